"""The monitor's view of one split virtqueue: what the driver publishes, checked as it appears.

A :class:`RingWatch` is attached when the device gets the queue and is *swept* whenever the
monitor hears from the driver (a kick, a register access, a config access) and before each
used-buffer notification. A sweep reads the ring through guest memory, never through the
device's own queue object, and never keeps a view of guest RAM (a vhost-user session unmaps
it at teardown):

1. the used ring since the last sweep: which published chains the device has used;
2. ``avail.flags`` (SPL-D-13 without EVENT_IDX: 0 or 1; SPL-D-14 with it: 0) and ``avail.idx``
   (SPL-D-11 / AV-01: never backwards, never more than the queue size ahead of used);
3. each new avail entry: the head (AV-03 below the size, AV-04 not in flight) and its chain,
   walked with the device end's own careful walker (:func:`virtqueue.walk.walk_chain`), so
   every descriptor rule (DC-, IN-; SPL-D-2/4/6/7/8/9) is graded with the same code that
   enforces it;
4. GEN-D-21: the descriptors and avail slot of every chain still exposed (published, not
   used) are read again and must be unchanged.

At attach: the queue configuration (CFG-01..05, CFG-07; SPL-D-1 alignment) and SPL-D-16 (the
driver zeroed ``used.flags`` when it allocated the used ring).

Limitation: a chain published, used by the device and reaped by the driver between two sweeps
is seen late, through descriptors the driver may already have reused. The simulated machine
sweeps before every kick and every interrupt, so that needs a driver that publishes without
kicking while the device is already draining the queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from device.monitor.grades import Ledger
from device.transport import RingConfig
from protocol.errors import GuestMemoryError
from protocol.split_ring import (
    AVAIL_ALIGN,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    DescFlags,
    avail_size,
    desc_table_size,
    used_size,
)
from virtqueue.chain import Segment
from virtqueue.layout import DESC, U16, USED_ELEM
from virtqueue.notify import kick_needed
from virtqueue.walk import walk_chain

__all__ = ["CHAIN_RULES", "INDIRECT_ONLY_RULES", "Published", "RingWatch", "Sweep"]

CHAIN_RULES = ("DC-01", "DC-02", "DC-04", "DC-05", "DC-06", "DC-07", "DC-08", "DC-09",
               "IN-01", "IN-02", "IN-03", "IN-04", "IN-05", "IN-06", "IN-07", "IN-08", "IN-09")
"""The descriptor rules every walked chain is graded against."""
INDIRECT_ONLY_RULES = frozenset({"IN-02", "IN-03", "IN-04", "IN-05", "IN-06", "IN-07", "IN-08",
                                 "IN-09"})
"""Rules about indirect tables: exercised only by a chain that uses one."""
SPEC_OF_RULE = {"DC-06": "SPL-D-2", "DC-09": "SPL-D-4", "DC-02": "SPL-D-4", "DC-04": "SPL-D-6",
                "IN-01": "SPL-D-7", "IN-06": "SPL-D-8", "IN-07": "SPL-D-9",
                "AV-01": "SPL-D-11"}
"""The spec requirement each peer-check rule implements (research/spec.md numbering)."""

_U64_END = 1 << 64
_INDIRECT = int(DescFlags.INDIRECT)
_NEXT = int(DescFlags.NEXT)
_SHOW = 8  # descriptors shown in evidence


@dataclass(slots=True)
class Published:
    """One chain the driver made available, as it was when the monitor first saw it."""

    queue: int
    slot: int
    """Free-running avail index of its entry."""
    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    indirect: bool
    descriptors: tuple[tuple[int, bytes], ...]
    """(guest address, 16 raw bytes) of every descriptor walked, for GEN-D-21."""
    data: bytes = b""
    """The device-readable bytes, read when the chain was first seen."""
    used_len: int | None = None

    @property
    def readable_len(self) -> int:
        return sum(s.len for s in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(s.len for s in self.writable)


class _Bounds:
    """What :func:`walk_chain` needs of RAM, reading copies (no view is ever kept)."""

    __slots__ = ("_memory",)

    def __init__(self, memory: Any) -> None:
        self._memory = memory

    def inside(self, addr: int, length: int) -> bool:
        return self._memory.contains(addr, length)

    def table(self, addr: int, length: int) -> tuple[bytes, int]:
        return self._memory.read(addr, length), 0


def describe_chain(descs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> list[str]:
    """Readable descriptors for evidence: ``addr/len/flags/next`` of the first few."""
    out = []
    for gpa, raw in list(descs)[:_SHOW]:
        addr, length, flags, nxt = DESC.unpack(raw)
        out.append(f"@{gpa:#x}: addr={addr:#x} len={length} flags={flags:#x} next={nxt}")
    if len(descs) > _SHOW:
        out.append(f"... {len(descs) - _SHOW} more")
    return out


@dataclass(slots=True)
class Sweep:
    """What one sweep found, in the order it happened: ``("published" | "used", chain)``."""

    events: list[tuple[str, Published]] = field(default_factory=list)

    @property
    def published(self) -> list[Published]:
        return [c for e, c in self.events if e == "published"]

    @property
    def used(self) -> list[Published]:
        return [c for e, c in self.events if e == "used"]


class RingWatch:
    """One attached queue as the monitor follows it (see the module docstring)."""

    def __init__(self, index: int, ring: RingConfig, memory: Any, *, event_idx: bool,
                 indirect: bool, max_size: int, ledger: Ledger, name: str) -> None:
        self.index = index
        self.ring = ring
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.name = name
        self.ledger = ledger
        self.size = ring.size
        self.usable = self._check_config(max_size)
        self.avail_seen = ring.next_avail
        self.used_seen = ring.next_used
        self.in_flight: dict[int, Published] = {}
        self.last_kick_avail: int = ring.next_avail
        self.kicks = 0
        self.chains = 0
        if self.usable:
            self._check_used_flags()

    # ---- attach --------------------------------------------------------------------------
    def _check_config(self, max_size: int) -> bool:
        r, led, q = self.ring, self.ledger, self.index
        n = r.size
        ok = led.check("CFG-01", isinstance(n, int) and 0 < n <= min(max_size, MAX_QUEUE_SIZE)
                       and n & (n - 1) == 0,
                       f"queue {q} ({self.name}) size {n} (QueueNumMax {max_size})",
                       queue=q, size=n, max_size=max_size)
        if not ok:
            return False
        areas = (("desc", r.desc, desc_table_size(n), DESC_ALIGN, "CFG-02"),
                 ("avail", r.avail, avail_size(n), AVAIL_ALIGN, "CFG-03"),
                 ("used", r.used, used_size(n), USED_ALIGN, "CFG-04"))
        for area, addr, length, align, rule in areas:
            aligned = addr % align == 0
            led.check(rule, aligned, f"queue {q} {area} area at {addr:#x} "
                      f"({'' if aligned else 'not '}{align}-byte aligned)",
                      queue=q, area=area, addr=addr, align=align)
            led.check("SPL-D-1", aligned, f"queue {q} {area} area at {addr:#x}, alignment "
                      f"{align}", queue=q, area=area, addr=addr, align=align)
            fits = addr + length <= _U64_END
            led.check("CFG-07", fits, f"queue {q} {area} area [{addr:#x}, +{length:#x})",
                      queue=q, area=area, addr=addr, len=length)
            inside = fits and self.memory.contains(addr, length)
            led.check("CFG-05", inside, f"queue {q} {area} area [{addr:#x}, +{length:#x}) "
                      f"{'is' if inside else 'is not'} inside guest RAM",
                      queue=q, area=area, addr=addr, len=length)
            ok = ok and inside
        return ok

    def _check_used_flags(self) -> None:
        flags = self._u16(self.ring.used + USED_FLAGS)
        self.ledger.check("SPL-D-16", flags == 0, f"queue {self.index} ({self.name}) "
                          f"used.flags = {flags} when the ring was handed to the device",
                          queue=self.index, used_flags=flags)

    # ---- sweeping ------------------------------------------------------------------------
    def sweep(self) -> Sweep:
        """Read what changed since the last sweep (see the module docstring)."""
        out = Sweep()
        if not self.usable:
            return out
        try:
            self._sweep(out)
        except GuestMemoryError:
            pass  # memory went away under us (a front-end leaving); nothing more to see
        return out

    def _u16(self, gpa: int) -> int:
        return U16.unpack(self.memory.read(gpa, 2))[0]

    def _sweep(self, out: Sweep) -> None:
        r, n = self.ring, self.size
        used_idx = self._u16(r.used + USED_IDX)
        pending = self._used_since(used_idx)
        idx = self._u16(r.avail + AVAIL_IDX)
        if idx != self.avail_seen:
            self._check_avail_flags()
            ahead = (idx - used_idx) & 0xFFFF
            new = (idx - self.avail_seen) & 0xFFFF
            if ahead > n or new > n:
                back = (self.avail_seen - idx) & 0xFFFF
                what = (f"moved backwards from {self.avail_seen} to {idx}" if back <= n
                        else f"jumped from {self.avail_seen} to {idx}")
                values = dict(queue=self.index, old=self.avail_seen, new=idx, used_idx=used_idx,
                              size=n)
                self.ledger.fail("AV-01", f"queue {self.index} avail.idx {what} (used.idx "
                                 f"{used_idx}, size {n})", **values)
                if back <= n:
                    self.ledger.fail("SPL-D-11", f"queue {self.index} avail.idx {what}",
                                     **values)
                self.avail_seen = idx  # follow the driver; later entries are judged from here
            else:
                evidence = f"queue {self.index} avail.idx {self.avail_seen} -> {idx}"
                self.ledger.ok("AV-01", evidence, queue=self.index, old=self.avail_seen, new=idx)
                self.ledger.ok("SPL-D-11", evidence, queue=self.index)
                for k in range(new):
                    slot = (self.avail_seen + k) & 0xFFFF
                    chain = self._published(slot, pending, out)
                    if chain is not None:
                        out.events.append(("published", chain))
                self.avail_seen = idx
        for _, head, length in pending:
            self._complete(head, length, out)
        self._check_exposed()

    def _used_since(self, used_idx: int) -> list[tuple[int, int, int]]:
        """Used elements written since the last sweep: (slot, id, len)."""
        count = (used_idx - self.used_seen) & 0xFFFF
        count = min(count, self.size)
        out = []
        for k in range(count):
            slot = (self.used_seen + k) & 0xFFFF
            raw = self.memory.read(self.ring.used + USED_RING + 8 * (slot % self.size), 8)
            head, length = USED_ELEM.unpack(raw)
            out.append((slot, head, length))
        self.used_seen = used_idx
        return out

    def _complete(self, head: int, length: int, out: Sweep) -> None:
        chain = self.in_flight.pop(head, None)
        if chain is not None:
            chain.used_len = length
            out.events.append(("used", chain))

    def _check_avail_flags(self) -> None:
        flags = self._u16(self.ring.avail)
        allowed = (0,) if self.event_idx else (0, 1)
        rule = "SPL-D-14" if self.event_idx else "SPL-D-13"
        self.ledger.check(rule, flags in allowed, f"queue {self.index} avail.flags = {flags} "
                          f"({'with' if self.event_idx else 'without'} EVENT_IDX)",
                          queue=self.index, avail_flags=flags, event_idx=self.event_idx)

    def _published(self, slot: int, pending: list[tuple[int, int, int]],
                   out: Sweep) -> Published | None:
        n, led, q = self.size, self.ledger, self.index
        head = self._u16(self.ring.avail + AVAIL_RING + 2 * (slot % n))
        if not led.check("AV-03", head < n, f"queue {q} avail slot {slot % n} names head "
                         f"{head} (size {n})", queue=q, head=head, size=n, slot=slot % n):
            return None
        if head in self.in_flight:
            done = next((p for p in pending if p[1] == head), None)
            if done is not None:  # used and republished between two sweeps
                pending.remove(done)
                self._complete(head, done[2], out)
        busy = head in self.in_flight
        if not led.check("AV-04", not busy, f"queue {q} head {head} made available "
                         + ("while still in flight" if busy else "(not in flight)"),
                         queue=q, head=head, slot=slot):
            return None
        table = self.memory.read(self.ring.desc, 16 * n)
        w = walk_chain(head, desc=table, size=n, ram=_Bounds(self.memory),
                       indirect=self.indirect)
        descs = self._descriptors(head, table)
        self.chains += 1
        shown = describe_chain(descs)
        if w.violation is not None:
            v = w.violation
            values = dict(queue=q, **{k: v for k, v in v.values.items()}, chain=shown)
            led.fail(v.rule_id, f"queue {q} ({self.name}) chain at head {head}: {v.message}",
                     **values)
            spec = SPEC_OF_RULE.get(v.rule_id)
            if spec is not None:
                led.fail(spec, f"queue {q} chain at head {head}: {v.message}", **values)
            return None
        for rule in CHAIN_RULES:
            if rule in INDIRECT_ONLY_RULES and not w.indirect:
                continue
            led.ok(rule, f"queue {q} ({self.name}) chain at head {head}: "
                   f"{len(w.readable)} readable, {len(w.writable)} writable"
                   f"{', indirect' if w.indirect else ''}", queue=q, head=head)
        for spec in ("SPL-D-2", "SPL-D-4", "SPL-D-6", "SPL-D-7", "SPL-D-8", "SPL-D-9"):
            if spec in ("SPL-D-8", "SPL-D-9") and not w.indirect:
                continue
            led.ok(spec, f"queue {q} chain at head {head} is well formed", queue=q, head=head)
        chain = Published(q, slot, head, tuple(w.readable), tuple(w.writable), w.indirect,
                          descs)
        chain.data = b"".join(self.memory.read(s.addr, s.len) for s in w.readable)
        self.in_flight[head] = chain
        return chain

    def _descriptors(self, head: int, table: bytes) -> tuple[tuple[int, bytes], ...]:
        """The raw descriptors of a chain (ring and one indirect table), bounded."""
        out = []
        base, buf, limit, i, seen = self.ring.desc, table, self.size, head, set()
        while len(out) <= self.size + 1 and i < limit and (base, i) not in seen:
            seen.add((base, i))
            raw = bytes(buf[16 * i:16 * i + 16])
            out.append((base + 16 * i, raw))
            addr, length, flags, nxt = DESC.unpack(raw)
            if flags & _INDIRECT and base == self.ring.desc and length and length % 16 == 0 \
                    and self.memory.contains(addr, length):
                base, buf, limit, i, seen = addr, self.memory.read(addr, length), length // 16, \
                    0, set()
                continue
            if not flags & _NEXT:
                break
            i = nxt
        return tuple(out)

    def _check_exposed(self) -> None:
        """GEN-D-21: exposed chains (published, not used) keep their descriptors."""
        for chain in self.in_flight.values():
            slot = self._u16(self.ring.avail + AVAIL_RING + 2 * (chain.slot % self.size))
            changed = [gpa for gpa, raw in chain.descriptors
                       if self.memory.read(gpa, 16) != raw]
            held = slot == chain.head and not changed
            evidence = (f"queue {self.index} exposed chain at head {chain.head} unchanged"
                        if held else f"queue {self.index} chain at head {chain.head} changed "
                        "while exposed (available, not yet used)")
            self.ledger.check("GEN-D-21", held, evidence, queue=self.index, head=chain.head,
                              avail_slot_now=slot,
                              changed_descriptors=[hex(g) for g in changed])

    def kicked(self) -> None:
        """A kick of this queue: remember where avail.idx stood (SPL-D-17/18 at the end)."""
        self.kicks += 1
        try:
            self.last_kick_avail = self._u16(self.ring.avail + AVAIL_IDX)
        except GuestMemoryError:
            pass

    def stranded(self) -> dict[str, int] | None:
        """Entries published after the last kick that the device never took, if the driver's
        own notification rule (SPL-D-17 / SPL-D-18) said it had to kick for them."""
        r = self.ring
        try:
            idx = self._u16(r.avail + AVAIL_IDX)
            used_idx = self._u16(r.used + USED_IDX)
            used_flags = self._u16(r.used + USED_FLAGS)
            avail_event = self._u16(r.used + USED_RING + 8 * self.size)
        except GuestMemoryError:
            return None
        since = (idx - self.last_kick_avail) & 0xFFFF
        late = [c.head for c in self.in_flight.values()
                if (c.slot - self.last_kick_avail) & 0xFFFF < since]
        if not since or not late:
            return None
        if not kick_needed(event_idx=self.event_idx, used_flags=used_flags,
                           avail_event=avail_event, old=self.last_kick_avail, new=idx):
            return None
        return {"queue": self.index, "avail_idx": idx, "avail_idx_at_last_kick":
                self.last_kick_avail, "used_idx": used_idx, "used_flags": used_flags,
                "avail_event": avail_event, "heads": late}
