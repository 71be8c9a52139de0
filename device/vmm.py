"""The host VMM: owns guest RAM, runs or pauses the guest, and live-migrates it.

This is the piece of QEMU a balloon device lives in, reduced to what vballoon needs: the RAM
(a :class:`~virtqueue.memory.GuestMemory`), the vCPU run state (:mod:`device.vcpu`), the
balloon device's hinting verbs (:class:`~device.migration.HintingDevice`) and precopy
migration (:mod:`device.migration`, :mod:`device.dirty_log`, :mod:`device.memcheck`).
Compose one with the device and the guest (sim/), then ``await vmm.migrate(...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol.errors import UsageError
from virtqueue.memory import GuestMemory

from .migration import HintingDevice, Migration, MigrationParams, Relied
from .migration_report import MigrationReport
from .vcpu import VcpuGate, VmControl

__all__ = ["Vmm"]


class Vmm:
    """Guest RAM, run state and migration of one VM.

    ``vm`` defaults to a :class:`VcpuGate` the guest tasks must run their work under;
    ``hinting_device`` is the balloon device (with VIRTIO_BALLOON_F_FREE_PAGE_HINT), if any.
    """

    def __init__(self, memory: GuestMemory, *, vm: VmControl | None = None,
                 hinting_device: HintingDevice | None = None) -> None:
        self.memory = memory
        self.vm: VmControl = vm if vm is not None else VcpuGate()
        self.hinting_device = hinting_device
        self.migration: Migration | None = None
        self.migrations: list[MigrationReport] = []

    def destination(self, name: str = "vballoon-dest-ram") -> GuestMemory:
        """A fresh RAM with this VM's layout, to migrate into (caller closes it)."""
        regions = self.memory.regions
        base, end = regions[0].gpa, regions[-1].end
        holes = [(a.end, b.gpa - a.end) for a, b in zip(regions, regions[1:], strict=False)
                 if b.gpa > a.end]
        return GuestMemory.create(end - base, base=base, holes=holes, name=name)

    async def migrate(self, params: MigrationParams, *, dest: GuestMemory | None = None,
                      relied: Relied | Callable[[], Relied] | None = None,
                      resume_after: bool = False) -> MigrationReport:
        """Live-migrate into ``dest`` (None: a null sink); see :meth:`Migration.run`."""
        if self.migration is not None and self.migration.report is None:
            raise UsageError("a migration is already running on this VM")
        self.migration = Migration(self.memory, dest, params, vm=self.vm,
                                   device=self.hinting_device)
        try:
            return await self.migration.run(relied=relied, resume_after=resume_after)
        finally:
            if self.migration.report is not None:
                self.migrations.append(self.migration.report)
