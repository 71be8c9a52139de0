"""The careful chain walker: every descriptor rule of virtio §2.7.4-§2.7.5.3, in a fixed order.

The device end first tries a fast walk that only recognises well-formed chains; anything odd
sends it here, and what this walker says is authoritative (it re-reads the descriptors once, so
the chain it returns is built from exactly the bytes it checked). It stops at the first broken
rule and returns the valid prefix with the violation; :mod:`virtqueue.policy` decides what
the queue does with that.

Checks, per descriptor, in this order (rule IDs from :mod:`protocol.rules`):

* a descriptor with INDIRECT: IN-06 (inside a table), IN-01 (feature not negotiated), IN-07
  (NEXT too), IN-02 (len 0), IN-03 (len not a multiple of 16), IN-04 (more than 65536 entries),
  IN-05 (table not inside RAM, or addr + len overflowing 64 bits). Its WRITE flag is ignored
  (SPL-V-3), and direct descriptors before it are fine (SPL-V-4).
* a buffer: DC-04 (would be buffer N + 1 of the chain, counting table entries), DC-05 (len 0),
  DC-08 (addr + len overflows 64 bits), DC-07 (not inside RAM), DC-06 (readable after
  writable), DC-09 (chain total above 2^32 bytes).
* its link, if NEXT: DC-01 / IN-09 (next >= queue size / table entries), DC-02 / IN-08 (next
  is a descriptor this chain already visited: a loop).

A walk visits at most N + 2 descriptors: N buffers, one INDIRECT descriptor and the one that
breaks DC-04; a loop is caught at its first repeated index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.errors import DriverViolation
from protocol.rules import RULES
from protocol.split_ring import DescFlags
from virtqueue.chain import Segment
from virtqueue.layout import DESC

__all__ = ["INDIRECT_MAX_ENTRIES", "RamBounds", "Walk", "driver_violation", "walk_chain"]

INDIRECT_MAX_ENTRIES = 65536
"""Most entries an indirect table may have (Linux vhost and rust-vmm: ``len / 16 <= 65536``)."""
CHAIN_MAX_BYTES = 1 << 32
"""Most bytes a chain may hold in total (§2.7.5.2)."""
_U64_END = 1 << 64
_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)
_INDIRECT = int(DescFlags.INDIRECT)


def driver_violation(rule_id: str, message: str, **values: Any) -> DriverViolation:
    """A DriverViolation for ``rule_id`` with its spec section from :data:`protocol.rules.RULES`."""
    return DriverViolation(rule_id=rule_id, section=RULES[rule_id].section, message=message,
                           **values)


class RamBounds:
    """Fast "is this range guest RAM" for one memory, and access to indirect tables.

    With a single RAM region (the common case), ``lo <= addr and addr + len <= hi`` is the whole
    check (``exact`` is True) and tables are read through one memoryview of the region. With
    several regions (holes, vhost-user tables) ``lo``/``hi`` are only the outer bounds and
    :meth:`contains` asks the memory.
    """

    __slots__ = ("contains", "exact", "hi", "lo", "_memory", "_view")

    def __init__(self, memory: Any) -> None:
        self._memory = memory
        self.contains = memory.contains
        regions = tuple(getattr(memory, "regions", ()))
        self._view = None
        if len(regions) == 1 and hasattr(memory, "view"):
            region = regions[0]
            self.lo, self.hi, self.exact = region.gpa, region.gpa + region.size, True
            self._view = memory.view(region.gpa, region.size)
        elif regions:
            self.lo = min(r.gpa for r in regions)
            self.hi = max(r.gpa + r.size for r in regions)
            self.exact = False
        else:
            self.lo, self.hi, self.exact = 0, _U64_END, False

    def table(self, addr: int, length: int) -> tuple[Any, int]:
        """``(buffer, offset)`` to unpack an indirect table at ``addr`` (already checked in RAM).

        Single region: the live region view (descriptors are read once each, like QEMU).
        Otherwise: a copy of the table taken now.
        """
        if self._view is not None:
            return self._view, addr - self.lo
        return self._memory.read(addr, length), 0

    def inside(self, addr: int, length: int) -> bool:
        """Whether [addr, addr + length) is RAM (length > 0)."""
        if addr < self.lo or addr + length > self.hi:
            return False
        return self.exact or self.contains(addr, length)


@dataclass(slots=True)
class Walk:
    """What :func:`walk_chain` found: the valid prefix and the first violation (or None)."""

    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0
    indirect: bool = False
    violation: DriverViolation | None = None
    visited: int = 0
    """Descriptors read, INDIRECT ones included (for the step bound)."""

    @property
    def empty(self) -> bool:
        return not self.readable and not self.writable


def walk_chain(head: int, *, desc: Any, size: int, ram: RamBounds, indirect: bool) -> Walk:
    """Walk the chain at ``head`` (< ``size``) of descriptor table ``desc``; see module doc.

    Args:
        head: head index, already checked against the queue size (AV-03).
        desc: buffer holding the descriptor table (16 * size bytes).
        size: the queue size N.
        ram: bounds of guest RAM.
        indirect: whether VIRTIO_F_INDIRECT_DESC was negotiated.
    """
    w = Walk()
    buf, base, limit = desc, 0, size
    table: int | None = None  # address of the indirect table once inside it
    seen: set[int] = set()
    i = head
    segs = 0
    while True:
        addr, length, flags, nxt = DESC.unpack_from(buf, base + 16 * i)
        w.visited += 1
        seen.add(i)
        where: dict[str, Any] = {"head": head, "index": i}
        if table is not None:
            where["table"] = table
        if flags & _INDIRECT:
            v = _check_indirect(addr, length, flags, table is not None, indirect, ram, where)
            if v is not None:
                w.violation = v
                return w
            buf, base = ram.table(addr, length)
            limit, table, i = length // 16, addr, 0
            seen = set()
            w.indirect = True
            continue
        v = _check_buffer(addr, length, flags, segs, size, w, ram, where)
        if v is not None:
            w.violation = v
            return w
        seg = Segment(addr, length)
        if flags & _WRITE:
            w.writable.append(seg)
            w.writable_len += length
        else:
            w.readable.append(seg)
            w.readable_len += length
        segs += 1
        if not flags & _NEXT:
            return w
        if nxt >= limit:
            if table is None:
                w.violation = driver_violation(
                    "DC-01", "a descriptor's next is not below the queue size",
                    **where, next=nxt, size=size)
            else:
                w.violation = driver_violation(
                    "IN-09", "an indirect descriptor's next is not below the table's entry count",
                    **where, next=nxt, entries=limit)
            return w
        if nxt in seen:
            if table is None:
                w.violation = driver_violation(
                    "DC-02", "the chain loops back to a descriptor it already visited",
                    **where, next=nxt)
            else:
                w.violation = driver_violation(
                    "IN-08", "the chain inside an indirect table loops back to an entry it "
                    "already visited", **where, next=nxt, entries=limit)
            return w
        i = nxt


def _check_indirect(addr: int, length: int, flags: int, in_table: bool, negotiated: bool,
                    ram: RamBounds, where: dict[str, Any]) -> DriverViolation | None:
    if in_table:
        return driver_violation("IN-06", "an indirect table holds an INDIRECT descriptor",
                                **where, flags=flags)
    if not negotiated:
        return driver_violation("IN-01", "INDIRECT is set but VIRTIO_F_INDIRECT_DESC was not "
                                "negotiated", **where, flags=flags)
    if flags & _NEXT:
        return driver_violation("IN-07", "a descriptor has both INDIRECT and NEXT", **where,
                                flags=flags)
    if length == 0:
        return driver_violation("IN-02", "an indirect table is empty", **where, addr=addr, len=0)
    if length % 16:
        return driver_violation("IN-03", "an indirect table's length is not a multiple of 16",
                                **where, addr=addr, len=length)
    if length // 16 > INDIRECT_MAX_ENTRIES:
        return driver_violation("IN-04", "an indirect table has more than 65536 entries",
                                **where, addr=addr, len=length)
    if addr + length > _U64_END or not ram.inside(addr, length):
        return driver_violation("IN-05", "an indirect table is not inside guest RAM", **where,
                                addr=addr, len=length)
    return None


def _check_buffer(addr: int, length: int, flags: int, segs: int, size: int, w: Walk,
                  ram: RamBounds, where: dict[str, Any]) -> DriverViolation | None:
    if segs >= size:
        return driver_violation("DC-04", "the chain is longer than the queue size", **where,
                                size=size)
    if length == 0:
        return driver_violation("DC-05", "a descriptor has length 0", **where, addr=addr)
    if addr + length > _U64_END:
        return driver_violation("DC-08", "a buffer's addr + len overflows 64 bits", **where,
                                addr=addr, len=length)
    if not ram.inside(addr, length):
        return driver_violation("DC-07", "a buffer is not inside guest RAM", **where, addr=addr,
                                len=length)
    if not flags & _WRITE and w.writable:
        return driver_violation("DC-06", "a device-readable descriptor follows a device-writable "
                                "one", **where, flags=flags)
    total = w.readable_len + w.writable_len + length
    if total > CHAIN_MAX_BYTES:
        return driver_violation("DC-09", "the chain's total length exceeds 2^32 bytes", **where,
                                total=total)
    return None
