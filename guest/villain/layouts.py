"""Descriptor layouts for the attack cases, with PFN payloads the suite can trace.

Near-valid layouts come from the fuzz engineer's builders
(:func:`virtqueue.strategies.build_near_valid`, one labelled mutation each); the three odd
but valid layouts of the spec (SPL-V-1/3/4) are built here by hand, so each is exactly the
situation its requirement describes. Every readable byte a layout carries is part of a stream
of le32 PFNs from the port's *pool* (:class:`PfnStream`): pages filled with a pattern, so the
suite can tell which PFNs the device discarded (they read back as zeros).

:func:`lenient_pfns` says which pool PFNs a device that checks nothing would take from a
chain: follow NEXT and one level of INDIRECT (ignoring NEXT on it, as QEMU does), read every
device-readable buffer that lies in RAM, bounded by the queue size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.split_ring import DescFlags
from virtqueue.cases import Choices, ExpectedChain, Geometry, Layout, RandomChoices
from virtqueue.layout import DESC, split_layout
from virtqueue.strategies import Options, build_near_valid, build_valid, feasible_kinds

__all__ = ["PfnStream", "build_case_layout", "lenient_pfns", "mixed_chains", "pool_pfns"]

_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_U64_END = 1 << 64


class PfnStream:
    """Payload source: consecutive pool PFNs as one le32 byte stream (see module doc)."""

    def __init__(self, first_pfn: int) -> None:
        self.first = first_pfn
        self.count = 0

    def take(self, pfns: int) -> bytes:
        out = b"".join(struct.pack("<I", self.first + self.count + k) for k in range(pfns))
        self.count += pfns
        return out

    def __call__(self, ch: Choices, n: int) -> bytes:
        """A builder's payload hook: ``n`` bytes (n // 4 PFNs, zero padding)."""
        data = self.take(n // 4)
        return data + bytes(n - len(data))


def pool_pfns(data: bytes, pool: range) -> set[int]:
    """The pool PFNs among the whole le32 values of ``data``."""
    whole = data[:len(data) & ~3]
    return {p for (p,) in struct.iter_unpack("<I", whole) if p in pool}


@dataclass(frozen=True, slots=True)
class CaseLayout:
    """A layout and the PFNs it uses (``stream.count`` pool pages from the first)."""

    layout: Layout
    pfns: int


def build_case_layout(case_id: str, mutation: str | None, size: int, geometry: Geometry,
                      pool_first: int, *, seed: int | str = 0) -> CaseLayout:
    """The layout of a ``layout`` or ``valid`` case (see the module docstring)."""
    if case_id in _HAND:
        stream = PfnStream(pool_first)
        return CaseLayout(_HAND[case_id](geometry, stream), stream.count)
    if mutation is not None and mutation not in feasible_kinds(size, geometry):
        raise ValueError(f"mutation {mutation} cannot be built with queue size {size}")
    best: CaseLayout | None = None
    for attempt in range(_ATTEMPTS):  # prefer a layout whose chains all carry PFNs
        stream = PfnStream(pool_first)
        ch = RandomChoices(f"villain-{case_id}-{seed}-{attempt}")
        opts = Options(max_chains=4, max_buffers=4, max_len=16, big_len=16, align4=True,
                       payload=stream, start=0)
        if mutation is None:
            layout = build_valid(ch, size=size, geometry=geometry, options=opts)
        else:
            layout = build_near_valid(ch, size=size, kind=mutation, geometry=geometry,
                                      options=opts)
        found = CaseLayout(layout, stream.count)
        if best is None or _richness(found) > _richness(best):
            best = found
        if _richness(found) == (0, 0, stream.count) and stream.count >= 4:
            break
    assert best is not None
    return best


_ATTEMPTS = 20


def _richness(cl: CaseLayout) -> tuple[int, int, int]:
    """How well a layout isolates its case: no chain mixing direct descriptors with an
    indirect table (SPL-V-4 has a case of its own, and a device that mishandles it would blur
    every other case), every valid chain carrying PFNs, then more PFNs."""
    chains = cl.layout.expected or ()
    return (-mixed_chains(cl.layout), sum(len(c.data) >= 4 for c in chains) - len(chains),
            cl.pfns)


def mixed_chains(layout: Layout) -> int:
    """How many available chains go through ring descriptors into an indirect table."""
    img = _Image(layout)
    count = 0
    for head in set(layout.entries):
        i, steps = head, 0
        while 0 <= i < layout.size and steps <= layout.size:
            _, _, flags, nxt = DESC.unpack(img.read(layout.desc + 16 * i, 16))
            if flags & _INDIRECT and steps:
                count += 1
                break
            if not flags & _NEXT:
                break
            i, steps = nxt, steps + 1
    return count


# ---- the hand-built valid layouts ----------------------------------------------------------

class _Builder:
    """A tiny placer for hand-built layouts: ring at the arena start, then tables and data."""

    def __init__(self, geometry: Geometry, size: int) -> None:
        lo, _ = geometry.arena_range
        self.geometry, self.size = geometry, size
        self.desc, self.avail, self.used, total = split_layout((lo + 15) & ~15, size)
        self.pos = (self.desc + total + 63) & ~63
        self.ring = [(0, 0, 0, 0)] * size
        self.writes: list[tuple[int, bytes]] = []

    def put(self, data: bytes) -> int:
        gpa = self.pos
        self.writes.append((gpa, data))
        self.pos = (gpa + len(data) + 15) & ~15
        return gpa

    def layout(self, label: str, heads: list[int], expected: list[ExpectedChain]) -> Layout:
        table = b"".join(DESC.pack(*d) for d in self.ring)
        return Layout(size=self.size, geometry=self.geometry, desc=self.desc, avail=self.avail,
                      used=self.used, table=table, start=0, entries=tuple(heads),
                      avail_idx=len(heads), writes=tuple(self.writes), indirect=True,
                      expected=tuple(expected), label=label)


def _split_buffers(geometry: Geometry, stream: PfnStream) -> Layout:
    """SPL-V-1: 4 PFNs over descriptors of 6, 5 and 5 bytes; 1 PFN over 2 + 2 bytes."""
    b = _Builder(geometry, 8)
    expected = []
    for k, (head, cuts) in enumerate(((0, (6, 5, 5)), (3, (2, 2)))):
        data = stream.take(sum(cuts) // 4)
        segs, pos = [], 0
        for j, n in enumerate(cuts):
            gpa = b.put(data[pos:pos + n])
            more = j + 1 < len(cuts)
            b.ring[head + j] = (gpa, n, _NEXT if more else 0, head + j + 1 if more else 0)
            segs.append((gpa, n))
            pos += n
        expected.append(ExpectedChain(head, tuple(segs), (), data, False, k))
    return b.layout("SPL-V-1 split buffers", [0, 3], expected)


def _write_on_indirect(geometry: Geometry, stream: PfnStream) -> Layout:
    """SPL-V-3: the INDIRECT descriptor also has WRITE; its table holds 2 + 1 PFNs."""
    b = _Builder(geometry, 8)
    first, second = stream.take(2), stream.take(1)
    a, c = b.put(first), b.put(second)
    table = DESC.pack(a, 8, _NEXT, 1) + DESC.pack(c, 4, 0, 0)
    t = b.put(table)
    b.ring[0] = (t, len(table), _INDIRECT | _WRITE, 0)
    return b.layout("SPL-V-3 WRITE on INDIRECT", [0], [
        ExpectedChain(0, ((a, 8), (c, 4)), (), first + second, True, 0)])


def _direct_then_indirect(geometry: Geometry, stream: PfnStream) -> Layout:
    """SPL-V-4: one direct descriptor (1 PFN), then an INDIRECT one (2 PFNs)."""
    b = _Builder(geometry, 8)
    head_data, tail_data = stream.take(1), stream.take(2)
    a, c = b.put(head_data), b.put(tail_data)
    t = b.put(DESC.pack(c, 8, 0, 0))
    b.ring[0] = (a, 4, _NEXT, 1)
    b.ring[1] = (t, 16, _INDIRECT, 0)
    return b.layout("SPL-V-4 direct then indirect", [0], [
        ExpectedChain(0, ((a, 4), (c, 8)), (), head_data + tail_data, True, 0)])


_HAND = {"SPL-V-1": _split_buffers, "SPL-V-3": _write_on_indirect,
         "SPL-V-4": _direct_then_indirect}


# ---- what a lenient device takes -----------------------------------------------------------

class _Image:
    """Read bytes of a layout from its own pieces (the table and its writes), zeros elsewhere."""

    def __init__(self, layout: Layout) -> None:
        self.pieces = [(layout.desc, layout.table), *layout.writes]
        self.geometry = layout.geometry

    def read(self, gpa: int, n: int) -> bytes:
        out = bytearray(n)
        for start, data in self.pieces:
            lo, hi = max(gpa, start), min(gpa + n, start + len(data))
            if lo < hi:
                out[lo - gpa:hi - gpa] = data[lo - start:hi - start]
        return bytes(out)

    def inside(self, gpa: int, n: int) -> bool:
        return 0 < n and gpa + n <= _U64_END and self.geometry.inside(gpa, n)


def lenient_pfns(layout: Layout, head: int, pool: range) -> set[int]:
    """Pool PFNs a device that checks nothing would take from the chain at ``head``.

    Only the parts of each buffer that the layout wrote are read (the rest of RAM holds no
    pool PFN), so a chain of 4 GiB (DC-09) costs no more than a small one.
    """
    if not 0 <= head < layout.size:
        return set()
    img = _Image(layout)
    base, limit, i, in_table = layout.desc, layout.size, head, False
    chunks: list[tuple[int, bytes]] = []  # (position in the chain's readable stream, bytes)
    offset = 0
    for _ in range(layout.size + 2):
        if i >= limit:
            break
        addr, length, flags, nxt = DESC.unpack(img.read(base + 16 * i, 16))
        if flags & _INDIRECT and not in_table:
            entries = length // 16
            if not entries or not img.inside(addr, 16 * entries):
                break
            base, limit, i, in_table = addr, entries, 0, True
            continue
        if not flags & _WRITE and img.inside(addr, length):
            for start, data in img.pieces:
                lo, hi = max(addr, start), min(addr + length, start + len(data))
                if lo < hi:
                    chunks.append((offset + lo - addr, data[lo - start:hi - start]))
            offset += length
        if not flags & _NEXT:
            break
        i = nxt
    out: set[int] = set()
    for at, data in _merge(chunks):
        out |= pool_pfns(data[(-at) % 4:], pool)
    return out


def _merge(chunks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Join chunks that are contiguous in the stream (a PFN may straddle two buffers)."""
    out: list[tuple[int, bytearray]] = []
    for at, data in sorted(chunks):
        if out and out[-1][0] + len(out[-1][1]) == at:
            out[-1][1].extend(data)
        else:
            out.append((at, bytearray(data)))
    return [(at, bytes(d)) for at, d in out]
