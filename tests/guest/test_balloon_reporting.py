"""Free page reporting through the balloon's reporting queue (Linux 6.1 behaviour)."""

from __future__ import annotations

import errno

import trio
from balloon_host import make_machine

from guest.balloon import BalloonOptions
from guest.balloon.reporting_dev import ReportingDevice
from guest.balloon.work import WaitQueue
from guest.mm import PAGEBLOCK_ORDER, ZoneType
from guest.reporting import ReportBatch
from virtqueue.driver import QueueFull


async def test_first_pass_comes_two_seconds_after_probe(autojump_clock):
    m = make_machine()
    m.balloon.probe()
    start = trio.current_time()
    isolated_seen = []
    record = m.host._record

    def spy(name, chain):
        record(name, chain)
        if name == "reporting":
            held = m.mm.isolated_blocks()
            isolated_seen.append(all(s.addr >> 12 in held for s in chain.writable))

    m.host._record = spy
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await trio.sleep(1.9)
        assert m.host.reported == []
        await trio.sleep(0.2)
        assert m.host.reported
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start >= 2.0
    assert all(isolated_seen)  # BAL-D-39: off the free lists while the host has them
    for chain in m.host.reported:
        assert 1 <= len(chain) <= 32
        for addr, length in chain:
            assert length >= 4096 << PAGEBLOCK_ORDER and length & (length - 1) == 0
            assert addr % length == 0  # buddy blocks are naturally aligned
    assert set(m.host.reported_readable) == {0}  # device-writable only
    assert all(m.host.reported_indirect[i] == (len(c) > 1)
               for i, c in enumerate(m.host.reported))  # Linux picks indirect for nents > 1
    m.close()


async def test_reported_blocks_are_marked_and_not_reported_again(autojump_clock):
    m = make_machine()
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await trio.sleep(2.5)
        first = sum(len(c) for c in m.host.reported)
        await trio.sleep(10)  # idle guest: no frees, no new pass
        nursery.cancel_scope.cancel()
    assert first > 0
    assert sum(len(c) for c in m.host.reported) == first
    core = m.balloon.reporting.core
    assert core.statistics().blocks_reported == first
    m.close()


async def test_newest_linux_reports_without_indirect(autojump_clock):
    m = make_machine(options=BalloonOptions(drop_indirect=True, max_queue_size=64))
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    assert m.host.reported and not any(m.host.reported_indirect)
    assert max(len(c) for c in m.host.reported) > 1  # a multi-entry direct chain
    m.close()


async def test_a_full_queue_fails_the_report_with_enospc(autojump_clock):
    class Ring:
        indirect = False
        indirect_area = None
        num_free = 0

        def add(self, readable, writable, token, *, use_indirect=False):
            raise QueueFull("full")

    class Vq:
        ring = Ring()

    dev = ReportingDevice(Vq(), WaitQueue())
    batch = ReportBatch(ZoneType.DMA32, ((512, 9),))
    assert await dev.report(batch) == -errno.ENOSPC
    assert dev.errors == 1


async def test_remove_waits_for_a_report_in_flight(autojump_clock):
    m = make_machine(policies={"reporting": "manual"})
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await trio.sleep(2.5)
        assert m.host.pending("reporting") == 1  # the host sits on the first batch
        removed = []

        async def remove():
            await m.balloon.remove()
            removed.append(True)

        nursery.start_soon(remove)
        await trio.sleep(5)
        assert not removed  # page_reporting_unregister waits for the pass
        assert m.mm.isolated_blocks()  # still the host's
        for _ in range(100):  # the whole pass finishes first, batch by batch
            if removed:
                break
            m.host.consume("reporting")
            await trio.sleep(1)
        assert removed
        assert len(m.host.reported) > 1
    assert m.mm.isolated_blocks() == {}
    assert m.mm.allocations() == {}  # rings and buffers freed too
    m.close()



def _passes_by_rule(mm) -> int:
    """Passes to report an idle guest, from Linux's rule: a zone is skipped unless its free
    pages exceed low + 32 << 9; each free list at order >= 9 may report (budget + 1) batches of
    32 per pass, budget = ceil(nr_free[order] / (32 * 16)); the slowest list sets the count."""
    from guest.mm import PAGEBLOCK_ORDER

    passes = 0
    for z in mm.zones:
        if z.nr_free_pages <= z.watermark_low + (32 << PAGEBLOCK_ORDER):
            continue
        for order in range(PAGEBLOCK_ORDER, len(z.free_area)):
            area = z.free_area[order]
            per_pass = (-(-area.nr_free // (32 * 16)) + 1) * 32
            for free_list in area.free_list:
                passes = max(passes, -(-len(free_list) // per_pass))
    return passes


async def test_idle_1gib_machine_is_reported_in_the_passes_the_budget_predicts(autojump_clock):
    """The whole path in trio's virtual time (driver, virtio-mmio, device, memfd): an idle
    1 GiB guest is fully reported after exactly the passes the budget rule predicts (derived
    from the rule, not from a run), one pass fewer is not enough, every report reaches the
    device, and the next allocation takes an unreported block: reported ones are reused last."""
    import trio

    from guest.mm import ZoneType
    from sim.machine import Machine, MachineConfig

    m = Machine(MachineConfig(ram=1 << 30))
    try:
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            expected = _passes_by_rule(m.mm)
            assert expected >= 2

            def eligible_and_reported() -> tuple[int, int]:
                blocks = [b for b in m.mm.free_blocks()
                          if b.zone is not ZoneType.DMA and b.order >= 9]
                return (sum(1 << b.order for b in blocks),
                        sum(1 << b.order for b in blocks if b.reported))

            await trio.sleep(2.0 * (expected - 1) + 1.0)  # just after pass expected - 1
            eligible, reported = eligible_and_reported()
            assert 0 < reported < eligible
            # reported blocks were rotated to the tail: the allocator takes an unreported one
            zone = m.mm.zone_for_pfn(next(b.pfn for b in m.mm.free_blocks() if b.reported))
            unreported = {b.pfn for b in m.mm.free_blocks()
                          if b.order == 10 and b.zone is zone.idx and not b.reported}
            pfn = m.mm.alloc_pages(10)
            assert pfn in unreported
            m.mm.free_pages(pfn, 10)
            await trio.sleep(2.0)  # just after the last predicted pass
            eligible, reported = eligible_and_reported()
            assert reported == eligible
            assert m.device.reported.total >= reported << 12
            nursery.cancel_scope.cancel()
    finally:
        m.close()
