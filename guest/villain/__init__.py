"""The hostile driver: our driver end with its checks taken out, grading devices.

Read in this order: :mod:`~guest.villain.verdicts` (PASS, REJECT, WEDGED, FAIL),
:mod:`~guest.villain.cases` (the attack catalogue), :mod:`~guest.villain.layouts` (descriptor
layouts with traceable PFN payloads), :mod:`~guest.villain.port` (where the driver meets a
device; virtio-mmio), :mod:`~guest.villain.driver` (the hostile driver and its proof of
health), :mod:`~guest.villain.suite` (running and grading) with
:mod:`~guest.villain.attacks` (payload, config, feature and status cases), and
:mod:`~guest.villain.vhost_user` (a hostile vhost-user front-end).
"""

from guest.villain.cases import (
    CATALOGUE,
    SUITE_CHECKS,
    AttackCase,
    catalogue,
    graded_requirements,
)
from guest.villain.driver import HostileDriver
from guest.villain.port import DevicePort, MmioPort, PortLayout
from guest.villain.suite import Suite
from guest.villain.verdicts import CaseResult, DeviceVerdict, SuiteResult

__all__ = [
    "CATALOGUE",
    "SUITE_CHECKS",
    "AttackCase",
    "CaseResult",
    "DevicePort",
    "DeviceVerdict",
    "HostileDriver",
    "MmioPort",
    "PortLayout",
    "Suite",
    "SuiteResult",
    "catalogue",
    "graded_requirements",
]
