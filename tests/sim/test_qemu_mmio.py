"""sim.qemu.mmio on a real QEMU: discovery, a raw modern init, config changes and interrupts.

The registers are written one by one here on purpose (the driver proper lives in guest/): this
pins down what QEMU's virtio-mmio balloon does, so the driver author can rely on it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from protocol.balloon import VIRTIO_ID_BALLOON, ConfigOffset
from protocol.errors import UsageError
from protocol.features import BalloonFeature, TransportFeature, bit, has
from protocol.mmio import CONFIG_OFFSET, MAGIC_VALUE, InterruptBit, MmioReg
from protocol.status import DeviceStatus
from sim.qemu.mmio import (
    MICROVM_VIRTIO_MMIO_BASE,
    MmioInterrupts,
    QtestIrqLine,
    QtestMmioBus,
    find_balloon,
    find_virtio_ioapic,
    intercept_virtio_irqs,
    scan_virtio_mmio,
)
from sim.qemu.process import BalloonProperties, QemuOptions, run_qemu

QEMU_VENDOR = 0x554D4551  # "QEMU"
MiB = 1 << 20


def device_features(bus: QtestMmioBus) -> int:
    bus.write32(MmioReg.DEVICE_FEATURES_SEL, 0)
    lo = bus.read32(MmioReg.DEVICE_FEATURES)
    bus.write32(MmioReg.DEVICE_FEATURES_SEL, 1)
    return bus.read32(MmioReg.DEVICE_FEATURES) << 32 | lo


def test_bus_refuses_offsets_outside_its_window_or_misaligned():
    bus = QtestMmioBus(qtest=None, base=MICROVM_VIRTIO_MMIO_BASE)  # nothing may be sent
    for call in (
        lambda: bus.read32(0x200),
        lambda: bus.read32(-4),
        lambda: bus.write32(0x1FE, 0),
        lambda: bus.read32(0x102),
        lambda: bus.read16(0x101),
    ):
        with pytest.raises(UsageError):
            call()


@pytest.mark.peer
async def test_discovery_finds_the_modern_balloon_on_the_last_transport(qemu_binary):
    options = QemuOptions(binary=qemu_binary, memory=64 * MiB)
    async with run_qemu(options) as qemu:
        slots = scan_virtio_mmio(qemu.qtest)
        assert len(slots) == 1
        slot, bus = find_balloon(qemu.qtest)
        assert slot == slots[0]
        assert (slot.device_id, slot.version, slot.vendor_id) == (VIRTIO_ID_BALLOON, 2, QEMU_VENDOR)
        assert (slot.index, slot.base) == (23, 0xFEB02E00)  # QEMU fills transports from the top
        assert bus.read32(MmioReg.MAGIC_VALUE) == MAGIC_VALUE
        features = device_features(bus)
        for feature in (TransportFeature.VERSION_1, BalloonFeature.STATS_VQ):
            assert has(features, feature)
        assert not has(features, BalloonFeature.REPORTING)  # not asked for
        assert not has(features, BalloonFeature.FREE_PAGE_HINT)


@pytest.mark.peer
async def test_device_properties_show_up_as_offered_features(qemu_binary):
    props = BalloonProperties(
        free_page_reporting=True, free_page_hint=True, deflate_on_oom=True, page_poison=False
    )
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB, balloon=props)) as qemu:
        _, bus = find_balloon(qemu.qtest)
        features = device_features(bus)
        for feature in (
            BalloonFeature.REPORTING,
            BalloonFeature.FREE_PAGE_HINT,
            BalloonFeature.DEFLATE_ON_OOM,
        ):
            assert has(features, feature)
        assert not has(features, BalloonFeature.PAGE_POISON)


@pytest.mark.peer
async def test_legacy_transport_reports_version_1(qemu_binary):
    options = QemuOptions(binary=qemu_binary, memory=64 * MiB, force_legacy=True)
    async with run_qemu(options) as qemu:
        slot, _ = find_balloon(qemu.qtest)
        assert slot.version == 1


@pytest.mark.peer
async def test_no_balloon_device_is_a_peer_error(qemu_binary):
    from protocol.errors import PeerError

    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB, balloon=None)) as qemu:
        assert scan_virtio_mmio(qemu.qtest) == []
        with pytest.raises(PeerError, match="DeviceID 5"):
            find_balloon(qemu.qtest)


def raw_modern_init(bus: QtestMmioBus, memory, wanted: int, queues: int) -> DeviceStatus:
    """Status 0 -> ACK -> DRIVER -> features -> FEATURES_OK -> queues -> DRIVER_OK (§3.1.1)."""
    bus.write32(MmioReg.STATUS, 0)
    assert bus.read32(MmioReg.STATUS) == 0
    status = DeviceStatus.ACKNOWLEDGE
    bus.write32(MmioReg.STATUS, status)
    status |= DeviceStatus.DRIVER
    bus.write32(MmioReg.STATUS, status)
    for sel in (0, 1):
        bus.write32(MmioReg.DRIVER_FEATURES_SEL, sel)
        bus.write32(MmioReg.DRIVER_FEATURES, wanted >> (32 * sel) & 0xFFFFFFFF)
    status |= DeviceStatus.FEATURES_OK
    bus.write32(MmioReg.STATUS, status)
    assert bus.read32(MmioReg.STATUS) & DeviceStatus.FEATURES_OK
    ring = 0x100000
    for index in range(queues):
        bus.write32(MmioReg.QUEUE_SEL, index)
        assert bus.read32(MmioReg.QUEUE_READY) == 0
        assert bus.read32(MmioReg.QUEUE_NUM_MAX) == 1024  # VIRTQUEUE_MAX_SIZE on mmio
        memory.fill(ring, 0x1000, 0)
        bus.write32(MmioReg.QUEUE_NUM, 8)
        for reg, addr in (
            (MmioReg.QUEUE_DESC_LOW, ring),
            (MmioReg.QUEUE_AVAIL_LOW, ring + 0x80),
            (MmioReg.QUEUE_USED_LOW, ring + 0x100),
        ):
            bus.write32(reg, addr)
            bus.write32(reg + 4, 0)
        bus.write32(MmioReg.QUEUE_READY, 1)
        assert bus.read32(MmioReg.QUEUE_READY) == 1
        ring += 0x1000
    status |= DeviceStatus.DRIVER_OK
    bus.write32(MmioReg.STATUS, status)
    return status


@pytest.mark.peer
async def test_raw_modern_init_reaches_driver_ok(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        _, bus = find_balloon(qemu.qtest)
        wanted = bit(TransportFeature.VERSION_1) | bit(BalloonFeature.STATS_VQ)
        status = raw_modern_init(bus, qemu.memory, wanted, queues=3)
        assert bus.read32(MmioReg.STATUS) == status == 0xF
        bus.write32(MmioReg.QUEUE_SEL, 3)
        assert bus.read32(MmioReg.QUEUE_NUM_MAX) == 0  # no 4th queue without reporting/hinting
        assert MmioInterrupts(bus).status() == 0


@pytest.mark.peer
async def test_qmp_balloon_target_changes_config_and_raises_the_config_interrupt(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=128 * MiB)) as qemu:
        slot, bus = find_balloon(qemu.qtest)
        raw_modern_init(bus, qemu.memory, bit(TransportFeature.VERSION_1), queues=2)
        ioapic = await intercept_virtio_irqs(qemu.qtest, qemu.qmp)
        assert ioapic == await find_virtio_ioapic(qemu.qmp)
        irqs = MmioInterrupts(bus)
        num_pages = CONFIG_OFFSET + ConfigOffset.NUM_PAGES
        assert bus.read32(num_pages) == 0
        generation = bus.read32(MmioReg.CONFIG_GENERATION)

        await qemu.qmp.balloon(64 * MiB)  # the guest should give back 64 MiB = 16384 pages

        assert bus.read32(num_pages) == 16384
        assert bus.read32(MmioReg.CONFIG_GENERATION) != generation
        pending = irqs.status()
        assert pending & InterruptBit.CONFIG
        assert qemu.qtest.irq_levels.get(slot.irq_pin) is True  # IRQ raise <pin> was seen
        assert irqs.take() == pending
        assert irqs.status() == 0
        bus.read32(MmioReg.MAGIC_VALUE)  # one more round trip to collect the async IRQ line
        assert qemu.qtest.irq_levels[slot.irq_pin] is False

        # The driver reports what it gave: QEMU's "actual" and BALLOON_CHANGE follow config.actual.
        since = len(qemu.qmp.events)
        bus.write32(CONFIG_OFFSET + ConfigOffset.ACTUAL, 16384)
        event = await qemu.qmp.wait_event("BALLOON_CHANGE", since=since)
        assert event.data["actual"] == 64 * MiB
        assert await qemu.qmp.query_balloon() == 64 * MiB


@pytest.mark.peer
async def test_before_driver_ok_a_target_change_updates_config_but_interrupts_nobody(qemu_binary):
    """QEMU's virtio_notify_config returns early until DRIVER_OK: no ISR bit, no generation bump."""
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=128 * MiB)) as qemu:
        _, bus = find_balloon(qemu.qtest)
        generation = bus.read32(MmioReg.CONFIG_GENERATION)
        await qemu.qmp.balloon(96 * MiB)
        assert bus.read32(CONFIG_OFFSET + ConfigOffset.NUM_PAGES) == 8192
        assert MmioInterrupts(bus).status() == 0
        assert bus.read32(MmioReg.CONFIG_GENERATION) == generation


@pytest.mark.peer
async def test_intercepted_irq_line_wakes_a_waiter_and_falls_after_ack(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=128 * MiB)) as qemu:
        slot, bus = find_balloon(qemu.qtest)
        raw_modern_init(bus, qemu.memory, bit(TransportFeature.VERSION_1), queues=2)
        await intercept_virtio_irqs(qemu.qtest, qemu.qmp)
        line, irqs = QtestIrqLine(qemu.qtest, slot.irq_pin), MmioInterrupts(bus)
        woke = trio.Event()

        async def driver_irq_task():
            await line.wait()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver_irq_task)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            await qemu.qmp.balloon(100 * MiB)  # QEMU sends "IRQ raise 23" on the qtest socket
            with trio.fail_after(5):
                await woke.wait()
        assert line.level and irqs.read_interrupt_status() & InterruptBit.CONFIG
        irqs.take()
        assert not line.level  # "IRQ lower" arrived inside the InterruptACK write
        with trio.move_on_after(0.1) as idle:
            await line.wait()
        assert idle.cancelled_caught
