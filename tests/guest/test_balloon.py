"""The balloon driver against a scripted host: probe, inflate/deflate, stats, OOM, remove."""

from __future__ import annotations

import struct

import pytest
import trio
from balloon_host import QEMU_LIKE_FEATURES, make_machine

from guest.balloon import BalloonOptions, ProbeError, VmEvents, validate_features
from guest.mm import MigrateType
from protocol.balloon import ConfigOffset, StatTag
from protocol.errors import DeviceViolation
from protocol.features import BalloonFeature, TransportFeature, bit, has, mask
from protocol.mmio import MmioReg
from protocol.status import DeviceStatus

B = BalloonFeature


@pytest.fixture
def machine():
    m = make_machine()
    yield m
    m.close()


async def settle() -> None:
    """Let every task run until all of them wait (virtual time moves on by itself)."""
    await trio.sleep(0.5)


# ---- probe ------------------------------------------------------------------------------


async def test_probe_accepts_only_offered_features(machine, autojump_clock):
    machine.balloon.probe()
    accepted = machine.balloon.features
    assert accepted & ~QEMU_LIKE_FEATURES == 0  # GEN-D-5
    assert has(accepted, B.MUST_TELL_HOST)  # BAL-D-1
    # no poisoning in this guest: PAGE_POISON declined, REPORTING kept (Linux validate)
    assert not has(accepted, B.PAGE_POISON) and has(accepted, B.REPORTING)
    assert machine.host.status == (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                                   | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)


@pytest.mark.parametrize(
    ("init_on_free", "poisoning", "offered_poison", "poison", "reporting"),
    [(False, False, True, False, True), (True, False, True, True, True),
     (False, True, True, True, True), (False, True, False, False, False),
     (True, False, False, False, False)],
)
def test_validate_prunes_like_linux(init_on_free, poisoning, offered_poison, poison, reporting):
    offered = mask(B.PAGE_POISON, B.REPORTING, TransportFeature.ACCESS_PLATFORM,
                   TransportFeature.VERSION_1)
    if not offered_poison:
        offered &= ~bit(B.PAGE_POISON)
    options = BalloonOptions(init_on_free=init_on_free, page_poisoning=poisoning)
    out = validate_features(offered, options)
    assert has(out, B.PAGE_POISON) == poison
    assert has(out, B.REPORTING) == reporting  # BAL-D-3
    assert not has(out, TransportFeature.ACCESS_PLATFORM)


def test_newest_linux_drops_indirect():
    offered = mask(TransportFeature.RING_INDIRECT_DESC, TransportFeature.VERSION_1)
    assert validate_features(offered, BalloonOptions()) == offered
    assert validate_features(offered, BalloonOptions(drop_indirect=True)) == bit(
        TransportFeature.VERSION_1)


@pytest.mark.parametrize(
    ("offered", "expected"),
    [(mask(B.STATS_VQ, B.FREE_PAGE_HINT, B.REPORTING),
      {"inflate": 0, "deflate": 1, "stats": 2, "free_page_vq": 3, "reporting_vq": 4}),
     (mask(B.REPORTING), {"inflate": 0, "deflate": 1, "reporting_vq": 2}),
     (mask(B.FREE_PAGE_HINT, B.REPORTING),
      {"inflate": 0, "deflate": 1, "free_page_vq": 2, "reporting_vq": 3})],
)
async def test_queues_are_numbered_densely_by_negotiated_features(offered, expected,
                                                                  autojump_clock):
    m = make_machine(features=offered | bit(TransportFeature.VERSION_1))
    m.balloon.probe()
    assert {vq.name: vq.index for vq in m.balloon.vqs.values()} == expected
    m.close()


async def test_rings_live_in_unmovable_guest_pages(machine, autojump_clock):
    machine.balloon.probe()
    allocations = machine.mm.allocations()
    for vq in machine.balloon.vqs.values():
        pfn = vq.ring_gpa >> 12
        assert pfn in allocations
        assert machine.mm.get_pageblock_migratetype(pfn) == MigrateType.UNMOVABLE
        assert machine.host.queues[vq.index].desc == vq.ring.desc


async def test_stats_are_primed_and_kicked_before_driver_ok(machine, autojump_clock):
    machine.balloon.probe()
    log = machine.host.log
    kick = log.index(("w", MmioReg.QUEUE_NOTIFY, 2))
    driver_ok = next(i for i, (op, off, v) in enumerate(log)
                     if op == "w" and off == MmioReg.STATUS and v & DeviceStatus.DRIVER_OK)
    assert kick < driver_ok  # the Linux quirk (GEN-D-20), kept by default
    assert len(machine.host.stats) == 1


async def test_stats_kick_can_wait_for_driver_ok(autojump_clock):
    m = make_machine(options=BalloonOptions(stats_kick_before_driver_ok=False))
    m.balloon.probe()
    log = m.host.log
    kick = log.index(("w", MmioReg.QUEUE_NOTIFY, 2))
    driver_ok = next(i for i, (op, off, v) in enumerate(log)
                     if op == "w" and off == MmioReg.STATUS and v & DeviceStatus.DRIVER_OK)
    assert kick > driver_ok
    m.close()


@pytest.mark.parametrize(("options", "value"),
                         [(BalloonOptions(page_poisoning=True), 0xAAAAAAAA),
                          (BalloonOptions(init_on_free=True), 0)])
async def test_poison_val_is_written_before_driver_ok(options, value, autojump_clock):
    m = make_machine(options=options)
    m.balloon.probe()
    assert has(m.balloon.features, B.PAGE_POISON)
    log = m.host.log
    poison = log.index(("w", 0x100 + ConfigOffset.POISON_VAL, value))
    driver_ok = next(i for i, (op, off, v) in enumerate(log)
                     if op == "w" and off == MmioReg.STATUS and v & DeviceStatus.DRIVER_OK)
    assert poison < driver_ok  # BAL-D-35
    m.close()


async def test_probe_failure_sets_failed_and_frees_memory(autojump_clock):
    m = make_machine(refuse_features=True)
    free = m.mm.nr_free_pages()
    with pytest.raises(DeviceViolation):
        m.balloon.probe()
    assert m.host.status & DeviceStatus.FAILED
    assert m.mm.nr_free_pages() == free
    m.close()


async def test_small_reporting_queue_fails_probe_with_enospc(autojump_clock):
    m = make_machine(queue_num_max=16)
    free = m.mm.nr_free_pages()
    with pytest.raises(ProbeError, match="ENOSPC") as exc:
        m.balloon.probe()
    assert exc.value.errno == 28
    assert m.host.status & DeviceStatus.FAILED
    assert all(not q.ready for q in m.host.queues.values())
    assert m.mm.nr_free_pages() == free
    m.close()


# ---- inflate / deflate ---------------------------------------------------------------------


async def test_inflate_to_target_in_messages_of_at_most_256(machine, autojump_clock):
    m = machine
    m.balloon.probe()
    free = m.mm.nr_free_pages()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(600)
        await settle()
        nursery.cancel_scope.cancel()
    q = m.host.queue("inflate")
    assert q.kicks == 3  # 256 + 256 + 88
    assert len(m.host.inflated) == 600 == len(set(m.host.inflated))
    assert m.host.get_config(ConfigOffset.ACTUAL) == 600
    assert m.mm.nr_free_pages() == free - 600
    assert all(m.mm.is_allocated(pfn, 0) for pfn in m.host.inflated)


async def test_deflate_tells_host_before_freeing(machine, autojump_clock):
    m = machine
    m.balloon.probe()
    seen_allocated = []
    record = m.host._record

    def spy(name, chain):
        record(name, chain)
        if name == "deflate":
            data = chain.read(m.memory)
            pfns = struct.unpack(f"<{len(data) // 4}I", data)
            seen_allocated.append(all(m.mm.is_allocated(p, 0) for p in pfns))

    m.host._record = spy
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(300)
        await settle()
        m.host.set_target(20)
        await settle()
        nursery.cancel_scope.cancel()
    assert len(m.host.deflated) == 280
    assert seen_allocated == [True, True]  # BAL-D-10: still the balloon's when the host hears
    assert m.host.balloon == set(m.host.inflated) - set(m.host.deflated)
    assert len(m.host.balloon) == 20 == m.host.get_config(ConfigOffset.ACTUAL)
    assert not any(m.mm.is_allocated(p, 0) for p in m.host.deflated)


async def test_without_deflate_on_oom_inflated_pages_leave_totalram(autojump_clock):
    m = make_machine(features=QEMU_LIKE_FEATURES & ~bit(B.DEFLATE_ON_OOM))
    total = m.mm.totalram_pages()
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(100)
        await settle()
        assert m.mm.totalram_pages() == total - 100
        m.host.set_target(0)
        await settle()
        nursery.cancel_scope.cancel()
    assert m.mm.totalram_pages() == total
    m.close()


async def test_out_of_memory_inflates_what_it_can_and_retries_later(autojump_clock):
    m = make_machine(size=64 << 20)
    m.balloon.probe()
    target = m.mm.totalram_pages()  # more than can ever be allocated
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(target)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    got = m.host.get_config(ConfigOffset.ACTUAL)
    assert 0 < got < target
    assert m.balloon.balloon.alloc_failures >= 2  # kept trying every 200 ms
    assert m.mm.alloc_pages(0, MigrateType.MOVABLE) is None  # the balloon took all it could


async def test_initial_target_is_picked_up_at_probe(autojump_clock):
    m = make_machine(num_pages=50)
    m.balloon.probe()
    assert m.balloon.size_work.pending
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        await settle()
        nursery.cancel_scope.cancel()
    assert m.host.get_config(ConfigOffset.ACTUAL) == 50
    m.close()


async def test_spurious_interrupts_are_harmless(autojump_clock):
    m = make_machine(features=QEMU_LIKE_FEATURES & ~bit(B.REPORTING))  # no timed reports
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        for _ in range(5):
            m.host.irq.raise_()  # InterruptStatus reads 0
            await settle()
        m.host.set_target(10)
        await settle()
        nursery.cancel_scope.cancel()
    assert m.balloon.spurious_interrupts == 5  # SPL-D-15
    assert m.host.get_config(ConfigOffset.ACTUAL) == 10
    m.close()


# ---- stats ---------------------------------------------------------------------------------


async def test_stats_answer_each_request_with_the_same_tags(autojump_clock):
    events = VmEvents(pgfault=1234, pgmajfault=5, pswpin=2, file_pages=10)
    m = make_machine(vm_events=lambda: events)
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(100)
        await settle()
        assert m.host.request_stats()
        await settle()
        free_now = m.mm.nr_free_pages()
        assert m.host.request_stats()
        await settle()
        nursery.cancel_scope.cancel()
    first, second, third = m.host.stats
    tags = [StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MAJFLT, StatTag.MINFLT, StatTag.MEMFREE,
            StatTag.MEMTOT, StatTag.AVAIL, StatTag.CACHES]
    assert list(first) == list(second) == list(third) == tags  # BAL-D-23, Linux 6.1 order
    assert third[StatTag.MEMFREE] == free_now << 12
    assert third[StatTag.MEMTOT] == m.mm.totalram_pages() << 12
    assert third[StatTag.MINFLT] == 1234 and third[StatTag.SWAP_IN] == 2 << 12
    assert third[StatTag.CACHES] == 10 << 12
    assert 0 < third[StatTag.AVAIL] < third[StatTag.MEMFREE] + (10 << 12)
    assert len(m.host.queue("stats").held) == 1  # BAL-D-16: one buffer at a time
    m.close()


async def test_stats_layout_6_12_and_hugetlb(autojump_clock):
    from guest.balloon import StatsLayout

    m = make_machine(options=BalloonOptions(stats_layout=StatsLayout.LINUX_6_12, hugetlb=True))
    m.balloon.probe()
    assert list(m.host.stats[0]) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7]
    m.close()


# ---- deflate on OOM, remove, poison ----------------------------------------------------


async def test_oom_notify_deflates_256_pages(machine, autojump_clock):
    m = machine
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(400)
        await settle()
        assert await m.balloon.oom_notify() == 256
        assert m.host.get_config(ConfigOffset.ACTUAL) == 144
        assert len(m.host.deflated) == 256
        nursery.cancel_scope.cancel()


async def test_oom_notify_without_deflate_on_oom_does_nothing(autojump_clock):
    m = make_machine(features=QEMU_LIKE_FEATURES & ~bit(B.DEFLATE_ON_OOM))
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(100)
        await settle()
        assert await m.balloon.oom_notify() == 0
        nursery.cancel_scope.cancel()
    assert m.host.deflated == []
    m.close()


async def test_remove_gives_everything_back(machine, autojump_clock):
    m = machine
    free = m.mm.nr_free_pages()
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(700)
        await settle()
        m.host.set_cmd_id(0x80000001)
        await settle()
        assert m.balloon.shrink_count() > 0
        await m.balloon.remove()  # run() returns: the nursery closes by itself
    assert m.host.get_config(ConfigOffset.ACTUAL) == 0
    assert sorted(m.host.deflated) == sorted(m.host.inflated)
    assert m.host.status == 0  # reset
    assert all(not q.ready for q in m.host.queues.values())
    assert m.mm.nr_free_pages() == free


async def test_remove_without_run_serves_its_own_interrupts(machine, autojump_clock):
    m = machine
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(50)
        await settle()
        nursery.cancel_scope.cancel()
    await m.balloon.remove()
    assert m.host.get_config(ConfigOffset.ACTUAL) == 0
    assert len(m.host.deflated) == 50


async def test_poisoned_guest_fills_deflated_pages(autojump_clock):
    m = make_machine(options=BalloonOptions(page_poisoning=True))
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(8)
        await settle()
        m.host.set_target(0)
        await settle()
        nursery.cancel_scope.cancel()
    for pfn in m.host.deflated:
        assert m.memory.read(pfn << 12, 4096) == b"\xaa" * 4096  # BAL-D-34
    m.close()


async def test_run_requires_probe(machine, autojump_clock):
    from protocol.errors import UsageError

    with pytest.raises(UsageError, match="probe"):
        await machine.balloon.run()


async def test_driver_runs_on_a_polling_line_as_against_qemu(autojump_clock):
    from guest.irq import PollingInterruptLine

    m = make_machine()
    m.transport.irq = PollingInterruptLine(m.transport, period=0.001)
    m.balloon.probe()
    async with trio.open_nursery() as nursery:
        await nursery.start(m.balloon.run)
        m.host.set_target(300)
        await settle()
        assert m.host.request_stats()
        await settle()
        nursery.cancel_scope.cancel()
    assert m.host.get_config(ConfigOffset.ACTUAL) == 300
    assert len(m.host.stats) == 2
    m.close()
