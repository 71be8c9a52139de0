"""The memory statistics the balloon sends on its stats queue (virtio spec §5.5.6.3).

Linux ``update_balloon_stats`` (``drivers/virtio/virtio_balloon.c``): a fixed list of tags,
each a packed ``{le16 tag; le64 val}`` (10 bytes), only the filled entries sent; the same subset
every time (BAL-D-23). Values come from the guest model:

- MEMFREE = ``nr_free_pages() << 12`` (``si_meminfo`` freeram),
- MEMTOT = ``totalram_pages() << 12`` (managed pages: inflated pages leave it unless
  DEFLATE_ON_OOM, as ``adjust_managed_page_count`` does),
- AVAIL = ``si_mem_available()``: free pages minus ``totalreserve_pages`` plus the reclaimable
  part of the page cache, as Linux computes it,
- CACHES = ``NR_FILE_PAGES << 12``,
- the vm-event counters (swap, faults, OOM kills, reclaim) from :class:`VmEvents`, which a
  workload fills in; the allocator model has no swap or reclaim, so they default to 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from guest.balloon.options import StatsLayout
from protocol.balloon import StatTag

__all__ = [
    "STAT_SIZE",
    "MemoryModel",
    "VmEvents",
    "collect_stats",
    "pack_stats",
    "si_mem_available",
    "stats_tags",
]

STAT_SIZE = 10
_STAT = struct.Struct("<HQ")
_PAGE_SHIFT = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class VmEvents:
    """Linux vm-event counters and page-cache size, in pages or counts (Linux's own units)."""

    pswpin: int = 0
    pswpout: int = 0
    pgmajfault: int = 0
    pgfault: int = 0
    htlb_buddy_alloc_success: int = 0
    htlb_buddy_alloc_fail: int = 0
    oom_kill: int = 0
    allocstall: int = 0
    pgscan_kswapd: int = 0
    pgscan_direct: int = 0
    pgsteal_kswapd: int = 0
    pgsteal_direct: int = 0
    file_pages: int = 0
    """``NR_FILE_PAGES``: the page cache (CACHES)."""
    reclaimable_pages: int = 0
    """``NR_SLAB_RECLAIMABLE_B`` + ``NR_KERNEL_MISC_RECLAIMABLE``, in pages (AVAIL)."""


class _Zone(Protocol):
    managed_pages: int
    watermark_low: int
    watermark_high: int
    lowmem_reserve: list[int]


class MemoryModel(Protocol):
    """What the stats read from the allocator (``guest.mm.PageAllocator`` has it)."""

    zones: tuple[_Zone, ...]

    def nr_free_pages(self) -> int: ...
    def totalram_pages(self) -> int: ...


def stats_tags(layout: StatsLayout, *, hugetlb: bool) -> tuple[StatTag, ...]:
    """The tags in the order the chosen kernel sends them."""
    events = [StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MAJFLT, StatTag.MINFLT]
    if layout is StatsLayout.LINUX_6_12:
        events += [StatTag.OOM_KILL, StatTag.ALLOC_STALL, StatTag.ASYNC_SCAN,
                   StatTag.DIRECT_SCAN, StatTag.ASYNC_RECLAIM, StatTag.DIRECT_RECLAIM]
    if hugetlb:
        events += [StatTag.HTLB_PGALLOC, StatTag.HTLB_PGFAIL]
    return (*events, StatTag.MEMFREE, StatTag.MEMTOT, StatTag.AVAIL, StatTag.CACHES)


def si_mem_available(mm: MemoryModel, ev: VmEvents) -> int:
    """Linux ``si_mem_available`` in pages: free - totalreserve + reclaimable cache and slab."""
    wmark_low = sum(z.watermark_low for z in mm.zones)
    totalreserve = 0
    for z in mm.zones:  # calculate_totalreserve_pages()
        reserve = max(z.lowmem_reserve, default=0) + z.watermark_high
        totalreserve += min(reserve, z.managed_pages)
    available = mm.nr_free_pages() - totalreserve
    pagecache = ev.file_pages
    available += pagecache - min(pagecache // 2, wmark_low)
    reclaimable = ev.reclaimable_pages
    available += reclaimable - min(reclaimable // 2, wmark_low)
    return max(available, 0)


def collect_stats(mm: MemoryModel, ev: VmEvents, tags: tuple[StatTag, ...]
                  ) -> list[tuple[StatTag, int]]:
    """(tag, value) for each tag, values in the spec's units (bytes, or counts for faults)."""
    values: dict[StatTag, Callable[[], int]] = {
        StatTag.SWAP_IN: lambda: ev.pswpin << _PAGE_SHIFT,
        StatTag.SWAP_OUT: lambda: ev.pswpout << _PAGE_SHIFT,
        StatTag.MAJFLT: lambda: ev.pgmajfault,
        StatTag.MINFLT: lambda: ev.pgfault,
        StatTag.HTLB_PGALLOC: lambda: ev.htlb_buddy_alloc_success,
        StatTag.HTLB_PGFAIL: lambda: ev.htlb_buddy_alloc_fail,
        StatTag.OOM_KILL: lambda: ev.oom_kill,
        StatTag.ALLOC_STALL: lambda: ev.allocstall,
        StatTag.ASYNC_SCAN: lambda: ev.pgscan_kswapd << _PAGE_SHIFT,
        StatTag.DIRECT_SCAN: lambda: ev.pgscan_direct << _PAGE_SHIFT,
        StatTag.ASYNC_RECLAIM: lambda: ev.pgsteal_kswapd << _PAGE_SHIFT,
        StatTag.DIRECT_RECLAIM: lambda: ev.pgsteal_direct << _PAGE_SHIFT,
        StatTag.MEMFREE: lambda: mm.nr_free_pages() << _PAGE_SHIFT,
        StatTag.MEMTOT: lambda: mm.totalram_pages() << _PAGE_SHIFT,
        StatTag.AVAIL: lambda: si_mem_available(mm, ev) << _PAGE_SHIFT,
        StatTag.CACHES: lambda: ev.file_pages << _PAGE_SHIFT,
    }
    return [(tag, values[tag]() & 0xFFFFFFFFFFFFFFFF) for tag in tags]


def pack_stats(stats: list[tuple[StatTag, int]]) -> bytes:
    """The stats buffer: packed 10-byte ``virtio_balloon_stat`` entries (little-endian)."""
    return b"".join(_STAT.pack(int(tag), value) for tag, value in stats)
