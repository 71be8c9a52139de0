"""BalloonDevice queue handling, driven through virtio-mmio registers by a hand-built driver.

Each test runs the real device tasks (trio) and a DriverQueue per queue on a 16 MiB memfd RAM,
then checks what QEMU would have done: memory discarded, records, used lengths, interrupts.
"""

from __future__ import annotations

import struct

import pytest
import trio

from device.balloon import BalloonDevice
from protocol.balloon import BalloonQueue as Q
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from protocol.mmio import InterruptBit, MmioReg
from protocol.status import DeviceStatus

try:
    from balloon_guest import PAGE_BASE, Guest, MiB, settle
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.balloon_guest import PAGE_BASE, Guest, MiB, settle

PFN0 = PAGE_BASE >> 12
PAGE = 4096


async def start(nursery, **kw) -> Guest:
    g = Guest(**kw)
    await nursery.start(g.device.run)
    g.init()
    return g


def fill_pages(g: Guest, first_pfn: int, count: int, byte: int = 0x5A) -> None:
    g.mem.fill(first_pfn << 12, count * PAGE, byte)


# ---- inflate / deflate ------------------------------------------------------------------
async def test_inflate_discards_pages_and_records_them(nursery):
    g = await start(nursery)
    fill_pages(g, PFN0, 32)
    buf = g.alloc(struct.pack("<32I", *range(PFN0, PFN0 + 32)))
    before = g.mem.allocated_bytes()
    g.send(Q.INFLATE, [buf])
    await settle()
    [(_, written)] = g.used(Q.INFLATE)
    assert written == 0
    assert before - g.mem.allocated_bytes() == 32 * PAGE
    assert g.mem.read(PAGE_BASE, 32 * PAGE) == bytes(32 * PAGE)
    assert list(g.device.ballooned) == [(PAGE_BASE, PAGE_BASE + 32 * PAGE)]
    assert g.device.summary()["pfns_inflated"] == 32
    assert g.r(MmioReg.INTERRUPT_STATUS) & InterruptBit.VRING


async def test_inflate_scattered_pfns_each_discarded(nursery):
    g = await start(nursery)
    pfns = [PFN0 + 7, PFN0, PFN0 + 3, PFN0 + 4, PFN0 + 100]
    fill_pages(g, PFN0, 101)
    g.pfns(Q.INFLATE, pfns)
    await settle()
    for p in range(PFN0, PFN0 + 101):
        page = g.mem.read(p << 12, PAGE)
        assert (page == bytes(PAGE)) == (p in pfns), hex(p)
    assert g.device.ballooned.total == len(pfns) * PAGE


async def test_inflate_pfns_outside_ram_are_rejected_not_fatal(nursery):
    hole = (12 * MiB, 1 * MiB)
    g = await start(nursery, holes=[hole])
    outside = [0xFFFF_FFFF, (16 * MiB) >> 12, (12 * MiB) >> 12]
    fill_pages(g, PFN0, 2)
    g.pfns(Q.INFLATE, [PFN0, *outside, PFN0 + 1])
    await settle()
    assert len(g.used(Q.INFLATE)) == 1
    assert g.device.rejected == outside
    assert g.device.ballooned.total == 2 * PAGE
    assert g.device.needs_reset is None
    assert g.device.summary()["rejected_pfns"] == 3


async def test_inflate_reads_whole_chain_and_ignores_trailing_bytes(nursery):
    g = await start(nursery)
    first = g.alloc(struct.pack("<II", PFN0, PFN0 + 1))
    second = g.alloc(struct.pack("<I", PFN0 + 2) + b"\x01\x02\x03")  # 3 trailing bytes: BL-01
    g.send(Q.INFLATE, [first, second])
    await settle()
    assert list(g.device.ballooned) == [(PAGE_BASE, PAGE_BASE + 3 * PAGE)]
    assert len(g.used(Q.INFLATE)) == 1


async def test_inflate_ignores_writable_part(nursery):
    g = await start(nursery)
    out = g.alloc(struct.pack("<I", PFN0 + 5))
    g.send(Q.INFLATE, [], [out])  # PFNs in a device-writable buffer: BL-03, not looked at
    await settle()
    assert g.device.ballooned.total == 0
    [(_, written)] = g.used(Q.INFLATE)
    assert written == 0


async def test_inflate_work_per_chain_is_bounded(nursery):
    g = await start(nursery, max_pfns_per_chain=4)
    g.pfns(Q.INFLATE, range(PFN0, PFN0 + 10))
    await settle()
    assert g.device.ballooned.total == 4 * PAGE
    assert len(g.used(Q.INFLATE)) == 1


async def test_deflate_takes_pages_out_of_the_balloon(nursery):
    g = await start(nursery)
    g.pfns(Q.INFLATE, range(PFN0, PFN0 + 8))
    await settle()
    g.pfns(Q.DEFLATE, [PFN0 + 2, PFN0 + 3, PFN0 + 50])  # PFN0 + 50 was never inflated: BL-09
    await settle()
    assert len(g.used(Q.DEFLATE)) == 1
    assert list(g.device.ballooned) == [(PAGE_BASE, PAGE_BASE + 2 * PAGE),
                                        (PAGE_BASE + 4 * PAGE, PAGE_BASE + 8 * PAGE)]
    s = g.device.summary()
    assert s["pfns_deflated"] == 3 and s["pfns_deflated_unknown"] == 1
    g.mem.write(PAGE_BASE + 2 * PAGE, b"reuse")  # deflated pages are the guest's again
    assert g.mem.read(PAGE_BASE + 2 * PAGE, 5) == b"reuse"


async def test_many_chains_all_served_and_returned(nursery):
    g = await start(nursery)
    q = g.queues[Q.INFLATE]
    for i in range(100):
        if q.num_free == 0:
            await settle()
            g.used(Q.INFLATE)
        g.pfns(Q.INFLATE, [PFN0 + i])
    await settle()
    g.used(Q.INFLATE)
    assert q.in_flight == 0
    assert g.device.ballooned.total == 100 * PAGE


async def test_indirect_chain_and_no_event_idx(nursery):
    g = Guest()
    await nursery.start(g.device.run)
    g.init(accept=g.device.offered_features() & ~bit(TransportFeature.RING_EVENT_IDX))
    pieces = [g.alloc(struct.pack("<I", PFN0 + i)) for i in range(3)]
    g.send(Q.INFLATE, pieces, use_indirect=True)
    g.send(Q.REPORTING, [], [(PAGE_BASE + MiB, MiB)], use_indirect=True)
    await settle()
    assert len(g.used(Q.INFLATE)) == len(g.used(Q.REPORTING)) == 1
    assert g.device.ballooned.total == 3 * PAGE and g.device.reported.total == MiB


async def test_no_interrupt_when_the_driver_suppresses_it(nursery):
    g = Guest()
    await nursery.start(g.device.run)
    g.init(accept=g.device.offered_features() & ~bit(TransportFeature.RING_EVENT_IDX))
    g.queues[Q.INFLATE].disable_cb()  # avail.flags NO_INTERRUPT
    g.pfns(Q.INFLATE, [PFN0])
    await settle()
    assert g.irqs == 0 and g.r(MmioReg.INTERRUPT_STATUS) == 0
    assert len(g.used(Q.INFLATE)) == 1  # used all the same


# ---- GEN-V-1: nothing before DRIVER_OK ------------------------------------------------------
async def test_no_buffer_is_consumed_before_driver_ok(nursery):
    g = Guest()
    await nursery.start(g.device.run)
    g.init(driver_ok=False)
    g.pfns(Q.INFLATE, [PFN0])
    await settle()
    assert g.used(Q.INFLATE) == [] and g.device.ballooned.total == 0
    g.set_status(DeviceStatus.DRIVER_OK)
    await settle()
    assert len(g.used(Q.INFLATE)) == 1 and g.device.ballooned.total == PAGE


# ---- free page reporting --------------------------------------------------------------------
async def test_reporting_discards_aligned_ranges(nursery):
    g = await start(nursery)
    fill_pages(g, PFN0, 1024)
    before = g.mem.allocated_bytes()
    ranges = [(PAGE_BASE, 2 * MiB), (PAGE_BASE + 3 * MiB, 512 * 1024)]
    g.send(Q.REPORTING, [], ranges)
    await settle()
    [(_, written)] = g.used(Q.REPORTING)
    assert written == 0
    assert list(g.device.reported) == [(s, s + n) for s, n in ranges]
    assert before - g.mem.allocated_bytes() == 2 * MiB + 512 * 1024
    assert g.mem.read(PAGE_BASE, 16) == bytes(16)


async def test_reporting_ignores_unaligned_ranges(nursery):
    g = await start(nursery)
    fill_pages(g, PFN0, 4)
    g.send(Q.REPORTING, [], [(PAGE_BASE + 512, PAGE), (PAGE_BASE + PAGE, 100)])  # BL-19
    await settle()
    assert len(g.used(Q.REPORTING)) == 1
    assert g.device.reported.total == 0
    assert g.mem.read(PAGE_BASE + PAGE, 4) == b"\x5a" * 4


async def test_reporting_with_poison_records_but_keeps_pages(nursery):
    g = await start(nursery)
    g.mmio.write32(MmioReg.CONFIG + 12, 0xAAAA_AAAA)  # poison_val (PAGE_POISON negotiated)
    fill_pages(g, PFN0, 4, 0xAA)
    g.send(Q.REPORTING, [], [(PAGE_BASE, 4 * PAGE)])
    await settle()
    assert len(g.used(Q.REPORTING)) == 1
    assert g.device.reported.total == 4 * PAGE  # recorded (BL-20) ...
    assert g.mem.read(PAGE_BASE, 4 * PAGE) == b"\xaa" * (4 * PAGE)  # ... not discarded
    assert g.device.summary()["discarded_bytes"] == 0


async def test_reporting_queue_is_dense_without_stats(nursery):
    # Only REPORTING offered: it is queue 2 (QEMU and Linux number densely; BL-26).
    g = await start(nursery, features=mask(BalloonFeature.REPORTING, TransportFeature.VERSION_1))
    assert g.queues[Q.REPORTING].index == 2
    g.send(Q.REPORTING, [], [(PAGE_BASE, PAGE)])
    await settle()
    assert g.device.reported.total == PAGE


# ---- stats ------------------------------------------------------------------------------------
def stats_buffer(g: Guest, records: list[tuple[int, int]], extra: bytes = b"") -> tuple[int, int]:
    return g.alloc(b"".join(struct.pack("<HQ", t, v) for t, v in records) + extra)


async def test_stats_buffer_is_parked_and_parsed(nursery):
    g = await start(nursery)
    g.send(Q.STATS, [stats_buffer(g, [(4, 1000), (5, 4000), (77, 9), (0, 12)], b"\x01")])
    await settle()
    assert g.used(Q.STATS) == []  # parked, not returned
    stats = g.device.guest_stats()["stats"]
    assert stats["stat-free-memory"] == 1000 and stats["stat-total-memory"] == 4000
    assert stats["stat-swap-in"] == 12
    assert stats["stat-disk-caches"] == 2**64 - 1  # unset; tag 77 ignored (BL-13)
    assert len(stats) == 16


async def test_stats_reset_to_unset_before_each_parse(nursery):
    g = await start(nursery)
    g.send(Q.STATS, [stats_buffer(g, [(4, 1), (5, 2)])])
    await settle()
    g.send(Q.STATS, [stats_buffer(g, [(5, 3)])])  # second buffer while parked: BL-14
    await settle()
    stats = g.device.guest_stats()["stats"]
    assert stats["stat-free-memory"] == 2**64 - 1 and stats["stat-total-memory"] == 3
    returned = g.used(Q.STATS)
    assert len(returned) == 1 and returned[0][1] == 0  # the old buffer came back


async def test_stats_polling_interval_in_virtual_time(nursery, autojump_clock):
    g = await start(nursery, stats_interval=10)
    g.send(Q.STATS, [stats_buffer(g, [(4, 1)])])
    await settle()
    t0 = trio.current_time()
    assert g.device.guest_stats()["last-update"] == int(t0)
    await trio.sleep(9.5)
    assert g.used(Q.STATS) == []
    g.ack_interrupts()
    await trio.sleep(1)
    assert len(g.used(Q.STATS)) == 1  # given back after 10 s to ask for fresh stats
    assert g.r(MmioReg.INTERRUPT_STATUS) & InterruptBit.VRING
    await trio.sleep(30)  # nothing parked: the timer only re-arms
    assert g.used(Q.STATS) == []
    g.send(Q.STATS, [stats_buffer(g, [(4, 2)])])
    await settle()
    await trio.sleep(10.5)
    assert len(g.used(Q.STATS)) == 1
    assert g.device.guest_stats()["stats"]["stat-free-memory"] == 2


async def test_stats_polling_enabled_later_fires_at_once(nursery, autojump_clock):
    g = await start(nursery)
    g.send(Q.STATS, [stats_buffer(g, [(4, 1)])])
    await settle()
    await trio.sleep(100)
    assert g.used(Q.STATS) == []  # polling off
    g.device.set_stats_polling_interval(3)
    await settle()
    assert len(g.used(Q.STATS)) == 1


def test_stats_polling_interval_is_validated():
    d = BalloonDevice()
    with pytest.raises(Exception, match="timer value must be greater than zero"):
        d.set_stats_polling_interval(-1)
    with pytest.raises(Exception, match="timer value is too big"):
        d.set_stats_polling_interval(2**32)


# ---- violations -----------------------------------------------------------------------------
async def test_malformed_chain_needs_reset_then_serviceable_after_reset(nursery):
    g = await start(nursery)
    g.ack_interrupts()
    gen = g.r(MmioReg.CONFIG_GENERATION)
    g.send(Q.INFLATE, [(32 * MiB, 4)])  # a buffer outside RAM: DC-07
    await settle()
    assert g.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert g.r(MmioReg.INTERRUPT_STATUS) == InterruptBit.CONFIG  # GEN-V-3
    assert g.r(MmioReg.CONFIG_GENERATION) != gen
    assert g.device.needs_reset is not None and g.device.needs_reset.rule_id == "DC-07"
    g.pfns(Q.DEFLATE, [PFN0])  # the whole device stops, not only the queue
    await settle()
    assert g.used(Q.DEFLATE) == []
    g.init()  # reset and initialise again
    assert not g.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert g.r(MmioReg.INTERRUPT_STATUS) == 0
    g.pfns(Q.INFLATE, [PFN0])
    await settle()
    assert len(g.used(Q.INFLATE)) == 1 and g.device.ballooned.total == PAGE


async def test_skip_policy_returns_bad_chain_and_keeps_serving(nursery):
    g = await start(nursery, policy="skip")
    g.send(Q.INFLATE, [(32 * MiB, 4)])
    g.pfns(Q.INFLATE, [PFN0])
    await settle()
    assert len(g.used(Q.INFLATE)) == 2
    assert g.device.needs_reset is None and g.device.ballooned.total == PAGE
    assert not g.status & DeviceStatus.DEVICE_NEEDS_RESET


async def test_reset_clears_ballooned_record(nursery):
    g = await start(nursery)
    g.pfns(Q.INFLATE, range(PFN0, PFN0 + 3))
    await settle()
    g.w(MmioReg.STATUS, 0)
    assert g.device.ballooned.total == 0
    assert g.device.summary()["reset_released_bytes"] == 3 * PAGE
    assert not g.device.active


def test_features_without_stats_have_no_stats_queue():
    g = Guest(features=bit(TransportFeature.VERSION_1))
    g.init()
    assert set(g.queues) == {Q.INFLATE, Q.DEFLATE}
