"""A memory zone: free areas, pageblock migratetypes, free-page counters and watermarks.

Follows Linux 6.1 ``include/linux/mmzone.h`` (``struct zone``) and ``mm/page_alloc.c``:
``add_to_free_list``, ``add_to_free_list_tail``, ``move_to_free_list``,
``del_page_from_free_list``, ``get/set_pageblock_migratetype``, ``__setup_per_zone_wmarks``,
``setup_per_zone_lowmem_reserve`` and ``__zone_watermark_ok``.

Watermark rule (Linux ``calculate_min_free_kbytes`` then ``__setup_per_zone_wmarks``, default
sysctls)::

    min_free_kbytes = clamp(isqrt(total_managed_kbytes * 16), 128, 262144)
    zone.min  = (min_free_kbytes / 4) * zone.managed / total_managed      # pages
    tmp       = max(zone.min / 4, zone.managed * watermark_scale_factor / 10000)   # factor 10
    zone.low  = zone.min + tmp
    zone.high = zone.low + tmp

so a 1 GiB guest gets min_free_kbytes = 4096 and its DMA32 zone min/low/high = 1008/1266/1524
pages. ``lowmem_reserve`` uses ``sysctl_lowmem_reserve_ratio`` = 256 (DMA, DMA32), 32 (Normal).
Not modelled: ``watermark_boost``, ``nr_reserved_highatomic``, per-cpu page lists.
"""

from __future__ import annotations

from math import isqrt

from guest.mm.freelist import FreeArea, FreeBlock
from guest.mm.types import (
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    PAGE_SHIFT,
    PAGEBLOCK_ORDER,
    AllocFlags,
    MigrateType,
    ZoneType,
)

__all__ = [
    "LOWMEM_RESERVE_RATIO",
    "WATERMARK_SCALE_FACTOR",
    "Zone",
    "calculate_min_free_kbytes",
    "zone_watermark_ok",
]

WATERMARK_SCALE_FACTOR = 10
"""Linux ``vm.watermark_scale_factor`` default: the low-min and high-low gaps are 0.1 %."""
LOWMEM_RESERVE_RATIO = (256, 256, 32)
"""Linux ``vm.lowmem_reserve_ratio`` defaults for DMA, DMA32, Normal."""

_CMA = int(MigrateType.CMA)
_ISOLATE = int(MigrateType.ISOLATE)
_ALLOC_CMA = int(AllocFlags.CMA)
_ALLOC_HIGH = int(AllocFlags.HIGH)


def calculate_min_free_kbytes(managed_pages: int) -> int:
    """Linux ``calculate_min_free_kbytes``: ``clamp(isqrt(lowmem_kbytes * 16), 128, 262144)``."""
    lowmem_kbytes = managed_pages << (PAGE_SHIFT - 10)
    return min(max(isqrt(lowmem_kbytes * 16), 128), 262144)


class Zone:
    """Linux ``struct zone`` (one node): span, counters, ``free_area[MAX_ORDER]``, watermarks.

    Attributes:
        idx: the :class:`ZoneType`.
        zone_start_pfn, spanned_pages: first pfn and span (holes included).
        present_pages: RAM pages in the span (holes excluded).
        managed_pages: present pages given to the buddy allocator (reserved ones excluded).
        free_area: ``free_area[order]`` for orders 0..MAX_ORDER-1.
        free_blocks: pfn -> :class:`FreeBlock` for every free block of the zone (buddy lookup:
            a buddy is free iff it is in here with the same order).
        nr_free_pages: Linux ``NR_FREE_PAGES``: pages on all lists except ``MIGRATE_ISOLATE``.
        nr_free_cma_pages: Linux ``NR_FREE_CMA_PAGES``.
        lowmem_reserve: pages kept back from allocations that could have used a higher zone,
            indexed by the highest zone the allocation may use.
        pageblock_flags: one migratetype byte per pageblock of the span (Linux keeps 4 bits),
            indexed by ``(pfn >> pageblock_order) - pageblock_base``; hot paths read it directly.
    """

    __slots__ = (
        "idx",
        "zone_start_pfn",
        "spanned_pages",
        "present_pages",
        "managed_pages",
        "free_area",
        "free_blocks",
        "nr_free_pages",
        "nr_free_cma_pages",
        "watermark_min",
        "watermark_low",
        "watermark_high",
        "lowmem_reserve",
        "pageblock_base",
        "pageblock_flags",
    )

    def __init__(
        self, idx: ZoneType, start_pfn: int, end_pfn: int, present_pages: int, managed_pages: int
    ) -> None:
        self.idx = ZoneType(idx)
        self.zone_start_pfn = start_pfn
        self.spanned_pages = end_pfn - start_pfn
        self.present_pages = present_pages
        self.managed_pages = managed_pages
        self.free_area = tuple(FreeArea(order) for order in range(MAX_ORDER))
        self.free_blocks: dict[int, FreeBlock] = {}
        self.nr_free_pages = 0
        self.nr_free_cma_pages = 0
        self.watermark_min = self.watermark_low = self.watermark_high = 0
        self.lowmem_reserve = [0] * len(ZoneType)
        # one byte per 2 MiB pageblock (Linux keeps 4 bits): 1 TiB is 512K bytes.
        # memmap_init_range() marks every pageblock MIGRATE_MOVABLE at boot.
        self.pageblock_base = start_pfn >> PAGEBLOCK_ORDER
        nblocks = ((end_pfn - 1) >> PAGEBLOCK_ORDER) - self.pageblock_base + 1
        self.pageblock_flags = bytearray([MigrateType.MOVABLE]) * nblocks

    # ---- identity and geometry ------------------------------------------------------------
    @property
    def name(self) -> str:
        """"DMA", "DMA32" or "Normal"."""
        return self.idx.display_name

    @property
    def zone_end_pfn(self) -> int:
        """One past the last pfn of the span."""
        return self.zone_start_pfn + self.spanned_pages

    def zone_spans_pfn(self, pfn: int) -> bool:
        """Linux ``zone_spans_pfn``."""
        return self.zone_start_pfn <= pfn < self.zone_start_pfn + self.spanned_pages

    # ---- pageblock migratetypes ----------------------------------------------------------
    def get_pageblock_migratetype(self, pfn: int) -> int:
        """Linux ``get_pageblock_migratetype``: the type of the 2 MiB block holding ``pfn``."""
        return self.pageblock_flags[(pfn >> PAGEBLOCK_ORDER) - self.pageblock_base]

    def set_pageblock_migratetype(self, pfn: int, mt: int) -> None:
        """Linux ``set_pageblock_migratetype``: only the bitmap; free blocks do not move."""
        self.pageblock_flags[(pfn >> PAGEBLOCK_ORDER) - self.pageblock_base] = mt

    def pageblock_types(self) -> bytes:
        """The migratetype of every pageblock of the span, lowest first (teaching view)."""
        return bytes(self.pageblock_flags)

    # ---- free list manipulation (the only code that changes the lists) -----------------
    def add_to_free_list(self, block: FreeBlock, tail: bool = False) -> None:
        """Linux ``add_to_free_list`` (head) / ``add_to_free_list_tail`` on ``block.mt``."""
        order = block.order
        area = self.free_area[order]
        if tail:
            area.free_list[block.mt].add_tail(block)
        else:
            area.free_list[block.mt].add(block)
        area.nr_free += 1
        self.free_blocks[block.pfn] = block
        mt = block.mt
        if mt != _ISOLATE:
            self.nr_free_pages += 1 << order
            if mt == _CMA:
                self.nr_free_cma_pages += 1 << order

    def del_page_from_free_list(self, block: FreeBlock) -> None:
        """Linux ``del_page_from_free_list``: unlink, forget, and clear Reported."""
        order = block.order
        area = self.free_area[order]
        area.free_list[block.mt].remove(block)
        area.nr_free -= 1
        del self.free_blocks[block.pfn]
        block.reported = False
        mt = block.mt
        if mt != _ISOLATE:
            self.nr_free_pages -= 1 << order
            if mt == _CMA:
                self.nr_free_cma_pages -= 1 << order

    def move_to_free_list(self, block: FreeBlock, mt: int) -> None:
        """Linux ``move_to_free_list``: to the tail of list ``mt``, keeping Reported."""
        order = block.order
        lists = self.free_area[order].free_list
        reported = block.reported
        old = block.mt
        lists[old].remove(block)
        block.mt = mt
        block.reported = reported
        lists[mt].add_tail(block)
        pages = 1 << order
        if old != _ISOLATE:
            self.nr_free_pages -= pages
            if old == _CMA:
                self.nr_free_cma_pages -= pages
        if mt != _ISOLATE:
            self.nr_free_pages += pages
            if mt == _CMA:
                self.nr_free_cma_pages += pages

    # ---- watermarks ------------------------------------------------------------------------
    def setup_watermarks(self, pages_min: int, lowmem_pages: int) -> None:
        """Linux ``__setup_per_zone_wmarks`` for this zone (see the module docstring)."""
        managed = self.managed_pages
        wmin = pages_min * managed // lowmem_pages if lowmem_pages else 0
        tmp = max(wmin >> 2, managed * WATERMARK_SCALE_FACTOR // 10000)
        self.watermark_min = wmin
        self.watermark_low = wmin + tmp
        self.watermark_high = wmin + 2 * tmp

    def min_wmark_pages(self) -> int:
        """Linux ``min_wmark_pages``."""
        return self.watermark_min

    def low_wmark_pages(self) -> int:
        """Linux ``low_wmark_pages``."""
        return self.watermark_low

    def high_wmark_pages(self) -> int:
        """Linux ``high_wmark_pages``."""
        return self.watermark_high

    def __repr__(self) -> str:
        return (
            f"Zone({self.name}, start_pfn={self.zone_start_pfn:#x}, "
            f"managed={self.managed_pages}, free={self.nr_free_pages})"
        )


def zone_watermark_ok(
    zone: Zone, order: int, mark: int, highest_zoneidx: int = 0,
    alloc_flags: AllocFlags = AllocFlags.NONE,
) -> bool:
    """Linux ``__zone_watermark_ok``: are there more than ``mark`` usable free pages?

    Usable excludes ``(1 << order) - 1`` pages and, without ``ALLOC_CMA``, free CMA pages; the
    zone must also keep ``lowmem_reserve[highest_zoneidx]``. For ``order > 0`` a block of at
    least ``order`` must exist on an ordinary list (or CMA with ``ALLOC_CMA``).
    """
    flags = int(alloc_flags)
    free_pages = zone.nr_free_pages - ((1 << order) - 1)
    if not flags & _ALLOC_CMA:
        free_pages -= zone.nr_free_cma_pages
    if flags & _ALLOC_HIGH:
        mark -= mark // 2
    if free_pages <= mark + zone.lowmem_reserve[highest_zoneidx]:
        return False
    if order == 0:
        return True
    cma = bool(flags & _ALLOC_CMA)
    for o in range(order, MAX_ORDER):
        area = zone.free_area[o]
        if not area.nr_free:
            continue
        lists = area.free_list
        for mt in range(MIGRATE_PCPTYPES):
            if lists[mt].next is not lists[mt]:
                return True
        if cma and lists[_CMA].next is not lists[_CMA]:
            return True
    return False
