"""The split virtqueue layout (virtio spec §2.7; Linux uapi ``virtio_ring.h``).

Three areas: the descriptor table (16-byte entries), the available ring written by the driver
and the used ring written by the device. Indices are free-running le16 values; slot = idx % N.
"""

from __future__ import annotations

from enum import IntFlag

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_FLAGS",
    "AVAIL_IDX",
    "AVAIL_RING",
    "DESC_ALIGN",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "USED_ELEM_SIZE",
    "USED_FLAGS",
    "USED_IDX",
    "USED_RING",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "DescFlags",
    "VirtqDesc",
    "VirtqUsedElem",
    "avail_event_offset",
    "avail_ring",
    "avail_size",
    "desc_table_size",
    "used_event_offset",
    "used_ring",
    "used_size",
    "vring_size",
    "vring_used_offset",
]

MAX_QUEUE_SIZE = 32768
"""Queue Size is a power of two no larger than 2^15 (§2.7)."""


class DescFlags(IntFlag):
    """``struct virtq_desc`` flags (``VRING_DESC_F_*``)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VirtqDesc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)
"""One descriptor: guest-physical address, length, flags, next index (16 bytes)."""

VirtqUsedElem = Struct("id" / Int32ul, "len" / Int32ul)
"""One used-ring element: head index of the chain and bytes written (8 bytes)."""

DESC_SIZE = 16
USED_ELEM_SIZE = 8
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4


def avail_ring(n: int) -> Struct:
    """``struct virtq_avail`` for queue size ``n``, including ``used_event``."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(n, Int16ul),
                  "used_event" / Int16ul)


def used_ring(n: int) -> Struct:
    """``struct virtq_used`` for queue size ``n``, including ``avail_event``."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(n, VirtqUsedElem),
                  "avail_event" / Int16ul)


def desc_table_size(n: int) -> int:
    """Bytes of the descriptor table (Descriptor Area)."""
    return DESC_SIZE * n


def avail_size(n: int) -> int:
    """Bytes of the available ring with ``used_event`` (Driver Area)."""
    return 6 + 2 * n


def used_size(n: int) -> int:
    """Bytes of the used ring with ``avail_event`` (Device Area)."""
    return 6 + USED_ELEM_SIZE * n


def used_event_offset(n: int) -> int:
    """Offset of ``used_event`` inside the available ring (``avail->ring[N]``)."""
    return AVAIL_RING + 2 * n


def avail_event_offset(n: int) -> int:
    """Offset of ``avail_event`` inside the used ring (``used->ring[N]``)."""
    return USED_RING + USED_ELEM_SIZE * n


def vring_used_offset(n: int, align: int) -> int:
    """Offset of the used ring in the legacy contiguous layout (Linux ``vring_init``)."""
    return (desc_table_size(n) + 2 * (3 + n) + align - 1) & ~(align - 1)


def vring_size(n: int, align: int) -> int:
    """Bytes of the legacy contiguous ring (Linux ``vring_size``; the spec's ALIGN is off by 1)."""
    return vring_used_offset(n, align) + 2 * 3 + USED_ELEM_SIZE * n
