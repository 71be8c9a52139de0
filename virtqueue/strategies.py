"""Hypothesis strategies for split-ring descriptor layouts, and the plain builders behind them.

Strategies (import hypothesis lazily, so this module loads without it; hypothesis is a test
dependency, ``pip install 'vballoon[test]'``):

* :func:`valid_chains`: valid layouts, direct, indirect and direct-then-indirect chains
  (SPL-V-4), WRITE on the INDIRECT descriptor (SPL-V-3), descriptors in any order (SPL-V-1),
  avail indices anywhere in the 16-bit space; each knows the chains and bytes to expect.
* :func:`near_valid_chains`: a valid layout with exactly one mutation of
  :data:`virtqueue.cases.MUTATIONS`, labelled with the rule ID the device must raise.
* :func:`arbitrary_layouts`: raw descriptor tables and avail rings from biased field values;
  the expected outcome is unknown (``Layout.expected is None``).

The builders :func:`build_valid`, :func:`build_near_valid` and :func:`build_arbitrary` take any
:class:`~virtqueue.cases.Choices` source: Hypothesis draws, a seeded ``random`` or fuzzer bytes.
A near-valid layout's mutated chain comes after ``expected`` (the chains popped before it), so
popping every available chain without pushing must give exactly those, then the rule.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import UsageError
from protocol.split_ring import DescFlags
from virtqueue.cases import (
    MUTATIONS,
    Choices,
    ExpectedChain,
    Geometry,
    Layout,
    choose,
    permutation,
)
from virtqueue.layout import DESC, legacy_layout, split_layout

__all__ = [
    "DEFAULT_GEOMETRY",
    "DEFAULT_OPTIONS",
    "SIZES",
    "Options",
    "arbitrary_layouts",
    "build_arbitrary",
    "build_near_valid",
    "build_valid",
    "feasible_kinds",
    "near_valid_chains",
    "valid_chains",
]

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Default queue sizes drawn from."""

_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_U64_END = 1 << 64
_TABLE_KINDS = {"table_loop", "table_next_out_of_range", "nested_indirect"}
_INDIRECT_DESC_KINDS = {"indirect_without_feature", "table_len_zero", "table_len_unaligned",
                        "table_too_big", "table_outside_ram", "indirect_with_next"}
_RING_BUFFER_KINDS = {"next_out_of_range", "loop"}


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs of the builders (defaults suit unit tests: small chains in 1 MiB of RAM)."""

    max_chains: int = 8
    max_buffers: int = 8
    max_len: int = 64
    """Longest ordinary buffer; one buffer in eight may reach ``big_len``."""
    big_len: int = 5000
    align4: bool = False
    """Buffer lengths are multiples of 4 (whole le32 PFNs for inflate payloads)."""
    payload: Callable[[Choices, int], bytes] | None = None
    """Readable bytes of an n-byte buffer (default: a short random pattern repeated)."""
    indirect: bool | None = None
    """VIRTIO_F_INDIRECT_DESC negotiated: True, False or None (drawn)."""
    start: int | None = None
    """First avail index; None draws one anywhere in 0..0xFFFF (16-bit wrap)."""
    unknown_flags: bool = False
    """Set undefined flag bits (0x8..0x8000) on some descriptors; devices ignore them."""


DEFAULT_OPTIONS = Options()
DEFAULT_GEOMETRY = Geometry()
"""1 MiB of RAM at 0, all of it the arena."""


@dataclass
class _Chain:
    head: int
    mode: str  # direct | indirect | mixed
    path: list[tuple[int | None, int]]  # each buffer descriptor: (table gpa or None, index)
    indirect_at: int | None = None  # ring index of the INDIRECT descriptor
    table: int | None = None


@dataclass
class _Draft:
    size: int
    geometry: Geometry
    desc: int
    avail: int
    used: int
    start: int
    indirect: bool
    ring: list[list[int]] = field(default_factory=list)
    tables: dict[int, list[list[int]]] = field(default_factory=dict)
    payload: dict[int, bytes] = field(default_factory=dict)
    chains: list[_Chain] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    avail_idx: int = 0
    avail_flags: int = 0

    def at(self, loc: tuple[int | None, int]) -> list[int]:
        table, i = loc
        return self.ring[i] if table is None else self.tables[table][i]

    def expected(self, chain: _Chain, token: int) -> ExpectedChain:
        readable, writable, data = [], [], []
        for loc in chain.path:
            addr, length, flags, _ = self.at(loc)
            if flags & _WRITE:
                writable.append((addr, length))
            else:
                readable.append((addr, length))
                data.append(self.payload[addr])
        return ExpectedChain(chain.head, tuple(readable), tuple(writable), b"".join(data),
                             chain.mode != "direct", token)

    def freeze(self, *, expected: tuple[ExpectedChain, ...] | None, rule: str | None,
               label: str) -> Layout:
        writes = [(gpa, b"".join(DESC.pack(*e) for e in entries))
                  for gpa, entries in self.tables.items()]
        writes += sorted(self.payload.items())
        return Layout(size=self.size, geometry=self.geometry, desc=self.desc, avail=self.avail,
                      used=self.used, table=b"".join(DESC.pack(*e) for e in self.ring),
                      start=self.start, entries=tuple(self.entries), avail_idx=self.avail_idx,
                      avail_flags=self.avail_flags, writes=tuple(writes),
                      indirect=self.indirect, expected=expected, rule=rule, label=label)


class _Arena:
    def __init__(self, lo: int, hi: int) -> None:
        self.pos, self.hi = lo, hi

    @property
    def left(self) -> int:
        return self.hi - self.pos

    def take(self, n: int, align: int = 1) -> int | None:
        addr = (self.pos + align - 1) & -align
        if addr + n > self.hi:
            return None
        self.pos = addr + n
        return addr


def _garbage(rng: random.Random) -> list[int]:
    return list(DESC.unpack(rng.randbytes(16)))


def _place_rings(ch: Choices, size: int, arena: _Arena) -> tuple[int, int, int]:
    lo = arena.take(0, 16)
    if lo is None:
        raise UsageError("the arena has no room for the rings")
    legacy = ch.boolean()
    desc, avail, used, total = (legacy_layout(lo, size) if legacy else split_layout(lo, size))
    if arena.take(total) is None:
        desc, avail, used, total = split_layout(lo, size)
        if arena.take(total) is None:
            raise UsageError(f"the arena has no room for a ring of size {size}")
    return desc, avail, used


def _length(ch: Choices, opts: Options, arena: _Arena) -> int:
    tier = ch.integer(0, 7)
    if tier < 5:
        n = ch.integer(1, 16)
    elif tier < 7 or arena.left < 1 << 16:
        n = ch.integer(1, opts.max_len)
    else:
        n = ch.integer(1, opts.big_len)
    return (n + 3) & ~3 if opts.align4 else n


def _pattern(ch: Choices, n: int) -> bytes:
    seed = ch.data(min(n, 8)) or b"\0"
    return (seed * (n // len(seed) + 1))[:n]


def _buffer(ch: Choices, d: _Draft, arena: _Arena, opts: Options, writable: bool) -> list[int]:
    n = _length(ch, opts, arena)
    skip = ch.integer(0, 15) & (~3 if opts.align4 else -1)
    addr = arena.take(n + skip)
    if addr is None:
        n = 4 if opts.align4 else 1
        skip = 0
        addr = arena.take(n)
        if addr is None:
            raise UsageError("the arena is full: use fewer or shorter chains")
    addr += skip
    if not writable:
        d.payload[addr] = (opts.payload or _pattern)(ch, n)
    return [addr, n, _WRITE if writable else 0, 0]


def _add_chain(ch: Choices, d: _Draft, arena: _Arena, opts: Options, free: list[int],
               rng: random.Random, *, mode: str, direct: int, table: int,
               readable: int | None = None) -> _Chain:
    """Place one valid chain: ``direct`` ring buffers, then ``table`` entries if not direct."""
    total = direct + table
    readable = ch.integer(0, total) if readable is None else readable
    ring_idx = [free.pop() for _ in range(direct + (mode != "direct"))]
    chain = _Chain(head=ring_idx[0], mode=mode, path=[(None, i) for i in ring_idx[:direct]])
    k = 0
    for i in ring_idx[:direct]:
        d.ring[i] = _buffer(ch, d, arena, opts, writable=k >= readable)
        k += 1
    if mode != "direct":
        slack = ch.integer(0, 2) if table < 65534 else 0
        entries = table + slack
        gpa = arena.take(16 * entries, choose(ch, (16, 16, 8)))
        if gpa is None:
            raise UsageError("the arena has no room for an indirect table")
        rows = [_garbage(rng) for _ in range(entries)]
        order = [0, *permutation(ch, range(1, entries))[:table - 1]]
        d.tables[gpa] = rows
        for i in order:
            rows[i] = _buffer(ch, d, arena, opts, writable=k >= readable)
            k += 1
        chain.path += [(gpa, i) for i in order]
        chain.indirect_at, chain.table = ring_idx[-1], gpa
        flags = _INDIRECT | (_WRITE if ch.integer(0, 3) == 0 else 0)  # SPL-V-3: ignored
        d.ring[ring_idx[-1]] = [gpa, 16 * entries, flags, 0]
    ring_seq = ring_idx
    table_seq = [i for t, i in chain.path if t is not None]
    for seq, loc in ((ring_seq, None), (table_seq, chain.table)):
        for a, b in zip(seq, seq[1:], strict=False):
            row = d.at((loc, a))
            row[2] |= _NEXT
            row[3] = b
        if seq:
            d.at((loc, seq[-1]))[3] = rng.randrange(0x10000)  # ignored without NEXT
    if opts.unknown_flags:
        for loc in chain.path:
            if ch.integer(0, 3) == 0:
                d.at(loc)[2] |= ch.integer(1, 0x1FFF) << 3
    d.chains.append(chain)
    return chain


def _modes(kind: str | None, size: int, budget: int, indirect: bool) -> list[str]:
    if kind in _INDIRECT_DESC_KINDS or kind in _TABLE_KINDS or kind in ("too_long",
                                                                         "chain_too_big"):
        modes = ["indirect", "mixed"] if kind != "chain_too_big" else ["indirect"]
    elif kind in _RING_BUFFER_KINDS:
        modes = ["direct", "mixed"] if indirect else ["direct"]
    else:
        modes = ["direct", "indirect", "mixed"] if indirect else ["direct"]
    return [m for m in modes if m != "mixed" or (size >= 2 and budget >= 2)]


def _big_chain(geometry: Geometry, size: int) -> tuple[int, int, int] | None:
    """(gpa, len, count) of buffers whose total passes 2^32 within ``size`` entries (DC-09)."""
    gpa, length = max(geometry.ram, key=lambda r: r[1])
    length = min(length, 0xFFFFFFFF)
    count = (1 << 32) // length + 1
    return (gpa, length, count) if count <= size else None


def feasible_kinds(size: int, geometry: Geometry = DEFAULT_GEOMETRY) -> list[str]:
    """The mutation kinds a queue of ``size`` in ``geometry`` can express."""
    kinds = list(MUTATIONS)
    if size < 2:
        kinds.remove("readable_after_writable")
        kinds.remove("duplicate_head")
    if _big_chain(geometry, size) is None:
        kinds.remove("chain_too_big")
    return kinds


def _draft(ch: Choices, size: int, geometry: Geometry, opts: Options,
           kind: str | None) -> tuple[_Draft, int]:
    """A valid draft; for a mutation ``kind``, chain j (returned) is shaped to take it."""
    arena = _Arena(*geometry.arena_range)
    desc, avail, used = _place_rings(ch, size, arena)
    indirect = opts.indirect if opts.indirect is not None else ch.boolean()
    if kind is not None and kind != "indirect_without_feature" and (
            kind in _INDIRECT_DESC_KINDS or kind in _TABLE_KINDS
            or kind in ("too_long", "chain_too_big")):
        indirect = True
    start = opts.start if opts.start is not None else ch.integer(0, 0xFFFF)
    d = _Draft(size, geometry, desc, avail, used, start, indirect)
    rng = random.Random(ch.integer(0, 0xFFFFFFFF))
    d.ring = [_garbage(rng) for _ in range(size)]
    may_indirect = indirect and kind != "indirect_without_feature"
    # ring descriptors chain j needs at least (two buffers without indirect tables)
    need = 2 if kind == "readable_after_writable" and not may_indirect else 1
    lo = 2 if kind == "duplicate_head" else 1
    count = ch.integer(lo, max(lo, min(opts.max_chains, size - need + 1)))
    j = ch.integer(1 if kind == "duplicate_head" else 0, count - 1) if kind else -1
    free = permutation(ch, range(size))[::-1]
    for c in range(count):
        budget = len(free) - (count - c - 1) - (need - 1 if c < j else 0)
        shaped = c == j and kind not in ("avail_idx_jump", "head_out_of_range",
                                         "duplicate_head")
        modes = _modes(kind if shaped else None, size, budget, may_indirect)
        if kind == "indirect_without_feature" and c == j:
            modes = [m for m in ("indirect", "mixed") if m in _modes(None, size, budget, True)]
        mode = choose(ch, modes)
        most = min(opts.max_buffers, size)
        direct = table = 0
        if shaped and kind == "too_long":
            direct = ch.integer(1, min(budget - 1, size)) if mode == "mixed" else 0
            table = size + 1 - direct
        elif shaped and kind == "chain_too_big":
            table = _big_chain(geometry, size)[2]
        elif mode == "direct":
            direct = ch.integer(1, max(1, min(budget, most)))
        elif mode == "indirect":
            table = ch.integer(1, most)
        else:
            direct = ch.integer(1, max(1, min(budget - 1, most - 1, size - 1)))
            table = ch.integer(1, max(1, min(most - direct, size - direct)))
        if shaped and kind == "readable_after_writable" and direct + table < 2:
            if mode == "direct" and budget >= 2:
                direct = 2
            elif mode == "direct":  # no room: tables are allowed then (see `need`)
                mode, direct, table = "indirect", 0, 2
            else:
                table = 2 - direct
        _add_chain(ch, d, arena, opts, free, rng, mode=mode, direct=direct, table=table)
    for c in d.chains:
        d.entries.append(c.head)
    d.avail_idx = (start + count) & 0xFFFF
    d.avail_flags = ch.integer(0, 1)
    return d, j


def build_valid(ch: Choices, *, size: int, geometry: Geometry = DEFAULT_GEOMETRY,
                options: Options = DEFAULT_OPTIONS) -> Layout:
    """A valid layout of queue ``size`` in ``geometry`` (see :func:`valid_chains`)."""
    d, _ = _draft(ch, size, geometry, options, None)
    expected = tuple(d.expected(c, k) for k, c in enumerate(d.chains))
    return d.freeze(expected=expected, rule=None, label="valid")


def build_near_valid(ch: Choices, *, size: int, kind: str, geometry: Geometry = DEFAULT_GEOMETRY,
                     options: Options = DEFAULT_OPTIONS) -> Layout:
    """A valid layout with one mutation ``kind`` (:data:`MUTATIONS`) applied to one chain."""
    if kind not in feasible_kinds(size, geometry):
        raise UsageError(f"mutation {kind!r} cannot be expressed with queue size {size} here")
    d, j = _draft(ch, size, geometry, options, kind)
    expected = tuple(d.expected(c, k) for k, c in enumerate(d.chains[:j]))
    _mutate(ch, d, kind, d.chains[j])
    if kind == "avail_idx_jump":
        expected = ()
    return d.freeze(expected=expected, rule=MUTATIONS[kind], label=kind)


def _mutate(ch: Choices, d: _Draft, kind: str, chain: _Chain) -> None:
    """Apply ``kind`` to ``chain`` (j); see MUTATIONS for the rule each one breaks."""
    n, g = d.size, d.geometry
    path = chain.path
    ring_pos = [p for p, (t, _) in enumerate(path) if t is None]
    table_pos = [p for p, (t, _) in enumerate(path) if t is not None]
    j = d.chains.index(chain)
    if kind == "too_long":
        pass  # built that way: N + 1 buffers through an indirect table
    elif kind == "avail_idx_jump":
        d.avail_idx = (d.start + ch.integer(n + 1, 0xFFFF)) & 0xFFFF
    elif kind == "head_out_of_range":
        d.entries[j] = ch.integer(n, 0xFFFF)
    elif kind == "duplicate_head":
        d.entries[j] = d.entries[ch.integer(0, j - 1)]
    elif kind in ("next_out_of_range", "table_next_out_of_range"):
        pos = ring_pos if kind == "next_out_of_range" else table_pos
        row = d.at(path[choose(ch, pos)])
        limit = n if kind == "next_out_of_range" else len(d.tables[chain.table])
        row[2] |= _NEXT
        row[3] = ch.integer(limit, 0xFFFF)
    elif kind in ("loop", "table_loop"):
        pos = ring_pos if kind == "loop" else table_pos
        p = ch.integer(0, len(pos) - 1)
        row = d.at(path[pos[p]])
        row[2] |= _NEXT
        row[3] = path[pos[ch.integer(0, p)]][1]
    elif kind == "zero_length":
        row = d.at(path[ch.integer(0, len(path) - 1)])
        d.payload.pop(row[0], None)
        row[1] = 0
    elif kind == "readable_after_writable":
        q = ch.integer(1, len(path) - 1)
        rows = [d.at(loc) for loc in path]
        if not any(r[2] & _WRITE for r in rows[:q]):
            rows[q - 1][2] |= _WRITE
        rows[q][2] &= ~_WRITE  # the first readable after a writable one: DC-06 here
    elif kind == "outside_ram":
        row = d.at(path[ch.integer(0, len(path) - 1)])
        d.payload.pop(row[0], None)
        row[0] = g.outside_address(ch, row[1])
    elif kind == "addr_len_overflow":
        row = d.at(path[ch.integer(0, len(path) - 1)])
        d.payload.pop(row[0], None)
        row[1] = max(row[1], 2)
        row[0] = _U64_END - ch.integer(1, row[1] - 1)
    elif kind == "chain_too_big":
        gpa, length, _ = _big_chain(g, n)
        for loc in path:
            row = d.at(loc)
            d.payload.pop(row[0], None)
            row[0], row[1], row[2] = gpa, length, row[2] & ~_WRITE
    elif kind == "nested_indirect":
        d.at(path[choose(ch, table_pos)])[2] |= _INDIRECT
    elif kind == "indirect_without_feature":
        d.indirect = False
    else:  # the INDIRECT descriptor itself
        row = d.ring[chain.indirect_at]
        entries = row[1] // 16
        if kind == "table_len_zero":
            row[1] = 0
        elif kind == "table_len_unaligned":
            row[1] = 16 * ch.integer(0, entries) + ch.integer(1, 15)
        elif kind == "table_too_big":
            row[1] = 16 * ch.integer(65537, 65537 + 0xFFFF)
        elif kind == "table_outside_ram":
            d.tables.pop(row[0])
            if ch.boolean():
                row[0] = g.outside_address(ch, row[1])
            else:
                row[0] = _U64_END - ch.integer(1, row[1] - 1)
        elif kind == "indirect_with_next":
            row[2] |= _NEXT
            row[3] = ch.integer(0, 0xFFFF)
        else:
            raise UsageError(f"unknown mutation {kind!r}")


# ---- arbitrary layouts -----------------------------------------------------------------------

def _field_desc(ch: Choices, size: int, arena: tuple[int, int], tables: Sequence[int]) -> bytes:
    lo, hi = arena
    addr = choose(ch, (lambda: ch.integer(lo, hi - 1), lambda: ch.integer(0, _U64_END - 1),
                       lambda: hi - ch.integer(0, 64), lambda: _U64_END - ch.integer(1, 64),
                       lambda: choose(ch, tables) if tables else lo))()
    length = choose(ch, (lambda: ch.integer(1, 64), lambda: 0, lambda: 16 * ch.integer(1, 8),
                         lambda: ch.integer(0, 0xFFFFFFFF)))()
    flags = ch.integer(0, 7) if ch.integer(0, 7) else ch.integer(0, 0xFFFF)
    nxt = ch.integer(0, max(0, size - 1)) if ch.integer(0, 3) else ch.integer(0, 0xFFFF)
    return DESC.pack(addr, length, flags, nxt)


def build_arbitrary(ch: Choices, *, size: int, geometry: Geometry = DEFAULT_GEOMETRY,
                    tables: int = 3) -> Layout:
    """Raw rings from biased field values; ``expected`` is None (see :func:`arbitrary_layouts`)."""
    arena = _Arena(*geometry.arena_range)
    desc, avail, used = _place_rings(ch, size, arena)
    table_addrs, writes = [], []
    for _ in range(ch.integer(0, tables)):
        count = ch.integer(1, 8)
        gpa = arena.take(16 * count, 16)
        if gpa is not None:
            table_addrs.append(gpa)
            writes.append((gpa, count))
    span = geometry.arena_range
    raw_writes = tuple((gpa, b"".join(_field_desc(ch, size, span, table_addrs)
                                      for _ in range(count))) for gpa, count in writes)
    table = bytearray(b"".join(_field_desc(ch, size, span, table_addrs) for _ in range(size)))
    for gpa in table_addrs:  # point some ring descriptors at the tables
        if ch.boolean():
            i = ch.integer(0, size - 1)
            count = len(dict(raw_writes)[gpa]) // 16
            table[16 * i:16 * i + 16] = DESC.pack(gpa, 16 * count, _INDIRECT, 0)
    start = ch.integer(0, 0xFFFF)
    count = ch.integer(0, size)
    entries = tuple(ch.integer(0, size - 1) if ch.integer(0, 7) else ch.integer(0, 0xFFFF)
                    for _ in range(count))
    idx = (start + count) & 0xFFFF if ch.integer(0, 7) else ch.integer(0, 0xFFFF)
    return Layout(size=size, geometry=geometry, desc=desc, avail=avail, used=used,
                  table=bytes(table), start=start, entries=entries, avail_idx=idx,
                  avail_flags=ch.integer(0, 3), writes=raw_writes, indirect=ch.boolean(),
                  expected=None, rule=None, label="arbitrary")


# ---- Hypothesis strategies ---------------------------------------------------------------

class _Draw:
    """:class:`Choices` backed by a Hypothesis ``draw``."""

    def __init__(self, draw: Any) -> None:
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def boolean(self) -> bool:
        return self._draw(self._st.booleans())

    def data(self, n: int) -> bytes:
        return self._draw(self._st.binary(min_size=n, max_size=n))


def _geometry(geometry: Geometry, ram_size: int | None) -> Geometry:
    return geometry if ram_size is None else Geometry(ram=((0, ram_size),))


def valid_chains(*, sizes: Sequence[int] = SIZES, ram_size: int | None = None,
                 geometry: Geometry = DEFAULT_GEOMETRY,
                 options: Options = DEFAULT_OPTIONS) -> Any:
    """Strategy: valid :class:`~virtqueue.cases.Layout` values (``rule`` None).

    Queue sizes come from ``sizes``; RAM is ``ram_size`` bytes at 0 when given, else
    ``geometry``. Popping every available chain must give ``layout.expected`` in order: heads,
    segments and readable bytes exactly.
    """
    from hypothesis import strategies as st

    geometry = _geometry(geometry, ram_size)

    @st.composite
    def strategy(draw: Any) -> Layout:
        ch = _Draw(draw)
        return build_valid(ch, size=choose(ch, sizes), geometry=geometry, options=options)

    return strategy()


def near_valid_chains(*, kinds: Sequence[str] | None = None, sizes: Sequence[int] = SIZES,
                      ram_size: int | None = None, geometry: Geometry = DEFAULT_GEOMETRY,
                      options: Options = DEFAULT_OPTIONS) -> Any:
    """Strategy: valid layouts with one mutation; ``layout.rule`` is the rule to raise.

    ``kinds`` restricts the mutations (default: all of :data:`MUTATIONS` each size allows).
    """
    from hypothesis import strategies as st

    geometry = _geometry(geometry, ram_size)

    wanted = list(MUTATIONS) if kinds is None else list(kinds)
    unknown = set(wanted) - set(MUTATIONS)
    if unknown:
        raise UsageError(f"unknown mutation kinds {sorted(unknown)}")
    pairs = [(s, k) for s in sizes for k in feasible_kinds(s, geometry) if k in wanted]
    if not pairs:
        raise UsageError(f"none of {wanted} is feasible with sizes {list(sizes)}")

    @st.composite
    def strategy(draw: Any) -> Layout:
        ch = _Draw(draw)
        kind = choose(ch, sorted({k for _, k in pairs}))
        size = choose(ch, [s for s, k in pairs if k == kind])
        return build_near_valid(ch, size=size, kind=kind, geometry=geometry, options=options)

    return strategy()


def arbitrary_layouts(*, sizes: Sequence[int] = SIZES, ram_size: int | None = None,
                      geometry: Geometry = DEFAULT_GEOMETRY, tables: int = 3) -> Any:
    """Strategy: raw layouts (``expected`` None) from biased descriptor and avail fields."""
    from hypothesis import strategies as st

    geometry = _geometry(geometry, ram_size)

    @st.composite
    def strategy(draw: Any) -> Layout:
        ch = _Draw(draw)
        return build_arbitrary(ch, size=choose(ch, sizes), geometry=geometry, tables=tables)

    return strategy()
