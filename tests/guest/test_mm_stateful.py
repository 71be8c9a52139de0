"""Hypothesis state machine: random alloc/free/isolate/putback/pageblock changes keep the
allocator consistent (checked by ``check_invariants`` and against a plain model)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guest.mm import (
    MAX_ORDER,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    Gfp,
    MigrateType,
    PageAllocator,
)
from protocol.errors import UsageError

MiB = 1 << 20
ORDERS = st.one_of(st.integers(0, 3), st.integers(0, MAX_ORDER - 1))
ALLOC_MTS = st.sampled_from([MigrateType.UNMOVABLE, MigrateType.MOVABLE, MigrateType.RECLAIMABLE])
GFPS = st.sampled_from([Gfp.NOWARN, Gfp.NOWARN | Gfp.DMA, Gfp.NOWARN | Gfp.DMA32,
                        Gfp.NOWARN | Gfp.HIGH])


class AllocatorMachine(RuleBasedStateMachine):
    """The model: which (pfn, order) are allocated and isolated; the rest must be free."""

    @initialize(size_mib=st.sampled_from([64, 96, 128]))
    def boot(self, size_mib):
        # a QEMU microvm-like layout: BIOS hole at 0xf0000, a reserved kernel range
        self.mm = PageAllocator.for_size(
            size_mib * MiB, holes=[(0xF0000, 0x10000)], reserved=[(0x100000, 0x2FF000)])
        self.allocated: dict[int, int] = {}
        self.isolated: dict[int, int] = {}
        self.notified: list[int] = []
        self.mm.on_free = self.notified.append

    @rule(order=ORDERS, mt=ALLOC_MTS, gfp=GFPS)
    def alloc(self, order, mt, gfp):
        pfn = self.mm.alloc_pages(order, mt, gfp=gfp)
        if pfn is not None:
            assert pfn % (1 << order) == 0
            assert pfn not in self.allocated
            self.allocated[pfn] = order
            if gfp & Gfp.DMA:
                assert pfn < 4096

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def free(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.allocated)))
        order = self.allocated.pop(pfn)
        self.notified.clear()
        self.mm.free_pages(pfn, order)
        # one notification with the final merged order; a block above pageblock order whose
        # pageblocks can no longer merge is freed as pageblock pieces, one notification each
        pieces = 1 << (order - PAGEBLOCK_ORDER) if order > PAGEBLOCK_ORDER else 1
        assert len(self.notified) in {1, pieces}
        assert all(n >= min(order, PAGEBLOCK_ORDER) for n in self.notified)

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def split_then_free_one(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.allocated)))
        order = self.allocated.pop(pfn)
        self.mm.split_page(pfn, order)
        for p in range(pfn, pfn + (1 << order)):
            self.allocated[p] = 0
        self.mm.free_pages(pfn + (1 << order) - 1, 0)
        del self.allocated[pfn + (1 << order) - 1]

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def bad_free_is_rejected_and_changes_nothing(self, data):
        pfn = data.draw(st.sampled_from(sorted(self.allocated)))
        order = self.allocated[pfn]
        before = (self.mm.nr_free_pages(), self.mm.buddyinfo())
        with pytest.raises(UsageError):
            self.mm.free_pages(pfn, order + 1 if order < MAX_ORDER - 1 else order - 1)
        free = next(self.mm.free_blocks(), None)
        if free is not None:
            with pytest.raises(UsageError):
                self.mm.free_pages(free.pfn, free.order)
        assert (self.mm.nr_free_pages(), self.mm.buddyinfo()) == before

    @rule(data=st.data())
    def isolate(self, data):
        blocks = [b for b in self.mm.free_blocks() if b.mt != MigrateType.ISOLATE]
        if not blocks:
            return
        b = data.draw(st.sampled_from(blocks))
        if self.mm.isolate_free_page(b.pfn, b.order):
            self.isolated[b.pfn] = b.order
            assert self.mm.find_free_block(b.pfn) is None

    @precondition(lambda self: self.isolated)
    @rule(data=st.data(), reported=st.booleans())
    def putback(self, data, reported):
        pfn = data.draw(st.sampled_from(sorted(self.isolated)))
        order = self.isolated.pop(pfn)
        self.notified.clear()
        merged = self.mm.putback_isolated_page(pfn, order)
        assert self.notified == []
        info = self.mm.find_free_block(pfn)
        assert info is not None and (info.order != order) == merged
        if reported and not merged:  # page_reporting_drain marks unmerged blocks
            self.mm.zone_for_pfn(pfn).free_blocks[pfn].reported = True

    @rule(data=st.data(), mt=st.sampled_from(list(MigrateType)))
    def set_pageblock_type(self, data, mt):
        zone = data.draw(st.sampled_from(self.mm.zones))
        first = zone.zone_start_pfn // PAGEBLOCK_NR_PAGES
        last = (zone.zone_end_pfn - 1) // PAGEBLOCK_NR_PAGES
        pfn = data.draw(st.integers(first, last)) * PAGEBLOCK_NR_PAGES
        pfn = max(pfn, zone.zone_start_pfn)
        self.mm.set_pageblock_migratetype(pfn, mt)
        assert self.mm.get_pageblock_migratetype(pfn) == mt

    @invariant()
    def consistent(self):
        self.mm.check_invariants()
        assert self.mm.allocations() == self.allocated
        assert self.mm.isolated_blocks() == self.isolated
        free_pages = sum(1 << b.order for b in self.mm.free_blocks())
        used = sum(1 << o for o in self.allocated.values()) + sum(
            1 << o for o in self.isolated.values())
        assert free_pages + used == self.mm.totalram_pages()
        isolate_pages = sum(1 << b.order for b in self.mm.free_blocks()
                            if b.mt == MigrateType.ISOLATE)
        assert self.mm.nr_free_pages() == free_pages - isolate_pages


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50,
                                              deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
