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
