"""``vballoon conform driver --uml``: the real Linux 6.1 ``virtio_balloon`` driver, graded.

User-Mode Linux (:mod:`sim.uml`) boots with ``virtio_uml`` attached to our vhost-user back-end
(:mod:`device.vhost_user`), which serves the real :class:`~device.balloon.BalloonDevice`
wrapped by the monitor (:class:`~device.monitor.MonitoredDevice`). The monitor sees what
vhost-user carries: features, config accesses, the rings in the guest RAM UML shares, kicks and
the interrupts we send. It cannot see the device status (UML never sends SET_STATUS), register
accesses or the guest's own RAM writes; those requirements are NOT-EXERCISED with that reason.

The scenario runs on both sides, paced by markers and files in a private directory:

* host: a spurious used-buffer notification, inflate to a target (the driver acks with
  ``actual``), deflate half of it, a free page hinting round (START, STOP, DONE) while the
  device polls stats every second;
* guest: fill and free 16 MiB of a private tmpfs so free page reporting has work (its pass
  comes 2 s later), then unload the driver (``rmmod``: deflate everything, reset) before power
  off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import structlog
import trio

from device.balloon import DEFAULT_FEATURES, BalloonDevice
from device.monitor import Capabilities, DriverMonitor, MonitoredDevice, MonitorResult
from device.vhost_user import VhostUserBackend
from protocol.balloon import PFN_SHIFT, BalloonQueue
from protocol.errors import ConfigError, PeerError
from protocol.features import BalloonFeature, mask
from sim.uml import UmlKernel, UmlMachine, boot, find_kernel

__all__ = ["UML_FEATURES", "UmlRun", "run_uml"]

log = structlog.get_logger("vballoon.sim")

MiB = 1 << 20
UML_FEATURES = DEFAULT_FEATURES | mask(BalloonFeature.FREE_PAGE_HINT,
                                       BalloonFeature.MUST_TELL_HOST)
"""What the device offers Linux: QEMU's defaults, reporting, hinting and MUST_TELL_HOST."""
_UML_QUEUE_SIZE = 256  # virtio_uml always asks for 256 entries


@dataclass(frozen=True, slots=True)
class UmlRun:
    """How to run Linux: guest memory, kernel command line, provocation, the device's offer."""

    mem: str = "256M"
    """Linux reports free pages only above the low watermark plus 32 pageblocks (128 MiB on
    UML, whose pageblocks are 4 MiB), so a smaller guest never reports."""
    cmdline: tuple[str, ...] = ("init_on_free=1",)
    """``init_on_free=1`` keeps PAGE_POISON (poison_val 0), so the poison rules are graded."""
    features: int = UML_FEATURES
    provoke: bool = True
    inflate: int = 8 * MiB
    timeout: float = 60.0
    kernel: str | None = None
    """linux.uml to boot (default: from PATH)."""

    def validate(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"UML run timeout must be positive: {self.timeout}")
        if self.inflate <= 0 or self.inflate % (1 << PFN_SHIFT):
            raise ConfigError(f"inflate must be whole 4 KiB pages: {self.inflate}")


def _guest_script(rundir: str) -> str:
    """The in-guest half: free memory for reporting, then unload the driver when told."""
    mnt = os.path.join(rundir, "mnt")
    return "\n".join([
        "mark ready",
        f"while [ ! -e {rundir}/free ]; do sleep 0.05; done",
        f"mount -t tmpfs -o size=64m vballoon-tmp {mnt} || mark tmpfs-failed",
        f"dd if=/dev/zero of={mnt}/fill bs=1M count=48 2>/dev/null",
        f"rm -f {mnt}/fill",
        f"umount {mnt}",
        "sleep 2.5",  # page reporting runs 2 s after pages are freed
        "mark freed",
        f"while [ ! -e {rundir}/go ]; do sleep 0.05; done",
        "rmmod virtio_balloon || mark rmmod-failed",
        "mark removed",
    ]) + "\n"


def _touch(rundir: str, name: str) -> None:
    open(os.path.join(rundir, name), "w").close()


async def _until(cond, limit: float, what: str) -> None:
    with trio.move_on_after(limit) as scope:
        while not cond():
            await trio.sleep(0.02)
    if scope.cancelled_caught:
        log.warning("conform.uml.timeout", waiting_for=what)


async def run_uml(run: UmlRun | None = None, kernel: UmlKernel | None = None) -> MonitorResult:
    """Boot UML against the monitored device, run the scenario, return the grades."""
    run = run or UmlRun()
    run.validate()
    kernel = kernel or find_kernel(run.kernel)
    rundir = tempfile.mkdtemp(prefix="vb-conform-", dir="/tmp")  # AF_UNIX paths are short
    os.mkdir(os.path.join(rundir, "mnt"))
    device = BalloonDevice(features=run.features, numbering="negotiated", stats_interval=1.0,
                           queue_sizes=dict.fromkeys(BalloonQueue, _UML_QUEUE_SIZE))
    monitor = DriverMonitor(Capabilities("vhost-user", status=False, registers=False,
                                         guest_writes=False))
    watched = MonitoredDevice(device, monitor, provoke=run.provoke)
    backend = VhostUserBackend(os.path.join(rundir, "sock"), watched)

    def ring_enabled(index: int) -> bool:  # UML disables every ring when the driver goes
        session = backend.session
        vring = session.vrings.get(index) if session is not None else None
        return vring is None or vring.enabled

    monitor.ring_enabled = ring_enabled
    machine = UmlMachine(scenario=_guest_script(rundir), socket=backend.path, mem=run.mem,
                         cmdline=run.cmdline, timeout=run.timeout)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            await nursery.start(backend.serve)
            async with boot(machine, kernel) as guest:
                with trio.fail_after(run.timeout):
                    await guest.wait_for_marker("ready")
                    await _until(lambda: monitor.live and device.stats.updates > 0, 10,
                                 "driver activation and the first stats buffer")
                    await _host_side(device, watched, monitor, run)
                    _touch(rundir, "free")
                    await guest.wait_for_marker("freed")
                    _touch(rundir, "go")
                result = (await guest.wait()).check()
            with trio.fail_after(10):
                session = await backend.wait_sessions_ended(1)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    if session.error is not None:
        raise PeerError(f"the vhost-user session with UML ended in error: {session.error}")
    log.info("conform.uml.done", duration=round(result.duration, 2), markers=result.markers)
    return monitor.finish(f"Linux {kernel.release} virtio_balloon (User-Mode Linux) over "
                          "vhost-user")


async def _host_side(device: BalloonDevice, watched: MonitoredDevice, monitor: DriverMonitor,
                     run: UmlRun) -> None:
    if run.provoke:
        watched.spurious_notification()
    pages = run.inflate >> PFN_SHIFT
    device.balloon(device.ram_size - run.inflate)
    await _until(lambda: device.config.actual == pages, 20, "inflate")
    device.balloon(device.ram_size - run.inflate // 2)
    await _until(lambda: device.config.actual == pages // 2, 20, "deflate")
    if device.hint_start() is not None:
        await _until(lambda: device.records.hinted_round.total > 0, 5, "hints")
        await trio.sleep(0.2)
        device.hint_stop()
        await trio.sleep(0.3)
        device.hint_done()
        await trio.sleep(0.3)
