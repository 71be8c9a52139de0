"""Taking a block off the free lists: Linux 6.1 ``__rmqueue`` and what it calls.

``rmqueue`` balances CMA for movable requests, then tries ``__rmqueue_smallest`` (the *head* of
the smallest non-empty list of the requested type, split by ``expand()`` with the upper halves
to the head of the smaller lists, unreported), then CMA, then ``__rmqueue_fallback`` (steal from
another type in Linux ``fallbacks[]`` order, largest block first) and retries.
"""

from __future__ import annotations

from guest.mm.freelist import FreeBlock
from guest.mm.types import (
    FALLBACKS,
    MAX_ORDER,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    AllocFlags,
    MigrateType,
)
from guest.mm.zone import Zone

__all__ = ["rmqueue", "rmqueue_fallback", "rmqueue_smallest"]

_MOVABLE = int(MigrateType.MOVABLE)
_UNMOVABLE = int(MigrateType.UNMOVABLE)
_RECLAIMABLE = int(MigrateType.RECLAIMABLE)
_HIGHATOMIC = int(MigrateType.HIGHATOMIC)
_CMA = int(MigrateType.CMA)
_TOP = MAX_ORDER - 1
_ALLOC_CMA = int(AllocFlags.CMA)


def rmqueue(zone: Zone, order: int, mt: int, flags: int) -> int | None:
    """Linux ``__rmqueue``: CMA balancing, the requested type, CMA, then fallback."""
    cma = bool(flags & _ALLOC_CMA)
    if cma and zone.nr_free_cma_pages > zone.nr_free_pages // 2:
        pfn = rmqueue_smallest(zone, order, _CMA)
        if pfn is not None:
            return pfn
    while True:
        pfn = rmqueue_smallest(zone, order, mt)
        if pfn is not None:
            return pfn
        if cma:
            pfn = rmqueue_smallest(zone, order, _CMA)
            if pfn is not None:
                return pfn
        if not rmqueue_fallback(zone, order, mt):
            return None


def rmqueue_smallest(zone: Zone, order: int, mt: int) -> int | None:
    """Linux ``__rmqueue_smallest``: the head of the smallest non-empty list, split."""
    areas = zone.free_area
    for current in range(order, MAX_ORDER):
        head = areas[current].free_list[mt]
        block = head.next
        if block is head:
            continue
        zone.del_page_from_free_list(block)  # type: ignore[arg-type]
        pfn = block.pfn  # type: ignore[union-attr]
        # expand(): the upper halves go to the head of the smaller lists, unreported
        size = 1 << current
        while current > order:
            current -= 1
            size >>= 1
            zone.add_to_free_list(FreeBlock(pfn + size, current, mt))
        return pfn
    return None


def rmqueue_fallback(zone: Zone, order: int, start_mt: int) -> bool:
    """Linux ``__rmqueue_fallback``: move a block of another type to ``start_mt``'s list.

    Prefers the largest block; a movable request that may not steal takes the smallest
    instead. Stealing ``pageblock_order`` or more converts the covered pageblocks.
    """
    found = None
    for current in range(_TOP, order - 1, -1):
        fmt, can_steal = _find_suitable_fallback(zone, current, start_mt)
        if fmt >= 0:
            found = current, fmt
            if not can_steal and start_mt == _MOVABLE and current > order:
                found = _find_smallest(zone, order, start_mt)
            break
    if found is None:
        return False
    current, fmt = found
    block = zone.free_area[current].free_list[fmt].next
    # steal_suitable_fallback()
    if current >= PAGEBLOCK_ORDER and zone.get_pageblock_migratetype(block.pfn) != _HIGHATOMIC:
        for p in range(block.pfn, block.pfn + (1 << current), PAGEBLOCK_NR_PAGES):
            zone.set_pageblock_migratetype(p, start_mt)
    zone.move_to_free_list(block, start_mt)  # type: ignore[arg-type]
    return True


def _find_suitable_fallback(zone: Zone, order: int, start_mt: int) -> tuple[int, bool]:
    """Linux ``find_suitable_fallback``: (first non-empty fallback list, may steal) or (-1, _)."""
    area = zone.free_area[order]
    if not area.nr_free:
        return -1, False
    for mt in FALLBACKS[start_mt]:
        head = area.free_list[mt]
        if head.next is not head:
            # can_steal_fallback()
            return mt, (order >= PAGEBLOCK_ORDER // 2 or start_mt in (_UNMOVABLE, _RECLAIMABLE))
    return -1, False


def _find_smallest(zone: Zone, order: int, start_mt: int) -> tuple[int, int]:
    """The ``find_smallest`` label of ``__rmqueue_fallback``: smallest order with a fallback."""
    for current in range(order, MAX_ORDER):
        fmt, _ = _find_suitable_fallback(zone, current, start_mt)
        if fmt >= 0:
            return current, fmt
    raise AssertionError("unreachable: a larger fallback block was found")  # pragma: no cover
