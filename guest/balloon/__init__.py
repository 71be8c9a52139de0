"""The virtio-balloon driver (Linux 6.1 ``drivers/virtio/virtio_balloon.c``).

Read in this order: :mod:`guest.balloon.options` (the guest's configuration, feature pruning),
:mod:`guest.balloon.work` (work items and wait queues on trio), :mod:`guest.balloon.inflate`
(fill / leak / tell_host), :mod:`guest.balloon.stats` (the stats buffer),
:mod:`guest.balloon.reporting_dev` (the reporting queue), :mod:`guest.balloon.driver` (probe,
interrupts, work, remove). Free page hinting's state machine is :mod:`guest.hinting`.
"""

from __future__ import annotations

from guest.balloon.driver import ProbeError, VirtioBalloon
from guest.balloon.options import (
    LINUX_FEATURE_TABLE,
    BalloonOptions,
    HintMode,
    StatsLayout,
    validate_features,
)
from guest.balloon.stats import VmEvents

__all__ = [
    "LINUX_FEATURE_TABLE",
    "BalloonOptions",
    "HintMode",
    "ProbeError",
    "StatsLayout",
    "VirtioBalloon",
    "VmEvents",
    "validate_features",
]
