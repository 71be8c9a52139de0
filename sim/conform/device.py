"""``vballoon conform device``: the attack suite (:mod:`guest.villain`) against a real device.

Three targets:

- :func:`run_ours_mmio`: our :class:`~device.balloon.BalloonDevice` behind our
  :class:`~device.mmio.MmioDevice`, in process, in virtual time (trio's MockClock), so a
  wedged device is found by a bounded wait that costs nothing;
- :func:`run_ours_vhost_user`: the same device served by our vhost-user back-end
  (:mod:`device.vhost_user`), attacked by the hostile front-end
  (:class:`~guest.villain.vhost_user.VhostUserPort`) over a real Unix socket, in real time;
- :func:`run_qemu`: QEMU's virtio-balloon on ``-M microvm`` over qtest, paused (mode A:
  notifications are handled synchronously inside the register write; free page hints run in
  QEMU's iothread, so the suite polls for those). One QEMU serves the whole suite; cases
  reset the device with status 0 and initialise it again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

import trio
import trio.testing

from device.balloon import DEFAULT_FEATURES, BalloonDevice
from device.mmio import MmioDevice
from device.vhost_user import VhostUserBackend
from guest.villain import AttackCase, MmioPort, PortLayout, Suite, SuiteResult, catalogue
from guest.villain.vhost_user import VhostUserPort
from protocol.features import BalloonFeature, mask
from virtqueue.cases import Geometry
from virtqueue.memory import GuestMemory
from virtqueue.policy import ErrorPolicy

__all__ = ["OUR_FEATURES", "QEMU_SKIPS", "run_ours_mmio", "run_ours_vhost_user", "run_qemu"]

MiB = 1 << 20
OUR_RAM = 64 * MiB
OUR_FEATURES = DEFAULT_FEATURES | mask(BalloonFeature.FREE_PAGE_HINT)
"""Our device offers everything the suite can attack: QEMU's defaults, reporting, hinting."""
BUSY_BOUND = 2.0
"""Seconds our device may stay busy after a notification before it counts as WEDGED (the
slowest legitimate case, a truncated 4 GiB chain of 65536 bogus PFNs, takes about 0.6 s)."""
QEMU_SKIPS = {
    "DC-09": "not sent to QEMU: QEMU does not check DC-09 (research/peers.md §8.3), so a "
             "chain of 2^32 bytes of PFNs would make it read the whole guest as PFNs",
}


class OurHost:
    """:class:`~guest.villain.port.HostControl` for our device: its host verbs."""

    def __init__(self, device: BalloonDevice) -> None:
        self.device = device

    async def set_target(self, target_bytes: int) -> None:
        self.device.balloon(target_bytes)

    def can_hint(self) -> bool:
        return True

    async def hint_start(self) -> None:
        self.device.hint_start()

    async def hint_done(self) -> None:
        self.device.hint_done()


class QemuHost:
    """:class:`~guest.villain.port.HostControl` for QEMU: QMP. A hinting round exists only
    inside a live migration, which the suite does not run."""

    def __init__(self, qmp) -> None:
        self.qmp = qmp

    async def set_target(self, target_bytes: int) -> None:
        await self.qmp.balloon(target_bytes)

    def can_hint(self) -> bool:
        return False

    async def hint_start(self) -> None:  # pragma: no cover - can_hint() is False
        raise NotImplementedError

    async def hint_done(self) -> None:  # pragma: no cover - can_hint() is False
        raise NotImplementedError


def our_layout(ram: int = OUR_RAM) -> PortLayout:
    """Simulated RAM at 0: layouts at 16 MiB, the suite's rings at 8 MiB, the pool at 32 MiB
    (2048 pages)."""
    return PortLayout(Geometry(ram=((0, ram),), arena=(16 * MiB, 16 * MiB + 512 * 1024)),
                      pool=((32 * MiB) >> 12, 2048), control=8 * MiB)


def qemu_layout(ram: int) -> PortLayout:
    """microvm's RAM map with the harmless non-RAM ranges the differential fuzzer uses."""
    from sim.fuzz.differential import microvm_geometry

    return PortLayout(microvm_geometry(ram), pool=((32 * MiB) >> 12, 2048), control=8 * MiB)


def _name(policy: ErrorPolicy, transport: str) -> str:
    return f"vballoon BalloonDevice (policy {policy}) over {transport}"


async def run_ours_mmio(policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                        cases: Iterable[AttackCase] | None = None) -> SuiteResult:
    """The suite against our device over virtio-mmio; run under a MockClock
    (:func:`run_ours_mmio_sync`)."""
    policy = ErrorPolicy(policy)
    memory = GuestMemory.create(OUR_RAM, name="vballoon-villain")
    try:
        device = BalloonDevice(memory, features=OUR_FEATURES, policy=policy)
        mmio = MmioDevice(device, memory, irq=lambda: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            port = MmioPort(mmio, memory, our_layout(), settle=trio.testing.wait_all_tasks_blocked,
                            alive=lambda: True, name=_name(policy, "virtio-mmio"),
                            host=OurHost(device), wait=BUSY_BOUND)
            result = await Suite(port).run(catalogue() if cases is None else cases)
            nursery.cancel_scope.cancel()
        return result
    finally:
        memory.close()


def run_ours_mmio_sync(policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                       cases: Iterable[AttackCase] | None = None) -> SuiteResult:
    """:func:`run_ours_mmio` in a fresh trio run with virtual time (which also moves with
    real time, so a device that never blocks still hits the suite's bounded waits)."""
    return trio.run(run_ours_mmio, policy, cases,
                    clock=trio.testing.MockClock(rate=1.0, autojump_threshold=0))


async def run_ours_vhost_user(policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                              cases: Iterable[AttackCase] | None = None) -> SuiteResult:
    """The suite against our device behind our vhost-user back-end (real sockets, real time)."""
    policy = ErrorPolicy(policy)
    rundir = tempfile.mkdtemp(prefix="vb-villain-", dir="/tmp")
    port: VhostUserPort | None = None
    try:
        device = BalloonDevice(features=OUR_FEATURES, policy=policy)
        backend = VhostUserBackend(os.path.join(rundir, "sock"), device, message_timeout=2.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            await nursery.start(backend.serve)
            port = VhostUserPort(backend.path, OUR_RAM, our_layout(),
                                 name=_name(policy, "vhost-user"),
                                 idle=trio.testing.wait_all_tasks_blocked, busy_bound=BUSY_BOUND,
                                 host=OurHost(device))
            await port.connect()
            result = await Suite(port).run(catalogue() if cases is None else cases)
            nursery.cancel_scope.cancel()
        return result
    finally:
        if port is not None:
            port.close()
        shutil.rmtree(rundir, ignore_errors=True)


QEMU_RUNNING_CASES = frozenset({"BL-16", "BL-17"})
"""Cases on the free page queue: QEMU serves it in an iothread only while the VM runs
(``virtio_balloon_set_status`` blocks the iothread of a stopped VM; research/qtest-hint.md),
so these run against a second QEMU in running mode (B)."""


async def run_qemu(cases: Iterable[AttackCase] | None = None, *, binary: str | None = None,
                   ram: int = 128 * MiB) -> SuiteResult:
    """The suite against QEMU's virtio-balloon (free page hinting and reporting on).

    Most cases run against a paused QEMU (mode A: every notification is handled inside the
    register write, so nothing needs waiting for); the free page queue cases against a running
    one (mode B), where the suite polls for the iothread's answer.
    """
    from sim.qemu import QemuMode

    chosen = catalogue() if cases is None else list(cases)
    paused = [c for c in chosen if c.id not in QEMU_RUNNING_CASES]
    running = [c for c in chosen if c.id in QEMU_RUNNING_CASES]
    first = await _qemu_suite(paused, QemuMode.PAUSED, binary, ram, wait=0.05)
    if not running:
        return first
    second = await _qemu_suite(running, QemuMode.RUNNING, binary, ram, wait=0.5)
    order = {c.id: k for k, c in enumerate(chosen)}
    merged = sorted((*first.cases, *second.cases), key=lambda r: order[r.case])
    return SuiteResult(first.subject, tuple(merged), first.checks)


async def _qemu_suite(cases: list[AttackCase], mode, binary: str | None, ram: int, *,
                      wait: float) -> SuiteResult:
    from sim.qemu import BalloonProperties, QemuOptions, find_balloon
    from sim.qemu import run_qemu as start_qemu

    props = BalloonProperties(free_page_reporting=True, free_page_hint=True)
    options = QemuOptions(memory=ram, balloon=props, binary=binary, mode=mode)
    async with start_qemu(options) as qemu:
        version = (await qemu.qmp.execute("query-version")).get("qemu", {})
        _, bus = find_balloon(qemu.qtest)

        async def checkpoint() -> None:
            await trio.lowlevel.checkpoint()

        label = ".".join(str(version.get(k, "?")) for k in ("major", "minor", "micro"))
        port = MmioPort(bus, qemu.memory, qemu_layout(ram), settle=checkpoint,
                        alive=qemu.is_alive, wait=wait, host=QemuHost(qemu.qmp),
                        name=f"QEMU {label} virtio-balloon-device (microvm, virtio-mmio over "
                        "qtest)")
        result = await Suite(port, skip=QEMU_SKIPS).run(cases)
    return _explain(result, QEMU_NOTES)


QEMU_NOTES: dict[tuple[str, str], str] = {
    ("SPL-V-4", "FAIL"):
        "QEMU 7.2's virtqueue_split_pop() (hw/virtio/virtio.c) looks for VRING_DESC_F_INDIRECT "
        "on the head descriptor only; an INDIRECT descriptor after direct ones is mapped as an "
        "ordinary buffer, so the table's own bytes are read as PFNs and pages the driver never "
        "named are discarded. The spec (§2.7.5.3.2) requires a device to handle zero or more "
        "direct descriptors followed by one INDIRECT descriptor.",
    ("DC-07", "FAIL"):
        "QEMU 7.2 maps a buffer that is not guest RAM through its bounce buffer "
        "(address_space_map), where it reads as zeros, so the inflate handler takes PFN 0 and "
        "discards guest page 0, which the driver never named. The spec does not say what a "
        "device does with a buffer outside RAM; vballoon's device refuses it (DC-07).",
    ("GEN-V-5", "FAIL"):
        "Observed: QEMU 7.2's virtio-mmio keeps FEATURES_OK set when the driver accepted a bit "
        "the device never offered; the spec (§2.2.2) wants FEATURES_OK left clear for a set "
        "it cannot take.",
    ("GEN-V-1", "FAIL"):
        "Observed: QEMU 7.2 runs a queue's handler on every notification, DRIVER_OK or not "
        "(§2.1.2 forbids using buffers before DRIVER_OK). Linux relies on it: its stats buffer "
        "is kicked before DRIVER_OK (GEN-D-20).",
}
"""Explanations of QEMU's results that differ from the spec, by (case, verdict)."""


def _explain(result: SuiteResult, notes: dict[tuple[str, str], str]) -> SuiteResult:
    from dataclasses import replace

    cases = tuple(replace(r, note=notes.get((r.case, str(r.verdict)), r.note))
                  for r in result.cases)
    return SuiteResult(result.subject, cases, result.checks)
