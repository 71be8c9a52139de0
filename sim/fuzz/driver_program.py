"""Driver-mode fuzz cases: valid traffic from the driver end must round-trip exactly.

The input is a stream of decisions (:class:`~sim.fuzz.encoding.BytesChoices`) for a program of
:class:`~virtqueue.driver.DriverQueue` calls against a :class:`~virtqueue.device.DeviceQueue` on
the same (checked) memory: queue size, INDIRECT_DESC and EVENT_IDX, a starting index anywhere in
the 16-bit space, then rounds of "add some chains, pop them all, complete them in some order,
reap them all". Every chain the device pops must carry exactly the segments and bytes added, and
every ``get_buf`` must return the token and length the device pushed, in push order, with the
written bytes in the driver's buffers. The driver's free list is reused across rounds, so the
device sees descriptor chains linked in ever-changing orders.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import VballoonError
from sim.fuzz.encoding import BytesChoices
from sim.fuzz.memory import CheckingMemory, FuzzFailure
from virtqueue.cases import Geometry
from virtqueue.device import DeviceQueue
from virtqueue.driver import DriverQueue, QueueFull
from virtqueue.layout import split_layout

__all__ = ["run_driver_program"]

_GEOMETRY = Geometry(ram=((0, 1 << 20),))
_INDIRECT_AREA = (0x40000, 0x20000)
_ARENA = (0x80000, 0x100000)


def _fail(message: str) -> FuzzFailure:
    return FuzzFailure("fuzz.driver", message)


def run_driver_program(program: bytes) -> None:
    """Run the driver program ``program`` describes; :class:`FuzzFailure` on any difference."""
    memory = _GEOMETRY.memory()
    try:
        _run(BytesChoices(program), CheckingMemory(memory))
    except (FuzzFailure, AssertionError):
        raise
    except Exception as exc:  # noqa: BLE001 - valid traffic must never raise
        raise _fail(f"valid driver traffic raised {exc!r}") from exc
    finally:
        memory.close()


def _pattern(token: int, n: int) -> bytes:
    unit = token.to_bytes(4, "little") + b"\xa5\x5a"
    return (unit * (n // len(unit) + 1))[:n]


def _run(ch: BytesChoices, memory: CheckingMemory) -> None:
    size = 1 << ch.integer(0, 8)
    indirect, event_idx = ch.boolean(), ch.boolean()
    start = ch.integer(0, 0xFFFF)
    desc, avail, used, _ = split_layout(0, size)
    drv = DriverQueue(index=0, size=size, desc=desc, avail=avail, used=used, memory=memory,
                      event_idx=event_idx, indirect=indirect,
                      indirect_area=_INDIRECT_AREA if indirect else None, initial_idx=start)
    dev = DeviceQueue(index=0, size=size, desc=desc, avail=avail, used=used, memory=memory,
                      event_idx=event_idx, indirect=indirect, next_avail=start, next_used=start)
    memory.strict = True
    slot_entries = (_INDIRECT_AREA[1] // size) // 16
    token = 0
    for _ in range(ch.integer(1, 6)):
        pos = _ARENA[0]
        added: dict[int, tuple] = {}
        for _ in range(ch.integer(1, size)):
            pieces = [(ch.integer(0, 3), ch.integer(1, 200))
                      for _ in range(ch.integer(1, min(6, size)))]
            readable, writable, data = [], [], []
            for kind, n in pieces:  # kind 0: writable, else readable; readable ones first
                if pos + n + 16 > _ARENA[1]:
                    break
                (writable if kind == 0 else readable).append((pos + ch.integer(0, 15), n))
                pos += n + 16
            if not readable and not writable:
                break
            for addr, n in readable:
                blob = ch.data(n)
                memory.write(addr, blob)
                data.append(blob)
            use_indirect = (indirect and len(readable) + len(writable) <= slot_entries
                            and ch.boolean())
            try:
                head = drv.add(readable, writable, token, use_indirect=use_indirect)
            except QueueFull:
                break
            added[token] = (readable, writable, b"".join(data), use_indirect, head)
            token += 1
        drv.kick_prepare()
        popped = _pop(dev, memory, added)
        _complete(ch, dev, drv, memory, popped)


def _pop(dev: DeviceQueue, memory: CheckingMemory, added: dict) -> list[tuple[Any, int]]:
    popped = []
    for tok, (readable, writable, data, use_indirect, head) in added.items():
        chain = dev.pop()
        if chain is None:
            raise _fail(f"the device saw no chain for token {tok} (head {head})")
        got = (chain.head, [tuple(s) for s in chain.readable], [tuple(s) for s in chain.writable],
               chain.indirect)
        if got != (head, readable, writable, use_indirect) or chain.violation is not None:
            raise _fail(f"token {tok}: device chain {got} != added {(head, readable, writable)}")
        if chain.read(memory) != data:
            raise _fail(f"token {tok}: the readable bytes differ")
        popped.append((chain, tok))
    if dev.pop() is not None:
        raise _fail("the device popped a chain nobody added")
    return popped


def _complete(ch: BytesChoices, dev: DeviceQueue, drv: DriverQueue, memory: CheckingMemory,
              popped: list) -> None:
    order = []
    while popped:
        chain, tok = popped.pop(ch.integer(0, len(popped) - 1))
        written = ch.integer(0, chain.writable_len)
        if chain.write(memory, _pattern(tok, written)) != written:
            raise _fail(f"token {tok}: write() stored fewer bytes than asked")
        dev.push(chain.head, written)
        order.append((tok, written, chain))
    dev.needs_interrupt()
    for tok, written, chain in order:
        try:
            got = drv.get_buf()
        except VballoonError as exc:
            raise _fail(f"get_buf() refused a correct used ring: {exc}") from exc
        if got != (tok, written):
            raise _fail(f"get_buf() returned {got}, the device pushed {(tok, written)}")
        stored = b"".join(memory.read(s.addr, s.len) for s in chain.writable)[:written]
        if stored != _pattern(tok, written):
            raise _fail(f"token {tok}: the written bytes are not in the driver's buffers")
    if drv.get_buf() is not None:
        raise _fail("get_buf() returned a buffer the device never pushed")
