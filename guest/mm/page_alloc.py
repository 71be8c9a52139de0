"""The buddy page allocator of Linux 6.1 ``mm/page_alloc.c``, modelled on free blocks.

What it keeps faithfully: zones and ``free_area[order].free_list[migratetype]``; ``nr_free``
per order; buddy merging on free (``__free_one_page``: ``buddy_pfn = pfn ^ (1 << order)``, same
order, same zone, and at ``order >= pageblock_order`` the two pageblocks' migratetypes must be
equal or both mergeable); head/tail placement (``FPI_TO_TAIL``, else optional shuffle at the top
order, else ``buddy_merge_likely``); allocation from the list *head* (``__rmqueue_smallest``)
splitting with ``expand()`` (upper halves to the head, unreported); ``__rmqueue_fallback`` in
Linux fallback order, claiming whole pageblocks when it steals a block of ``pageblock_order`` or
more; the CMA balancing of ``__rmqueue``; zone watermarks with a low-then-min zonelist walk;
``__isolate_free_page`` / ``__putback_isolated_page``; the Reported flag, cleared whenever a
block leaves a free list; the ``page_reporting_notify_free(order)`` hook with the final merged
order.

What it leaves out: per-cpu page lists (every free reaches ``__free_one_page`` at once, as if
``pcp->high`` were 0), reclaim, compaction, the OOM killer, ``ALLOC_NOFRAGMENT``, highatomic
reserves, and claiming a pageblock when a *small* fallback steal finds it half free.

Memory and time scale with the number of free blocks (see :mod:`guest.mm.freelist`): a 1 TiB
guest is built in well under a second.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import structlog

from guest.mm.freelist import FreeBlock
from guest.mm.layout import maximal_blocks, normalize_ranges, split_by_zone, subtract_ranges
from guest.mm.rmqueue import rmqueue
from guest.mm.types import (
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    PAGE_SHIFT,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    AllocFlags,
    Fpi,
    Gfp,
    MigrateType,
    ZoneType,
)
from guest.mm.zone import (
    LOWMEM_RESERVE_RATIO,
    Zone,
    calculate_min_free_kbytes,
    zone_watermark_ok,
)
from protocol.errors import ConfigError, UsageError

__all__ = ["FreeBlockInfo", "PageAllocator"]

_log = structlog.get_logger("vballoon.guest")

_MOVABLE = int(MigrateType.MOVABLE)
_ISOLATE = int(MigrateType.ISOLATE)
_TOP = MAX_ORDER - 1
_FPI_TO_TAIL = int(Fpi.TO_TAIL)
_FPI_SKIP_REPORT_NOTIFY = int(Fpi.SKIP_REPORT_NOTIFY)
_PUTBACK = _FPI_TO_TAIL | _FPI_SKIP_REPORT_NOTIFY
_MT = tuple(MigrateType)
_ALLOC_CMA = int(AllocFlags.CMA)
_ALLOC_HIGH = int(AllocFlags.HIGH)
_GFP_DMA, _GFP_DMA32, _GFP_HIGH, _GFP_NOWARN = (int(Gfp.DMA), int(Gfp.DMA32), int(Gfp.HIGH),
                                                int(Gfp.NOWARN))


class FreeBlockInfo(NamedTuple):
    """A read-only view of one free block, for tests and the teaching view."""

    zone: ZoneType
    order: int
    mt: MigrateType
    pfn: int
    reported: bool


class PageAllocator:
    """Zones of free blocks built from guest-physical RAM ranges, with Linux's operations.

    Args:
        ram: usable RAM as ``(gpa, size)`` byte ranges or ``MemoryRegion``-like objects
            (``.gpa``, ``.size``), like memblock's memory list. Partial pages are dropped.
        reserved: byte ranges never given to the allocator (kernel image, rings, firmware),
            like ``memblock_reserve``; every page they touch is reserved.
        shuffle: ``CONFIG_SHUFFLE_PAGE_ALLOCATOR``: top-order frees go to a random end.
        seed: seed of the shuffle's random choices.

    Raises:
        ConfigError: overlapping RAM ranges, ranges outside 52-bit physical memory, no RAM.
    """

    def __init__(
        self, ram: Iterable[Any], *, reserved: Iterable[Any] = (), shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.ram_ranges = normalize_ranges(ram, what="RAM", inner=True)
        if not self.ram_ranges:
            raise ConfigError("the guest has no RAM: no whole 4 KiB page in the RAM ranges")
        self.reserved_ranges = normalize_ranges(reserved, what="reserved", inner=False)
        self.usable_ranges = subtract_ranges(self.ram_ranges, self.reserved_ranges)
        present = split_by_zone(self.ram_ranges)
        usable = split_by_zone(self.usable_ranges)
        zones = []
        for zt in ZoneType:
            if zt not in present:
                continue
            spans = present[zt]
            zones.append(Zone(
                zt, spans[0][0], spans[-1][1], sum(e - s for s, e in spans),
                sum(e - s for s, e in usable.get(zt, ())),
            ))
        self.zones: tuple[Zone, ...] = tuple(zones)
        self.on_free: Callable[[int], None] | None = None
        """Called as ``on_free(order)`` after every free that may notify, with the final merged
        order (Linux ``page_reporting_notify_free``; page reporting registers itself here)."""
        self.on_alloc: Callable[[int, int], None] | None = None
        """Called as ``on_alloc(pfn, order)`` after every successful allocation (the balloon's
        hint ledger counts hinted pages the guest reuses)."""
        self.shuffle = shuffle
        self._rng = random.Random(seed)
        self._allocated: dict[int, int] = {}
        self._isolated: dict[int, int] = {}
        self.nr_allocated_pages = 0
        self.nr_isolated_pages = 0
        self.nr_allocs = 0
        self.nr_frees = 0
        self.nr_alloc_fail = 0
        self.seq = 0
        """Bumped by every operation that changes the free lists (the walker checks it)."""
        self.walk_pass = 0
        """Id of the newest :mod:`guest.walker` pass (0 = none yet)."""
        self._setup_per_zone_lowmem_reserve()
        self._setup_per_zone_wmarks()
        for zone in self.zones:
            self._free_boot_ranges(zone, usable.get(zone.idx, []))

    @classmethod
    def for_size(
        cls, size: int, *, base: int = 0, holes: Iterable[tuple[int, int]] = (),
        reserved: Iterable[Any] = (), **kwargs: Any,
    ) -> PageAllocator:
        """The allocator for ``GuestMemory.create(size, base=base, holes=holes)``'s layout."""
        ram = subtract_ranges(
            [(base, base + size)], sorted((s, s + n) for s, n in holes)
        )
        return cls([(s, e - s) for s, e in ram], reserved=reserved, **kwargs)

    # ---- boot -----------------------------------------------------------------------------
    def _setup_per_zone_lowmem_reserve(self) -> None:
        managed = {z.idx: z.managed_pages for z in self.zones}
        for zone in self.zones:
            ratio = LOWMEM_RESERVE_RATIO[zone.idx]
            upper = 0
            for j in range(zone.idx + 1, len(ZoneType)):
                upper += managed.get(ZoneType(j), 0)
                zone.lowmem_reserve[j] = upper // ratio if zone.managed_pages else 0

    def _setup_per_zone_wmarks(self) -> None:
        total = sum(z.managed_pages for z in self.zones)
        pages_min = calculate_min_free_kbytes(total) >> (PAGE_SHIFT - 10)
        for zone in self.zones:
            zone.setup_watermarks(pages_min, total)

    def _free_boot_ranges(self, zone: Zone, ranges: list[tuple[int, int]]) -> None:
        """``memblock_free_all``: each range as maximal blocks, ascending, to the list tails."""
        lists = [area.free_list[_MOVABLE] for area in zone.free_area]
        fb = zone.free_blocks
        counts = [0] * MAX_ORDER
        for start, end in ranges:
            for pfn, order in maximal_blocks(start, end):
                block = FreeBlock(pfn, order, _MOVABLE)
                head = lists[order]
                last = head.prev
                block.next = head
                block.prev = last
                last.next = block
                head.prev = block
                fb[pfn] = block
                counts[order] += 1
        for order, n in enumerate(counts):
            lists[order].count += n
            zone.free_area[order].nr_free += n
            zone.nr_free_pages += n << order

    # ---- lookup -----------------------------------------------------------------------------
    def zone_for_pfn(self, pfn: int) -> Zone | None:
        """Linux ``page_zone``: the zone whose span holds ``pfn`` (None outside every zone)."""
        for zone in self.zones:
            if zone.zone_start_pfn <= pfn < zone.zone_start_pfn + zone.spanned_pages:
                return zone
        return None

    def get_pageblock_migratetype(self, pfn: int) -> MigrateType:
        """The migratetype of the pageblock holding ``pfn``."""
        return _MT[self._zone_or_raise(pfn).get_pageblock_migratetype(pfn)]

    def _zone_or_raise(self, pfn: int) -> Zone:
        if not isinstance(pfn, int) or isinstance(pfn, bool):
            raise UsageError(f"pfn {pfn!r} is not an integer")
        zone = self.zone_for_pfn(pfn)
        if zone is None:
            raise UsageError(f"pfn {pfn:#x} is outside every zone of guest RAM")
        return zone

    # ---- allocation -------------------------------------------------------------------------
    def alloc_pages(
        self, order: int = 0, migratetype: MigrateType | int = MigrateType.MOVABLE, *,
        gfp: Gfp = Gfp.NONE,
    ) -> int | None:
        """Linux ``alloc_pages``: a block of ``1 << order`` pages; its first pfn, or None.

        Zones are tried from the highest the GFP flags allow down to DMA, first against the
        low watermark (fast path), then against the min watermark (slow path, halved with
        ``Gfp.HIGH``). Each zone must also keep its ``lowmem_reserve``.

        Raises:
            UsageError: ``order`` outside 0..MAX_ORDER-1 (Linux warns and returns NULL), or a
                migratetype an allocation cannot ask for (only the first three).
        """
        if not isinstance(order, int) or not 0 <= order < MAX_ORDER:
            raise UsageError(f"alloc_pages order {order!r} is outside 0..{MAX_ORDER - 1}")
        if not isinstance(migratetype, int) or not 0 <= migratetype < MIGRATE_PCPTYPES:
            raise UsageError(
                f"alloc_pages migratetype {migratetype!r} must be UNMOVABLE, MOVABLE or"
                " RECLAIMABLE"
            )
        mt = int(migratetype)
        g = int(gfp)
        if g & _GFP_DMA:
            highest = ZoneType.DMA
        elif g & _GFP_DMA32:
            highest = ZoneType.DMA32
        else:
            highest = ZoneType.NORMAL
        flags = _ALLOC_CMA if mt == _MOVABLE else 0
        zonelist = [z for z in reversed(self.zones) if z.idx <= highest]
        for low in (True, False):
            if not low and g & _GFP_HIGH:
                flags |= _ALLOC_HIGH
            for zone in zonelist:
                mark = zone.watermark_low if low else zone.watermark_min
                if not zone_watermark_ok(zone, order, mark, highest, flags):
                    continue
                pfn = rmqueue(zone, order, mt, flags)
                if pfn is not None:
                    self._allocated[pfn] = order
                    self.nr_allocated_pages += 1 << order
                    self.nr_allocs += 1
                    self.seq += 1
                    if self.on_alloc is not None:
                        self.on_alloc(pfn, order)
                    return pfn
        self.nr_alloc_fail += 1
        if not g & _GFP_NOWARN:
            _log.warning("mm.alloc_fail", order=order, migratetype=_MT[mt].name,
                         free_pages=self.nr_free_pages())
        return None

    def split_page(self, pfn: int, order: int) -> None:
        """Linux ``split_page``: an order-``order`` allocation becomes order-0 allocations."""
        if self._allocated.get(pfn) != order:
            raise UsageError(f"split_page: no order-{order} allocation at pfn {pfn:#x}")
        for p in range(pfn, pfn + (1 << order)):
            self._allocated[p] = 0

    # ---- freeing ----------------------------------------------------------------------------
    def free_pages(self, pfn: int, order: int = 0) -> None:
        """Linux ``__free_pages``: give back an allocation (exact pfn and order).

        Raises:
            UsageError: double free, a pfn that is reserved, isolated, outside RAM, not the start
                of an allocation, or an order that differs from the allocation's.
        """
        try:
            allocated = self._allocated.get(pfn)
        except TypeError:
            raise UsageError(f"free_pages: pfn {pfn!r} is not a page frame number") from None
        if allocated != order:
            raise self._bad_free(pfn, order, allocated)
        del self._allocated[pfn]
        self.nr_allocated_pages -= 1 << order
        self.nr_frees += 1
        zone = self.zone_for_pfn(pfn)
        self._free_one_page(zone, pfn, order, zone.get_pageblock_migratetype(pfn), 0)

    def _free_one_page(self, zone: Zone, pfn: int, order: int, mt: int, fpi: int) -> FreeBlock:
        """Linux ``__free_one_page``: merge with free buddies, place, notify; the final block.

        A block larger than a pageblock whose pageblocks can no longer merge (a type changed
        while it was allocated or isolated) is freed as pageblock-sized pieces, each on its own
        type's list, as Linux 6.10's ``split_large_buddy`` does; 6.1 would keep it whole on one
        list. The returned block is then the one holding ``pfn``.
        """
        self.seq += 1
        fb = zone.free_blocks
        flags = zone.pageblock_flags
        base = zone.pageblock_base
        if order > PAGEBLOCK_ORDER:
            for p in range(pfn, pfn + (1 << order), PAGEBLOCK_NR_PAGES):
                t = flags[(p >> PAGEBLOCK_ORDER) - base]
                if t != mt and (t >= MIGRATE_PCPTYPES or mt >= MIGRATE_PCPTYPES):
                    return self._split_large_buddy(zone, pfn, order, fpi)
        buddy_pfn = pfn ^ (1 << order)
        while order < _TOP:
            buddy_pfn = pfn ^ (1 << order)
            buddy = fb.get(buddy_pfn)
            if buddy is None or buddy.order != order:
                break
            if order >= PAGEBLOCK_ORDER and not _mergeable(
                    mt, flags[(buddy_pfn >> PAGEBLOCK_ORDER) - base]):
                break
            zone.del_page_from_free_list(buddy)
            pfn &= buddy_pfn
            order += 1
        block = FreeBlock(pfn, order, mt)
        if fpi & _FPI_TO_TAIL:
            tail = True
        elif self.shuffle and order >= _TOP:
            tail = bool(self._rng.getrandbits(1))  # shuffle_pick_tail()
        elif order >= MAX_ORDER - 2:
            tail = False
        else:
            # buddy_merge_likely(): is the buddy of the next-higher block free already?
            higher = (buddy_pfn & pfn) ^ (1 << (order + 1))
            hb = fb.get(higher)
            tail = hb is not None and hb.order == order + 1
        zone.add_to_free_list(block, tail)
        if not fpi & _FPI_SKIP_REPORT_NOTIFY and self.on_free is not None:
            self.on_free(order)  # page_reporting_notify_free(order)
        return block

    def _split_large_buddy(self, zone: Zone, pfn: int, order: int, fpi: int) -> FreeBlock:
        """Free [pfn, pfn + (1 << order)) as pageblocks, each with its own type."""
        pbmt = zone.get_pageblock_migratetype
        blocks = [self._free_one_page(zone, p, PAGEBLOCK_ORDER, pbmt(p), fpi)
                  for p in range(pfn, pfn + (1 << order), PAGEBLOCK_NR_PAGES)]
        return next(b for b in blocks if b.next is not None and b.pfn <= pfn)

    def _bad_free(self, pfn: int, order: int, allocated: int | None) -> UsageError:
        """The most precise reason a free_pages(pfn, order) call is wrong."""
        what = f"free_pages(pfn={pfn!r}, order={order!r})"
        if not isinstance(order, int) or not 0 <= order < MAX_ORDER:
            return UsageError(f"{what}: order outside 0..{MAX_ORDER - 1}")
        if allocated is not None:
            return UsageError(f"{what}: the allocation at that pfn has order {allocated}")
        if not isinstance(pfn, int) or isinstance(pfn, bool) or pfn < 0:
            return UsageError(f"{what}: pfn is not a page frame number")
        zone = self.zone_for_pfn(pfn)
        if zone is None or not _in_ranges(pfn, self.ram_ranges):
            return UsageError(f"{what}: pfn {pfn:#x} is outside guest RAM")
        if _in_ranges(pfn, self.reserved_ranges):
            return UsageError(f"{what}: pfn {pfn:#x} is reserved, never allocated")
        block = self._free_block_at(zone, pfn)
        if block is not None:
            return UsageError(f"{what}: double free (pfn {pfn:#x} is in the free order-"
                              f"{block.order} block at {block.pfn:#x})")
        for o in range(MAX_ORDER):
            base = pfn & ~((1 << o) - 1)
            if self._isolated.get(base) == o:
                return UsageError(f"{what}: pfn {pfn:#x} is isolated (by page reporting)")
            if self._allocated.get(base) == o:
                return UsageError(f"{what}: pfn {pfn:#x} is inside the order-{o} allocation "
                                  f"at {base:#x}, not its start")
        return UsageError(f"{what}: pfn {pfn:#x} is not allocated")

    # ---- isolation (page reporting) ------------------------------------------------------
    def isolate_free_block(self, zone: Zone, block: FreeBlock) -> bool:
        """Linux ``__isolate_free_page`` on a block object (the reporting hot path).

        Fails (False) if taking it would leave the zone at or below ``min + (1 << order)``
        free pages (blocks in ``MIGRATE_ISOLATE`` pageblocks skip the check). An isolated block
        of at least half a pageblock turns its ordinary pageblocks MOVABLE.
        """
        order = block.order
        pfn = block.pfn
        flags = zone.pageblock_flags
        base = zone.pageblock_base
        if (flags[(pfn >> PAGEBLOCK_ORDER) - base] != _ISOLATE
                and zone.nr_free_pages <= zone.watermark_min + (1 << order)):
            return False
        self.seq += 1
        zone.del_page_from_free_list(block)
        if order >= PAGEBLOCK_ORDER - 1:
            for p in range(pfn, pfn + (1 << order) - 1, PAGEBLOCK_NR_PAGES):
                i = (p >> PAGEBLOCK_ORDER) - base
                if flags[i] < MIGRATE_PCPTYPES:
                    flags[i] = _MOVABLE
        self._isolated[pfn] = order
        self.nr_isolated_pages += 1 << order
        return True

    def putback_isolated_block(self, zone: Zone, pfn: int, order: int, mt: int) -> FreeBlock:
        """Linux ``__putback_isolated_page``: free to the tail, no report notification.

        Returns the block the pages ended up in (larger than ``order`` if they merged).
        """
        if self._isolated.get(pfn) != order:
            raise UsageError(f"putback of pfn {pfn:#x} order {order}: it is not isolated")
        del self._isolated[pfn]
        self.nr_isolated_pages -= 1 << order
        return self._free_one_page(zone, pfn, order, mt, _PUTBACK)

    def isolate_free_page(self, pfn: int, order: int) -> int:
        """Linux ``__isolate_free_page(page, order)``: ``1 << order`` on success, else 0.

        Raises:
            UsageError: ``pfn`` is not the head of a free block of exactly ``order``.
        """
        zone = self._zone_or_raise(pfn)
        block = zone.free_blocks.get(pfn)
        if block is None or block.order != order:
            raise UsageError(f"isolate_free_page: no free order-{order} block at pfn {pfn:#x}")
        return 1 << order if self.isolate_free_block(zone, block) else 0

    def putback_isolated_page(self, pfn: int, order: int, mt: int | None = None) -> bool:
        """Linux ``__putback_isolated_page``; ``mt`` defaults to the pageblock's type.

        Returns whether the pages merged with free buddies, i.e. did not come back as one
        block of exactly ``order`` (page reporting marks only such unchanged blocks Reported;
        a block split by pageblock types, see ``_free_one_page``, counts as merged too).
        """
        zone = self._zone_or_raise(pfn)
        if mt is None:
            mt = zone.get_pageblock_migratetype(pfn)
        return self.putback_isolated_block(zone, pfn, order, mt).order != order

    # ---- pageblock types ----------------------------------------------------------------------
    def set_pageblock_migratetype(self, pfn: int, migratetype: MigrateType | int) -> None:
        """Change the type of the pageblock holding ``pfn`` and keep the free lists right.

        Combines what Linux does around a type change: a free block larger than a pageblock
        that covers it is split into pageblocks first (``split_free_page``); free blocks inside
        move to the tail of the new type's list keeping Reported (``move_freepages_block``);
        and a whole free pageblock whose buddy may now merge is re-freed so it does
        (``unset_migratetype_isolate``). Re-freed blocks go to the tail, unreported.
        """
        zone = self._zone_or_raise(pfn)
        if not isinstance(migratetype, int) or not 0 <= migratetype < MIGRATE_TYPES:
            raise UsageError(f"migratetype {migratetype!r} is outside 0..{MIGRATE_TYPES - 1}")
        mt = int(migratetype)
        self.seq += 1
        start = pfn & ~(PAGEBLOCK_NR_PAGES - 1)
        fb = zone.free_blocks
        pieces: list[int] = []
        for order in range(PAGEBLOCK_ORDER + 1, MAX_ORDER):
            big = fb.get(start & ~((1 << order) - 1))
            if big is not None and big.order == order:
                zone.del_page_from_free_list(big)
                pieces = list(range(big.pfn, big.pfn + (1 << order), PAGEBLOCK_NR_PAGES))
                break
        zone.set_pageblock_migratetype(start, mt)
        p = start
        end = min(start + PAGEBLOCK_NR_PAGES, zone.zone_end_pfn)
        while p < end:
            block = fb.get(p)
            if block is not None:
                if block.mt != mt:
                    zone.move_to_free_list(block, mt)
                p += 1 << block.order
                continue
            used = self._allocated.get(p, self._isolated.get(p))
            p += 1 << used if used is not None else 1
        for piece in pieces:
            self._free_one_page(zone, piece, PAGEBLOCK_ORDER,
                                zone.get_pageblock_migratetype(piece), _PUTBACK)
        block = fb.get(start)
        if not pieces and block is not None and block.order == PAGEBLOCK_ORDER:
            buddy_pfn = start ^ PAGEBLOCK_NR_PAGES
            buddy = fb.get(buddy_pfn)
            if (buddy is not None and buddy.order == PAGEBLOCK_ORDER
                    and _mergeable(mt, zone.get_pageblock_migratetype(buddy_pfn))):
                zone.del_page_from_free_list(block)
                self._free_one_page(zone, start, PAGEBLOCK_ORDER, mt, _PUTBACK)

    # ---- accounting -----------------------------------------------------------------------
    def nr_free_pages(self) -> int:
        """Linux ``nr_free_pages()``: ``NR_FREE_PAGES`` summed over zones (isolated excluded)."""
        return sum(z.nr_free_pages for z in self.zones)

    def totalram_pages(self) -> int:
        """Linux ``totalram_pages()``: the managed pages of all zones."""
        return sum(z.managed_pages for z in self.zones)

    def adjust_managed_page_count(self, pfn: int, count: int) -> None:
        """Linux ``adjust_managed_page_count``: the balloon takes pages out of totalram."""
        self._zone_or_raise(pfn).managed_pages += count

    # ---- introspection ----------------------------------------------------------------------
    def free_blocks(self) -> Iterator[FreeBlockInfo]:
        """Every free block: zones in order, orders ascending, migratetypes, head to tail."""
        for zone in self.zones:
            for area in zone.free_area:
                for head in area.free_list:
                    for b in head:
                        yield FreeBlockInfo(zone.idx, b.order, _MT[b.mt], b.pfn, b.reported)

    def find_free_block(self, pfn: int) -> FreeBlockInfo | None:
        """The free block that holds ``pfn``, or None if the page is not free."""
        zone = self.zone_for_pfn(pfn)
        b = self._free_block_at(zone, pfn) if zone is not None else None
        if b is None:
            return None
        return FreeBlockInfo(zone.idx, b.order, _MT[b.mt], b.pfn, b.reported)

    @staticmethod
    def _free_block_at(zone: Zone, pfn: int) -> FreeBlock | None:
        fb = zone.free_blocks
        for order in range(MAX_ORDER):
            b = fb.get(pfn & ~((1 << order) - 1))
            if b is not None and b.pfn + (1 << b.order) > pfn:
                return b
        return None

    def allocations(self) -> dict[int, int]:
        """A copy of the live allocations: first pfn -> order."""
        return dict(self._allocated)

    def isolated_blocks(self) -> dict[int, int]:
        """A copy of the isolated blocks (taken by page reporting): pfn -> order."""
        return dict(self._isolated)

    def is_allocated(self, pfn: int, order: int) -> bool:
        """Whether an allocation of exactly ``order`` starts at ``pfn``."""
        return self._allocated.get(pfn) == order

    def buddyinfo(self) -> dict[str, tuple[int, ...]]:
        """``/proc/buddyinfo``: per zone name, ``nr_free`` of each order."""
        return {z.name: tuple(a.nr_free for a in z.free_area) for z in self.zones}

    def check_invariants(self) -> None:
        """Raise :class:`~guest.mm.debug.AllocatorInvariantError` on any inconsistency."""
        from guest.mm.debug import check_invariants

        check_invariants(self)


def _mergeable(mt: int, buddy_mt: int) -> bool:
    """The pageblock rule of ``__free_one_page`` at ``order >= pageblock_order``."""
    return mt == buddy_mt or (mt < MIGRATE_PCPTYPES and buddy_mt < MIGRATE_PCPTYPES)


def _in_ranges(pfn: int, ranges: list[tuple[int, int]]) -> bool:
    return any(s <= pfn < e for s, e in ranges)
