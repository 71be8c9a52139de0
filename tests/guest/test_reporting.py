"""Free page reporting as Linux 6.1: passes, budget, batches, drain, failure, state machine.

Virtual time: a plain clock object the test moves; no trio needed for the sans-I/O core.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from guest.mm import MAX_ORDER, PAGEBLOCK_ORDER, Gfp, MigrateType, PageAllocator, ZoneType
from guest.reporting import (
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY,
    TRANSITIONS,
    PageReporting,
    PageReportingState,
    ReportBatch,
    ReportingEvent,
)
from protocol.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30
ENOSPC = -28


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(size: int, **kwargs) -> tuple[PageAllocator, PageReporting, Clock]:
    mm = PageAllocator.for_size(size)
    clock = Clock()
    rep = PageReporting(mm, clock=clock, **kwargs)
    rep.register()
    return mm, rep, clock


def run_due(rep: PageReporting, clock: Clock, report=lambda batch: 0) -> int:
    clock.now = rep.next_deadline()
    return rep.run_pass(report)


def zone(mm: PageAllocator, zt: ZoneType):
    return next(z for z in mm.zones if z.idx == zt)


def reported_pages(mm: PageAllocator, zt: ZoneType | None = None) -> int:
    return sum(1 << b.order for b in mm.free_blocks() if b.reported and zt in (None, b.zone))


def predicted_passes(mm: PageAllocator) -> int:
    """Passes to report an idle guest whose reportable memory is one list per zone, from the
    rule: a zone is skipped unless free > low + 32 << 9; a list's budget is
    ceil(nr_free / (32 * 16)); a pass reports (budget + 1) full batches of 32 before the
    budget runs out; the pass that finds no more than that many unreported blocks ends it."""
    passes = 0
    for z in mm.zones:
        if z.nr_free_pages <= z.watermark_low + (PAGE_REPORTING_CAPACITY << PAGEBLOCK_ORDER):
            continue
        lists = [h for a in z.free_area[PAGEBLOCK_ORDER:] for h in a.free_list if len(h)]
        assert len(lists) == 1, "the rule below is for one reportable list"
        area = z.free_area[lists[0].order]
        budget = -(-area.nr_free // (PAGE_REPORTING_CAPACITY * 16))
        per_pass = (budget + 1) * PAGE_REPORTING_CAPACITY
        passes = max(passes, -(-len(lists[0]) // per_pass))
    return passes


# ---- the idle guest -----------------------------------------------------------------------
@pytest.mark.parametrize("size", [1 * GiB, 6 * GiB])
def test_an_idle_guest_is_fully_reported_in_the_passes_the_budget_predicts(size):
    mm, rep, clock = setup(size)
    expected = predicted_passes(mm)
    assert rep.next_deadline() == PAGE_REPORTING_DELAY  # registration schedules a pass
    times = []
    while rep.next_deadline() is not None:
        assert run_due(rep, clock) == 0
        times.append(clock.now)
        mm.check_invariants()
    assert len(times) == expected
    assert times == [PAGE_REPORTING_DELAY * (i + 1) for i in range(expected)]
    assert rep.state is PageReportingState.IDLE
    dma = zone(mm, ZoneType.DMA)  # 16 MiB never passes the low + 64 MiB gate
    assert reported_pages(mm, ZoneType.DMA) == 0
    assert reported_pages(mm) == mm.nr_free_pages() - dma.nr_free_pages
    assert rep.statistics().bytes_reported == reported_pages(mm) << 12
    assert rep.statistics().zones_skipped == expected


def test_1gib_batches_are_full_until_the_leftover_and_filled_from_the_end():
    mm, rep, clock = setup(1 * GiB)
    head = zone(mm, ZoneType.DMA32).free_area[10].free_list[MigrateType.MOVABLE]
    first_pfns = [b.pfn for b in head][:32]
    batches: list[ReportBatch] = []
    while rep.next_deadline() is not None:
        run_due(rep, clock, lambda b: batches.append(b) or 0)
    assert [len(b) for b in batches] == [32] * 7 + [252 - 7 * 32]
    assert [pfn for pfn, _ in batches[0].entries] == first_pfns[::-1]  # sgl[31] first
    assert batches[0].sg()[0] == (first_pfns[-1] << 12, 4 * MiB)
    assert batches[0].nbytes == 32 * 4 * MiB and batches[0].zone is ZoneType.DMA32


def test_a_spent_budget_leaves_the_first_unreported_block_at_the_head():
    mm, rep, clock = setup(1 * GiB)
    head = zone(mm, ZoneType.DMA32).free_area[10].free_list[MigrateType.MOVABLE]
    before = [b.pfn for b in head]
    run_due(rep, clock)
    assert rep.state is PageReportingState.REQUESTED
    assert rep.next_deadline() == clock.now + PAGE_REPORTING_DELAY
    after = list(head)
    assert after[0].pfn == before[64] and not after[0].reported
    assert all(b.reported for b in after[-64:]) and not any(b.reported for b in after[:-64])
    assert rep.statistics().budget_spent == 1


def test_reported_blocks_are_reused_last():
    mm = PageAllocator.for_size(1 * GiB)
    early = mm.alloc_pages(10)
    clock = Clock()
    rep = PageReporting(mm, clock=clock)
    rep.register()
    while rep.next_deadline() is not None:
        run_due(rep, clock)
    dma32 = zone(mm, ZoneType.DMA32)
    assert all(b.reported for a in dma32.free_area for h in a.free_list for b in h)
    mm.free_pages(early, 10)  # an unreported block joins: it is allocated first
    assert mm.find_free_block(early).reported is False
    assert mm.alloc_pages(10) == early
    nxt = mm.alloc_pages(9)  # then reported memory, which loses its flag when split
    assert mm.find_free_block(nxt + 512).reported is False
    mm.check_invariants()


# ---- the pieces of the algorithm -----------------------------------------------------------
def test_merging_clears_reported_and_the_merged_block_is_reported_again():
    mm, rep, clock = setup(256 * MiB)
    pfn = mm.alloc_pages(9)  # its free order-9 buddy gets reported
    while rep.next_deadline() is not None:
        run_due(rep, clock)
    buddy = mm.find_free_block(pfn ^ 512)
    assert (buddy.order, buddy.reported) == (9, True)
    mm.free_pages(pfn, 9)
    merged = mm.find_free_block(pfn)
    assert (merged.order, merged.reported) == (10, False)
    assert rep.state is PageReportingState.REQUESTED  # the order-10 free notified
    run_due(rep, clock)
    assert mm.find_free_block(pfn).reported


def test_a_block_that_merges_at_drain_is_not_marked_reported():
    mm, rep, clock = setup(256 * MiB, capacity=1)  # one block per report
    x = mm.alloc_pages(9)  # its buddy x + 512 is a free order-9 block
    clock.now = rep.next_deadline()
    gen = rep.process()
    batch = next(gen)
    while batch.zone is ZoneType.DMA:  # with capacity 1 the DMA zone passes the gate
        batch = gen.send(0)
    assert batch.entries == ((x + 512, 9),)  # order 9 is walked first
    mm.free_pages(x, 9)  # the buddy is isolated: no merge now
    assert mm.find_free_block(x).order == 9
    gen.send(0)  # drain: the putback merges x + 512 with x
    merged = mm.find_free_block(x)
    assert (merged.pfn, merged.order, merged.reported) == (x, 10, False)
    gen.close()
    assert rep.state is PageReportingState.REQUESTED  # the free during the pass


def test_after_a_pass_only_frees_of_final_order_9_or_more_request_another():
    mm, rep, clock = setup(256 * MiB)
    while rep.next_deadline() is not None:
        run_due(rep, clock)
    assert rep.state is PageReportingState.IDLE
    x = mm.alloc_pages(8)  # splits an order-10 block P: x = P
    y = mm.alloc_pages(8)  # P + 256
    z = mm.alloc_pages(9)  # P + 512
    assert (y, z) == (x + 256, x + 512)
    mm.free_pages(y, 8)  # its buddy x is allocated: final order 8
    assert rep.state is PageReportingState.IDLE and rep.next_deadline() is None
    clock.now = 100.0
    mm.free_pages(x, 8)  # merges with y into order 9 (z holds the rest): the threshold
    assert mm.find_free_block(x).order == PAGEBLOCK_ORDER
    assert rep.state is PageReportingState.REQUESTED
    assert rep.next_deadline() == 100.0 + PAGE_REPORTING_DELAY
    clock.now = 101.0
    mm.free_pages(z, 9)  # already requested: the deadline does not move
    assert rep.next_deadline() == 100.0 + PAGE_REPORTING_DELAY


def test_a_failed_report_puts_blocks_back_unreported_and_ends_the_pass():
    mm, rep, clock = setup(1 * GiB)
    before = mm.buddyinfo()
    calls = []
    assert run_due(rep, clock, lambda b: calls.append(b) or ENOSPC) == ENOSPC
    assert len(calls) == 1
    assert reported_pages(mm) == 0
    assert mm.buddyinfo() == before and not mm.isolated_blocks()
    assert rep.state is PageReportingState.IDLE and rep.next_deadline() is None
    stats = rep.statistics()
    assert (stats.failed_batches, stats.blocks_reported) == (1, 0)
    mm.check_invariants()
    clock.now = 10.0
    mm.free_pages(mm.alloc_pages(10), 10)  # the next qualifying free re-requests
    assert rep.next_deadline() == 10.0 + PAGE_REPORTING_DELAY


def test_zones_below_the_watermark_gate_are_skipped():
    mm, rep, clock = setup(64 * MiB)  # DMA32: 12288 pages < low + 16384
    assert run_due(rep, clock, lambda b: pytest.fail("nothing to report")) == 0
    assert rep.statistics().zones_skipped == 2 and rep.statistics().batches == 0


def fill_to(mm: PageAllocator, zt: ZoneType, target: int) -> None:
    """Allocate until the zone has exactly ``target`` free pages."""
    z = zone(mm, zt)
    gfp = Gfp.DMA32 if zt is ZoneType.DMA32 else Gfp.NONE
    while z.nr_free_pages - 1024 >= target:
        assert mm.alloc_pages(10, gfp=gfp) is not None
    while z.nr_free_pages > target:
        assert mm.alloc_pages(0, gfp=gfp) is not None


@pytest.mark.parametrize(("extra", "skipped"), [(0, 2), (1, 1)])
def test_a_zone_needs_more_than_low_plus_a_full_batch_of_free_pages(extra, skipped):
    mm, rep, clock = setup(256 * MiB)
    dma32 = zone(mm, ZoneType.DMA32)
    fill_to(mm, ZoneType.DMA32,
            dma32.watermark_low + (PAGE_REPORTING_CAPACITY << PAGEBLOCK_ORDER) + extra)
    run_due(rep, clock)
    assert rep.statistics().zones_skipped == skipped
    assert (rep.statistics().batches > 0) == (skipped == 1)


def test_isolation_stops_at_the_min_watermark_and_the_rest_waits():
    mm, rep, clock = setup(256 * MiB)
    dma32 = zone(mm, ZoneType.DMA32)
    gate = dma32.watermark_low + (PAGE_REPORTING_CAPACITY << PAGEBLOCK_ORDER)
    while dma32.nr_free_pages - 1024 > gate:  # only order-10 blocks stay free
        mm.alloc_pages(10)
    free = dma32.nr_free_pages
    # isolating block k needs free - 1024 * (k - 1) > min + 1024
    can_isolate = (free - dma32.watermark_min - 1024 - 1) // 1024 + 1
    assert can_isolate < PAGE_REPORTING_CAPACITY
    sizes = []
    run_due(rep, clock, lambda b: sizes.append(len(b)) or 0)
    stats = rep.statistics()
    assert stats.isolate_failures == 1
    assert sizes == [can_isolate]  # the leftover batch at the end of the zone
    assert rep.state is PageReportingState.IDLE  # no budget was spent: no new pass
    head = dma32.free_area[10].free_list[MigrateType.MOVABLE]
    assert not head.first().reported  # the block isolation refused is the restart point
    assert not mm.isolated_blocks()
    mm.check_invariants()


def test_closing_the_pass_early_puts_isolated_blocks_back_unreported():
    mm, rep, clock = setup(1 * GiB)
    clock.now = rep.next_deadline()
    gen = rep.process()
    batch = next(gen)
    assert mm.isolated_blocks() == {pfn: order for pfn, order in batch.entries}
    gen.close()
    assert not mm.isolated_blocks() and reported_pages(mm) == 0
    assert rep.state is PageReportingState.IDLE
    mm.check_invariants()


def test_a_free_during_a_pass_makes_it_reschedule():
    mm, rep, clock = setup(256 * MiB)
    held = mm.alloc_pages(10)
    clock.now = rep.next_deadline()
    gen = rep.process()
    next(gen)
    assert rep.state is PageReportingState.ACTIVE
    mm.free_pages(held, 10)
    assert rep.state is PageReportingState.REQUESTED and rep.next_deadline() is None
    clock.now += 0.5
    with pytest.raises(StopIteration):
        while True:
            gen.send(0)
    assert rep.next_deadline() == clock.now + PAGE_REPORTING_DELAY


def test_a_bad_report_result_is_refused_and_undone():
    mm, rep, clock = setup(1 * GiB)
    clock.now = rep.next_deadline()
    gen = rep.process()
    next(gen)
    with pytest.raises(UsageError, match="0 or -errno"):
        gen.send(None)
    assert not mm.isolated_blocks() and reported_pages(mm) == 0
    mm.check_invariants()


def test_capacity_and_order_are_configurable_like_newer_kernels():
    mm, rep, clock = setup(256 * MiB, capacity=8, order=10)
    sizes = []
    while rep.next_deadline() is not None:
        run_due(rep, clock, lambda b: sizes.append(len(b)) or 0)
    assert max(sizes) == 8
    assert reported_pages(mm) == zone(mm, ZoneType.DMA32).nr_free_pages
    for bad in ({"capacity": 0}, {"capacity": 33}, {"order": MAX_ORDER}):
        with pytest.raises(UsageError):
            PageReporting(mm, clock=clock, **bad)


# ---- registration and the state machine -------------------------------------------------
def test_register_twice_is_busy_and_unregister_cancels():
    mm, rep, clock = setup(256 * MiB)
    with pytest.raises(UsageError, match="already has a reporting device"):
        PageReporting(mm, clock=clock).register()
    rep.unregister()
    assert mm.on_free is None and rep.next_deadline() is None
    mm.free_pages(mm.alloc_pages(10), 10)
    assert rep.next_deadline() is None
    with pytest.raises(UsageError, match="no pass is scheduled"):
        rep.process()


def test_a_pass_cannot_start_early_or_be_unregistered_while_running():
    mm, rep, clock = setup(1 * GiB)
    with pytest.raises(UsageError, match="due at"):
        rep.process()
    clock.now = rep.next_deadline()
    gen = rep.process()
    next(gen)
    with pytest.raises(UsageError, match="during a pass"):
        rep.unregister()
    gen.close()
    rep.unregister()


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s, e in itertools.product(PageReportingState, ReportingEvent)
     if (s, e) not in TRANSITIONS],
)
def test_reject_transitions_missing_from_the_table(state, event):
    mm, rep, clock = setup(64 * MiB)
    rep.state = state
    with pytest.raises(UsageError, match=f"{event.value} is not allowed in state {state.name}"):
        rep._apply(event)
    assert rep.state is state


def test_the_table_schedules_only_from_idle_and_at_the_end_of_a_requested_pass():
    scheduling = {key for key, (_, schedule) in TRANSITIONS.items() if schedule}
    assert scheduling == {(PageReportingState.IDLE, ReportingEvent.REQUEST),
                          (PageReportingState.REQUESTED, ReportingEvent.WORK_END)}


# ---- property: reporting under churn ------------------------------------------------------
class ReportingMachine(RuleBasedStateMachine):
    """Allocation churn interleaved with passes whose reports succeed or fail."""

    @initialize(size=st.sampled_from([256 * MiB, 384 * MiB]), order=st.sampled_from([7, 9]))
    def boot(self, size, order):
        self.mm = PageAllocator.for_size(size)
        self.clock = Clock()
        self.rep = PageReporting(self.mm, clock=self.clock, order=order)
        self.rep.register()
        self.live: list[tuple[int, int]] = []

    @rule(order=st.integers(0, 10))
    def alloc(self, order):
        pfn = self.mm.alloc_pages(order, gfp=Gfp.NOWARN)
        if pfn is not None:
            self.live.append((pfn, order))

    @rule(i=st.integers(0, 10**6))
    def free(self, i):
        if self.live:
            self.mm.free_pages(*self.live.pop(i % len(self.live)))

    @rule(errors=st.lists(st.sampled_from([0, 0, 0, ENOSPC]), max_size=20),
          churn=st.booleans())
    def run_pass(self, errors, churn):
        if self.rep.next_deadline() is None:
            return
        self.clock.now = self.rep.next_deadline()
        results = iter(errors)

        def report(batch):
            for pfn, order in batch.entries:
                assert self.mm.isolated_blocks()[pfn] == order
            if churn and self.live:  # the allocator changes while the report is out
                self.mm.free_pages(*self.live.pop())
            return next(results, 0)

        self.rep.run_pass(report)

    @invariant()
    def consistent(self):
        self.mm.check_invariants()
        if not self.rep._active:
            assert not self.mm.isolated_blocks()
        state, deadline = self.rep.state, self.rep.next_deadline()
        assert (deadline is not None) == (state is PageReportingState.REQUESTED)
        for b in self.mm.free_blocks():
            assert not b.reported or b.order >= self.rep.order


ReportingMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30,
                                              deadline=None)
TestReportingMachine = ReportingMachine.TestCase


def test_the_benchmark_reports_all_reportable_memory_of_a_small_guest():
    from benchmarks.reporting import measure

    r = measure(2 * GiB)
    assert r["reported_pages"] == r["reportable_pages"] > 0
    assert r["passes"] >= 1 and r["virtual_s"] == r["passes"] * PAGE_REPORTING_DELAY
