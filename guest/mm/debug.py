"""Consistency checks of the page allocator, for tests (the spirit of ``CONFIG_DEBUG_VM``).

:func:`check_invariants` walks every structure and raises :class:`AllocatorInvariantError` at
the first inconsistency. It is O(free blocks + allocations); tests call it after each step.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

from guest.mm.types import (
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    MigrateType,
)
from protocol.errors import VballoonError

if TYPE_CHECKING:
    from guest.mm.page_alloc import PageAllocator
    from guest.mm.zone import Zone

__all__ = ["AllocatorInvariantError", "check_invariants"]

_ISOLATE = int(MigrateType.ISOLATE)
_CMA = int(MigrateType.CMA)


class AllocatorInvariantError(VballoonError):
    """The allocator's structures disagree with each other (a bug in the model)."""


def _fail(message: str) -> None:
    raise AllocatorInvariantError(message)


def check_invariants(allocator: PageAllocator) -> None:
    """Check every invariant of the allocator; raise AllocatorInvariantError on the first break.

    1. Each free list is a well-formed circular list whose ``count`` is its length; its blocks
       carry the list's order and type, are aligned, and are exactly the zone's
       ``free_blocks`` map.
    2. ``nr_free`` per order, ``NR_FREE_PAGES`` and ``NR_FREE_CMA_PAGES`` match the lists.
    3. Free blocks, allocations and isolated blocks lie in usable RAM of their zone, never
       overlap, and together with reserved pages account for every present page.
    4. No two free buddies are left unmerged where ``__free_one_page`` would merge them, and no
       free block above pageblock order spans pageblocks that could not merge.
    """
    intervals: list[tuple[int, int, str]] = []
    for zone in allocator.zones:
        _check_zone_lists(zone, intervals)
        _check_buddies(zone)
    for pfn, order in allocator.allocations().items():
        intervals.append((pfn, pfn + (1 << order), "allocated"))
    for pfn, order in allocator.isolated_blocks().items():
        intervals.append((pfn, pfn + (1 << order), "isolated"))
    _check_cover(allocator, intervals)


def _check_zone_lists(zone: Zone, intervals: list[tuple[int, int, str]]) -> None:
    seen = 0
    free_pages = cma_pages = 0
    for order, area in enumerate(zone.free_area):
        blocks_at_order = 0
        for mt, head in enumerate(area.free_list):
            n = 0
            prev = head
            node = head.next
            while node is not head:
                if node.prev is not prev:
                    _fail(f"{zone.name} order {order} mt {mt}: broken prev link at {node!r}")
                if node.order != order or node.mt != mt:
                    _fail(f"{zone.name}: {node!r} is on the order-{order} mt-{mt} list")
                if node.pfn & ((1 << order) - 1):
                    _fail(f"{zone.name}: {node!r} is not aligned to its order")
                if zone.free_blocks.get(node.pfn) is not node:
                    _fail(f"{zone.name}: {node!r} is on a list but not in free_blocks")
                if not zone.zone_spans_pfn(node.pfn) or not zone.zone_spans_pfn(
                        node.pfn + (1 << order) - 1):
                    _fail(f"{zone.name}: {node!r} is outside the zone span")
                intervals.append((node.pfn, node.pfn + (1 << order), "free"))
                if mt != _ISOLATE:
                    free_pages += 1 << order
                    if mt == _CMA:
                        cma_pages += 1 << order
                n += 1
                prev = node
                node = node.next
                if n > len(zone.free_blocks):
                    _fail(f"{zone.name} order {order} mt {mt}: the list does not close")
            if head.prev is not prev:
                _fail(f"{zone.name} order {order} mt {mt}: tail link is wrong")
            if n != head.count:
                _fail(f"{zone.name} order {order} mt {mt}: count {head.count}, length {n}")
            blocks_at_order += n
        if blocks_at_order != area.nr_free:
            _fail(f"{zone.name} order {order}: nr_free {area.nr_free}, blocks {blocks_at_order}")
        seen += blocks_at_order
    if seen != len(zone.free_blocks):
        _fail(f"{zone.name}: free_blocks has {len(zone.free_blocks)} entries, lists {seen}")
    if free_pages != zone.nr_free_pages:
        _fail(f"{zone.name}: NR_FREE_PAGES {zone.nr_free_pages}, lists hold {free_pages}")
    if cma_pages != zone.nr_free_cma_pages:
        _fail(f"{zone.name}: NR_FREE_CMA_PAGES {zone.nr_free_cma_pages}, lists hold {cma_pages}")


def _check_buddies(zone: Zone) -> None:
    fb = zone.free_blocks
    pbmt = zone.get_pageblock_migratetype
    for pfn, block in fb.items():
        order = block.order
        if order > PAGEBLOCK_ORDER:
            types = {pbmt(p) for p in range(pfn, pfn + (1 << order), PAGEBLOCK_NR_PAGES)}
            if len(types) > 1 and any(t >= MIGRATE_PCPTYPES for t in types):
                _fail(f"{zone.name}: {block!r} spans pageblocks of unmergeable types {types}")
        if order >= MAX_ORDER - 1 or pfn & (1 << order):
            continue  # top order, or the upper half (its pair is checked from the lower)
        buddy = fb.get(pfn ^ (1 << order))
        if buddy is None or buddy.order != order:
            continue
        if order >= PAGEBLOCK_ORDER:
            a, b = pbmt(pfn), pbmt(buddy.pfn)
            if a != b and (a >= MIGRATE_PCPTYPES or b >= MIGRATE_PCPTYPES):
                continue
        _fail(f"{zone.name}: free buddies {block!r} and {buddy!r} were not merged")


def _check_cover(allocator: PageAllocator, intervals: list[tuple[int, int, str]]) -> None:
    intervals.sort()
    usable = allocator.usable_ranges
    starts = [s for s, _ in usable]
    last_end, last_kind = -1, ""
    total = 0
    for start, end, kind in intervals:
        if start < last_end:
            _fail(f"{kind} pages [{start:#x}, {end:#x}) overlap {last_kind} pages before them")
        i = bisect_right(starts, start) - 1
        if i < 0 or end > usable[i][1]:
            _fail(f"{kind} pages [{start:#x}, {end:#x}) are not inside usable RAM")
        zone = allocator.zone_for_pfn(start)
        if zone is None or zone is not allocator.zone_for_pfn(end - 1):
            _fail(f"{kind} pages [{start:#x}, {end:#x}) are not inside one zone")
        total += end - start
        last_end, last_kind = end, kind
    usable_pages = sum(e - s for s, e in usable)
    if total != usable_pages:
        _fail(f"free + allocated + isolated = {total} pages, usable RAM has {usable_pages}")
    if allocator.nr_allocated_pages != sum(1 << o for o in allocator.allocations().values()):
        _fail("nr_allocated_pages does not match the allocations")
    if allocator.nr_isolated_pages != sum(1 << o for o in allocator.isolated_blocks().values()):
        _fail("nr_isolated_pages does not match the isolated blocks")
