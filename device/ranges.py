"""A set of half-open integer ranges, kept merged and sorted: what a host records per kind.

The device records ballooned, reported and hinted memory as ranges, never as pages, so a 1 TiB
guest's records stay small. Operations are O(log n + k) for k ranges touched. Measured against
the ``portion`` library (``python -m benchmarks ranges``): on the device's workload of many small
adds, removes and overlap queries, these two sorted lists are about three orders of magnitude
faster than ``portion``'s immutable interval unions, and keep a dependency out.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["RangeSet"]


class RangeSet:
    """Disjoint, non-adjacent [start, end) ranges of integers (bytes or pages)."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> int:
        """Add [start, end), merging with touching ranges; returns the units newly added."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, start)  # first range that ends at or after start
        j = bisect.bisect_right(starts, end)  # ranges [i, j) touch [start, end)
        added = end - start
        for k in range(i, j):
            added -= max(0, min(ends[k], end) - max(starts[k], start))
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        return added

    def remove(self, start: int, end: int) -> int:
        """Remove [start, end). Returns units actually removed."""
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)  # first range ending after start
        j = bisect.bisect_left(starts, end)  # ranges [i, j) overlap [start, end)
        if i >= j:
            return 0
        removed = 0
        new_s: list[int] = []
        new_e: list[int] = []
        for k in range(i, j):
            s, e = starts[k], ends[k]
            removed += min(e, end) - max(s, start)
            if s < start:
                new_s.append(s)
                new_e.append(start)
            if e > end:
                new_s.append(end)
                new_e.append(e)
        starts[i:j] = new_s
        ends[i:j] = new_e
        return removed

    def overlap(self, start: int, end: int) -> int:
        """Units of [start, end) that are in the set."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        total = 0
        while i < len(starts) and starts[i] < end:
            total += min(ends[i], end) - max(starts[i], start)
            i += 1
        return total

    def contains(self, start: int, end: int) -> bool:
        """Whether all of [start, end) is in the set."""
        i = bisect.bisect_right(starts := self._starts, start) - 1
        return i >= 0 and starts[i] <= start and end <= self._ends[i]

    def __contains__(self, point: int) -> bool:
        return self.contains(point, point + 1)

    def clip(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of the set inside [start, end), in order."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        while i < len(starts) and starts[i] < end:
            yield max(starts[i], start), min(ends[i], end)
            i += 1

    def update(self, other: Iterable[tuple[int, int]]) -> None:
        for s, e in other:
            self.add(s, e)

    def difference_update(self, other: Iterable[tuple[int, int]]) -> None:
        for s, e in list(other):
            self.remove(s, e)

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._starts = self._starts.copy()
        out._ends = self._ends.copy()
        return out

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    @property
    def total(self) -> int:
        """Units covered."""
        return sum(self._ends) - sum(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        """Number of disjoint ranges."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({[(hex(s), hex(e)) for s, e in self]})"

