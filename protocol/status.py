"""The device status field (virtio spec §2.1): one byte the driver writes step by step."""

from __future__ import annotations

from enum import IntFlag

from construct import ExprAdapter, Int8ul

__all__ = ["DeviceStatus", "StatusByte"]


class DeviceStatus(IntFlag):
    """Status bits (Linux ``VIRTIO_CONFIG_S_*``); writing 0 resets the device."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


StatusByte = ExprAdapter(
    Int8ul,
    decoder=lambda obj, ctx: DeviceStatus(obj),
    encoder=lambda obj, ctx: int(obj),
)
"""The status byte as a construct layout: parses to a :class:`DeviceStatus`, keeping undefined
bits (e.g. 0x20) so a checker can see and report them."""
