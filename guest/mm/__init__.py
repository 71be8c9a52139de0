"""The guest's page allocator: Linux 6.1's buddy allocator, modelled on free blocks.

Read in this order: :mod:`guest.mm.types` (constants, migratetypes, flags),
:mod:`guest.mm.freelist` (free blocks and intrusive lists), :mod:`guest.mm.zone` (free areas,
pageblock types, watermarks), :mod:`guest.mm.layout` (RAM ranges to zones and blocks),
:mod:`guest.mm.rmqueue` (taking blocks off the lists), :mod:`guest.mm.page_alloc` (the
allocator), :mod:`guest.mm.debug` (invariant checks).

>>> from guest.mm import PageAllocator, MigrateType
>>> mm = PageAllocator.for_size(64 << 20)
>>> pfn = mm.alloc_pages(3, MigrateType.MOVABLE)
>>> mm.free_pages(pfn, 3)
>>> mm.nr_free_pages() == mm.totalram_pages()
True
"""

from __future__ import annotations

from guest.mm.debug import AllocatorInvariantError, check_invariants
from guest.mm.freelist import FreeArea, FreeBlock, FreeList
from guest.mm.page_alloc import FreeBlockInfo, PageAllocator
from guest.mm.types import (
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    AllocFlags,
    Fpi,
    Gfp,
    MigrateType,
    ZoneType,
    migratetype_is_mergeable,
)
from guest.mm.zone import Zone, zone_watermark_ok

__all__ = [
    "MAX_ORDER",
    "MIGRATE_PCPTYPES",
    "MIGRATE_TYPES",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "AllocFlags",
    "AllocatorInvariantError",
    "FreeArea",
    "FreeBlock",
    "FreeBlockInfo",
    "FreeList",
    "Fpi",
    "Gfp",
    "MigrateType",
    "PageAllocator",
    "Zone",
    "ZoneType",
    "check_invariants",
    "migratetype_is_mergeable",
    "zone_watermark_ok",
]
