"""The teaching scenarios against a real peer: our driver on QEMU's device, Linux's on ours.

``vballoon trace --peer qemu`` runs the guest half of a scenario (:mod:`sim.teach.scenarios`)
on QEMU's RAM and virtio-mmio registers over qtest (:mod:`sim.qemu.guest`), with QEMU's own
device at the other end and QMP as the host's control plane. The same recorder and probes are
used, so the same narrator tells it; but only *our* end is instrumented: the trace has the
driver's ``vq.add``, ``vq.kick`` and ``vq.get_buf``, the ring copies read over qtest show what
QEMU wrote to the used ring, and there are no ``vq.pop`` / ``balloon.*`` events (QEMU's device
is not ours to log). Time is real, not virtual: QEMU runs on the wall clock.

Differences from the simulated runs, each said in the trace's boot step: page reporting waits
:data:`REPORTING_DELAY` instead of 2 s, and the hinting round is QEMU's own migration
(``migrate exec:cat > /dev/null``).

``vballoon trace --peer uml`` is the other direction (:func:`run_uml_trace`): Linux 6.1's real
``virtio_balloon`` in User-Mode Linux drives *our* device end over vhost-user
(:func:`sim.uml_boot.run_boot` with the :mod:`sim.uml_scenarios` scenarios). Only the device end
is instrumented: the trace has ``vq.pop``, ``vq.push``, ``vq.interrupt`` and ``balloon.*``, the
rings are read from the mapped guest RAM with :meth:`~virtqueue.memory.GuestMemory.peek` at the
addresses the front-end gave (the server's ``queue`` events), and the device's records are
copied after it records. There is no guest allocator to show, so no free lists; the guest is at
least 256 MiB (page reporting passes need the zone's low watermark + 32 blocks of 4 MiB free).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import trio

from guest.balloon import BalloonOptions, HintMode
from guest.mm import PAGE_SHIFT, Gfp, MigrateType
from guest.reporting import PageReporting
from protocol.balloon import BalloonQueue
from protocol.errors import ConfigError
from protocol.features import names
from protocol.rules import RULES
from sim.teach.capture import Recorder, recording, teach_log
from sim.teach.scenarios import Trace, TraceOptions, tamper
from sim.teach.snapshots import (
    FreeListProbe,
    RingGeometry,
    RingProbe,
    free_lists_record,
    traced_walk,
)

__all__ = ["QEMU_SCENARIOS", "REPORTING_DELAY", "UML_SCENARIOS", "run_qemu_trace",
           "run_uml_trace"]

MiB = 1 << 20
REPORTING_DELAY = 0.5
"""Seconds from a reporting request to its pass on the wall clock (Linux: 2 s)."""
_TIMEOUT = 30.0
_FOCUS = {
    "reporting": (BalloonQueue.REPORTING,),
    "hinting": (BalloonQueue.FREE_PAGE,),
    "inflate": (BalloonQueue.INFLATE, BalloonQueue.DEFLATE),
    "malformed": (BalloonQueue.INFLATE,),
}
QEMU_SCENARIOS = tuple(_FOCUS)
UML_SCENARIOS = ("inflate", "reporting")
"""What ``--peer uml`` traces (the host drives those; hinting and malformed are not yet)."""
UML_MIN_RAM = 256 * MiB
UML_INFLATE = 4 * MiB
"""How much the ``inflate`` trace balloons: 4 chains of 256 PFNs (VIRTIO_BALLOON_ARRAY_PFNS_MAX)
each way, one told in detail."""
_LINUX_QUEUE_NAMES = {BalloonQueue.INFLATE: "inflate", BalloonQueue.DEFLATE: "deflate",
                      BalloonQueue.STATS: "stats", BalloonQueue.FREE_PAGE: "free_page_vq",
                      BalloonQueue.REPORTING: "reporting_vq"}
"""The names Linux's virtballoon gives its queues (``init_vqs()``)."""


class _QemuStage:
    """Like :class:`~sim.teach.scenarios.Stage`, on a running QEMU."""

    def __init__(self, recorder: Recorder, options: TraceOptions, name: str, qemu: Any,
                 guest: Any) -> None:
        self.recorder, self.options, self.name = recorder, options, name
        self.qemu, self.guest = qemu, guest

    def attach(self) -> None:
        g = self.guest
        driver = g.balloon
        reporting = driver.reporting
        if reporting is not None:
            reporting.core.unregister()
            reporting.core = PageReporting(g.mm, clock=trio.current_time,
                                           capacity=self.options.reporting_capacity,
                                           delay=REPORTING_DELAY, wakeup=reporting.wakeup)
            reporting.core.register()
        if driver.hinting is not None and driver.hinting.mode == HintMode.WALK:
            driver.hinting._walk = traced_walk(driver.hinting._walk)
        rings = [RingGeometry(vq.index, vq.name, vq.size, vq.ring.desc, vq.ring.avail,
                              vq.ring.used) for q, vq in driver.vqs.items()
                 if q in _FOCUS[self.name]]
        self.recorder.probes += [RingProbe(g.memory, rings), FreeListProbe(g.mm)]
        teach_log.info("teach.scenario", name=self.name, ram=self.options.ram, peer="qemu",
                       features=names(driver.features),
                       queues={vq.name: vq.index for vq in driver.vqs.values()},
                       focus=[r.to_dict() for r in rings],
                       reporting_capacity=(reporting.core.capacity if reporting else None),
                       hint_mode=str(self.options.hint_mode), policy="QEMU virtio_error",
                       options={k: str(v) for k, v in
                                dataclasses.asdict(self.options).items()})

    def chapter(self, title: str, text: str) -> None:
        teach_log.info("teach.chapter", title=title, text=text)

    def free_lists(self, label: str) -> None:
        teach_log.info("teach.free_lists", **free_lists_record(self.guest.mm, label))


async def _until(predicate: Any, timeout: float = _TIMEOUT) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def _inflate(stage: _QemuStage) -> None:
    ram, driver = stage.options.ram, stage.guest.balloon
    stage.free_lists("before: nothing is in the balloon")
    stage.chapter("QEMU asks for 1 MiB back", "QMP 'balloon' with a target 1 MiB below RAM; "
                  "QEMU sets num_pages = 256 and raises a config interrupt.")
    await stage.qemu.qmp.balloon(ram - MiB)
    await _until(lambda: driver.towards_target() == 0 and driver.balloon.num_pages)
    await trio.sleep(0.05)
    stage.free_lists("after inflating")
    stage.chapter("QEMU gives it back", "Target = all of RAM: the driver deflates.")
    await stage.qemu.qmp.balloon(ram)
    await _until(lambda: driver.balloon.num_pages == 0)
    await trio.sleep(0.05)
    stage.free_lists("after deflating")


async def _reporting(stage: _QemuStage) -> None:
    core = stage.guest.balloon.reporting.core
    stage.free_lists("before: nothing Reported yet")
    stage.chapter("Free page reporting wakes up", f"A pass runs {REPORTING_DELAY} s after the "
                  f"request (Linux: 2 s), {core.capacity} blocks per chain; QEMU discards them.")
    await _until(lambda: core.statistics().passes >= 1 and core.next_deadline() is None)
    await trio.sleep(0.05)
    stage.free_lists("after reporting: the large blocks are Reported, at the tails")


async def _hinting(stage: _QemuStage) -> None:
    g = stage.guest
    stage.chapter("The guest has been busy", "Free memory is filled with non-zero bytes and "
                  "freed again, so skipping it is worth something.")
    blocks = []
    while (pfn := g.mm.alloc_pages(10, MigrateType.MOVABLE, gfp=Gfp.NOWARN)) is not None:
        blocks.append(pfn)
    for pfn in blocks:
        g.memory.fill(pfn << PAGE_SHIFT, 4 * MiB, 0x5A)
        g.mm.free_pages(pfn, 10)
    stage.free_lists("before the migration")
    stage.chapter("QEMU migrates the guest", "QMP migrate to exec:cat > /dev/null at 64 MiB/s; "
                  "QEMU's precopy notifier asks the balloon for hints with a command ID.")
    await stage.qemu.qmp.migrate_set_parameters(max_bandwidth=64 * MiB)
    await stage.qemu.qmp.migrate("exec:cat > /dev/null")
    info = await stage.qemu.qmp.wait_migration(timeout=_TIMEOUT)
    await trio.sleep(0.2)
    ram = info.get("ram", {})
    stats = stage.guest.balloon.hint_statistics()
    teach_log.info("teach.outcome", title="QEMU's migration is over", peer="qemu",
                   status=str(info.get("status")),
                   lines=[f"migration status: {info.get('status')}",
                          f"QEMU sent {ram.get('transferred', 0):,} bytes of RAM "
                          f"({ram.get('normal', 0):,} normal pages, {ram.get('duplicate', 0):,} "
                          f"zero pages) for {stage.options.ram:,} bytes of guest RAM",
                          f"the driver hinted {stats.blocks_hinted} blocks, "
                          f"{stats.bytes_hinted:,} bytes" if stats else "no hints"])
    stage.free_lists("after the migration")


async def _malformed(stage: _QemuStage) -> None:
    g = stage.guest
    rule = RULES[stage.options.rule]
    stage.chapter("A driver with a bug", f"Our driver's chain on inflateq is rewritten to "
                  f"break {rule.id}: {rule.summary} (virtio §{rule.section}). What does QEMU do?")
    page = g.mm.alloc_pages(0, MigrateType.UNMOVABLE)
    buf = page << PAGE_SHIFT
    g.memory.write(buf, page.to_bytes(4, "little") * 2)
    ring = g.balloon.vqs[BalloonQueue.INFLATE].ring
    head = ring.add([(buf, 8)], [(buf + 8, 8)], "villain")
    tamper(g.memory, ring, head, rule.id)
    ring.kick()
    await trio.sleep(0.3)
    status = g.transport.get_status()
    broke = "NEEDS_RESET" in str(status.name)
    stderr = [line for line in stage.qemu.stderr_tail(400).splitlines() if line.strip()]
    teach_log.info("teach.outcome", title="Afterwards: what QEMU did about it", peer="qemu",
                   status=status.name, needs_reset=rule.id if broke else None,
                   lines=[f"device status read back: {status.name}",
                          "QEMU called virtio_error(): DEVICE_NEEDS_RESET and a config "
                          "interrupt" if broke else "QEMU accepted the chain",
                          *(f"QEMU: {line}" for line in stderr[-2:])])


_BODIES = {"inflate": _inflate, "reporting": _reporting, "hinting": _hinting,
           "malformed": _malformed}


def run_qemu_trace(name: str, options: TraceOptions | None = None, *,
                   binary: str | None = None) -> Trace:
    """Run scenario ``name`` with our driver on QEMU's virtio-balloon; everything it logged.

    Raises:
        ConfigError: an unknown scenario.
        PeerError: QEMU is missing or died.
    """
    from sim.qemu import BalloonProperties, QemuMode, QemuOptions, run_qemu
    from sim.qemu.guest import build_guest

    if name not in _BODIES:
        raise ConfigError(f"unknown trace scenario {name!r}; with --peer qemu choose one of "
                          f"{', '.join(_BODIES)}")
    options = options or TraceOptions()
    props = BalloonProperties(free_page_reporting=name == "reporting",
                              free_page_hint=name == "hinting")
    qemu_options = QemuOptions(memory=options.ram, mode=QemuMode.RUNNING, binary=binary,
                               balloon=props)
    driver_options = BalloonOptions(max_queue_size=options.queue_size, drop_indirect=True,
                                    hint_mode=options.hint_mode)

    async def main(recorder: Recorder) -> None:
        async with run_qemu(qemu_options) as qemu:
            guest = build_guest(qemu, driver_options)
            guest.balloon.probe()
            stage = _QemuStage(recorder, options, name, qemu, guest)
            stage.attach()
            async with trio.open_nursery() as nursery:
                await nursery.start(guest.balloon.run)
                await _BODIES[name](stage)
                nursery.cancel_scope.cancel()

    with recording() as recorder:
        trio.run(main, recorder)
    return Trace(name, options, recorder.records)


# ---- Linux's driver (User-Mode Linux) against our device -------------------------------------

_UML_CHAPTERS = {
    "inflate": ("The host asks for 4 MiB back", "The device's num_pages goes to 1024 and a "
                "config interrupt tells the driver; Linux's balloon work item allocates pages "
                "and sends their PFNs on inflateq, 256 per chain. Then the host sets the target "
                "back to all of RAM and the driver deflates them on deflateq."),
    "reporting": ("Linux's free page reporting", "2 s after the driver registers, and 2 s after "
                  "a large free, page_reporting_process() isolates free 4 MiB blocks and sends "
                  "up to 32 per chain on reporting_vq; the device discards each. The guest "
                  "fills a 64 MiB tmpfs file, then deletes it."),
}


@dataclasses.dataclass(frozen=True)
class _Watch:
    """A :class:`~sim.uml_boot.Scenario` run first: the driver is up (DRIVER_OK, queues
    attached), so the rings' addresses are known; attach the probes and log the scenario."""

    recorder: Recorder
    scenario: str
    name: str = "trace"

    def guest(self) -> str:
        return ""

    async def host(self, ctx: Any) -> None:
        from sim.teach.snapshots import RecordsProbe

        device = ctx.device
        focus = {device.queue_index(q) for q in _FOCUS[self.scenario]} - {None}
        where = {e.fields["index"]: e.fields for e in ctx.server.events if e.kind == "queue"}
        queues = {_LINUX_QUEUE_NAMES[BalloonQueue[f["queue"]]]: i for i, f in where.items()
                  if f.get("queue")}
        rings = [RingGeometry(i, _LINUX_QUEUE_NAMES[BalloonQueue[f["queue"]]], f["size"],
                              f["desc"], f["avail"], f["used"])
                 for i, f in sorted(where.items()) if i in focus]
        self.recorder.probes += [RingProbe(device.memory, rings, buffers_after="vq.pop"),
                                 RecordsProbe(device.records)]
        teach_log.info("teach.scenario", name=self.scenario, ram=device.ram_size,
                       peer="User-Mode Linux 6.1", traced_end="device", transport="vhost-user",
                       features=names(device.features), queues=queues,
                       focus=[r.to_dict() for r in rings], reporting_capacity=None,
                       policy=str(device.policy), options={})
        teach_log.info("teach.chapter", title=_UML_CHAPTERS[self.scenario][0],
                       text=_UML_CHAPTERS[self.scenario][1])


def _uml_outcome(name: str, result: Any) -> None:
    if name == "inflate":
        lines = [f"inflated to {result.actual_inflated} pages in {result.seconds_inflate:.2f} s "
                 f"(num_pages {result.num_pages}), then deflated to {result.actual_deflated}",
                 f"ballooned ranges held {result.resident_bytes:,} bytes of data (0: all "
                 f"discarded); guest MemTotal {result.before.total >> 10} -> "
                 f"{result.inflated.total >> 10} -> {result.deflated.total >> 10} KiB"]
    else:
        lines = [f"{result.initial_reports} report chain(s) in the first pass",
                 f"after the 64 MiB free: {result.reported_bytes:,} bytes reported in "
                 f"{len(result.ranges)} ranges"
                 + (f", the first {result.first_delay:.2f} s after the free"
                    if result.first_delay is not None else ""),
                 f"the RAM file gave back {result.returned_bytes:,} bytes"]
    teach_log.info("teach.outcome", title="Afterwards: what the device saw", peer="uml",
                   lines=lines)


def run_uml_trace(name: str, options: TraceOptions | None = None, *,
                  kernel: Any = None) -> Trace:
    """Run scenario ``name`` with Linux 6.1's driver (UML) on our device; everything it logged.

    ``options.ram`` is raised to 256 MiB if smaller; the queue sizes are UML's (256).

    Raises:
        ConfigError: an unknown scenario.
        PeerError: UML is missing, stuck or did not power off cleanly.
    """
    from sim.uml_scenarios import Inflate, Reporting, run_boot

    if name not in UML_SCENARIOS:
        raise ConfigError(f"unknown trace scenario {name!r}; with --peer uml choose one of "
                          f"{', '.join(UML_SCENARIOS)}")
    options = options or TraceOptions()
    mem = max(options.ram, UML_MIN_RAM)
    body = Inflate(size=UML_INFLATE, dirty=False) if name == "inflate" else Reporting()
    with recording() as recorder:
        result = trio.run(functools.partial(
            run_boot, [_Watch(recorder, name), body], mem=f"{mem // MiB}M", kernel=kernel))
        _uml_outcome(name, result.results[body.name])
    return Trace(name, options, recorder.records)
