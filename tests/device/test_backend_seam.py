"""BalloonDevice driven directly through the VirtioBackendDevice seam, as vhost-user does it:
no MMIO registers, rings handed over as RingConfig, activation on the first kick."""

from __future__ import annotations

import struct

import pytest

from device.balloon import BalloonDevice
from device.transport import RingConfig
from protocol.balloon import BalloonQueue as Q
from protocol.errors import DriverViolation, UsageError
from protocol.features import TransportFeature, has
from virtqueue.driver import DriverQueue
from virtqueue.layout import legacy_layout
from virtqueue.memory import GuestMemory

MiB = 1 << 20
BUF = 4 * MiB


@pytest.fixture
def mem():
    with GuestMemory.create(16 * MiB) as m:
        yield m


def attach(dev: BalloonDevice, mem: GuestMemory, index: int, size: int = 256,
           next_avail: int = 0, calls: list | None = None) -> tuple[DriverQueue, RingConfig]:
    desc, avail, used, _ = legacy_layout(MiB + index * 64 * 1024, size)  # UML's layout
    q = DriverQueue(index=index, size=size, desc=desc, avail=avail, used=used, memory=mem,
                    event_idx=has(dev.features, TransportFeature.RING_EVENT_IDX),
                    initial_idx=next_avail)
    ring = RingConfig(size=size, desc=desc, avail=avail, used=used, next_avail=next_avail,
                      next_used=next_avail)
    dev.attach_queue(index, ring, mem, lambda: (calls if calls is not None else []).append(index))
    return q, ring


def test_uml_sized_ring_works_without_driver_ok(mem):
    dev = BalloonDevice(mem)
    assert dev.set_features(dev.offered_features())
    calls: list[int] = []
    q, _ = attach(dev, mem, 0, calls=calls)  # 256 > QEMU's 128: vhost-user front-ends choose
    mem.write(BUF, struct.pack("<I", 0x900))
    q.add([(BUF, 4)], [], "inflate")
    dev.kick(0)
    assert dev.poll_queue(0) is False and q.get_buf() is None  # not active yet: nothing taken
    dev.activate()  # the vhost-user back-end activates on the first kick / enable
    dev.poll_queue(0)
    assert q.get_buf() == ("inflate", 0) and calls == [0]
    assert dev.ballooned.total == 4096


def test_detach_rewinds_a_parked_stats_buffer_like_qemu_unpop(mem):
    dev = BalloonDevice(mem)
    dev.set_features(dev.offered_features())
    dev.activate()
    q, _ = attach(dev, mem, 2)
    mem.write(BUF, struct.pack("<HQ", 4, 111))
    q.add([(BUF, 10)], [], "stats")
    dev.poll_queue(Q.STATS)
    assert dev.stats.parked is not None
    assert dev.detach_queue(2) == 0  # popped once, rewound: the ring resumes at the buffer
    assert dev.stats.parked is None
    with pytest.raises(UsageError):
        dev.detach_queue(2)
    mem.write(BUF, struct.pack("<HQ", 4, 222))  # the front-end resumes with the same ring
    desc, avail, used = q.desc, q.avail, q.used
    dev.attach_queue(2, RingConfig(256, desc, avail, used, next_avail=0), mem, lambda: None)
    dev.poll_queue(Q.STATS)
    assert dev.guest_stats()["stats"]["stat-free-memory"] == 222


def test_attach_of_a_queue_that_does_not_exist_needs_reset(mem):
    seen = []
    dev = BalloonDevice(mem)
    dev.on_needs_reset = seen.append
    with pytest.raises(DriverViolation) as exc:
        attach(dev, mem, 7)
    assert exc.value.rule_id == "CFG-01" and seen == [exc.value]
    assert dev.needs_reset is exc.value
    dev.reset()
    assert dev.needs_reset is None


def test_bad_ring_under_truncate_policy_is_refused_without_reset(mem):
    dev = BalloonDevice(mem, policy="truncate")
    ring = RingConfig(size=100, desc=MiB, avail=2 * MiB, used=3 * MiB)  # not a power of two
    with pytest.raises(DriverViolation, match="CFG-01"):
        dev.attach_queue(0, ring, mem, lambda: None)
    assert dev.needs_reset is None


def test_kick_of_unattached_queue_is_ignored(mem):
    dev = BalloonDevice(mem)
    dev.activate()
    dev.kick(0)
    dev.kick(40)
    assert dev.summary().get("kicks", 0) == 0
