"""The migration's final check: is every byte the guest relies on the same on both sides?

After the last round the destination must hold, for every range the guest relies on, exactly
what the paused source holds. Pages the guest does *not* rely on may differ, and that is the
point of hinting: a hinted page the guest never wrote again was never sent. So the caller names
the ranges it relies on (what its workload allocated and wrote; not the blocks the hinting
driver holds until DONE, not ballooned pages) and the check counts the pages that differ.

The comparison is bulk and hole-aware: both memfds' data extents (SEEK_DATA/SEEK_HOLE) are
read once; where both sides are holes nothing is read; where one side is a hole the other side
is compared with zeros, and the hole is never read (reading a memfd hole through its mapping
would allocate it); elsewhere slices of up to :data:`SLICE` bytes are compared and only a slice
that differs is searched page by page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol.errors import UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

from .dirty_log import PAGE_SHIFT
from .ranges import RangeSet

__all__ = ["SLICE", "MemoryCheck", "compare_memory", "relied_ranges"]

SLICE = 1 << 20
"""Bytes compared at a time."""

_ZERO_SLICE = bytes(SLICE)
_SAMPLE = 16


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    """Outcome of :func:`compare_memory`.

    ``pages_lost`` counts 4 KiB pages holding at least one relied-on byte that differs;
    ``lost_sample`` gives the guest-physical addresses of the first few of them.
    """

    relied_bytes: int
    compared_bytes: int
    pages_lost: int
    lost_sample: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.pages_lost == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "relied_bytes": self.relied_bytes,
            "compared_bytes": self.compared_bytes,
            "pages_lost": self.pages_lost,
            "lost_sample": list(self.lost_sample),
            "ok": self.ok,
        }


def relied_ranges(relied: RangeSet | Iterable[tuple[int, int]]) -> RangeSet:
    """Normalise the caller's relied-on memory to a RangeSet of bytes.

    A :class:`RangeSet` is taken as guest-physical byte ranges [start, end); any other iterable
    holds (gpa, length) pairs.
    """
    if isinstance(relied, RangeSet):
        return relied
    out = RangeSet()
    for gpa, length in relied:
        if gpa < 0 or length < 0:
            raise UsageError(f"relied range ({gpa:#x}, {length:#x}) is negative")
        out.add(gpa, gpa + length)
    return out


def compare_memory(source: GuestMemory, dest: GuestMemory,
                   relied: RangeSet | Iterable[tuple[int, int]]) -> MemoryCheck:
    """Compare ``source`` and ``dest`` over ``relied`` (see :func:`relied_ranges`)."""
    wanted = relied_ranges(relied)
    for start, end in wanted:
        source.check(start, end - start)
        dest.check(start, end - start)
    src_data = RangeSet(source.data_ranges())
    dst_data = RangeSet(dest.data_ranges())
    lost = RangeSet()
    compared = 0
    for start, end in wanted:
        for s, e, in_src, in_dst in _segments(start, end, src_data, dst_data):
            compared += e - s
            _compare(source if in_src else None, dest if in_dst else None, s, e, lost)
    sample = []
    for first, end in lost:
        sample.extend(p << PAGE_SHIFT for p in range(first, min(end, first + _SAMPLE)))
        if len(sample) >= _SAMPLE:
            break
    return MemoryCheck(wanted.total, compared, lost.total, tuple(sample[:_SAMPLE]))


def _segments(start: int, end: int, a: RangeSet, b: RangeSet):
    """Split [start, end) where ``a`` or ``b`` holds data: (s, e, in_a, in_b), holes left out."""
    cuts = {start, end}
    for s, e in a.clip(start, end):
        cuts.update((s, e))
    for s, e in b.clip(start, end):
        cuts.update((s, e))
    points = sorted(cuts)
    for s, e in zip(points, points[1:], strict=False):
        in_a, in_b = a.contains(s, e), b.contains(s, e)
        if in_a or in_b:
            yield s, e, in_a, in_b


def _compare(src: GuestMemory | None, dst: GuestMemory | None, start: int, end: int,
             lost: RangeSet) -> None:
    """Compare one segment slice by slice; ``None`` stands for a hole (reads as zeros)."""
    pos = start
    while pos < end:
        n = min(SLICE - pos % SLICE, end - pos)  # slices stay page aligned after the first
        x = src.read(pos, n) if src is not None else None
        y = dst.read(pos, n) if dst is not None else None
        zero = _ZERO_SLICE if n == SLICE else bytes(n)
        if (x if x is not None else zero) != (y if y is not None else zero):
            _find_pages(x, y, pos, n, lost)
        pos += n


def _find_pages(x: bytes | None, y: bytes | None, base: int, n: int, lost: RangeSet) -> None:
    """Add the pages of [base, base + n) where ``x`` and ``y`` differ (None: zeros)."""
    off = 0
    while off < n:
        k = min(PAGE_SIZE - (base + off) % PAGE_SIZE, n - off)
        px = x[off:off + k] if x is not None else bytes(k)
        py = y[off:off + k] if y is not None else bytes(k)
        if px != py:
            page = (base + off) >> PAGE_SHIFT
            lost.add(page, page + 1)
        off += k
