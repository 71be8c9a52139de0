"""Feature bits: device-independent transport bits (virtio spec §6) and balloon bits (§5.5.3).

Values are bit *numbers*, as the spec and Linux's ``VIRTIO_F_*`` / ``VIRTIO_BALLOON_F_*`` defines
give them; a feature set on the wire is a 64-bit mask, built with :func:`bit`.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["BalloonFeature", "TransportFeature", "bit", "has", "mask", "names"]


class TransportFeature(IntEnum):
    """Reserved (device-independent) feature bits 24..43 (virtio 1.4 §6)."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    UNUSED = 30  # vhost-user reuses it as VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41
    SUSPEND = 43


class BalloonFeature(IntEnum):
    """Balloon device feature bits (virtio §5.5.3; Linux ``VIRTIO_BALLOON_F_*``)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5


def bit(feature: int) -> int:
    """The mask of one feature bit."""
    return 1 << int(feature)


def mask(*features: int) -> int:
    """The mask of several feature bits."""
    out = 0
    for f in features:
        out |= 1 << int(f)
    return out


def has(features: int, feature: int) -> bool:
    """Whether ``features`` (a mask) contains ``feature`` (a bit number)."""
    return bool(features >> int(feature) & 1)


def names(features: int) -> list[str]:
    """Readable names of the bits set in ``features`` (unknown bits as ``BIT_n``)."""
    known = {int(f): f.name for f in BalloonFeature} | {int(f): f.name for f in TransportFeature}
    return [known.get(n, f"BIT_{n}") for n in range(64) if features >> n & 1]
