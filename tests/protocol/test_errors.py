"""The error hierarchy: abstract ProtocolViolation, readable messages, pickling (xdist, fuzzers)."""

from __future__ import annotations

import pickle

import pytest

from protocol.errors import (
    ConfigError,
    DeviceViolation,
    DriverViolation,
    GuestMemoryError,
    PeerError,
    ProtocolViolation,
    UsageError,
    VballoonError,
)


def test_protocol_violation_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ProtocolViolation(rule_id="DC-01", section="2.7.5", message="m")


def test_driver_violation_names_rule_section_and_values() -> None:
    exc = DriverViolation(rule_id="DC-01", section="2.7.5", message="next is out of range",
                          head=3, next=300, addr=0x1_0000_0000, indirect=False)
    assert str(exc) == ("[DC-01] next is out of range "
                        "(virtio 2.7.5; head=3, next=300, addr=0x100000000, indirect=False)")
    assert (exc.rule_id, exc.section, exc.message) == ("DC-01", "2.7.5", "next is out of range")
    assert exc.values == {"head": 3, "next": 300, "addr": 0x1_0000_0000, "indirect": False}
    assert isinstance(exc, ProtocolViolation) and isinstance(exc, VballoonError)


def test_violation_without_values_or_with_a_peer_section() -> None:
    assert str(DeviceViolation(rule_id="US-01", section="2.7.8", message="m")) == (
        "[US-01] m (virtio 2.7.8)")
    exc = DriverViolation(rule_id="DC-05", section="QEMU virtqueue_split_pop", message="m", n=0)
    assert str(exc) == "[DC-05] m (QEMU virtqueue_split_pop; n=0)"


@pytest.mark.parametrize("cls", [DriverViolation, DeviceViolation])
def test_violation_pickles(cls: type[ProtocolViolation]) -> None:
    exc = cls(rule_id="AV-03", section="2.7.6", message="head out of range", head=70000, n=256)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.rule_id, back.section, back.message, back.values) == (
        exc.rule_id, exc.section, exc.message, exc.values)
    assert str(back) == str(exc)


def test_guest_memory_error_message_and_pickling() -> None:
    exc = GuestMemoryError(0xFFFF_F000, 0x2000, "is outside guest RAM")
    assert str(exc) == "guest memory access [0xfffff000, +0x2000) is outside guest RAM"
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.gpa, back.length, back.reason, str(back)) == (
        GuestMemoryError, exc.gpa, exc.length, exc.reason, str(exc))


@pytest.mark.parametrize("cls", [GuestMemoryError, ConfigError, UsageError, PeerError,
                                 DriverViolation, DeviceViolation])
def test_every_error_is_a_vballoon_error(cls: type) -> None:
    assert issubclass(cls, VballoonError)
