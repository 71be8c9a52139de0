"""The packed virtqueue layout (virtio spec §2.8): declared for reference and fuzzing only.

vballoon's queues are split rings; these layouts let tests and the teaching view show the other
format, and are checked against Linux's ``struct vring_packed_desc`` like the rest.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from construct import Int16ul, Int32ul, Int64ul, Struct

__all__ = [
    "EVENT_F_WRAP_CTR",
    "PACKED_DESC_ALIGN",
    "PACKED_EVENT_ALIGN",
    "EventFlags",
    "PackedDesc",
    "PackedDescFlags",
    "PackedEventSuppress",
]


class PackedDescFlags(IntFlag):
    """Packed descriptor flags; AVAIL and USED are bits 7 and 15."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


class EventFlags(IntEnum):
    """``desc_event_flags`` values (``RING_EVENT_FLAGS_*``); DESC needs EVENT_IDX."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


EVENT_F_WRAP_CTR = 15
"""Bit of ``off_wrap`` holding the wrap counter (Linux ``VRING_PACKED_EVENT_F_WRAP_CTR``)."""
PACKED_DESC_ALIGN = 16
PACKED_EVENT_ALIGN = 4

PackedDesc = Struct("addr" / Int64ul, "len" / Int32ul, "id" / Int16ul, "flags" / Int16ul)
"""``struct pvirtq_desc`` (16 bytes)."""

PackedEventSuppress = Struct("off_wrap" / Int16ul, "flags" / Int16ul)
"""``struct pvirtq_event_suppress`` (4 bytes): offset in bits 0-14, wrap counter in bit 15."""
