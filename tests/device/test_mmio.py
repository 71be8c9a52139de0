"""The virtio-mmio register model (virtio §4.2.2) in front of a BalloonDevice."""

from __future__ import annotations

import pytest

from device.balloon import DEFAULT_FEATURES
from device.mmio import QEMU_VENDOR_ID
from protocol.balloon import BalloonQueue as Q
from protocol.features import BalloonFeature, TransportFeature, bit
from protocol.mmio import MAGIC_VALUE, InterruptBit, MmioReg
from protocol.status import DeviceStatus as S

try:
    from balloon_guest import RING_BASE, Guest, settle
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.balloon_guest import RING_BASE, Guest, settle


def test_identity_registers():
    g = Guest()
    assert g.r(MmioReg.MAGIC_VALUE) == MAGIC_VALUE
    assert g.r(MmioReg.VERSION) == 2
    assert g.r(MmioReg.DEVICE_ID) == 5
    assert g.r(MmioReg.VENDOR_ID) == QEMU_VENDOR_ID


def test_device_features_through_two_windows():
    g = Guest()
    assert g.device_features() == DEFAULT_FEATURES
    g.w(MmioReg.DEVICE_FEATURES_SEL, 1)
    assert g.r(MmioReg.DEVICE_FEATURES) == 1  # VERSION_1 is bit 32
    g.w(MmioReg.DEVICE_FEATURES_SEL, 2)
    assert g.r(MmioReg.DEVICE_FEATURES) == 0


def test_full_init_sequence_activates_device():
    g = Guest()
    assert g.negotiate()
    assert g.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    assert g.device.features == DEFAULT_FEATURES
    for kind in (Q.INFLATE, Q.DEFLATE, Q.STATS, Q.REPORTING):
        g.setup_queue(kind)
        assert g.r(MmioReg.QUEUE_READY) == 1
    assert not g.device.active
    g.set_status(S.DRIVER_OK)
    assert g.device.active
    assert g.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK


def test_features_ok_refused_for_unoffered_bit():
    g = Guest()
    assert not g.negotiate(DEFAULT_FEATURES | bit(BalloonFeature.FREE_PAGE_HINT))
    assert g.status == S.ACKNOWLEDGE | S.DRIVER
    assert g.mmio.counters["features_refused"] == 1
    assert g.device.features == 0


def test_driver_ok_without_features_ok_is_not_taken():
    g = Guest()
    g.set_status(S.ACKNOWLEDGE | S.DRIVER)
    g.set_status(S.DRIVER_OK)
    assert not g.status & S.DRIVER_OK and not g.device.active
    assert g.mmio.counters["GEN-D-18"] == 1


def test_queue_num_max_follows_qemu_sizes_and_numbering():
    g = Guest(features=DEFAULT_FEATURES | bit(BalloonFeature.FREE_PAGE_HINT))
    sizes = []
    for sel in range(6):
        g.w(MmioReg.QUEUE_SEL, sel)
        sizes.append(g.r(MmioReg.QUEUE_NUM_MAX))
    assert sizes == [128, 128, 128, 1024, 32, 0]


def test_queue_num_above_max_is_ignored_like_qemu():
    g = Guest()
    g.negotiate()
    g.w(MmioReg.QUEUE_SEL, 0)
    g.w(MmioReg.QUEUE_NUM, 256)  # > QueueNumMax 128: ignored, the size stays 128
    assert g.mmio.counters["CFG-01"] == 1
    g.w(MmioReg.QUEUE_DESC_LOW, RING_BASE)
    g.w(MmioReg.QUEUE_AVAIL_LOW, RING_BASE + 128 * 16)
    g.w(MmioReg.QUEUE_USED_LOW, RING_BASE + 4096)
    g.w(MmioReg.QUEUE_READY, 1)
    assert g.r(MmioReg.QUEUE_READY) == 1
    assert g.device.detach_queue(0) == 0


@pytest.mark.parametrize("reg", [MmioReg.QUEUE_NUM, MmioReg.QUEUE_SEL, MmioReg.INTERRUPT_ACK,
                                 MmioReg.DRIVER_FEATURES, MmioReg.QUEUE_DESC_LOW,
                                 MmioReg.QUEUE_PFN])
def test_reads_of_write_only_registers_give_zero(reg):
    g = Guest()
    g.w(MmioReg.QUEUE_SEL, 1)
    assert g.r(reg) == 0
    assert g.mmio.counters["MMIO-D-1"] == 1


@pytest.mark.parametrize("reg", [MmioReg.MAGIC_VALUE, MmioReg.DEVICE_FEATURES,
                                 MmioReg.INTERRUPT_STATUS, MmioReg.CONFIG_GENERATION])
def test_writes_to_read_only_registers_are_ignored(reg):
    g = Guest()
    before = g.r(reg)
    g.w(reg, 0x1234)
    assert g.r(reg) == before
    assert g.mmio.counters["MMIO-D-1"] == 1


def test_misaligned_and_narrow_control_accesses_are_ignored():
    g = Guest()
    assert g.mmio.read32(0x002) == 0
    assert g.mmio.read16(int(MmioReg.MAGIC_VALUE)) == 0
    g.mmio.write8(int(MmioReg.STATUS), 1)
    assert g.status == 0
    assert g.mmio.counters["MMIO-D-2"] == 3
    assert g.mmio.read32(0x0F0) == 0  # no register there
    assert g.mmio.counters["MMIO-D-1"] == 1


def test_config_space_narrow_accesses():
    g = Guest()
    g.device.balloon(g.device.ram_size - 0x123 * 4096)  # num_pages = 0x123
    base = int(MmioReg.CONFIG)
    assert g.mmio.read32(base) == 0x123
    assert g.mmio.read16(base) == 0x123 and g.mmio.read8(base + 1) == 0x01
    g.negotiate()
    g.mmio.write16(base + 4, 0xBEEF)
    g.mmio.write8(base + 6, 0x01)
    assert g.mmio.read32(base + 4) == 0x01BEEF == g.device.config.actual


def test_config_change_interrupt_only_after_driver_ok_and_generation_moves():
    g = Guest()
    gen = g.r(MmioReg.CONFIG_GENERATION)
    g.device.balloon(4096)
    assert g.r(MmioReg.CONFIG_GENERATION) == gen + 1
    assert g.r(MmioReg.INTERRUPT_STATUS) == 0 and g.irqs == 0
    g.init()
    g.device.balloon(8192)
    assert g.r(MmioReg.INTERRUPT_STATUS) == InterruptBit.CONFIG and g.irqs == 1
    g.w(MmioReg.INTERRUPT_ACK, InterruptBit.CONFIG)
    assert g.r(MmioReg.INTERRUPT_STATUS) == 0


async def test_interrupt_status_latches_until_ack(nursery):
    g = Guest()
    await nursery.start(g.device.run)
    g.init()
    g.pfns(Q.INFLATE, [0x800])
    await settle()
    assert g.r(MmioReg.INTERRUPT_STATUS) == InterruptBit.VRING
    assert g.r(MmioReg.INTERRUPT_STATUS) == InterruptBit.VRING  # reading does not clear
    g.w(MmioReg.INTERRUPT_ACK, InterruptBit.CONFIG)
    assert g.r(MmioReg.INTERRUPT_STATUS) == InterruptBit.VRING
    g.w(MmioReg.INTERRUPT_ACK, InterruptBit.VRING | 0x10)  # undefined bit: MMIO-D-6
    assert g.r(MmioReg.INTERRUPT_STATUS) == 0
    assert g.mmio.counters["MMIO-D-6"] == 1


def test_misaligned_ring_is_refused_and_needs_reset():
    g = Guest()
    g.negotiate()
    g.w(MmioReg.QUEUE_SEL, 0)
    g.w(MmioReg.QUEUE_DESC_LOW, RING_BASE + 8)  # not 16-byte aligned: CFG-02
    g.w(MmioReg.QUEUE_AVAIL_LOW, RING_BASE + 4096)
    g.w(MmioReg.QUEUE_USED_LOW, RING_BASE + 8192)
    g.w(MmioReg.QUEUE_READY, 1)
    assert g.r(MmioReg.QUEUE_READY) == 0
    assert g.status & S.DEVICE_NEEDS_RESET
    assert g.r(MmioReg.INTERRUPT_STATUS) == 0  # no DRIVER_OK yet: no config interrupt
    assert g.mmio.counters["CFG-02"] == 1


def test_ring_outside_ram_refused_without_reset_under_skip_policy():
    g = Guest(policy="skip")
    g.negotiate()
    g.w(MmioReg.QUEUE_SEL, 0)
    g.w(MmioReg.QUEUE_DESC_LOW, 0)
    g.w(MmioReg.QUEUE_DESC_HIGH, 1)  # 4 GiB: outside the 16 MiB of RAM (CFG-05)
    g.w(MmioReg.QUEUE_READY, 1)
    assert g.r(MmioReg.QUEUE_READY) == 0
    assert not g.status & S.DEVICE_NEEDS_RESET


def test_queue_registers_locked_while_ready():
    g = Guest()
    g.negotiate()
    g.setup_queue(Q.INFLATE)
    g.w(MmioReg.QUEUE_NUM, 64)
    g.w(MmioReg.QUEUE_DESC_LOW, 0)
    assert g.mmio.counters["MMIO-D-5"] == 2
    g.w(MmioReg.QUEUE_READY, 0)
    assert g.r(MmioReg.QUEUE_READY) == 0
    with pytest.raises(Exception, match="not attached"):
        g.device.detach_queue(0)


def test_notify_of_queue_not_ready_is_ignored():
    g = Guest()
    g.negotiate()
    g.notify(0)
    assert g.mmio.counters["CFG-06"] == 1


def test_status_zero_resets_everything():
    g = Guest()
    g.init()
    g.device.balloon(4096)
    assert g.r(MmioReg.INTERRUPT_STATUS)
    g.w(MmioReg.STATUS, 0)
    assert g.status == 0 and g.r(MmioReg.INTERRUPT_STATUS) == 0
    for sel in range(4):
        g.w(MmioReg.QUEUE_SEL, sel)
        assert g.r(MmioReg.QUEUE_READY) == 0
    assert not g.device.active and g.device.features == 0


def test_driver_cannot_clear_needs_reset_or_take_features_after_features_ok():
    g = Guest()
    g.negotiate()
    g.mmio._device_needs_reset(_violation())
    g.w(MmioReg.STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    assert g.status & S.DEVICE_NEEDS_RESET
    g.w(MmioReg.DRIVER_FEATURES_SEL, 0)
    g.w(MmioReg.DRIVER_FEATURES, 0)
    assert g.mmio.driver_features[0] != 0
    assert g.mmio.counters["GEN-D-18"] == 1


def test_shared_memory_registers_say_no_region():
    g = Guest()
    assert g.r(MmioReg.SHM_LEN_LOW) == g.r(MmioReg.SHM_BASE_HIGH) == 0xFFFF_FFFF


def test_device_without_stats_offers_no_stats_window():
    g = Guest(features=bit(TransportFeature.VERSION_1))
    g.w(MmioReg.QUEUE_SEL, 2)
    assert g.r(MmioReg.QUEUE_NUM_MAX) == 0


def _violation():
    from protocol.errors import DriverViolation
    return DriverViolation(rule_id="DC-07", section="2.7.5", message="test")
