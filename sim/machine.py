"""A simulated machine: guest RAM, the balloon device on virtio-mmio, the guest and its VMM.

This is the composition root of the simulator. The guest (allocator, workload, balloon driver)
and the host (device, VMM) share nothing but the RAM memfd and the virtio-mmio registers, as a
real guest and host do:

    guest.balloon.VirtioBalloon -> guest.virtio_mmio (driver side)
        -> device.mmio.MmioDevice (register model) -> device.balloon.BalloonDevice
    device.vmm.Vmm migrates the RAM; hints reach it through BalloonDevice.on_hint.

Everything runs as trio tasks in one nursery, so with ``trio.testing.MockClock`` a whole run
happens in virtual time and a seed reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from device.balloon import DEFAULT_FEATURES, BalloonDevice
from device.mmio import MmioDevice
from device.ranges import RangeSet
from device.vcpu import VcpuGate
from device.vmm import Vmm
from guest.balloon import BalloonOptions, HintMode, VirtioBalloon, VmEvents
from guest.irq import EventInterruptLine
from guest.mm import PAGE_SHIFT, PageAllocator
from guest.virtio_mmio import VirtioMmioTransport
from guest.workload import Workload, WorkloadProfile
from protocol.errors import ConfigError
from protocol.features import BalloonFeature, bit
from virtqueue.memory import GuestMemory
from virtqueue.policy import ErrorPolicy

__all__ = ["Machine", "MachineConfig", "SimVm"]

MIN_RAM = 64 << 20
MAX_RAM = 1 << 40
KERNEL_RESERVED = 16 << 20
"""The bottom of RAM the guest keeps for its "kernel" (never on the free lists)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """What to build: sizes, features on both ends, the workload and the error policy."""

    ram: int = 4 << 30
    device_features: int = (DEFAULT_FEATURES | bit(BalloonFeature.FREE_PAGE_HINT)
                            | bit(BalloonFeature.DEFLATE_ON_OOM))
    driver: BalloonOptions = field(default_factory=BalloonOptions)
    policy: ErrorPolicy = ErrorPolicy.NEEDS_RESET
    stats_interval: float = 10.0
    profile: WorkloadProfile = WorkloadProfile.STEADY
    seed: int = 0
    workload_ops: int = 4000
    max_live: int = 256

    def __post_init__(self) -> None:
        if not MIN_RAM <= self.ram <= MAX_RAM or self.ram % (2 << 20):
            raise ConfigError(f"guest RAM must be a multiple of 2 MiB between 64 MiB and 1 TiB, "
                              f"not {self.ram} bytes")
        if self.stats_interval < 0:
            raise ConfigError(f"stats interval must be >= 0 s, not {self.stats_interval}")

    @property
    def hint_mode(self) -> HintMode:
        return self.driver.hint_mode


class SimVm:
    """The VMM's view of the simulated guest's run state (``vm_stop`` / ``vm_start``).

    Pausing holds the workload back (its steps run as vCPU work units) and stops the device
    serving queues, as QEMU stops virtio devices with the VM.
    """

    def __init__(self, gate: VcpuGate, device: BalloonDevice) -> None:
        self.gate = gate
        self.device = device

    @property
    def running(self) -> bool:
        return self.gate.running

    async def pause(self) -> None:
        self.device.vm_stop()
        await self.gate.pause()

    async def resume(self) -> None:
        await self.gate.resume()
        self.device.vm_start()


class Machine:
    """One simulated VM: build it, then ``async with machine.running():``."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.memory = GuestMemory.create(config.ram, name="vballoon-guest-ram")
        self.device = BalloonDevice(self.memory, features=config.device_features,
                                    policy=config.policy, stats_interval=config.stats_interval)
        self.irq = EventInterruptLine()
        self.mmio = MmioDevice(self.device, self.memory, irq=self.irq.raise_)
        self.mm = PageAllocator.for_size(config.ram, reserved=[(0, KERNEL_RESERVED)])
        self.workload = Workload(self.mm, self.memory, config.profile, seed=config.seed,
                                 ops=config.workload_ops, max_live=config.max_live,
                                 free_fill=config.driver.free_fill_byte)
        self.transport = VirtioMmioTransport(self.mmio, self.irq, self.memory)
        self.driver = VirtioBalloon(self.transport, self.mm, self.memory,
                                    options=config.driver, vm_events=self.vm_events)
        self.gate = VcpuGate()
        self.vm = SimVm(self.gate, self.device)
        self.vmm = Vmm(self.memory, vm=self.vm, hinting_device=self.device)
        self.oom_events = 0
        self._nursery: trio.Nursery | None = None

    # ---- guest-side glue ----------------------------------------------------------------
    def vm_events(self) -> VmEvents:
        """The vm-event counters the stats report, from the workload's activity."""
        w = self.workload
        return VmEvents(pgfault=w.allocs, allocstall=w.alloc_failures, oom_kill=0)

    def relied_ranges(self) -> RangeSet:
        """Guest-physical bytes whose contents the guest relies on: the workload's live
        allocations (not the blocks the hinting driver holds, nor ballooned pages)."""
        out = RangeSet()
        for a in self.workload.live:
            out.add(a.pfn << PAGE_SHIFT, (a.pfn + (1 << a.order)) << PAGE_SHIFT)
        return out

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Start the device, probe the driver (reset ... DRIVER_OK) and start its work."""
        self._nursery = nursery
        await nursery.start(self.device.run)
        self.driver.probe()
        await nursery.start(self.driver.run)

    async def workload_steps(self, steps: int, *, per_step: float = 0.0,
                             on_alloc_fail: Callable[[], object] | None = None) -> int:
        """Run ``steps`` workload operations as vCPU work, ``per_step`` virtual seconds apart.

        An allocation failure is an out-of-memory event: with DEFLATE_ON_OOM the balloon's OOM
        notifier gives 256 pages back (Linux ``virtio_balloon_oom_notify``).
        """
        ran = 0
        for _ in range(steps):
            async with self.gate.vcpu():
                op = self.workload.step()
            if op is None:
                break
            ran += 1
            if op.kind == "alloc_fail":
                self.oom_events += 1
                if self.driver.has(BalloonFeature.DEFLATE_ON_OOM):
                    await self.driver.oom_notify()
            if per_step:
                await trio.sleep(per_step)
            else:
                await trio.lowlevel.checkpoint()
        return ran

    async def stop(self) -> None:
        """Remove the driver (deflate all, actual = 0, reset) like Linux's remove."""
        await self.driver.remove()

    def close(self) -> None:
        self.memory.close()
