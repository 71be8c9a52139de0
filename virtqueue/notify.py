"""Notification suppression (virtio spec §2.7.7, §2.7.10): when to kick and when to interrupt.

Both ends move a free-running 16-bit index (avail idx for the driver, used idx for the device)
from ``old`` to ``new`` and then ask whether the other side wants to hear about it:

* without VIRTIO_F_EVENT_IDX the other side's flag says so: ``used.flags`` NO_NOTIFY
  (VRING_USED_F_NO_NOTIFY) for kicks, ``avail.flags`` NO_INTERRUPT for interrupts;
* with EVENT_IDX the other side publishes an index instead (``avail_event`` in the used ring,
  ``used_event`` in the avail ring) and wants a notification when that entry is written,
  i.e. when ``event`` lies in ``[old, new)`` modulo 2^16: :func:`vring_need_event`.
"""

from __future__ import annotations

from protocol.split_ring import VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY

__all__ = ["interrupt_needed", "kick_needed", "vring_need_event"]


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx`` (all u16).

    The spec's and Linux's ``vring_need_event``: ``(u16)(new - event - 1) < (u16)(new - old)``,
    which is "event is one of old, old + 1, ..., new - 1" with 16-bit wrap-around. Moving by 0
    never needs an event.

    >>> vring_need_event(0, 1, 0), vring_need_event(1, 1, 0), vring_need_event(65535, 0, 65535)
    (True, False, True)
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def kick_needed(*, event_idx: bool, used_flags: int, avail_event: int, old: int,
                new: int) -> bool:
    """The driver's decision after publishing avail entries ``old .. new - 1`` (§2.7.10).

    SPL-D-17: without EVENT_IDX, notify unless ``used.flags`` has NO_NOTIFY (``avail_event`` is
    ignored). SPL-D-18: with EVENT_IDX, ignore the flags and notify iff ``avail_event`` was
    passed.
    """
    if event_idx:
        return vring_need_event(avail_event, new, old)
    return not used_flags & VRING_USED_F_NO_NOTIFY


def interrupt_needed(*, event_idx: bool, avail_flags: int, used_event: int, old: int,
                     new: int) -> bool:
    """The device's decision after writing used entries ``old .. new - 1`` (§2.7.7).

    SPL-V-7: without EVENT_IDX, interrupt unless ``avail.flags`` has NO_INTERRUPT. SPL-V-8: with
    EVENT_IDX, ignore the flags and interrupt iff ``used_event`` was passed. Writing nothing
    (``old == new``) never needs an interrupt.
    """
    if old == new:
        return False
    if event_idx:
        return vring_need_event(used_event, new, old)
    return not avail_flags & VRING_AVAIL_F_NO_INTERRUPT
