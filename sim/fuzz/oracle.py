"""A reference model of the device end: what popping a layout must give, under each policy.

This is a second, deliberately plain implementation of the documented behaviour of
:class:`virtqueue.device.DeviceQueue` (the check order of :mod:`virtqueue.walk`, the policies of
:mod:`virtqueue.policy`, the queue checks CFG-01..07), written from those docstrings and the
spec rather than from the code, without the fast path, memoryviews or precompiled parsers. The
fuzz harness runs both on every input and reports any difference.

The scenario it predicts is the one every fuzz case runs: build the queue, then call ``pop``
until it returns None or raises, pushing nothing. Memory is read through the real memory object
plus an overlay of the used-ring stores the device would make (under ``skip``/``truncate`` a
rejected chain is returned used, and a driver may have laid the used ring over other areas).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from protocol.split_ring import DescFlags, avail_size, desc_table_size, used_size
from virtqueue.cases import Geometry
from virtqueue.layout import is_queue_size
from virtqueue.policy import ErrorPolicy

__all__ = ["Expected", "ExpectedPop", "predict"]

_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_U64_END = 1 << 64
_TABLE_ENTRIES_MAX = 65536
_CHAIN_BYTES_MAX = 1 << 32
_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True, slots=True)
class ExpectedPop:
    """One chain ``pop`` must return (``violation`` set only under ``truncate``)."""

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    indirect: bool
    violation: str | None = None

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(slots=True)
class Expected:
    """What the run must show: chains, the rule raised, used entries stored, final state."""

    construct_rule: str | None = None
    """CFG-xx raised by the constructor (nothing else happens then)."""
    pops: list[ExpectedPop] = field(default_factory=list)
    raised: str | None = None
    """Rule raised by ``pop`` under ``needs-reset``."""
    used: list[tuple[int, int]] = field(default_factory=list)
    """(id, len) stored in the used ring by ``pop`` itself (chains returned unused)."""
    next_avail: int = 0
    broken: bool = False


class _Overlay:
    """Memory reads with the model's own used-ring stores applied on top.

    Stores only ever go to the used ring, so they are kept in a shadow of that area and only
    reads that overlap it (rings laid over each other) pay for the patching.
    """

    def __init__(self, memory: Any, used: int, used_len: int) -> None:
        self._memory = memory
        self._lo, self._hi = used, used + used_len
        self._shadow = bytearray(used_len)
        self._written = bytearray(used_len)
        self._dirty = False

    def read(self, gpa: int, n: int) -> bytes:
        if not self._dirty or gpa + n <= self._lo or gpa >= self._hi:
            return self._memory.read(gpa, n)
        data = bytearray(self._memory.read(gpa, n))
        for k in range(max(gpa, self._lo), min(gpa + n, self._hi)):
            if self._written[k - self._lo]:
                data[k - gpa] = self._shadow[k - self._lo]
        return bytes(data)

    def store(self, gpa: int, blob: bytes) -> None:
        off = gpa - self._lo
        self._shadow[off:off + len(blob)] = blob
        self._written[off:off + len(blob)] = b"\1" * len(blob)
        self._dirty = True


def _u16(mem: _Overlay, gpa: int) -> int:
    return int.from_bytes(mem.read(gpa, 2), "little")


def _in_one_region(geometry: Geometry, addr: int, n: int) -> bool:
    return any(g <= addr and addr + n <= g + s for g, s in geometry.ram)


def _config_rule(size: int, desc: int, avail: int, used: int, geometry: Geometry,
                 max_size: int) -> str | None:
    if not is_queue_size(size) or size > max_size:
        return "CFG-01"
    for addr, length, align, rule in ((desc, desc_table_size(size), 16, "CFG-02"),
                                      (avail, avail_size(size), 2, "CFG-03"),
                                      (used, used_size(size), 4, "CFG-04")):
        if addr % align:
            return rule
        if addr + length > _U64_END:
            return "CFG-07"
        if not _in_one_region(geometry, addr, length):
            return "CFG-05"
    return None


def _walk(mem: _Overlay, geometry: Geometry, size: int, desc: int, head: int,
          negotiated: bool) -> tuple[list, list, bool, str | None]:
    """The chain at ``head``: readable, writable, indirect?, first broken rule (or None)."""
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    table, limit, in_table, indirect = mem.read(desc, 16 * size), size, False, False
    seen: set[int] = set()
    i, total = head, 0
    while True:
        addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)
        seen.add(i)
        if flags & _INDIRECT:
            for broken, rule in ((in_table, "IN-06"), (not negotiated, "IN-01"),
                                 (flags & _NEXT, "IN-07"), (length == 0, "IN-02"),
                                 (length % 16, "IN-03"),
                                 (length // 16 > _TABLE_ENTRIES_MAX, "IN-04"),
                                 (addr + length > _U64_END
                                  or not geometry.inside(addr, length), "IN-05")):
                if broken:
                    return readable, writable, indirect, rule
            table, limit, in_table, indirect = mem.read(addr, length), length // 16, True, True
            seen, i = set(), 0
            continue
        for broken, rule in ((len(readable) + len(writable) >= size, "DC-04"),
                             (length == 0, "DC-05"), (addr + length > _U64_END, "DC-08"),
                             (not geometry.inside(addr, length), "DC-07"),
                             (not flags & _WRITE and writable, "DC-06"),
                             (total + length > _CHAIN_BYTES_MAX, "DC-09")):
            if broken:
                return readable, writable, indirect, rule
        (writable if flags & _WRITE else readable).append((addr, length))
        total += length
        if not flags & _NEXT:
            return readable, writable, indirect, None
        if nxt >= limit:
            return readable, writable, indirect, "IN-09" if in_table else "DC-01"
        if nxt in seen:
            return readable, writable, indirect, "IN-08" if in_table else "DC-02"
        i = nxt


def predict(memory: Any, *, geometry: Geometry, size: int, desc: int, avail: int, used: int,
            start: int, indirect: bool, policy: ErrorPolicy,
            max_size: int = 32768) -> Expected:
    """What ``pop`` until None or an exception must give (see the module docstring)."""
    out = Expected(next_avail=start)
    out.construct_rule = _config_rule(size, desc, avail, used, geometry, max_size)
    if out.construct_rule is not None:
        return out
    mem = _Overlay(memory, used, used_size(size))
    in_flight: set[int] = set()
    na, next_used = start, start
    while True:  # one iteration per pop() call; the run stops at the first None or raise
        chain = None
        for _ in range(size + 1):  # a pop consumes at most the N pending entries
            idx = _u16(mem, avail + 2)
            pending = (idx - na) & 0xFFFF
            if pending == 0:
                break
            if pending > size:  # AV-01: nothing consumed; needs-reset raises, others wait
                if policy is ErrorPolicy.NEEDS_RESET:
                    out.raised, out.broken = "AV-01", True
                break
            head = _u16(mem, avail + 4 + 2 * (na % size))
            if head >= size or head in in_flight:
                if policy is ErrorPolicy.NEEDS_RESET:
                    out.raised, out.broken = ("AV-03" if head >= size else "AV-04"), True
                    break
                na = (na + 1) & 0xFFFF  # consumed, nothing returned
                continue
            readable, writable, ind, rule = _walk(mem, geometry, size, desc, head, indirect)
            if rule is not None and policy is ErrorPolicy.NEEDS_RESET:
                out.raised, out.broken = rule, True
                break
            na = (na + 1) & 0xFFFF
            if rule is None or (policy is ErrorPolicy.TRUNCATE and (readable or writable)):
                chain = ExpectedPop(head, tuple(readable), tuple(writable), ind, rule)
                break
            # skip (or truncate with nothing valid): returned used with length 0
            mem.store(used + 4 + 8 * (next_used % size), struct.pack("<II", head, 0))
            out.used.append((head, 0))
            next_used = (next_used + 1) & 0xFFFF
            mem.store(used + 2, struct.pack("<H", next_used))
        if chain is None:
            break
        out.pops.append(chain)
        in_flight.add(chain.head)
    out.next_avail = na
    return out
