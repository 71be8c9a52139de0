"""The monitor catches deliberately broken drivers, with the evidence a tester needs.

Each test drives the real BalloonDevice behind the real MmioDevice by hand (tests/device
balloon_guest.Guest), with the monitor on the seam, the registers and a guest write tap, and
breaks one rule: the matching requirement must FAIL, with the offending values.
"""

from __future__ import annotations

import struct

from device.balloon import DEFAULT_FEATURES
from device.mmio import MmioDevice
from device.monitor import (
    Capabilities,
    DriverMonitor,
    GuestWriteTap,
    MonitoredDevice,
    MonitoredMmio,
    Verdict,
)
from protocol.balloon import BalloonQueue as Q
from protocol.balloon import ConfigOffset
from protocol.features import BalloonFeature, bit
from protocol.mmio import CONFIG_OFFSET, MmioReg
from protocol.split_ring import AVAIL_IDX, AVAIL_RING, USED_FLAGS, DescFlags
from protocol.status import DeviceStatus as S
from virtqueue.layout import DESC, split_layout

try:
    from balloon_guest import BUF_BASE, PAGE_BASE, RING_BASE, Guest, settle
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.balloon_guest import BUF_BASE, PAGE_BASE, RING_BASE, Guest, settle

FAIL, PASS = Verdict.FAIL, Verdict.PASS
HINT = bit(BalloonFeature.FREE_PAGE_HINT)


class Watched:
    """A hand-driven Guest with the monitor on every path it uses."""

    def __init__(self, **kw) -> None:
        self.g = g = Guest(**kw)
        self.monitor = DriverMonitor(Capabilities("virtio-mmio", status=True, registers=True,
                                                  guest_writes=True))
        self.device = MonitoredDevice(g.device, self.monitor, provoke=False)
        g.mmio = MonitoredMmio(MmioDevice(self.device, g.mem, irq=g._irq), self.monitor)
        self.tap = GuestWriteTap(g.mem, self.monitor.guest_wrote)

    def grade(self, rid: str):
        return self.monitor.finish("hand driver").grade(rid)


def test_a_clean_hand_driver_passes():
    w = Watched()
    w.g.init()
    w.g.pfns(Q.INFLATE, [PAGE_BASE >> 12])
    for rid in ("GEN-D-1", "GEN-D-2", "GEN-D-5", "GEN-D-9", "GEN-D-20", "SPL-D-1", "SPL-D-16",
                "DC-06", "BL-01", "BL-04", "CFG-01"):
        assert w.grade(rid).verdict is PASS, rid


def test_accepting_an_unoffered_feature_fails_gen_d_5():
    w = Watched()
    assert not w.g.negotiate(accept=DEFAULT_FEATURES | HINT)  # the device refuses it too
    g = w.grade("GEN-D-5")
    assert g.verdict is FAIL
    assert g.values["not_offered"] == ["FREE_PAGE_HINT"]


def test_notify_before_driver_ok_fails_gen_d_20_without_an_excuse():
    w = Watched()
    w.g.init(driver_ok=False)
    w.g.pfns(Q.INFLATE, [PAGE_BASE >> 12])
    g = w.grade("GEN-D-20")
    assert g.verdict is FAIL and g.note is None  # only the stats kick is Linux's
    assert g.values["queue_name"] == "inflate" and g.values["status"] == 0xB


async def test_avail_idx_moving_backwards_fails_spl_d_11(nursery, autojump_clock):
    w = Watched()
    await nursery.start(w.g.device.run)
    w.g.init()
    for k in range(3):
        w.g.pfns(Q.INFLATE, [(PAGE_BASE >> 12) + k])
    await settle()
    q = w.g.queues[Q.INFLATE]
    w.g.mem.write(q.avail + AVAIL_IDX, struct.pack("<H", 1))  # the buggy driver: 3 -> 1
    w.g.r(MmioReg.INTERRUPT_STATUS)  # any register access makes the monitor look
    for rid in ("SPL-D-11", "AV-01"):
        g = w.grade(rid)
        assert g.verdict is FAIL, rid
        assert (g.values["old"], g.values["new"]) == (3, 1)
        assert "backwards" in g.evidence


def test_readable_after_writable_chain_fails_dc_06_with_the_chain():
    w = Watched()
    w.g.init()
    q = w.g.queues[Q.INFLATE]
    mem = w.g.mem
    mem.write(q.desc, DESC.pack(BUF_BASE, 8, DescFlags.WRITE | DescFlags.NEXT, 1)
              + DESC.pack(BUF_BASE + 64, 4, 0, 0))
    mem.write(q.avail + AVAIL_RING, struct.pack("<H", 0))
    mem.write(q.avail + AVAIL_IDX, struct.pack("<H", 1))
    w.g.notify(q.index)
    for rid in ("DC-06", "SPL-D-2"):
        g = w.grade(rid)
        assert g.verdict is FAIL, rid
        assert g.values["head"] == 0 and len(g.values["chain"]) == 2
        assert "flags=0x3" in g.values["chain"][0]


def test_clearing_a_status_bit_fails_gen_d_2():
    w = Watched()
    assert w.g.negotiate()
    w.g.w(MmioReg.STATUS, int(S.ACKNOWLEDGE))
    g = w.grade("GEN-D-2")
    assert g.verdict is FAIL and (g.values["old"], g.values["new"]) == (0xB, 0x1)


def test_writing_config_before_features_ok_fails_gen_d_18():
    w = Watched()
    w.g.w(MmioReg.STATUS, 0)
    w.g.set_status(S.ACKNOWLEDGE | S.DRIVER)
    w.g.w(CONFIG_OFFSET + ConfigOffset.ACTUAL, 5)
    g = w.grade("GEN-D-18")
    assert g.verdict is FAIL and "before FEATURES_OK" in g.evidence


def test_poison_val_late_and_then_changed_fails_bal_d_35_and_36():
    w = Watched()
    w.g.init()  # DRIVER_OK without writing poison_val although PAGE_POISON is negotiated
    w.g.w(CONFIG_OFFSET + ConfigOffset.POISON_VAL, 0xAAAAAAAA)
    assert w.grade("BAL-D-35").verdict is FAIL
    g = w.grade("BAL-D-36")
    assert g.verdict is FAIL and g.values["new"] == 0xAAAAAAAA


async def test_touching_a_page_being_inflated_fails_bal_d_12(nursery, autojump_clock):
    w = Watched()
    await nursery.start(w.g.device.run)
    w.g.init()
    pfn = PAGE_BASE >> 12
    w.g.pfns(Q.INFLATE, [pfn])
    w.tap.write(pfn << 12, b"oops")  # before the device used the buffer
    await settle()
    w.tap.write((pfn << 12) + 8, b"again")  # in the balloon now, never deflated
    assert w.grade("BAL-D-12").values["pfn"] == pfn
    assert w.grade("BAL-D-12").verdict is FAIL
    assert w.grade("BAL-D-9").verdict is FAIL


async def test_deflating_a_page_never_inflated_fails_bal_d_13(nursery, autojump_clock):
    w = Watched()
    await nursery.start(w.g.device.run)
    w.g.init()
    w.g.pfns(Q.DEFLATE, [PAGE_BASE >> 12])
    await settle()
    for rid in ("BAL-D-13", "BL-09"):
        g = w.grade(rid)
        assert g.verdict is FAIL and g.values["pfns"] == [hex(PAGE_BASE >> 12)], rid


def test_odd_stats_buffer_fails_bl_11():
    w = Watched()
    w.g.init()
    w.g.send(Q.STATS, [w.g.alloc(15)])
    assert w.grade("BL-11").verdict is FAIL
    assert w.grade("BL-11").values["readable_len"] == 15


def test_short_command_id_fails_bl_16():
    w = Watched(features=DEFAULT_FEATURES | HINT)
    w.g.init()
    w.g.send(Q.FREE_PAGE, [w.g.alloc(2)])
    for rid in ("BL-16", "BAL-D-24"):
        assert w.grade(rid).verdict is FAIL, rid


def test_register_misuse_fails_the_mmio_rules():
    w = Watched()
    w.g.init()
    w.g.r(MmioReg.QUEUE_NOTIFY)  # write-only
    w.g.mmio.read16(int(MmioReg.STATUS))  # control registers are 32-bit only
    w.g.r(MmioReg.INTERRUPT_STATUS)
    w.g.w(MmioReg.INTERRUPT_ACK, 0x10)  # an undefined bit
    assert w.grade("MMIO-D-1").values == {"register": "QUEUE_NOTIFY", "access": "read"}
    assert w.grade("MMIO-D-1").verdict is FAIL
    assert w.grade("MMIO-D-2").verdict is FAIL
    assert w.grade("MMIO-D-6").verdict is FAIL


def _raw_queue(w: Watched, desc: int, avail: int, used: int) -> None:
    w.g.w(MmioReg.QUEUE_SEL, 0)
    w.g.w(MmioReg.QUEUE_NUM, 8)
    for low, addr in ((MmioReg.QUEUE_DESC_LOW, desc), (MmioReg.QUEUE_AVAIL_LOW, avail),
                      (MmioReg.QUEUE_USED_LOW, used)):
        w.g.w(low, addr)
        w.g.w(MmioReg(low + 4), 0)
    w.g.w(MmioReg.QUEUE_READY, 1)


def test_a_misaligned_descriptor_table_fails_spl_d_1():
    w = Watched()
    assert w.g.negotiate()
    desc, avail, used, _ = split_layout(RING_BASE, 8)
    _raw_queue(w, desc + 8, avail, used)  # the device refuses it (CFG-02); the monitor saw it
    for rid in ("SPL-D-1", "CFG-02"):
        assert w.grade(rid).verdict is FAIL, rid
        assert w.grade(rid).values["addr"] == desc + 8


def test_a_used_ring_handed_over_dirty_fails_spl_d_16():
    w = Watched()
    assert w.g.negotiate()
    desc, avail, used, total = split_layout(RING_BASE, 8)
    w.g.mem.write(RING_BASE, bytes(total))
    w.g.mem.write(used + USED_FLAGS, struct.pack("<H", 1))  # not zeroed at allocation
    _raw_queue(w, desc, avail, used)
    g = w.grade("SPL-D-16")
    assert g.verdict is FAIL and g.values["used_flags"] == 1


async def test_changing_an_exposed_chain_fails_gen_d_21(nursery, autojump_clock):
    w = Watched()
    await nursery.start(w.g.device.run)
    w.g.init()
    head = w.g.send(Q.STATS, [w.g.alloc(20)])  # the device parks it: exposed, not used
    await settle()
    q = w.g.queues[Q.STATS]
    w.g.mem.write(q.desc + 16 * head, DESC.pack(BUF_BASE + 512, 10, 0, 0))
    w.g.r(MmioReg.INTERRUPT_STATUS)
    g = w.grade("GEN-D-21")
    assert g.verdict is FAIL and g.values["head"] == head
    assert g.values["changed_descriptors"] == [hex(q.desc + 16 * head)]
