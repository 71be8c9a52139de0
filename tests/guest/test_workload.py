"""Workloads: seeded churn over the allocator, stamps written to and verified in real memory."""

from __future__ import annotations

import pytest

from guest.mm import PageAllocator
from guest.workload import (
    STAMP_SIZE,
    Workload,
    WorkloadProfile,
    expected_page,
)
from protocol.errors import UsageError
from virtqueue.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def guest():
    mem = GuestMemory.create(128 * MiB)
    mm = PageAllocator.for_size(128 * MiB)
    yield mm, mem
    mem.close()


def test_the_stamp_names_magic_generation_and_pfn():
    stamp = expected_page(0x12345, 7)
    assert len(stamp) == STAMP_SIZE == 16
    assert stamp[:4] == b"vbwl"
    assert int.from_bytes(stamp[4:8], "little") == 7
    assert int.from_bytes(stamp[8:], "little") == 0x12345
    assert expected_page(1, 2**32 + 3) == expected_page(1, 3)  # the generation wraps at u32


def test_steady_churn_stamps_every_page_and_tracks_the_allocator(guest):
    mm, mem = guest
    wl = Workload(mm, mem, "steady", seed=1, ops=400, max_live=40)
    kinds = [op.kind for op in iter(wl.step, None)]
    assert len(kinds) == 400 and wl.done
    assert {"alloc", "free"} <= set(kinds)
    assert 0 < len(wl.live) <= 40
    assert {a.pfn: a.order for a in wl.live} == mm.allocations()
    for alloc in wl.live:
        for p in range(alloc.pfn, alloc.pfn + (1 << alloc.order)):
            assert mem.read(p << 12, 16) == expected_page(p, alloc.generation)
    assert wl.verify() == []
    mm.check_invariants()


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not():
    def run(seed):
        with GuestMemory.create(64 * MiB) as mem:
            wl = Workload(PageAllocator.for_size(64 * MiB), mem, "steady", seed=seed, ops=200)
            return [op for op in iter(wl.step, None)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_burst_allocates_a_large_area_then_frees_it_all(guest):
    mm, mem = guest
    before = mm.buddyinfo()
    wl = Workload(mm, mem, WorkloadProfile.BURST, seed=2, ops=40, burst_order=9)
    wl.run(20)
    assert len(wl.live) == 20 and wl.live.pages() == 20 * 512  # a 40 MiB area
    assert wl.verify() == []
    wl.run()
    assert len(wl.live) == 0 and wl.frees == 20
    assert mm.buddyinfo() == before  # everything merged back
    mm.check_invariants()


def test_grow_only_allocates_until_memory_runs_out():
    with GuestMemory.create(64 * MiB) as mem:
        mm = PageAllocator.for_size(64 * MiB)
        wl = Workload(mm, mem, "grow", seed=3, ops=500, stamp_stride=64)
        ops = [op.kind for op in iter(wl.step, None)]
        assert "free" not in ops and "alloc_fail" in ops
        assert wl.alloc_failures == ops.count("alloc_fail")
        for z in mm.zones:  # it stopped near the watermarks
            assert z.nr_free_pages < z.watermark_low + 1024
        assert wl.verify() == []
        assert wl.free_all() == len(ops) - wl.alloc_failures
        assert mm.nr_free_pages() == mm.totalram_pages()


def test_idle_touches_nothing(guest):
    mm, mem = guest
    wl = Workload(mm, mem, "idle", ops=50)
    assert wl.run() == 50
    assert mm.nr_free_pages() == mm.totalram_pages() and mem.allocated_bytes() == 0


def test_verify_finds_discarded_and_overwritten_pages(guest):
    mm, mem = guest
    wl = Workload(mm, mem, "grow", seed=4, ops=30)
    wl.run()
    victim = max(wl.live, key=lambda a: a.order)
    mem.discard(victim.pfn << 12, 4096)  # the host dropped a page the guest still uses
    other = next(a for a in wl.live if a is not victim)
    mem.write(other.pfn << 12, expected_page(other.pfn, other.generation + 1))
    bad = {(m.pfn, m.actual) for m in wl.verify()}
    assert bad == {(victim.pfn, bytes(16)),
                   (other.pfn, expected_page(other.pfn, other.generation + 1))}


def test_stamp_stride_stamps_every_nth_page(guest):
    mm, mem = guest
    wl = Workload(mm, mem, "burst", ops=2, burst_order=4, stamp_stride=4)
    op = wl.step()
    pages = [mem.read((op.pfn + i) << 12, 16) for i in range(16)]
    assert [i for i, p in enumerate(pages) if p != bytes(16)] == [0, 4, 8, 12]


def test_operations_scale_with_ops_not_with_guest_size():
    size = 1 << 40
    with GuestMemory.create(size) as mem:
        mm = PageAllocator.for_size(size)
        wl = Workload(mm, mem, "steady", seed=9, ops=300, stamp_stride=16)
        assert wl.run() == 300
        assert wl.verify() == []
        assert mem.allocated_bytes() < 64 * MiB


@pytest.mark.parametrize(
    "kwargs",
    [{"profile": "busy"}, {"ops": -1}, {"max_live": 0}, {"stamp_stride": 0},
     {"burst_order": 11}],
)
def test_reject_bad_workload_parameters(guest, kwargs):
    mm, mem = guest
    with pytest.raises(UsageError):
        Workload(mm, mem, **kwargs)


def test_reject_freeing_what_the_workload_does_not_own(guest):
    mm, mem = guest
    wl = Workload(mm, mem)
    pfn = mm.alloc_pages(0)
    with pytest.raises(UsageError, match="not a live allocation"):
        wl.free(pfn)


@pytest.mark.parametrize("fill", [0x00, 0xAA])
def test_free_fill_clears_or_poisons_freed_blocks(fill):
    """init_on_free (0) / page poisoning (0xaa): a freed block holds only the fill byte."""
    mm = PageAllocator.for_size(64 << 20)
    with GuestMemory.create(64 << 20) as mem:
        w = Workload(mm, mem, "steady", seed=3, free_fill=fill)
        op = w.alloc(2)
        start, n = op.pfn << 12, 4 << 12
        assert mem.read(start, 4) == b"vbwl"
        w.free(op.pfn)
        assert mem.read(start, n) == bytes([fill]) * n


def test_without_free_fill_freed_blocks_keep_their_stamps():
    mm = PageAllocator.for_size(64 << 20)
    with GuestMemory.create(64 << 20) as mem:
        w = Workload(mm, mem, "steady", seed=3)
        op = w.alloc(0)
        w.free(op.pfn)
        assert mem.read(op.pfn << 12, 4) == b"vbwl"
