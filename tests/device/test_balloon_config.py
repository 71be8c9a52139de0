"""Config space, feature offers, queue layout and the QMP-named host verbs of BalloonDevice."""

from __future__ import annotations

import struct

import pytest
from construct import Int32ul

from device import config as config_mod
from device.balloon import DEFAULT_FEATURES, QEMU_DEFAULT_FEATURES, BalloonDevice
from device.inflate import PFN
from device.transport import VirtioBackendDevice
from protocol.balloon import BalloonConfig, BalloonQueue
from protocol.errors import ConfigError, UsageError
from protocol.features import BalloonFeature, TransportFeature, bit
from virtqueue.memory import GuestMemory

MiB = 1 << 20
V1 = bit(TransportFeature.VERSION_1)
HINT = bit(BalloonFeature.FREE_PAGE_HINT)
POISON = bit(BalloonFeature.PAGE_POISON)


@pytest.fixture
def mem():
    with GuestMemory.create(16 * MiB) as m:
        yield m


def device(mem, features=DEFAULT_FEATURES, **kw) -> BalloonDevice:
    return BalloonDevice(mem, features=features, **kw)


def test_precompiled_layouts_equal_protocol():
    values = dict(num_pages=1, actual=0x01020304, free_page_hint_cmd_id=0x80000001,
                  poison_val=0xAAAAAAAA)
    assert config_mod._CONFIG.pack(*values.values()) == BalloonConfig.build(values)
    assert PFN.pack(0xDEADBEEF) == Int32ul.build(0xDEADBEEF)


def test_balloon_device_is_a_backend_device(mem):
    assert isinstance(device(mem), VirtioBackendDevice)


def test_vhost_user_api_reexports_the_transport_protocol():
    from device import transport
    from device.vhost_user import api
    assert api.VirtioBackendDevice is transport.VirtioBackendDevice
    assert api.RingConfig is transport.RingConfig


@pytest.mark.parametrize(("features", "size"), [
    (V1, 8), (V1 | HINT, 12), (V1 | POISON, 16), (V1 | HINT | POISON, 16),
    (QEMU_DEFAULT_FEATURES, 16)])
def test_config_size_by_offered_features(mem, features, size):
    d = device(mem, features)
    d.balloon(8 * MiB)
    assert d.read_config(0, size)[:4] == struct.pack("<I", 2048)
    assert d.read_config(size - 4, 4) == bytes(4)  # the last field is there (and 0)
    assert d.read_config(size, 4) == b"\xff" * 4  # past the end: all ones (BL-23)
    assert d.read_config(size - 2, 4) == b"\xff" * 4  # straddling the end too
    d.write_config(size, b"\x01\x00\x00\x00")  # dropped
    assert d.summary()["actual"] == 0


def test_actual_write_recorded_with_history(mem):
    d = device(mem)
    d.set_features(DEFAULT_FEATURES)
    d.write_config(4, struct.pack("<I", 100))
    d.write_config(4, struct.pack("<I", 100))
    d.write_config(4, struct.pack("<I", 300))
    assert [a for _, a in d.config.actual_history] == [100, 300]
    assert d.query_balloon() == {"actual": 16 * MiB - 300 * 4096}
    assert d.summary()["actual_updates"] == 2


def test_driver_cannot_write_num_pages_or_cmd_id(mem):
    d = device(mem, V1 | HINT | POISON)
    d.set_features(V1 | HINT | POISON)
    d.balloon(12 * MiB)
    d.write_config(0, struct.pack("<IIII", 7, 5, 9, 0))
    assert struct.unpack("<IIII", d.read_config(0, 16)) == (1024, 5, 0, 0)


def test_poison_val_only_with_page_poison_negotiated(mem):
    d = device(mem)
    d.set_features(DEFAULT_FEATURES & ~POISON)
    d.write_config(12, b"\xaa" * 4)
    assert d.config.poison_val == 0  # forced to 0 (BL-25)
    d.reset()
    d.set_features(DEFAULT_FEATURES)
    d.write_config(12, b"\xaa" * 4)
    assert d.config.poison_val == 0xAAAAAAAA
    d.reset()
    assert d.config.poison_val == 0  # QEMU clears it on reset


def test_balloon_target_like_qemu(mem):
    changes = []
    d = device(mem)
    d.on_config_change = lambda: changes.append(d.config.num_pages)
    d.balloon(12 * MiB)
    d.balloon(64 * MiB)  # above RAM: clamped, num_pages 0
    d.balloon(0)  # ignored
    assert changes == [1024, 0]
    with pytest.raises(UsageError):
        d.balloon(-1)


def test_num_pages_and_actual_survive_reset_like_qemu(mem):
    d = device(mem)
    d.balloon(8 * MiB)
    d.write_config(4, struct.pack("<I", 12))
    d.reset()
    assert struct.unpack("<II", d.read_config(0, 8)) == (2048, 12)


def test_guest_stats_initially_unset(mem):
    out = device(mem).guest_stats()
    assert out["last-update"] == 0
    assert set(out["stats"].values()) == {2**64 - 1} and len(out["stats"]) == 16


def test_set_features_refuses_unoffered_bits(mem):
    d = device(mem)
    assert not d.set_features(DEFAULT_FEATURES | HINT)
    assert d.features == 0
    assert d.set_features(V1) and d.features == V1
    assert d.set_features(DEFAULT_FEATURES)  # a second SET_FEATURES (UML) replaces the first


def test_queue_layout_dense_over_offered_features(mem):
    d = device(mem, V1 | HINT | bit(BalloonFeature.REPORTING))
    assert [d.queue_max_size(i) for i in range(5)] == [128, 128, 1024, 32, 0]
    assert d.num_queues(V1) == 4  # numbered by what is offered (QEMU)
    assert d.queue_index(BalloonQueue.REPORTING) == 3
    assert d.queue_index(BalloonQueue.STATS) is None


def test_negotiated_numbering_follows_linux(mem):
    d = device(mem, DEFAULT_FEATURES, numbering="negotiated")
    d.set_features(V1 | bit(BalloonFeature.REPORTING))
    assert d.num_queues(d.features) == 3
    assert d.queue_index(BalloonQueue.REPORTING) == 2


@pytest.mark.parametrize("kw", [
    dict(features=bit(BalloonFeature.STATS_VQ)),  # no VERSION_1
    dict(features=V1 | bit(TransportFeature.RING_PACKED)),
    dict(policy="panic"),
    dict(queue_sizes={BalloonQueue.INFLATE: 100}),
    dict(numbering="fixed"),
    dict(stats_interval=-1),
])
def test_bad_configuration_is_a_config_error(mem, kw):
    with pytest.raises(ConfigError):
        BalloonDevice(mem, **kw)


def test_summary_is_plain_values(mem):
    s = device(mem).summary()
    assert s["hint_state"] == "STOP" and s["needs_reset"] is None and s["ballooned_bytes"] == 0
