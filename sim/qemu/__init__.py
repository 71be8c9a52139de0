"""Drive QEMU's real virtio-balloon device from vballoon's guest side, over qtest.

:func:`run_qemu` starts ``qemu-system-x86_64 -M microvm`` with a virtio-balloon-device under
qtest and always stops it; :class:`QtestMemory` and :class:`QtestMmioBus` are the guest RAM and
the virtio-mmio registers the guest driver runs on; :class:`QmpClient` is the host's control
plane (balloon target, stats, migration). See shared/research/qtest.md for the measurements.
"""

from sim.qemu.memory import QtestMemory, microvm_ram_regions, read_rss_anon
from sim.qemu.mmio import (
    MmioInterrupts,
    MmioSlot,
    QtestIrqLine,
    QtestMmioBus,
    find_balloon,
    find_virtio_ioapic,
    intercept_virtio_irqs,
    scan_virtio_mmio,
)
from sim.qemu.process import (
    BalloonProperties,
    QemuMode,
    QemuOptions,
    QemuProcess,
    find_qemu_binary,
    run_qemu,
)
from sim.qemu.qmp import QmpClient, QmpCommandError, QmpEvent, open_qmp
from sim.qemu.qtest import IrqEvent, QtestClient, QtestError

__all__ = [
    "BalloonProperties",
    "IrqEvent",
    "MmioInterrupts",
    "MmioSlot",
    "QemuMode",
    "QemuOptions",
    "QemuProcess",
    "QmpClient",
    "QmpCommandError",
    "QmpEvent",
    "QtestClient",
    "QtestError",
    "QtestIrqLine",
    "QtestMemory",
    "QtestMmioBus",
    "find_balloon",
    "find_qemu_binary",
    "find_virtio_ioapic",
    "intercept_virtio_irqs",
    "microvm_ram_regions",
    "open_qmp",
    "read_rss_anon",
    "run_qemu",
    "scan_virtio_mmio",
]
