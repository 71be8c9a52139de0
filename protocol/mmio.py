"""The virtio-mmio register map (virtio spec §4.2.2; Linux uapi ``virtio_mmio.h``)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = ["CONFIG_OFFSET", "LEGACY_VERSION", "MAGIC_VALUE", "VERSION", "InterruptBit", "MmioReg"]

MAGIC_VALUE = 0x74726976
"""``"virt"`` in little-endian."""
VERSION = 2
LEGACY_VERSION = 1
CONFIG_OFFSET = 0x100
"""Device-specific configuration space starts here."""


class MmioReg(IntEnum):
    """Register offsets from the device base; all registers are 32-bit little-endian."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    GUEST_PAGE_SIZE = 0x028  # legacy
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_ALIGN = 0x03C  # legacy
    QUEUE_PFN = 0x040  # legacy
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_AVAIL_LOW = 0x090
    QUEUE_AVAIL_HIGH = 0x094
    QUEUE_USED_LOW = 0x0A0
    QUEUE_USED_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class InterruptBit(IntFlag):
    """InterruptStatus / InterruptACK bits (``VIRTIO_MMIO_INT_*``)."""

    VRING = 1
    CONFIG = 2
