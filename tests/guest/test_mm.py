"""The buddy allocator model: construction, zones, watermarks, alloc/free, merge, placement."""

from __future__ import annotations

import time
from math import isqrt

import pytest

from guest.mm import (
    MAX_ORDER,
    PAGEBLOCK_NR_PAGES,
    Fpi,
    Gfp,
    MigrateType,
    PageAllocator,
    ZoneType,
)
from guest.mm.layout import maximal_blocks
from protocol.errors import ConfigError, UsageError

MiB = 1 << 20
GiB = 1 << 30


def zone(mm: PageAllocator, zt: ZoneType):
    return next(z for z in mm.zones if z.idx == zt)


def pfns(head) -> list[int]:
    return [b.pfn for b in head]


# ---- construction -------------------------------------------------------------------------
def test_zones_of_a_64mib_guest_are_dma_and_dma32_all_free_in_top_order_blocks():
    mm = PageAllocator.for_size(64 * MiB)
    assert [z.idx for z in mm.zones] == [ZoneType.DMA, ZoneType.DMA32]
    dma, dma32 = mm.zones
    assert (dma.zone_start_pfn, dma.spanned_pages) == (0, 4096)
    assert (dma32.zone_start_pfn, dma32.spanned_pages) == (4096, 16384 - 4096)
    assert mm.totalram_pages() == mm.nr_free_pages() == 16384
    assert mm.buddyinfo() == {"DMA": (0,) * 10 + (4,), "DMA32": (0,) * 10 + (12,)}
    mm.check_invariants()


def test_boot_lists_are_in_ascending_pfn_order_head_to_tail():
    mm = PageAllocator.for_size(64 * MiB)
    head = zone(mm, ZoneType.DMA32).free_area[10].free_list[MigrateType.MOVABLE]
    assert pfns(head) == list(range(4096, 16384, 1024))


def test_a_guest_above_4gib_has_a_normal_zone():
    mm = PageAllocator.for_size(6 * GiB)
    assert [z.idx for z in mm.zones] == list(ZoneType)
    normal = zone(mm, ZoneType.NORMAL)
    assert normal.zone_start_pfn == (4 * GiB) >> 12
    assert normal.managed_pages == (2 * GiB) >> 12


def test_a_pci_hole_below_4gib_is_a_hole_inside_dma32():
    mm = PageAllocator([(0, 3 * GiB), (4 * GiB, 3 * GiB)])  # q35-like: RAM above 4 GiB
    dma32, normal = zone(mm, ZoneType.DMA32), zone(mm, ZoneType.NORMAL)
    assert dma32.zone_end_pfn == (3 * GiB) >> 12
    assert normal.zone_start_pfn == (4 * GiB) >> 12 and normal.managed_pages == (3 * GiB) >> 12
    assert mm.find_free_block((3 * GiB) >> 12) is None
    mm.check_invariants()


def test_holes_and_reserved_ranges_are_never_free():
    bios_hole = (0xF0000, 0x10000)  # QEMU microvm's hole: pfns 0xf0..0xff
    kernel = (0x100000, 0x3FF000)  # pfns 0x100..0x4fe
    mm = PageAllocator.for_size(64 * MiB, holes=[bios_hole], reserved=[kernel, (0x500, 1)])
    dma = zone(mm, ZoneType.DMA)
    assert dma.present_pages == 4096 - 16
    assert dma.managed_pages == 4096 - 16 - 0x3FF - 1  # the byte at 0x500 reserves page 0
    for info in mm.free_blocks():
        start, end = info.pfn, info.pfn + (1 << info.order)
        assert start >= 1 and (end <= 0xF0 or start >= 0x4FF), info
    assert mm.find_free_block(0x4FF) is not None and mm.find_free_block(0x4FE) is None
    mm.check_invariants()
    assert mm.nr_free_pages() == mm.totalram_pages()


def test_free_ranges_are_cut_into_maximal_aligned_blocks():
    assert list(maximal_blocks(1, 8)) == [(1, 0), (2, 1), (4, 2)]
    blocks = list(maximal_blocks(3, 3000))
    assert sum(1 << o for _, o in blocks) == 2997
    assert all(p % (1 << o) == 0 and o < MAX_ORDER for p, o in blocks)
    assert blocks[0] == (3, 0) and (1024, 10) in blocks and (2048, 9) in blocks


@pytest.mark.parametrize(
    ("ram", "message"),
    [
        ([(0, 4 * MiB), (2 * MiB, 4 * MiB)], "RAM ranges overlap"),
        ([(0, 100)], "no RAM"),
        ([(0, 1 << 53)], "outside"),
        ([("a", 3)], "integers"),
        ([5], "not a"),
    ],
)
def test_reject_bad_ram_layouts(ram, message):
    with pytest.raises(ConfigError, match=message):
        PageAllocator(ram)


def test_a_1tib_guest_builds_fast_from_blocks_not_pages():
    t0 = time.perf_counter()
    mm = PageAllocator([(0, 0xF0000), (0x100000, (1 << 40) - 0x100000)])
    elapsed = time.perf_counter() - t0
    assert mm.totalram_pages() == (1 << 28) - 16  # 1 TiB minus the 64 KiB hole
    assert sum(len(z.free_blocks) for z in mm.zones) == 262_143 + 4 + 2
    assert elapsed < 2.0


# ---- watermarks ---------------------------------------------------------------------------
def test_watermarks_follow_the_min_free_kbytes_rule():
    mm = PageAllocator.for_size(1 * GiB)
    total = mm.totalram_pages()
    min_free_kbytes = min(max(isqrt(total * 4 * 16), 128), 262144)
    pages_min = min_free_kbytes // 4
    for z in mm.zones:
        wmin = pages_min * z.managed_pages // total
        gap = max(wmin // 4, z.managed_pages * 10 // 10000)
        assert (z.watermark_min, z.watermark_low, z.watermark_high) == (
            wmin, wmin + gap, wmin + 2 * gap)
    assert zone(mm, ZoneType.DMA32).watermark_low == 1266  # the documented example


def test_lowmem_reserve_keeps_dma32_from_normal_allocations():
    mm = PageAllocator.for_size(8 * GiB)
    dma32 = zone(mm, ZoneType.DMA32)
    assert dma32.lowmem_reserve[ZoneType.NORMAL] == zone(mm, ZoneType.NORMAL).managed_pages // 256
    assert dma32.lowmem_reserve[ZoneType.DMA32] == 0


def test_allocation_stops_at_the_min_watermark_and_gfp_high_digs_deeper():
    mm = PageAllocator.for_size(64 * MiB)
    while mm.alloc_pages(0, gfp=Gfp.NOWARN) is not None:
        pass
    for z in mm.zones:  # each zone keeps min plus its reserve against Normal-capable requests
        assert z.nr_free_pages == z.watermark_min + z.lowmem_reserve[ZoneType.NORMAL]
    assert mm.alloc_pages(0, gfp=Gfp.NOWARN | Gfp.HIGH) is not None
    assert mm.nr_alloc_fail == 1
    mm.check_invariants()


# ---- allocation ---------------------------------------------------------------------------
def test_alloc_takes_the_head_and_expand_puts_upper_halves_at_the_heads():
    mm = PageAllocator.for_size(64 * MiB)
    dma32 = zone(mm, ZoneType.DMA32)
    pfn = mm.alloc_pages(0)
    assert pfn == 4096  # DMA32 is tried first; its head is the lowest block
    area = dma32.free_area
    for order in range(10):
        assert pfns(area[order].free_list[MigrateType.MOVABLE]) == [4096 + (1 << order)]
    assert mm.alloc_pages(0) == 4097
    assert mm.alloc_pages(2) == 4100
    mm.check_invariants()


def test_free_merges_buddies_back_to_the_boot_layout():
    mm = PageAllocator.for_size(64 * MiB)
    before = mm.buddyinfo()
    got = [(mm.alloc_pages(o), o) for o in (0, 3, 0, 5, 9, 1, 10, 0)]
    for pfn, order in reversed(got):
        mm.free_pages(pfn, order)
    assert mm.buddyinfo() == before
    mm.check_invariants()


def test_unmovable_request_steals_a_whole_block_and_claims_its_pageblocks():
    mm = PageAllocator.for_size(64 * MiB)
    pfn = mm.alloc_pages(0, MigrateType.UNMOVABLE)
    assert pfn == 4096
    for p in (4096, 4096 + PAGEBLOCK_NR_PAGES):
        assert mm.get_pageblock_migratetype(p) == MigrateType.UNMOVABLE
    dma32 = zone(mm, ZoneType.DMA32)
    assert [len(dma32.free_area[o].free_list[MigrateType.UNMOVABLE]) for o in range(10)] == [1] * 10
    mm.free_pages(pfn, 0)
    info = mm.find_free_block(4096)
    assert (info.order, info.mt) == (10, MigrateType.UNMOVABLE)
    mm.check_invariants()


def test_movable_allocations_prefer_cma_when_it_is_most_of_free_memory():
    mm = PageAllocator.for_size(64 * MiB)
    cma_blocks = range(4096 + 4 * PAGEBLOCK_NR_PAGES, 16384, PAGEBLOCK_NR_PAGES)  # 20 of 24
    for p in cma_blocks:
        mm.set_pageblock_migratetype(p, MigrateType.CMA)
    dma32 = zone(mm, ZoneType.DMA32)
    assert dma32.nr_free_cma_pages == 20 * 512 > dma32.nr_free_pages // 2
    mm.check_invariants()
    movable = mm.alloc_pages(0, MigrateType.MOVABLE)
    assert mm.get_pageblock_migratetype(movable) == MigrateType.CMA
    for _ in range(8):  # other types never get CMA memory
        p = mm.alloc_pages(3, MigrateType.UNMOVABLE)
        assert mm.get_pageblock_migratetype(p) != MigrateType.CMA
    mm.check_invariants()


def test_free_placement_buddy_merge_likely_goes_to_the_tail():
    mm = PageAllocator.for_size(64 * MiB)
    a, b = mm.alloc_pages(10), mm.alloc_pages(10)
    assert (a, b) == (4096, 5120)
    mm.split_page(a, 10)
    mm.split_page(b, 10)
    order1 = zone(mm, ZoneType.DMA32).free_area[1].free_list[MigrateType.MOVABLE]
    mm.free_pages(5120)
    mm.free_pages(5121)  # order-1 block at 5120; its order-2 buddy 5122 is allocated: head
    for p in (4100, 4101, 4102, 4103):  # a free order-2 block at 4100
        mm.free_pages(p)
    mm.free_pages(4096)
    mm.free_pages(4097)  # order 1 at 4096; 4098 allocated, but 4100 (order 2) is free: tail
    assert pfns(order1) == [5120, 4096]
    mm.free_pages(5124)  # order 0, its buddy 5125 allocated, 5126 not free: head
    mm.free_pages(5126)  # order 0; higher buddy 5124 is order 0, not order 1: head
    order0 = zone(mm, ZoneType.DMA32).free_area[0].free_list[MigrateType.MOVABLE]
    assert pfns(order0)[:2] == [5126, 5124]
    mm.check_invariants()


def test_split_page_allocations_are_freed_one_page_at_a_time():
    mm = PageAllocator.for_size(64 * MiB)
    pfn = mm.alloc_pages(2)
    mm.split_page(pfn, 2)
    with pytest.raises(UsageError, match="order 0"):
        mm.free_pages(pfn, 2)
    for p in range(pfn, pfn + 4):
        mm.free_pages(p, 0)
    assert mm.nr_free_pages() == mm.totalram_pages()


# ---- errors -------------------------------------------------------------------------------
def test_reject_double_free_and_frees_of_what_was_never_allocated():
    mm = PageAllocator.for_size(64 * MiB, holes=[(0xF0000, 0x10000)], reserved=[(0, 4096)])
    pfn = mm.alloc_pages(3)
    mm.free_pages(pfn, 3)
    with pytest.raises(UsageError, match="double free"):
        mm.free_pages(pfn, 3)
    pfn = mm.alloc_pages(3)
    with pytest.raises(UsageError, match="has order 3"):
        mm.free_pages(pfn, 2)
    with pytest.raises(UsageError, match="inside the order-3 allocation"):
        mm.free_pages(pfn + 1, 0)
    with pytest.raises(UsageError, match="reserved"):
        mm.free_pages(0)
    with pytest.raises(UsageError, match="outside guest RAM"):
        mm.free_pages(0xF5)
    with pytest.raises(UsageError, match="outside guest RAM"):
        mm.free_pages(1 << 30)
    with pytest.raises(UsageError, match="order outside"):
        mm.free_pages(pfn, 11)
    with pytest.raises(UsageError, match="not a page frame number"):
        mm.free_pages([1])
    mm.check_invariants()


@pytest.mark.parametrize(("order", "mt"), [(11, 1), (-1, 1), (0, MigrateType.CMA), (0, 9)])
def test_reject_bad_allocation_requests(order, mt):
    mm = PageAllocator.for_size(64 * MiB)
    with pytest.raises(UsageError):
        mm.alloc_pages(order, mt)


# ---- isolation, putback, Reported -------------------------------------------------------
def test_isolate_then_putback_goes_to_the_tail_without_notifying():
    mm = PageAllocator.for_size(64 * MiB)
    notified = []
    mm.on_free = notified.append
    head = zone(mm, ZoneType.DMA32).free_area[10].free_list[MigrateType.MOVABLE]
    assert mm.isolate_free_page(4096, 10) == 1024
    assert mm.nr_free_pages() == mm.totalram_pages() - 1024
    with pytest.raises(UsageError, match="double free|isolated"):
        mm.free_pages(4096, 10)
    assert mm.putback_isolated_page(4096, 10) is False
    assert pfns(head)[-1] == 4096
    assert notified == []
    mm.check_invariants()


def test_isolation_respects_the_min_watermark():
    mm = PageAllocator.for_size(64 * MiB)
    dma = zone(mm, ZoneType.DMA)
    # the DMA zone has 4096 pages and a min watermark of 64: isolate until it refuses
    taken = [b.pfn for b in list(dma.free_area[10].free_list[MigrateType.MOVABLE])]
    results = [mm.isolate_free_page(p, 10) for p in taken]
    assert results == [1024, 1024, 1024, 0]  # the last would leave 0 <= min + 1024
    mm.check_invariants()


def test_isolating_half_a_pageblock_makes_it_movable():
    mm = PageAllocator.for_size(64 * MiB)
    pfn = mm.alloc_pages(0, MigrateType.UNMOVABLE)  # claims 4096..5119 for UNMOVABLE
    order8 = 4096 + 256
    assert mm.find_free_block(order8).order == 8
    assert mm.isolate_free_page(order8, 8) == 256
    assert mm.get_pageblock_migratetype(order8) == MigrateType.MOVABLE
    assert mm.get_pageblock_migratetype(5120 - 1) == MigrateType.UNMOVABLE
    mm.putback_isolated_page(order8, 8)
    mm.free_pages(pfn, 0)
    mm.check_invariants()


def test_merging_clears_reported_and_putback_reports_only_unmerged():
    mm = PageAllocator.for_size(64 * MiB)
    pfn = mm.alloc_pages(9)  # splits 4096: the free upper half 4608 is order 9
    assert mm.isolate_free_page(4608, 9)
    assert mm.putback_isolated_page(4608, 9) is False
    dma32 = zone(mm, ZoneType.DMA32)
    dma32.free_blocks[4608].reported = True
    mm.free_pages(pfn, 9)  # merges with the reported buddy
    info = mm.find_free_block(4096)
    assert (info.order, info.reported) == (10, False)
    mm.check_invariants()


def test_allocation_clears_reported():
    mm = PageAllocator.for_size(64 * MiB)
    dma32 = zone(mm, ZoneType.DMA32)
    block = dma32.free_blocks[4096]
    block.reported = True
    assert mm.alloc_pages(10) == 4096
    assert block.reported is False and not block.on_list


def test_notify_hook_gets_the_final_merged_order():
    mm = PageAllocator.for_size(64 * MiB)
    a, b = mm.alloc_pages(0), mm.alloc_pages(0)
    seen = []
    mm.on_free = seen.append
    mm.free_pages(b, 0)
    mm.free_pages(a, 0)
    assert seen == [0, 10]


def test_isolate_pageblock_splits_a_top_block_and_stops_merging():
    mm = PageAllocator.for_size(64 * MiB)
    mm.set_pageblock_migratetype(4096, MigrateType.ISOLATE)
    iso = mm.find_free_block(4096)
    assert (iso.order, iso.mt) == (9, MigrateType.ISOLATE)
    assert (mm.find_free_block(4608).order, mm.find_free_block(4608).mt) == (9, MigrateType.MOVABLE)
    assert mm.nr_free_pages() == mm.totalram_pages() - 512
    mm.check_invariants()
    mm.set_pageblock_migratetype(4096, MigrateType.MOVABLE)
    assert mm.find_free_block(4096).order == 10
    assert mm.nr_free_pages() == mm.totalram_pages()
    mm.check_invariants()


def test_shuffle_sends_top_order_frees_to_both_ends():
    mm = PageAllocator.for_size(256 * MiB, shuffle=True, seed=1)
    head = zone(mm, ZoneType.DMA32).free_area[10].free_list[MigrateType.MOVABLE]
    got = [mm.alloc_pages(10) for _ in range(16)]
    for p in got:
        mm.free_pages(p, 10)
    firsts = set(pfns(head)[:16])
    assert firsts & set(got) and set(got) - firsts
    mm.check_invariants()


def test_fpi_flags_have_linux_values():
    assert (Fpi.SKIP_REPORT_NOTIFY, Fpi.TO_TAIL) == (1, 2)
    assert [m.value for m in MigrateType] == [0, 1, 2, 3, 4, 5]


def test_the_model_modules_are_sans_io():
    """guest.mm, the walker, reporting and workloads import no trio, socket, time or asyncio."""
    import ast
    from pathlib import Path

    import guest

    root = Path(guest.__file__).parent
    files = [*root.joinpath("mm").glob("*.py"), root / "walker.py", root / "reporting.py",
             root / "workload.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"trio", "socket", "time", "asyncio"}, path
