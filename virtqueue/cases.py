"""Descriptor-layout cases: what to write into guest memory, and what the device end must do.

A :class:`Layout` is one split-ring situation frozen as data: ring addresses, the descriptor
table, the avail ring entries and idx, indirect tables and buffer contents, the negotiated
INDIRECT_DESC feature, and the expected outcome under the ``needs-reset`` policy when every
available chain is popped without pushing any:

* a valid layout lists the chains the device must hand out (:class:`ExpectedChain`: head,
  segments, readable bytes) and ``rule`` is None;
* a near-valid layout is a valid one with exactly one mutation from research/peers.md §8 (see
  :data:`MUTATIONS`): ``rule`` is the rule ID the device must raise and ``expected`` the chains
  popped before it;
* an arbitrary layout (raw, biased field values) has ``expected`` None: only a reference model
  can say what the device must do.

The builders draw every decision from a :class:`Choices` source, so the same code serves
Hypothesis (:mod:`virtqueue.strategies`), seeded ``random`` (fuzz corpus seeds) and a fuzzer's
input bytes (:mod:`sim.fuzz`). The builders live in :mod:`virtqueue.strategies`; this module
holds the values and the geometry they live in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.errors import UsageError
from protocol.split_ring import AVAIL_IDX, AVAIL_RING, USED_IDX, avail_size, used_size
from virtqueue.device import DeviceQueue
from virtqueue.layout import U16
from virtqueue.memory import PAGE_SIZE, GuestMemory
from virtqueue.policy import ErrorPolicy

__all__ = [
    "MUTATIONS",
    "Choices",
    "ExpectedChain",
    "Geometry",
    "Layout",
    "RandomChoices",
]

_U64_END = 1 << 64

MUTATIONS: dict[str, str] = {
    "next_out_of_range": "DC-01",
    "loop": "DC-02",
    "too_long": "DC-04",
    "zero_length": "DC-05",
    "readable_after_writable": "DC-06",
    "outside_ram": "DC-07",
    "addr_len_overflow": "DC-08",
    "chain_too_big": "DC-09",
    "indirect_without_feature": "IN-01",
    "table_len_zero": "IN-02",
    "table_len_unaligned": "IN-03",
    "table_too_big": "IN-04",
    "table_outside_ram": "IN-05",
    "nested_indirect": "IN-06",
    "indirect_with_next": "IN-07",
    "table_loop": "IN-08",
    "table_next_out_of_range": "IN-09",
    "avail_idx_jump": "AV-01",
    "head_out_of_range": "AV-03",
    "duplicate_head": "AV-04",
}
"""Mutation kind -> the rule ID (:data:`protocol.rules.RULES`) the device must report."""


class Choices(Protocol):
    """A source of decisions: Hypothesis ``draw``, ``random.Random`` or fuzzer bytes."""

    def integer(self, lo: int, hi: int) -> int:
        """An int in [lo, hi] (inclusive); sources shrink towards ``lo``."""
        ...

    def boolean(self) -> bool: ...

    def data(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""
        ...


class RandomChoices:
    """:class:`Choices` from a seeded :class:`random.Random` (reproducible corpus seeds)."""

    def __init__(self, seed: int | str | bytes = 0) -> None:
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def boolean(self) -> bool:
        return self._rng.random() < 0.5

    def data(self, n: int) -> bytes:
        return self._rng.randbytes(n)


def choose(ch: Choices, seq: Sequence[Any]) -> Any:
    """One element of ``seq`` (shrinks towards the first)."""
    return seq[ch.integer(0, len(seq) - 1)]


def permutation(ch: Choices, seq: Sequence[Any]) -> list[Any]:
    """A permutation of ``seq`` drawn with Fisher-Yates (identity when every draw is minimal)."""
    out = list(seq)
    for i in range(len(out) - 1):
        k = ch.integer(i, len(out) - 1)
        out[i], out[k] = out[k], out[i]
    return out


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where a layout lives: RAM regions, the arena rings and buffers go in, non-RAM ranges.

    Args:
        ram: ``(gpa, length)`` RAM regions, page aligned, sorted, disjoint.
        arena: ``(lo, hi)`` inside one region where rings, tables and buffers are placed
            (default: the largest region).
        outside: ``(lo, hi)`` address ranges that are not RAM, from which mutations pick bad
            addresses (default: every gap below 2^64). A peer whose non-RAM space has side
            effects (MMIO) narrows this to harmless ranges.
    """

    ram: tuple[tuple[int, int], ...] = ((0, 1 << 20),)
    arena: tuple[int, int] | None = None
    outside: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        prev_end = -1
        for gpa, length in self.ram:
            if gpa % PAGE_SIZE or length <= 0 or length % PAGE_SIZE or gpa < prev_end:
                raise UsageError(f"RAM regions must be page aligned, sorted and disjoint: "
                                 f"{self.ram}")
            prev_end = gpa + length
        lo, hi = self.arena_range
        if not self.inside(lo, hi - lo):
            raise UsageError(f"arena {lo:#x}-{hi:#x} is not inside one RAM region")

    @property
    def arena_range(self) -> tuple[int, int]:
        if self.arena is not None:
            return self.arena
        gpa, length = max(self.ram, key=lambda r: r[1])
        return gpa, gpa + length

    @property
    def outside_ranges(self) -> tuple[tuple[int, int], ...]:
        if self.outside is not None:
            return self.outside
        gaps, pos = [], 0
        for gpa, length in self.ram:
            if gpa > pos:
                gaps.append((pos, gpa))
            pos = gpa + length
        if pos < _U64_END:
            gaps.append((pos, _U64_END))
        return tuple(gaps)

    def inside(self, addr: int, length: int) -> bool:
        """Whether [addr, addr + length) is RAM (regions may be adjacent)."""
        pos, end = addr, addr + length
        for gpa, size in self.ram:
            if gpa <= pos < gpa + size:
                pos = gpa + size
                if pos >= end:
                    return True
        return length == 0 and any(g <= addr < g + s for g, s in self.ram)

    def memory(self) -> GuestMemory:
        """Fresh (zeroed, sparse) guest RAM with exactly these regions."""
        base = self.ram[0][0]
        end = self.ram[-1][0] + self.ram[-1][1]
        holes, pos = [], base
        for gpa, length in self.ram:
            if gpa > pos:
                holes.append((pos, gpa - pos))
            pos = gpa + length
        return GuestMemory.create(end - base, base=base, holes=holes, name="vballoon-case")

    def outside_address(self, ch: Choices, length: int) -> int:
        """An address where ``length`` (> 0) bytes are not all RAM and addr + length <= 2^64.

        Either straddles the end of a region into a non-RAM range, or lies in one.
        """
        ranges = [(lo, hi) for lo, hi in self.outside_ranges if hi - lo >= length]
        ends = {gpa + size: (gpa, size) for gpa, size in self.ram}
        straddle = [lo for lo, _ in self.outside_ranges if lo in ends]
        if length >= 2 and straddle and (not ranges or ch.boolean()):
            end = choose(ch, straddle)
            return end - ch.integer(1, min(length - 1, ends[end][1]))
        if not ranges:
            raise UsageError(f"no non-RAM range holds {length} bytes")
        lo, hi = choose(ch, ranges)
        if ch.boolean():
            return lo + ch.integer(0, min(hi - lo - length, 0xFFFF))
        return hi - length - ch.integer(0, min(hi - lo - length, 0xFFFF))


@dataclass(frozen=True, slots=True)
class ExpectedChain:
    """A chain the device must hand out: its head, segments, readable bytes and token."""

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]
    data: bytes
    """The readable bytes, concatenated in chain order."""
    indirect: bool
    token: int
    """Its position among the available entries (what a driver's get_buf would return)."""

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(frozen=True, slots=True)
class Layout:
    """One split-ring situation and its expected outcome (module docstring).

    ``entries`` go to avail slots ``(start + k) % size``; the device starts with ``next_avail``
    and ``next_used`` at ``start``. ``writes`` are ``(gpa, bytes)`` stored after the rings.
    """

    size: int
    geometry: Geometry
    desc: int
    avail: int
    used: int
    table: bytes
    start: int
    entries: tuple[int, ...]
    avail_idx: int
    avail_flags: int = 0
    writes: tuple[tuple[int, bytes], ...] = ()
    indirect: bool = False
    expected: tuple[ExpectedChain, ...] | None = ()
    rule: str | None = None
    label: str = "valid"

    @property
    def pending(self) -> int:
        """Entries the device sees as available: ``(avail_idx - start) mod 2^16``."""
        return (self.avail_idx - self.start) & 0xFFFF

    @property
    def valid(self) -> bool:
        return self.expected is not None and self.rule is None

    def write_into(self, memory: Any, *, strict: bool = True) -> None:
        """Store the rings, tables and buffers; the used ring is zeroed with idx = start.

        With ``strict=False`` pieces that are not inside RAM are left out (raw fuzz inputs
        whose rings are bad: the queue's constructor is what is tested then).
        """
        n = self.size
        avail = bytearray(avail_size(n))
        U16.pack_into(avail, 0, self.avail_flags)
        U16.pack_into(avail, AVAIL_IDX, self.avail_idx)
        for k, head in enumerate(self.entries):
            U16.pack_into(avail, AVAIL_RING + 2 * ((self.start + k) % n), head)
        used = bytearray(used_size(n))
        U16.pack_into(used, USED_IDX, self.start)
        pieces = ((self.desc, self.table), (self.avail, bytes(avail)), (self.used, bytes(used)),
                  *self.writes)
        for gpa, data in pieces:
            if strict or memory.contains(gpa, len(data)):
                memory.write(gpa, data)

    def device_queue(self, memory: Any, policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                     **kwargs: Any) -> DeviceQueue:
        """The device end over this layout (already written into ``memory``)."""
        return DeviceQueue(index=0, size=self.size, desc=self.desc, avail=self.avail,
                           used=self.used, memory=memory, indirect=self.indirect,
                           policy=policy, next_avail=self.start, next_used=self.start, **kwargs)

    # ---- serialisation (corpus seeds, findings) -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "size": self.size, "ram": [list(r) for r in g.ram],
            "arena": None if g.arena is None else list(g.arena),
            "outside": None if g.outside is None else [list(r) for r in g.outside],
            "desc": self.desc, "avail": self.avail, "used": self.used,
            "table": self.table.hex(), "start": self.start, "entries": list(self.entries),
            "avail_idx": self.avail_idx, "avail_flags": self.avail_flags,
            "writes": [[gpa, data.hex()] for gpa, data in self.writes],
            "indirect": self.indirect, "rule": self.rule, "label": self.label,
            "expected": None if self.expected is None else [
                {"head": c.head, "readable": [list(s) for s in c.readable],
                 "writable": [list(s) for s in c.writable], "data": c.data.hex(),
                 "indirect": c.indirect, "token": c.token} for c in self.expected],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        geometry = Geometry(
            ram=tuple((int(a), int(b)) for a, b in d["ram"]),
            arena=None if d.get("arena") is None else tuple(d["arena"]),
            outside=None if d.get("outside") is None else tuple(tuple(r) for r in d["outside"]))
        expected = None if d.get("expected") is None else tuple(
            ExpectedChain(c["head"], tuple(map(tuple, c["readable"])),
                          tuple(map(tuple, c["writable"])), bytes.fromhex(c["data"]),
                          c["indirect"], c["token"]) for c in d["expected"])
        return cls(size=d["size"], geometry=geometry, desc=d["desc"], avail=d["avail"],
                   used=d["used"], table=bytes.fromhex(d["table"]), start=d["start"],
                   entries=tuple(d["entries"]), avail_idx=d["avail_idx"],
                   avail_flags=d.get("avail_flags", 0),
                   writes=tuple((gpa, bytes.fromhex(h)) for gpa, h in d["writes"]),
                   indirect=d["indirect"], expected=expected, rule=d.get("rule"),
                   label=d.get("label", "valid"))

    def describe(self) -> str:
        """One line for reports: label, rule, size, chains."""
        outcome = ("?" if self.expected is None else
                   f"{len(self.expected)} chain(s)" + (f" then {self.rule}" if self.rule else ""))
        return (f"{self.label}: N={self.size} start={self.start} avail_idx={self.avail_idx} "
                f"entries={len(self.entries)} indirect={self.indirect} -> {outcome}")
