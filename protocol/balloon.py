"""The traditional memory balloon device (virtio spec §5.5; Linux uapi ``virtio_balloon.h``).

Config space, stats records, free page hint command IDs, queue numbering and the constants the
Linux driver and QEMU agree on. Counts of pages are in 4 KiB *balloon pages* (``PFN_SHIFT``).
"""

from __future__ import annotations

from enum import IntEnum

from construct import Int16ul, Int32ul, Int64ul, Struct

from protocol.features import BalloonFeature, has

__all__ = [
    "ARRAY_PFNS_MAX",
    "BALLOON_PAGE_SIZE",
    "CMD_ID_MIN",
    "OOM_NR_PAGES",
    "PAGE_POISON_BYTE",
    "PFN_SHIFT",
    "PFN_SIZE",
    "VIRTIO_ID_BALLOON",
    "BalloonConfig",
    "BalloonQueue",
    "CommandId",
    "ConfigOffset",
    "StatRecord",
    "StatTag",
    "config_size",
    "queue_numbering",
]

VIRTIO_ID_BALLOON = 5
PFN_SHIFT = 12
"""A balloon PFN is a guest-physical address shifted right by 12, whatever the guest page size."""
BALLOON_PAGE_SIZE = 1 << PFN_SHIFT
PFN_SIZE = 4
"""Each PFN in an inflate/deflate buffer is a le32."""
ARRAY_PFNS_MAX = 256
"""Linux ``VIRTIO_BALLOON_ARRAY_PFNS_MAX``: PFNs per inflate/deflate message (1 MiB)."""
OOM_NR_PAGES = 256
"""Linux ``VIRTIO_BALLOON_OOM_NR_PAGES``: pages deflated per OOM notification."""
PAGE_POISON_BYTE = 0xAA
"""Linux ``PAGE_POISON``: the byte a poisoning guest fills free pages with."""
CMD_ID_MIN = 0x80000000
"""QEMU ``VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN``: the first hint command ID; wraps back here."""


class ConfigOffset(IntEnum):
    """Byte offsets of the le32 config fields (``struct virtio_balloon_config``)."""

    NUM_PAGES = 0
    ACTUAL = 4
    FREE_PAGE_HINT_CMD_ID = 8
    POISON_VAL = 12


BalloonConfig = Struct(
    "num_pages" / Int32ul,
    "actual" / Int32ul,
    "free_page_hint_cmd_id" / Int32ul,
    "poison_val" / Int32ul,
)
"""The whole config space (16 bytes); devices may expose only a prefix (:func:`config_size`)."""


def config_size(offered: int) -> int:
    """Config bytes a device exposes for the ``offered`` feature mask, as QEMU does.

    16 with PAGE_POISON offered, else 12 with FREE_PAGE_HINT, else 8 (num_pages and actual).
    """
    if has(offered, BalloonFeature.PAGE_POISON):
        return 16
    if has(offered, BalloonFeature.FREE_PAGE_HINT):
        return 12
    return 8


class StatTag(IntEnum):
    """Stats tags (``VIRTIO_BALLOON_S_*``); 0-9 since Linux 5.x, 10-15 since 6.12."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


StatRecord = Struct("tag" / Int16ul, "val" / Int64ul)
"""One packed stats entry (``struct virtio_balloon_stat``): 10 bytes, no padding."""


class CommandId(IntEnum):
    """Reserved values of ``free_page_hint_cmd_id``; any other value is a hinting round's ID."""

    STOP = 0
    DONE = 1


class BalloonQueue(IntEnum):
    """The balloon's queues in spec order (Linux ``VIRTIO_BALLOON_VQ_*``)."""

    INFLATE = 0
    DEFLATE = 1
    STATS = 2
    FREE_PAGE = 3
    REPORTING = 4


_QUEUE_FEATURE = {
    BalloonQueue.STATS: BalloonFeature.STATS_VQ,
    BalloonQueue.FREE_PAGE: BalloonFeature.FREE_PAGE_HINT,
    BalloonQueue.REPORTING: BalloonFeature.REPORTING,
}


def queue_numbering(features: int) -> dict[BalloonQueue, int]:
    """Transport queue index of each queue that exists, numbered densely as Linux and QEMU do.

    Absent queues take no index: with only REPORTING, reporting is queue 2. Linux numbers by the
    *negotiated* features, QEMU by the *offered* ones; pass whichever mask applies.
    """
    out: dict[BalloonQueue, int] = {}
    for q in BalloonQueue:
        feature = _QUEUE_FEATURE.get(q)
        if feature is None or has(features, feature):
            out[q] = len(out)
    return out
