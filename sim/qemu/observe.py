"""Watching our driver's rings on QEMU's RAM: the chains it publishes and the interrupts QEMU skips.

Two observers that never change what the driver or QEMU does; they only read guest RAM and
InterruptStatus over qtest, like a logic analyser on the bus:

- :class:`ChainTap` is a write observer of :class:`~sim.qemu.memory.QtestMemory`. Each time the
  driver writes an ``avail.ring`` slot of a tapped queue (the moment a chain is published, just
  before ``avail.idx`` and the kick), it reads the chain back from RAM exactly as the device will
  (head descriptor, then the indirect table or the NEXT chain) and records a :class:`Chain`.
  So "the reporting chain went indirect" is a fact read from QEMU's memory, not a driver flag.
- :class:`KickCounter` sits between the transport and the bus and counts QueueNotify writes.
- :class:`WatchedInterruptLine` is the driver's interrupt line (it polls InterruptStatus like
  ``guest.irq.PollingInterruptLine``) and also keeps score: interrupts taken by kind, and used
  buffers QEMU returned on watched queues *without* raising an interrupt while the driver's
  ``used_event`` said none was needed (virtio §2.7.7.2: VIRTIO_F_EVENT_IDX suppression).

How suppression is proven (no timing guess): within one :meth:`WatchedInterruptLine.wait` call
nobody acknowledges interrupts (only the driver's dispatcher does, after ``wait`` returns). Each
poll reads the queue's used index first, then InterruptStatus. A buffer whose index was visible
at poll *k-1* was pushed before that read, and QEMU notifies right after pushing; if poll *k*
(at least one poll period later, with no acknowledgement in between) still reads
InterruptStatus 0, QEMU did not interrupt for it. Those buffers are counted as suppressed when
``vring_need_event(used_event, new, old)`` is false for them, i.e. the driver's event index asked
for no interrupt.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol.errors import UsageError
from protocol.mmio import InterruptBit, MmioReg
from protocol.split_ring import AVAIL_RING, USED_IDX, DescFlags, used_event_offset
from virtqueue.layout import DESC
from virtqueue.notify import vring_need_event

__all__ = ["Chain", "ChainTap", "KickCounter", "QueueScore", "WatchedInterruptLine"]

_U16 = struct.Struct("<H")
_INDIRECT = int(DescFlags.INDIRECT)
_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)


class KickCounter:
    """An ``MmioBus`` pass-through that counts QueueNotify writes per queue: the kicks the
    driver actually made (with EVENT_IDX it skips those the device's ``avail_event`` says it
    does not need)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.kicks: Counter[int] = Counter()

    def read32(self, offset: int) -> int:
        return self.bus.read32(offset)

    def write32(self, offset: int, value: int) -> None:
        if offset == MmioReg.QUEUE_NOTIFY:
            self.kicks[value & 0xFFFF] += 1
        self.bus.write32(offset, value)


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain as published in guest RAM: ``segments`` are ``(addr, len, writable)``."""

    queue: str
    head: int
    indirect: bool
    segments: tuple[tuple[int, int, bool], ...]
    out_data: bytes = b""
    """The first bytes (at most 16) of the first device-readable segment (command IDs)."""

    @property
    def nbytes(self) -> int:
        return sum(length for _, length, _ in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "head": self.head, "indirect": self.indirect,
                "entries": len(self.segments), "bytes": self.nbytes}


class ChainTap:
    """Record every chain the driver publishes on the tapped queues (see module docstring).

    Args:
        memory: QEMU's guest RAM (needs ``add_write_observer`` and ``read``).
    """

    def __init__(self, memory: Any) -> None:
        self.memory = memory
        self._queues: list[tuple[str, Any]] = []
        self.chains: list[Chain] = []
        memory.add_write_observer(self._on_write)

    def tap(self, name: str, ring: Any) -> None:
        """Start recording chains of ``ring`` (a ``virtqueue.driver.DriverQueue``)."""
        self._queues.append((name, ring))

    def close(self) -> None:
        """Stop observing the memory."""
        try:
            self.memory.remove_write_observer(self._on_write)
        except ValueError:
            pass

    def of(self, name: str) -> list[Chain]:
        return [c for c in self.chains if c.queue == name]

    def _on_write(self, gpa: int, n: int) -> None:
        for name, ring in self._queues:
            start = ring.avail + AVAIL_RING
            if start <= gpa < start + 2 * ring.size and n == 2:
                head = _U16.unpack(self.memory.read(gpa, 2))[0]
                self.chains.append(self._read_chain(name, ring, head))

    def _read_chain(self, name: str, ring: Any, head: int) -> Chain:
        if head >= ring.size:
            return Chain(name, head, False, ())
        addr, length, flags, nxt = DESC.unpack(self.memory.read(ring.desc + 16 * head, 16))
        indirect = bool(flags & _INDIRECT)
        if indirect:
            count = min(length // 16, ring.size)
            table = self.memory.read(addr, 16 * count) if count else b""
            descs = [DESC.unpack_from(table, 16 * i) for i in range(count)]
        else:
            descs = [(addr, length, flags, nxt)]
            while flags & _NEXT and len(descs) < ring.size:
                addr, length, flags, nxt = DESC.unpack(self.memory.read(ring.desc + 16 * nxt, 16))
                descs.append((addr, length, flags, nxt))
        segments = tuple((a, n, bool(f & _WRITE)) for a, n, f, _ in descs)
        out = b""
        readable = [(a, n) for a, n, w in segments if not w and n]
        if readable:
            out = self.memory.read(readable[0][0], min(16, readable[0][1]))
        return Chain(name, head, indirect, segments, out)


@dataclass(slots=True)
class QueueScore:
    """What :class:`WatchedInterruptLine` saw of one watched queue."""

    name: str
    used_seen: int = 0
    """Used buffers seen returned while watching (by used index)."""
    suppressed: int = 0
    """Used buffers proven returned without an interrupt the event index did not ask for."""
    used_events: set[int] = field(default_factory=set)
    """``used_event`` values the driver had published during the proofs."""

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.name, "used_seen": self.used_seen, "suppressed": self.suppressed,
                "used_event": sorted(self.used_events)}


class WatchedInterruptLine:
    """The driver's interrupt line on QEMU: polls InterruptStatus and keeps score.

    Args:
        source: what to poll (the transport: ``read_interrupt_status()``).
        memory: guest RAM, to read watched rings' used index and ``used_event``.
        period: seconds between polls (QEMU runs in real time; this is the one clock sleep).
    """

    def __init__(self, source: Any, memory: Any, *, period: float = 0.001) -> None:
        if not period > 0:
            raise UsageError(f"poll period must be positive, not {period!r}")
        self.source = source
        self.memory = memory
        self.period = period
        self._watched: list[tuple[QueueScore, Any]] = []
        self._last: list[int] = []
        self.polls = 0
        self.interrupts = 0
        self.vring = 0
        """Interrupts seen with the used-buffer bit set."""
        self.config = 0
        """Interrupts seen with the configuration-change bit set."""

    def watch(self, name: str, ring: Any) -> QueueScore:
        """Also watch ``ring`` (a ``DriverQueue``) for suppressed interrupts."""
        score = QueueScore(name)
        self._watched.append((score, ring))
        self._last.append(self._used_idx(ring))
        return score

    def scores(self) -> list[QueueScore]:
        return [score for score, _ in self._watched]

    def _used_idx(self, ring: Any) -> int:
        return _U16.unpack(self.memory.read(ring.used + USED_IDX, 2))[0]

    def _used_event(self, ring: Any) -> int:
        return _U16.unpack(self.memory.read(ring.avail + used_event_offset(ring.size), 2))[0]

    def _sample(self) -> list[tuple[int, int]]:
        """(used idx, used_event) of every watched ring, read before InterruptStatus."""
        return [(self._used_idx(ring), self._used_event(ring)) for _, ring in self._watched]

    async def wait(self) -> None:
        proven: list[int] | None = None  # per queue: used idx up to which buffers are judged
        previous: list[tuple[int, int]] | None = None
        while True:
            sample = self._sample()
            status = self.source.read_interrupt_status() & 0x3
            self.polls += 1
            for i, (score, _) in enumerate(self._watched):
                score.used_seen += (sample[i][0] - self._last[i]) & 0xFFFF
                self._last[i] = sample[i][0]
            if proven is None or len(proven) != len(sample):  # first poll, or a new watch
                proven, previous = [used for used, _ in sample], None
            elif previous is not None and not status & InterruptBit.VRING:
                self._credit(proven, previous, sample)
            if status:
                self.interrupts += 1
                self.vring += bool(status & InterruptBit.VRING)
                self.config += bool(status & InterruptBit.CONFIG)
                await trio.lowlevel.checkpoint()
                return
            previous = sample
            await trio.sleep(self.period)

    def _credit(self, proven: list[int], previous: list[tuple[int, int]],
                now: list[tuple[int, int]]) -> None:
        """No used-buffer interrupt a poll period after ``previous`` was read: the buffers
        pushed between ``proven`` and ``previous`` were returned without one. Count them when
        the driver's ``used_event`` (unchanged over the span) asked for none."""
        for i, (score, _) in enumerate(self._watched):
            old, (new, event) = proven[i], previous[i]
            if new == old:
                continue
            if now[i][1] == event and not vring_need_event(event, new, old):
                score.suppressed += (new - old) & 0xFFFF
                score.used_events.add(event)
            proven[i] = new
