"""Constants and enums of the page allocator, as Linux 6.1 on x86-64 with 4 KiB pages.

Sources: ``include/linux/mmzone.h`` (``MAX_ORDER``, migratetypes, ``fallbacks``),
``include/linux/pageblock-flags.h`` (``pageblock_order``), ``mm/internal.h`` (``ALLOC_*``),
``mm/page_alloc.c`` (``FPI_*``). Linux spells some of these in lower case (``pageblock_order``);
here every constant is upper case and says which Linux name it stands for.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "FALLBACKS",
    "MAX_DMA32_PFN",
    "MAX_DMA_PFN",
    "MAX_ORDER",
    "MIGRATE_PCPTYPES",
    "MIGRATE_TYPES",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "AllocFlags",
    "Fpi",
    "Gfp",
    "MigrateType",
    "ZoneType",
    "migratetype_is_mergeable",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

MAX_ORDER = 11
"""Linux <= 6.3 ``MAX_ORDER``, *exclusive*: orders 0..10, the largest block is 4 MiB.

(6.4 redefined ``MAX_ORDER`` as 10 inclusive and 6.8 renamed it ``MAX_PAGE_ORDER``; the lists
never changed: 11 of them, top order 10.)"""

PAGEBLOCK_ORDER = 9
"""Linux ``pageblock_order`` = ``HUGETLB_PAGE_ORDER`` on x86-64: 512 pages, 2 MiB."""
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER
"""Linux ``pageblock_nr_pages``."""

MAX_DMA_PFN = (16 << 20) >> PAGE_SHIFT
"""``ZONE_DMA`` is the first 16 MiB of guest-physical memory (x86-64 ``MAX_DMA_PFN``)."""
MAX_DMA32_PFN = (4 << 30) >> PAGE_SHIFT
"""``ZONE_DMA32`` ends at 4 GiB (x86-64 ``MAX_DMA32_PFN``); ``ZONE_NORMAL`` is above."""


class MigrateType(IntEnum):
    """Migratetypes numbered as Linux 6.1 with ``CONFIG_CMA`` and ``CONFIG_MEMORY_ISOLATION``.

    ``MIGRATE_HIGHATOMIC`` shares its value with ``MIGRATE_PCPTYPES`` (the count of the first
    three, the only types an allocation asks for).
    """

    UNMOVABLE = 0
    MOVABLE = 1
    RECLAIMABLE = 2
    HIGHATOMIC = 3
    CMA = 4
    ISOLATE = 5

    @property
    def display_name(self) -> str:
        """The name ``/proc/pagetypeinfo`` prints ("Unmovable", "Movable", ...)."""
        return _DISPLAY[self]


_DISPLAY = ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "CMA", "Isolate")

MIGRATE_PCPTYPES = 3
"""Linux ``MIGRATE_PCPTYPES``: types below it are ordinary (mergeable) ones."""
MIGRATE_TYPES = 6
"""Linux ``MIGRATE_TYPES`` with both CMA and memory isolation configured."""

FALLBACKS: dict[int, tuple[int, ...]] = {
    MigrateType.UNMOVABLE: (MigrateType.RECLAIMABLE, MigrateType.MOVABLE),
    MigrateType.MOVABLE: (MigrateType.RECLAIMABLE, MigrateType.UNMOVABLE),
    MigrateType.RECLAIMABLE: (MigrateType.UNMOVABLE, MigrateType.MOVABLE),
}
"""Linux ``fallbacks[]``: where ``__rmqueue_fallback`` steals from, in order."""


def migratetype_is_mergeable(mt: int) -> bool:
    """Linux ``migratetype_is_mergeable``: only the three ordinary types merge across blocks."""
    return mt < MIGRATE_PCPTYPES


class ZoneType(IntEnum):
    """The x86-64 zones the model has (``ZONE_MOVABLE``/``ZONE_DEVICE`` are not modelled)."""

    DMA = 0
    DMA32 = 1
    NORMAL = 2

    @property
    def display_name(self) -> str:
        """The name ``/proc/zoneinfo`` prints ("DMA", "DMA32", "Normal")."""
        return ("DMA", "DMA32", "Normal")[self]


class Fpi(IntFlag):
    """Linux ``fpi_t`` flags of ``__free_one_page`` (values as 6.1)."""

    NONE = 0
    SKIP_REPORT_NOTIFY = 1 << 0
    """Do not call ``page_reporting_notify_free`` (putback of reported pages)."""
    TO_TAIL = 1 << 1
    """Place the freed block at the tail of its list (putback, memory onlining, boot)."""


class Gfp(IntFlag):
    """The subset of GFP flags the model gives a meaning to (values are model-local).

    The migratetype is passed to :meth:`PageAllocator.alloc_pages` directly rather than derived
    from ``__GFP_MOVABLE``/``__GFP_RECLAIMABLE``. There is no reclaim, compaction or OOM killer in
    the model, so every allocation behaves as ``__GFP_NORETRY``: it fails when no zone passes its
    watermark. ``NORETRY`` and ``NOMEMALLOC`` are accepted for fidelity of call sites.
    """

    NONE = 0
    DMA = 1 << 0
    """``__GFP_DMA``: only ``ZONE_DMA``."""
    DMA32 = 1 << 1
    """``__GFP_DMA32``: ``ZONE_DMA32`` and below."""
    HIGH = 1 << 2
    """``__GFP_HIGH``: ``ALLOC_HIGH``, may dip to half of the min watermark."""
    NOWARN = 1 << 3
    """``__GFP_NOWARN``: no ``mm.alloc_fail`` warning event on failure."""
    NORETRY = 1 << 4
    """``__GFP_NORETRY``: accepted; the model never retries."""
    NOMEMALLOC = 1 << 5
    """``__GFP_NOMEMALLOC``: accepted; the model has no memory reserves beyond watermarks."""


class AllocFlags(IntFlag):
    """Linux ``ALLOC_*`` flags of ``mm/internal.h`` that the watermark check uses."""

    NONE = 0
    HIGH = 1 << 0
    """``ALLOC_HIGH``: the mark is halved (``__GFP_HIGH`` callers)."""
    CMA = 1 << 1
    """``ALLOC_CMA``: free CMA pages count as usable (movable allocations, page reporting)."""
