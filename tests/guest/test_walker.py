"""The restartable walker of the 2018 thread: order of visits, rotation, stop/resume, budget,
and its guarantees when the allocator changes between calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest.mm import MAX_ORDER, Gfp, MigrateType, PageAllocator, ZoneType
from guest.walker import WalkStatus, walk_free_blocks
from protocol.errors import UsageError

MiB = 1 << 20


def expected_order(mm: PageAllocator, min_order: int) -> list[int]:
    """Zones in order, orders high to low, migratetypes (not ISOLATE), head to tail."""
    out = []
    for zone in mm.zones:
        for order in range(MAX_ORDER - 1, min_order - 1, -1):
            for mt in range(MigrateType.ISOLATE):
                out += [b.pfn for b in zone.free_area[order].free_list[mt]]
    return out


def fragmented(size=64 * MiB, seed=3) -> PageAllocator:
    """A guest with free blocks of many orders and two migratetypes."""
    import random

    rng = random.Random(seed)
    mm = PageAllocator.for_size(size)
    live = []
    for _ in range(300):
        order = rng.choice([0, 0, 1, 2, 3, 5, 9])
        mt = rng.choice([MigrateType.MOVABLE, MigrateType.MOVABLE, MigrateType.UNMOVABLE])
        pfn = mm.alloc_pages(order, mt)
        if pfn is not None:
            live.append((pfn, order))
    rng.shuffle(live)
    for pfn, order in live[: len(live) // 2]:
        mm.free_pages(pfn, order)
    return mm


class Recorder:
    def __init__(self, answer=lambda pfn: 1):
        self.seen: list[tuple[int, int, MigrateType]] = []
        self.answer = answer

    def __call__(self, zone, pfn, order, mt):
        self.seen.append((pfn, order, mt))
        return self.answer(pfn)


def test_a_pass_visits_every_block_in_zone_order_mt_list_order():
    mm = fragmented()
    want = expected_order(mm, 0)
    rec = Recorder()
    result = walk_free_blocks(mm, None, 0, rec)
    assert result.status is WalkStatus.COMPLETE and result.cursor is None
    assert [p for p, _, _ in rec.seen] == want
    assert result.visited == len(want) and result.reported == 0
    assert {mt for _, _, mt in rec.seen} == {MigrateType.MOVABLE, MigrateType.UNMOVABLE}


def test_min_order_limits_the_walk():
    mm = fragmented()
    rec = Recorder()
    walk_free_blocks(mm, None, 5, rec)
    assert [p for p, _, _ in rec.seen] == expected_order(mm, 5)
    assert all(order >= 5 for _, order, _ in rec.seen)


def test_reported_blocks_rotate_to_the_tail_in_visit_order_skipped_ones_stay():
    mm = PageAllocator.for_size(64 * MiB)
    head = mm.zones[1].free_area[10].free_list[MigrateType.MOVABLE]
    before = [b.pfn for b in head]
    report = {before[0], before[2], before[5]}
    rec = Recorder(lambda pfn: 0 if pfn in report else 1)
    result = walk_free_blocks(mm, None, 10, rec)
    assert result.reported == 3
    rest = [p for p in before if p not in report]
    assert [b.pfn for b in head] == rest + [before[0], before[2], before[5]]
    mm.check_invariants()


def test_stop_reports_the_value_and_resume_offers_the_stopping_block_again():
    mm = fragmented()
    want = expected_order(mm, 0)
    stop_at = want[7]
    calls = []

    def cb(zone, pfn, order, mt):
        calls.append(pfn)
        return -5 if pfn == stop_at and calls.count(pfn) == 1 else 1

    first = walk_free_blocks(mm, None, 0, cb)
    assert first.status is WalkStatus.STOPPED and first.value == -5
    assert calls == want[:8]
    second = walk_free_blocks(mm, first.cursor, 0, cb)
    assert second.status is WalkStatus.COMPLETE
    assert calls == want[:8] + want[7:]


def test_budget_yields_and_resuming_completes_the_pass_exactly_once():
    mm = fragmented()
    want = expected_order(mm, 0)
    rec = Recorder(lambda pfn: 0 if pfn % 3 == 0 else 1)
    cursor, calls = None, 0
    while True:
        result = walk_free_blocks(mm, cursor, 0, rec, budget=5)
        calls += 1
        assert result.visited <= 5
        if result.complete:
            break
        assert result.status is WalkStatus.BUDGET
        cursor = result.cursor
    assert sorted(p for p, _, _ in rec.seen) == sorted(want)
    assert calls == -(-len(want) // 5)
    mm.check_invariants()


def test_a_block_allocated_between_calls_is_not_offered():
    mm = PageAllocator.for_size(64 * MiB)
    rec = Recorder(lambda pfn: 0)
    first = walk_free_blocks(mm, None, 10, rec, budget=3)
    anchor_pfn = first.cursor.anchor.pfn
    assert anchor_pfn == 3072  # DMA's last block; the 3 reported ones went behind it
    assert mm.alloc_pages(10, gfp=Gfp.DMA) == anchor_pfn  # the head of DMA's list
    walk_free_blocks(mm, first.cursor, 10, rec)
    seen = [p for p, _, _ in rec.seen]
    assert anchor_pfn not in seen
    assert len(seen) == len(set(seen)) == 16 - 1


def test_split_and_merge_between_calls_never_double_report():
    mm = PageAllocator.for_size(64 * MiB)
    rec = Recorder(lambda pfn: 0)
    first = walk_free_blocks(mm, None, 0, rec, budget=4)
    # split a block not yet visited and one already visited, then merge one back
    unvisited = mm.alloc_pages(3)
    tail = mm.zones[0].free_area[10].free_list[MigrateType.MOVABLE].last()
    assert tail.walk == first.cursor.pass_id  # DMA's blocks were reported: at the tail
    visited_pfn = tail.pfn
    assert mm.isolate_free_page(visited_pfn, 10)
    mm.putback_isolated_page(visited_pfn, 10)  # a new block object: next pass
    mm.free_pages(unvisited, 3)
    result = walk_free_blocks(mm, first.cursor, 0, rec)
    assert result.complete
    seen = [(p, o) for p, o, _ in rec.seen]
    assert len(seen) == len(set(seen))
    assert seen.count((visited_pfn, 10)) == 1
    assert all(mm.find_free_block(p) is not None for p, _ in seen if p != unvisited)
    mm.check_invariants()


def dma32_cursor(mm: PageAllocator, rec: Recorder):
    """A pass stopped inside DMA32's order-10 list: 4096 and 5120 visited, anchor 6144."""
    result = walk_free_blocks(mm, None, 10, rec, budget=6)
    assert result.status is WalkStatus.BUDGET and result.cursor.anchor.pfn == 6144
    return result.cursor


def offered(rec: Recorder) -> list[int]:
    return [p for p, _, _ in rec.seen]


def test_a_block_freed_to_the_head_before_the_anchor_waits_for_the_next_pass():
    mm = PageAllocator.for_size(64 * MiB)
    rec = Recorder()
    cursor = dma32_cursor(mm, rec)
    pfn = mm.alloc_pages(10)
    assert pfn == 4096
    mm.free_pages(pfn, 10)  # a new block, at the head: in front of the live anchor
    walk_free_blocks(mm, cursor, 10, rec)
    assert offered(rec).count(4096) == 1  # only the old block object, before the churn
    rec2 = Recorder()
    walk_free_blocks(mm, None, 10, rec2)
    assert 4096 in offered(rec2)


def test_a_block_put_back_at_the_tail_joins_the_current_pass():
    mm = PageAllocator.for_size(64 * MiB)
    rec = Recorder()
    cursor = dma32_cursor(mm, rec)
    assert mm.isolate_free_page(4096, 10) and not mm.putback_isolated_page(4096, 10)
    walk_free_blocks(mm, cursor, 10, rec)
    assert offered(rec).count(4096) == 2  # the old object, then the new one at the tail
    assert offered(rec)[-1] == 4096


def test_when_the_anchor_vanishes_the_list_is_rescanned_skipping_visited_blocks():
    mm = PageAllocator.for_size(64 * MiB)
    rec = Recorder()
    cursor = dma32_cursor(mm, rec)
    assert mm.isolate_free_page(6144, 10)
    result = walk_free_blocks(mm, cursor, 10, rec)
    assert result.complete
    seen = offered(rec)
    assert 6144 not in seen and len(seen) == len(set(seen)) == 15


def test_reject_a_stale_cursor_a_changed_min_order_and_bad_arguments():
    mm = PageAllocator.for_size(64 * MiB)
    old = walk_free_blocks(mm, None, 9, Recorder(), budget=1).cursor
    walk_free_blocks(mm, None, 9, Recorder(), budget=1)
    with pytest.raises(UsageError, match="stale"):
        walk_free_blocks(mm, old, 9, Recorder())
    cur = walk_free_blocks(mm, None, 9, Recorder(), budget=1).cursor
    with pytest.raises(UsageError, match="min_order"):
        walk_free_blocks(mm, cur, 8, Recorder())
    with pytest.raises(UsageError):
        walk_free_blocks(mm, None, 11, Recorder())
    with pytest.raises(UsageError):
        walk_free_blocks(mm, None, 0, Recorder(), budget=-1)


def test_reject_a_callback_that_changes_the_allocator():
    mm = PageAllocator.for_size(64 * MiB)

    def greedy(zone, pfn, order, mt):
        mm.alloc_pages(0)
        return 0

    with pytest.raises(UsageError, match="callback changed the allocator"):
        walk_free_blocks(mm, None, 0, greedy)
    mm.check_invariants()


def test_dma_zone_is_walked_first():
    mm = PageAllocator.for_size(64 * MiB)
    zones = []
    walk_free_blocks(mm, None, 10, lambda z, p, o, m: zones.append(z.idx) or 1)
    assert zones == [ZoneType.DMA] * 4 + [ZoneType.DMA32] * 12


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    budget=st.integers(1, 12),
    churn=st.lists(st.tuples(st.integers(0, 10), st.booleans()), min_size=1, max_size=40),
)
def test_property_at_most_once_never_stale_complete_for_stable_blocks(seed, budget, churn):
    """Interleave budgeted walk calls with allocations and frees: a pass offers each block
    object at most once, only blocks free at that moment, and every block that stayed free
    on its list for the whole pass."""
    mm = fragmented(seed=seed)
    live: list[tuple[int, int]] = []
    offered: list[tuple[int, int]] = []
    offered_ids: dict[int, object] = {}  # id -> block, keeping blocks alive so ids stay unique
    start_blocks = {id(b): b for z in mm.zones for b in z.free_blocks.values()}

    def cb(zone, pfn, order, mt):
        block = zone.free_blocks.get(pfn)
        assert block is not None and block.order == order  # free right now
        assert id(block) not in offered_ids  # at most once per pass
        offered_ids[id(block)] = block
        offered.append((pfn, order))
        return 0 if pfn % 2 else 1

    cursor = None
    steps = iter(churn)
    while True:
        result = walk_free_blocks(mm, cursor, 0, cb, budget=budget)
        if result.complete:
            break
        cursor = result.cursor
        step = next(steps, None)
        if step is None:
            continue
        order, free = step
        if free and live:
            mm.free_pages(*live.pop())
        else:
            pfn = mm.alloc_pages(order, gfp=Gfp.NOWARN)
            if pfn is not None:
                live.append((pfn, order))
    stable = [b for b in start_blocks.values() if b.on_list]
    assert all(id(b) in offered_ids for b in stable)
    mm.check_invariants()
