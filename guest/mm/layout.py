"""Guest-physical layout: usable RAM ranges (like memblock), zone spans, maximal aligned blocks.

Linux boots with ``memblock``: a list of RAM ranges and a list of reserved ranges (kernel image,
firmware, early allocations). ``memblock_free_all`` then hands every usable page to the buddy
allocator (``__free_pages_core``, ``FPI_TO_TAIL``) in the largest aligned blocks that fit.
This module does the arithmetic: page-trimming, subtracting reserved ranges, cutting at zone
boundaries (16 MiB, 4 GiB), and the greedy aligned decomposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from guest.mm.types import MAX_DMA32_PFN, MAX_DMA_PFN, MAX_ORDER, PAGE_SHIFT, PAGE_SIZE, ZoneType
from protocol.errors import ConfigError

__all__ = [
    "MAX_PHYS_ADDR",
    "PfnRange",
    "maximal_blocks",
    "normalize_ranges",
    "split_by_zone",
    "subtract_ranges",
]

MAX_PHYS_ADDR = 1 << 52
"""x86-64's architectural limit on physical addresses (52 bits)."""

PfnRange = tuple[int, int]
"""A half-open page frame range ``(start_pfn, end_pfn)``."""

_ZONE_LIMITS = ((ZoneType.DMA, 0, MAX_DMA_PFN), (ZoneType.DMA32, MAX_DMA_PFN, MAX_DMA32_PFN),
                (ZoneType.NORMAL, MAX_DMA32_PFN, MAX_PHYS_ADDR >> PAGE_SHIFT))


def _as_gpa_size(item: Any, what: str) -> tuple[int, int]:
    """Accept ``(gpa, size)`` or anything with ``.gpa`` and ``.size`` (a ``MemoryRegion``)."""
    if hasattr(item, "gpa") and hasattr(item, "size"):
        gpa, size = item.gpa, item.size
    else:
        try:
            gpa, size = item
        except (TypeError, ValueError):
            raise ConfigError(f"{what} range {item!r} is not a (gpa, size) pair") from None
    if not isinstance(gpa, int) or not isinstance(size, int):
        raise ConfigError(f"{what} range {item!r} must be integers (gpa, size)")
    if gpa < 0 or size < 0 or gpa + size > MAX_PHYS_ADDR:
        raise ConfigError(
            f"{what} range [{gpa:#x}, +{size:#x}) is outside [0, 2**52) guest-physical memory"
        )
    return gpa, size


def normalize_ranges(items: Iterable[Any], *, what: str, inner: bool) -> list[PfnRange]:
    """Sorted, coalesced pfn ranges from byte ranges.

    ``inner=True`` (RAM) keeps only whole pages inside each range (``PFN_UP(start)``,
    ``PFN_DOWN(end)``); ``inner=False`` (reserved) covers every page the range touches.
    Overlapping RAM ranges are a :class:`ConfigError`; overlapping reservations just merge.
    """
    out: list[PfnRange] = []
    for item in items:
        gpa, size = _as_gpa_size(item, what)
        if inner:
            start, end = -(-gpa // PAGE_SIZE), (gpa + size) // PAGE_SIZE
        else:
            start, end = gpa // PAGE_SIZE, -(-(gpa + size) // PAGE_SIZE)
        if start < end:
            out.append((start, end))
    out.sort()
    merged: list[PfnRange] = []
    for start, end in out:
        if merged and start <= merged[-1][1]:
            if inner and start < merged[-1][1]:
                raise ConfigError(
                    f"RAM ranges overlap at guest-physical {start << PAGE_SHIFT:#x}"
                )
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract_ranges(ranges: list[PfnRange], holes: list[PfnRange]) -> list[PfnRange]:
    """``ranges`` minus ``holes``; both sorted and coalesced; the result is too."""
    out: list[PfnRange] = []
    j = 0
    for start, end in ranges:
        while j < len(holes) and holes[j][1] <= start:
            j += 1
        k = j
        cur = start
        while k < len(holes) and holes[k][0] < end:
            hs, he = holes[k]
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def split_by_zone(ranges: list[PfnRange]) -> dict[ZoneType, list[PfnRange]]:
    """Cut sorted ranges at the DMA (16 MiB) and DMA32 (4 GiB) boundaries."""
    zones: dict[ZoneType, list[PfnRange]] = {}
    for zt, lo, hi in _ZONE_LIMITS:
        for start, end in ranges:
            s, e = max(start, lo), min(end, hi)
            if s < e:
                zones.setdefault(zt, []).append((s, e))
    return zones


def maximal_blocks(start: int, end: int) -> Iterator[tuple[int, int]]:
    """The greedy buddy decomposition of [start, end): (pfn, order), ascending, each block
    as large as its alignment and the remaining length allow (never above MAX_ORDER-1).

    >>> list(maximal_blocks(1, 8))
    [(1, 0), (2, 1), (4, 2)]
    """
    top = MAX_ORDER - 1
    pfn = start
    while pfn < end:
        order = top if pfn == 0 else min(top, (pfn & -pfn).bit_length() - 1)
        while pfn + (1 << order) > end:
            order -= 1
        if order == top:
            # the aligned middle: one range() instead of a loop iteration per block
            size = 1 << top
            stop = pfn + ((end - pfn) >> top << top)
            for p in range(pfn, stop, size):
                yield p, top
            pfn = stop
            continue
        yield pfn, order
        pfn += 1 << order
