"""``vballoon conform driver --model``: our guest driver model on a simulated machine, graded.

The machine is the project's own (:class:`sim.machine.Machine`: guest RAM, the real
:class:`~device.balloon.BalloonDevice` behind the real :class:`~device.mmio.MmioDevice`, the
guest's allocator, workload, virtio-mmio transport and :class:`~guest.balloon.VirtioBalloon`,
Linux 6.1's driver), with the monitor put in three places (:func:`instrument`): on the transport
seam (:class:`~device.monitor.MonitoredDevice`), on the registers
(:class:`~device.monitor.MonitoredMmio`) and on the guest's RAM writes
(:class:`~device.monitor.GuestWriteTap`, which the driver and the workload write through).
Everything runs in virtual time (trio's MockClock), so the scenario's seconds cost nothing.

The scenario (:func:`scenario`) exercises each part of the driver once: probe, a spurious
used-buffer notification, inflate to a target, stats rounds (the device polls every second),
deflate, a burst of workload churn, free page reporting (its first pass comes 2 s after probe,
then after pages are freed), a free page hinting round (START, STOP, DONE), and removal
(deflate everything, reset).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio
import trio.testing

from device.balloon import DEFAULT_FEATURES
from device.mmio import MmioDevice
from device.monitor import (
    Capabilities,
    DriverMonitor,
    GuestWriteTap,
    MonitoredDevice,
    MonitoredMmio,
    MonitorResult,
)
from guest.balloon import BalloonOptions, VirtioBalloon
from guest.virtio_mmio import VirtioMmioTransport
from guest.workload import Workload, WorkloadProfile
from protocol.balloon import PFN_SHIFT
from protocol.errors import ConfigError
from protocol.features import BalloonFeature, mask
from sim.machine import Machine, MachineConfig

__all__ = ["MODEL_FEATURES", "ModelRun", "run_model", "scenario"]

log = structlog.get_logger("vballoon.sim")

MiB = 1 << 20
MODEL_FEATURES = DEFAULT_FEATURES | mask(BalloonFeature.FREE_PAGE_HINT,
                                         BalloonFeature.MUST_TELL_HOST)
"""What the device offers the model: QEMU's defaults, reporting, hinting, MUST_TELL_HOST."""


def _model_options() -> BalloonOptions:
    return BalloonOptions(max_queue_size=64)


@dataclass(frozen=True, slots=True)
class ModelRun:
    """How to run the model: guest size, guest options, provocation, the device's offer.

    The default guest is Linux's default configuration (no page poisoning, no
    ``init_on_free``), so PAGE_POISON is declined. ``options=BalloonOptions(init_on_free=True)``
    keeps it (poison_val 0) and grades the page poison rules too.
    """

    ram: int = 128 * MiB
    options: BalloonOptions = field(default_factory=_model_options)
    features: int = MODEL_FEATURES
    provoke: bool = True
    inflate: int = 8 * MiB
    """How much the host asks the guest to give up first."""
    workload_steps: int = 200

    def validate(self) -> None:
        if not 0 < self.inflate <= self.ram // 4 or self.inflate % (1 << PFN_SHIFT):
            raise ConfigError(f"inflate must be whole pages, at most a quarter of RAM: "
                              f"{self.inflate}")


def instrument(machine: Machine, monitor: DriverMonitor, *, provoke: bool) -> MonitoredDevice:
    """Rewire ``machine`` (built, not started) so ``monitor`` sees the driver: the device seam,
    the registers and the guest's RAM writes. Returns the monitored device."""
    m = machine
    watched = MonitoredDevice(m.device, monitor, provoke=provoke)
    m.mmio = MmioDevice(watched, m.memory, irq=m.irq.raise_)
    tap = GuestWriteTap(m.memory, monitor.guest_wrote)
    cfg = m.config
    m.workload = Workload(m.mm, tap, cfg.profile, seed=cfg.seed, ops=cfg.workload_ops,
                          max_live=cfg.max_live, free_fill=cfg.driver.free_fill_byte)
    m.transport = VirtioMmioTransport(MonitoredMmio(m.mmio, monitor), m.irq, tap)
    m.driver = VirtioBalloon(m.transport, m.mm, tap, options=cfg.driver,
                             vm_events=m.vm_events)
    return watched


async def _until(done: Callable[[], bool], *, limit: float, step: float = 0.05) -> bool:
    """Wait (virtual time) until ``done()``; False after ``limit`` seconds."""
    with trio.move_on_after(limit):
        while not done():
            await trio.sleep(step)
        return True
    return False


async def scenario(m: Machine, watched: MonitoredDevice, run: ModelRun) -> None:
    """The driver's life on the simulated machine (see the module docstring)."""
    dev = m.device
    await trio.sleep(0.1)
    if run.provoke:
        watched.spurious_notification()
    dev.balloon(dev.ram_size - run.inflate)
    target = run.inflate >> PFN_SHIFT
    await _until(lambda: dev.config.actual == target, limit=30)
    await trio.sleep(2.5)  # stats polled every second; the first reporting pass at 2 s
    dev.balloon(dev.ram_size - run.inflate // 2)
    await _until(lambda: dev.config.actual == target // 2, limit=30)
    await m.workload_steps(run.workload_steps)
    await trio.sleep(3.0)  # freed pages are reported 2 s later
    if dev.hint_start() is not None:
        await trio.sleep(0.5)
        dev.hint_stop()
        await trio.sleep(0.5)
        dev.hint_done()
        await trio.sleep(0.5)
    await m.stop()
    await trio.sleep(0.1)


async def run_model(run: ModelRun | None = None,
                    script: Callable[[Machine, MonitoredDevice, ModelRun],
                                     Awaitable[None]] = scenario) -> MonitorResult:
    """Build the machine, run ``script`` on it and return the monitor's grades.

    Must run under trio with a MockClock (:func:`run_model_sync` sets one up).
    """
    run = run or ModelRun()
    run.validate()
    config = MachineConfig(ram=run.ram, device_features=run.features, driver=run.options,
                           stats_interval=1.0, profile=WorkloadProfile.STEADY,
                           workload_ops=run.workload_steps, max_live=64)
    machine = Machine(config)
    try:
        monitor = DriverMonitor(Capabilities("virtio-mmio", status=True, registers=True,
                                             guest_writes=True))
        watched = instrument(machine, monitor, provoke=run.provoke)
        async with trio.open_nursery() as nursery:
            await machine.start(nursery)
            await script(machine, watched, run)
            nursery.cancel_scope.cancel()
        return monitor.finish("vballoon guest model (guest.balloon.VirtioBalloon, Linux 6.1 "
                              "behaviour) on the simulated machine, virtio-mmio")
    finally:
        machine.close()


def run_model_sync(run: ModelRun | None = None) -> MonitorResult:
    """:func:`run_model` in a fresh trio run with virtual time."""
    return trio.run(run_model, run, clock=trio.testing.MockClock(autojump_threshold=0))
