"""The driver conformance monitor: watch a driver through the device end and grade it.

Read in this order: :mod:`~device.monitor.grades` (verdicts and the ledger),
:mod:`~device.monitor.rings` (what the driver publishes on each queue),
:mod:`~device.monitor.status` (status and feature steps), :mod:`~device.monitor.balloon`
(balloon payloads, config space, page use), :mod:`~device.monitor.monitor` (the core that
grades every driver requirement of the catalogue), then the adapters that feed it:
:mod:`~device.monitor.backend` (the transport seam, both transports),
:mod:`~device.monitor.mmio` (virtio-mmio registers) and :mod:`~device.monitor.tap` (the
simulated guest's RAM writes); :mod:`~device.monitor.deviations` explains known Linux
behaviour.
"""

from device.monitor.backend import PROVOKE_FEATURES, MonitoredDevice
from device.monitor.deviations import LINUX_DEVIATIONS, Deviation
from device.monitor.grades import Capabilities, Grade, Ledger, Verdict
from device.monitor.mmio import MonitoredMmio
from device.monitor.monitor import IMPLEMENTED, DriverMonitor, MonitorResult, driver_requirements
from device.monitor.tap import GuestWriteTap

__all__ = [
    "IMPLEMENTED",
    "LINUX_DEVIATIONS",
    "PROVOKE_FEATURES",
    "Capabilities",
    "Deviation",
    "DriverMonitor",
    "Grade",
    "GuestWriteTap",
    "Ledger",
    "MonitorResult",
    "MonitoredDevice",
    "MonitoredMmio",
    "Verdict",
    "driver_requirements",
]
