"""The driver side of virtio-mmio: register sequences against a scripted host."""

from __future__ import annotations

import pytest
from balloon_host import QEMU_LIKE_FEATURES, BalloonHost

from guest.virtio_mmio import NoDevice, VirtioMmioTransport
from protocol.errors import DeviceViolation, UsageError
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from protocol.mmio import CONFIG_OFFSET, InterruptBit, MmioReg
from protocol.status import DeviceStatus
from virtqueue.memory import GuestMemory

R = MmioReg


class BumpRings:
    """Ring memory from a bump pointer (the driver tests use the guest's allocator)."""

    def __init__(self, base: int = 0x100000) -> None:
        self.next = base
        self.freed: list[tuple[int, int]] = []

    def alloc_ring(self, nbytes: int) -> int:
        gpa = self.next
        self.next += (nbytes + 4095) & ~4095
        return gpa

    def free_ring(self, gpa: int, nbytes: int) -> None:
        self.freed.append((gpa, nbytes))


@pytest.fixture
def memory():
    with GuestMemory.create(16 << 20) as mem:
        yield mem


def make(memory, **kw) -> tuple[BalloonHost, VirtioMmioTransport]:
    host = BalloonHost(memory, **kw)
    return host, VirtioMmioTransport(host, host.irq, memory)


def test_begin_reads_identity_then_resets_and_acknowledges(memory):
    host, t = make(memory)
    t.begin(device_id=5)
    assert host.log[:4] == [("r", R.MAGIC_VALUE, 0x74726976), ("r", R.VERSION, 2),
                            ("r", R.DEVICE_ID, 5), ("r", R.VENDOR_ID, 0x554D4551)]
    # reset (write 0, read back 0), then virtio_add_status read-modify-writes
    assert host.log[4:] == [("w", R.STATUS, 0), ("r", R.STATUS, 0),
                            ("r", R.STATUS, 0), ("w", R.STATUS, 1),
                            ("r", R.STATUS, 1), ("w", R.STATUS, 3)]


def test_probe_rejects_wrong_magic_with_rule_id(memory):
    host, t = make(memory)
    host.read32 = lambda off: 0x12345678 if off == R.MAGIC_VALUE else 0
    with pytest.raises(DeviceViolation) as exc:
        t.probe()
    assert exc.value.rule_id == "MMIO-V-1"
    assert exc.value.values == {"magic": 0x12345678}


def test_probe_rejects_legacy_version(memory):
    host, t = make(memory)
    real = host.read32
    host.read32 = lambda off: 1 if off == R.VERSION else real(off)
    with pytest.raises(DeviceViolation, match=r"Version is not 2"):
        t.probe()


def test_device_id_zero_is_ignored_without_touching_other_registers(memory):
    host, t = make(memory)
    seen = []

    def read32(off):
        seen.append(off)
        return {R.MAGIC_VALUE: 0x74726976, R.VERSION: 2}.get(off, 0)

    host.read32 = read32
    host.write32 = lambda off, v: seen.append(("w", off))
    with pytest.raises(NoDevice, match="placeholder"):
        t.probe()
    assert seen == [R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID]  # MMIO-D-7


def test_probe_rejects_another_device_type(memory):
    host, t = make(memory)
    with pytest.raises(NoDevice, match="DeviceID is 5, not 1"):
        t.probe(device_id=1)


def test_features_read_high_word_first_and_written_high_first(memory):
    host, t = make(memory)
    t.begin()
    start = len(host.log)
    features = t.negotiate(mask(BalloonFeature.STATS_VQ))
    log = host.log[start:]
    assert log[:4] == [("w", R.DEVICE_FEATURES_SEL, 1), ("r", R.DEVICE_FEATURES, 1),
                       ("w", R.DEVICE_FEATURES_SEL, 0),
                       ("r", R.DEVICE_FEATURES, QEMU_LIKE_FEATURES & 0xFFFFFFFF)]
    assert log[4:8] == [("w", R.DRIVER_FEATURES_SEL, 1), ("w", R.DRIVER_FEATURES, 1),
                        ("w", R.DRIVER_FEATURES_SEL, 0),
                        ("w", R.DRIVER_FEATURES, features & 0xFFFFFFFF)]
    # only offered bits (GEN-D-5): what we asked for plus the offered ring/VERSION_1 bits
    assert features == mask(BalloonFeature.STATS_VQ, TransportFeature.RING_INDIRECT_DESC,
                            TransportFeature.RING_EVENT_IDX, TransportFeature.VERSION_1)
    assert host.driver_features == features
    assert t.get_status() & DeviceStatus.FEATURES_OK


def test_unsupported_transport_bits_are_dropped(memory):
    offered = (QEMU_LIKE_FEATURES | bit(TransportFeature.RING_PACKED)
               | bit(TransportFeature.RING_RESET) | bit(TransportFeature.ACCESS_PLATFORM))
    host, t = make(memory, features=offered)
    t.begin()
    features = t.negotiate(0)
    assert not features & bit(TransportFeature.RING_PACKED)  # our rings are split only
    assert not features & bit(TransportFeature.RING_RESET)  # Linux 6.1 drops it too
    assert features & bit(TransportFeature.ACCESS_PLATFORM)  # kept until the driver validates


def test_validate_change_writes_features_twice(memory):
    host, t = make(memory)
    t.begin()
    t.negotiate(mask(BalloonFeature.STATS_VQ, BalloonFeature.PAGE_POISON),
                validate=lambda f: f & ~bit(BalloonFeature.PAGE_POISON))
    written = host.writes(R.DRIVER_FEATURES)
    assert len(written) == 4
    assert written[1] & bit(BalloonFeature.PAGE_POISON)
    assert not written[3] & bit(BalloonFeature.PAGE_POISON)


def test_validate_may_only_clear_bits(memory):
    host, t = make(memory)
    t.begin()
    with pytest.raises(UsageError, match="only clear"):
        t.negotiate(0, validate=lambda f: f | 1)


def test_refused_features_raise_gen_v_5(memory):
    host, t = make(memory, refuse_features=True)
    t.begin()
    with pytest.raises(DeviceViolation) as exc:
        t.negotiate(mask(BalloonFeature.STATS_VQ))
    assert exc.value.rule_id == "GEN-V-5"
    t.fail()
    assert host.status & DeviceStatus.FAILED


def test_missing_version_1_is_a_device_violation(memory):
    host, t = make(memory, features=mask(BalloonFeature.STATS_VQ))
    t.begin()
    with pytest.raises(DeviceViolation) as exc:
        t.negotiate(mask(BalloonFeature.STATS_VQ))
    assert exc.value.rule_id == "GEN-V-8"


def test_reset_waits_for_status_zero(memory):
    host, t = make(memory)
    real = host.read32
    reads = iter([7, 7, 0])
    host.read32 = lambda off: next(reads) if off == R.STATUS else real(off)
    t.reset()  # returns once Status reads 0


def test_reset_that_never_completes_is_gen_v_12(memory):
    host, t = make(memory)
    real = host.read32
    host.read32 = lambda off: 1 if off == R.STATUS else real(off)
    with pytest.raises(DeviceViolation) as exc:
        t.reset()
    assert exc.value.rule_id == "GEN-V-12"


def test_queue_setup_sequence(memory):
    host, t = make(memory, queue_num_max=100)
    t.begin()
    t.negotiate(0)
    rings = BumpRings()
    start = len(host.log)
    vq = t.setup_vq(1, "deflate", None, rings)
    assert vq.size == 64  # largest power of two <= QueueNumMax
    ring = vq.ring
    assert host.log[start:] == [
        ("w", R.QUEUE_SEL, 1), ("r", R.QUEUE_READY, 0), ("r", R.QUEUE_NUM_MAX, 100),
        ("w", R.QUEUE_NUM, 64),
        ("w", R.QUEUE_DESC_LOW, ring.desc), ("w", R.QUEUE_DESC_HIGH, 0),
        ("w", R.QUEUE_AVAIL_LOW, ring.avail), ("w", R.QUEUE_AVAIL_HIGH, 0),
        ("w", R.QUEUE_USED_LOW, ring.used), ("w", R.QUEUE_USED_HIGH, 0),
        ("w", R.QUEUE_READY, 1)]
    assert ring.desc == 0x100000 and ring.used % 4096 == 0  # legacy layout, 4 KiB aligned
    assert t.setup_vq(0, "inflate", None, rings, max_size=8).size == 8


def test_queue_that_does_not_exist(memory):
    host, t = make(memory)
    t.begin()
    t.negotiate(0)  # no STATS_VQ: queues 0 and 1 only
    with pytest.raises(NoDevice, match="QueueNumMax is 0"):
        t.setup_vq(2, "stats", None, BumpRings())


def test_queue_already_ready_is_refused(memory):
    host, t = make(memory)
    t.begin()
    t.negotiate(0)
    t.setup_vq(0, "inflate", None, BumpRings())
    with pytest.raises(DeviceViolation, match="QueueReady is not 0"):
        t.setup_vq(0, "inflate", None, BumpRings(0x200000))


def test_del_vqs_stops_queues_and_frees_rings(memory):
    host, t = make(memory)
    t.begin()
    t.negotiate(0)
    rings = BumpRings()
    a = t.setup_vq(0, "inflate", None, rings)
    b = t.setup_vq(1, "deflate", None, rings)
    t.del_vqs(rings)
    assert host.queues[0].ready == 0 and host.queues[1].ready == 0
    assert rings.freed == [(a.ring_gpa, a.ring_bytes), (b.ring_gpa, b.ring_bytes)]
    assert t.queues == {}


def test_indirect_area_only_with_the_feature(memory):
    host, t = make(memory)
    t.begin()
    t.negotiate(0)
    vq = t.setup_vq(0, "inflate", None, BumpRings(), indirect_entries=32)
    assert vq.ring.indirect and vq.indirect_area == (vq.ring.indirect_area[0], 64 * 32 * 16)
    no_indirect = QEMU_LIKE_FEATURES & ~bit(TransportFeature.RING_INDIRECT_DESC)
    host2, t2 = make(memory, features=no_indirect)
    t2.begin()
    t2.negotiate(0)
    assert t2.setup_vq(0, "inflate", None, BumpRings(), indirect_entries=32).indirect_area is None


def test_config_read_retries_until_generation_is_stable(memory):
    host, t = make(memory, num_pages=42)
    real = host.read32
    gens = iter([1, 2, 2, 2])  # changes during the first read

    def read32(off):
        if off == R.CONFIG_GENERATION:
            return next(gens)
        return real(off)

    host.read32 = read32
    assert t.read_config32(0) == 42
    reads = [off for op, off, _ in host.log if op == "r" and off == CONFIG_OFFSET]
    assert len(reads) == 2


def test_config_read_without_generation_is_one_readl(memory):
    host = BalloonHost(memory, num_pages=7)
    t = VirtioMmioTransport(host, None, memory, config_generation=False)
    assert t.read_config32(0) == 7
    assert host.log == [("r", CONFIG_OFFSET, 7)]


def test_generation_that_never_settles_is_mmio_v_4(memory):
    host, t = make(memory)
    real = host.read32
    counter = iter(range(10**6))
    host.read32 = lambda off: next(counter) if off == R.CONFIG_GENERATION else real(off)
    with pytest.raises(DeviceViolation) as exc:
        t.read_config32(0)
    assert exc.value.rule_id == "MMIO-V-4"


def test_config_write_is_one_aligned_access(memory):
    host, t = make(memory)
    t.write_config32(4, 0x1_0000_0005)
    assert host.log == [("w", CONFIG_OFFSET + 4, 5)]
    with pytest.raises(UsageError):
        t.write_config32(2, 1)


def test_interrupt_ack_uses_only_defined_bits(memory):
    host, t = make(memory)
    host.isr = 0x7  # bit 2 is undefined
    assert t.take_interrupt() == InterruptBit.VRING | InterruptBit.CONFIG
    assert host.writes(R.INTERRUPT_ACK) == [3]  # MMIO-D-6
    assert host.isr == 0x4


def test_notify_writes_the_queue_index(memory):
    writes = []

    class Bus:
        def read32(self, off):
            raise AssertionError("notify reads nothing")

        def write32(self, off, value):
            writes.append((off, value))

    VirtioMmioTransport(Bus(), None, memory).notify(3)
    assert writes == [(R.QUEUE_NOTIFY, 3)]
