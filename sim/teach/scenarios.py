"""The scenarios ``vballoon trace`` narrates: small machines doing one thing each, recorded.

Each scenario builds a :class:`~sim.machine.Machine` with a small guest (64 MiB by default) and
small rings (``BalloonOptions(max_queue_size=8)``) so every table fits a terminal, runs it in
virtual time (``trio.testing.MockClock(autojump_threshold=0)``) and records every structlog
event with :func:`~sim.teach.capture.recording`. The scenario adds ``teach.*`` events of its own:
``teach.scenario`` (what was built), ``teach.chapter`` (what happens next and why),
``teach.free_lists`` (a copy of the free lists) and ``teach.tamper`` (a deliberate corruption).

- ``reporting``: free page reporting (virtio §5.5.6.7, Linux ``mm/page_reporting.c``): passes
  isolate large free blocks, report them on reporting_vq, the device discards them, the blocks
  go back to the tail of their lists marked Reported; then the guest reuses memory and the next
  pass reports only what is new.
- ``hinting``: free page hinting (§5.5.6.5) during a live migration, with the seed thread's
  walker (:mod:`guest.walker`): the host asks for hints with a command ID, the walker offers
  free blocks to a callback that puts them on free_page_vq, the device clears them from the
  migration bitmap.
- ``inflate``: the host sets a balloon target, the driver inflates (a PFN array on inflateq),
  then the host gives the memory back (deflateq).
- ``malformed``: the driver's own chain is rewritten in guest memory before the kick so it
  breaks one descriptor rule; the device names the rule and the spec section.

Page reporting's batch is lowered from Linux 6.1's 32 blocks to 4 (``reporting_capacity``):
newer Linux lets the driver set it (``page_reporting_dev_info.capacity``), and with 32 a guest
below 128 MiB never passes reporting's watermark gate (``low + capacity << order`` free pages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from device.migration import MigrationParams
from guest.balloon import BalloonOptions, HintMode
from guest.mm import PAGE_SHIFT, MigrateType
from guest.reporting import PAGE_REPORTING_CAPACITY, PageReporting
from protocol.balloon import BalloonQueue
from protocol.errors import ConfigError
from protocol.features import names
from protocol.rules import RULES
from protocol.split_ring import DescFlags
from sim.machine import Machine, MachineConfig
from sim.teach.capture import Recorder, recording, teach_log
from sim.teach.snapshots import (
    FreeListProbe,
    RecordsProbe,
    RingGeometry,
    RingProbe,
    free_lists_record,
    traced_walk,
)
from virtqueue.layout import DESC
from virtqueue.policy import ErrorPolicy

__all__ = [
    "SCENARIOS",
    "TAMPER_RULES",
    "Stage",
    "Trace",
    "TraceOptions",
    "run_trace",
    "seed_scheduler",
    "tamper",
]

MiB = 1 << 20
TAMPER_RULES = ("DC-01", "DC-02", "DC-05", "DC-06", "DC-07", "AV-03")
"""Rules the ``malformed`` scenario can break (see :func:`tamper`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceOptions:
    """What a traced scenario is built with.

    Attributes:
        ram: guest RAM (64 MiB .. 1 GiB: the trace is for reading, not for scale).
        queue_size: cap on the driver's queue sizes (Linux keeps reporting_vq at 32).
        seed: seed of the workload's choices.
        reporting_capacity: blocks per report (Linux 6.1: 32).
        rule: the rule the ``malformed`` scenario breaks (:data:`TAMPER_RULES`).
        policy: what the device does about it (:class:`~virtqueue.policy.ErrorPolicy`).
        hint_mode: ``walk`` (the seed's walker, shows its visits) or ``alloc`` (Linux 4.20+).
    """

    ram: int = 64 * MiB
    queue_size: int = 8
    seed: int = 0
    reporting_capacity: int = 4
    rule: str = "DC-06"
    policy: ErrorPolicy = ErrorPolicy.NEEDS_RESET
    hint_mode: HintMode = HintMode.WALK

    def __post_init__(self) -> None:
        if not 64 * MiB <= self.ram <= 1024 * MiB or self.ram % (2 * MiB):
            raise ConfigError(f"trace guest RAM must be a multiple of 2 MiB from 64 MiB to "
                              f"1 GiB, not {self.ram} bytes")
        if self.queue_size not in (2, 4, 8, 16, 32):
            raise ConfigError(f"trace queue size must be 2, 4, 8, 16 or 32, not "
                              f"{self.queue_size}")
        if not 1 <= self.reporting_capacity <= PAGE_REPORTING_CAPACITY:
            raise ConfigError(f"reporting capacity must be 1..{PAGE_REPORTING_CAPACITY}, not "
                              f"{self.reporting_capacity}")
        if self.rule not in TAMPER_RULES:
            raise ConfigError(f"malformed: rule must be one of {', '.join(TAMPER_RULES)}, not "
                              f"{self.rule!r}")
        try:
            object.__setattr__(self, "policy", ErrorPolicy(self.policy))
            object.__setattr__(self, "hint_mode", HintMode(self.hint_mode))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(slots=True)
class Trace:
    """A recorded scenario: its name, options and every record (library and ``teach.*``)."""

    scenario: str
    options: TraceOptions
    records: list[dict[str, Any]] = field(default_factory=list)


class Stage:
    """A machine being traced: builds it, boots it, and logs the scenario's own events."""

    def __init__(self, recorder: Recorder, options: TraceOptions, *, name: str,
                 focus: tuple[BalloonQueue, ...]) -> None:
        self.recorder = recorder
        self.options = options
        self.name = name
        self.focus = focus
        driver = BalloonOptions(max_queue_size=options.queue_size, drop_indirect=True,
                                hint_mode=options.hint_mode)
        self.machine = Machine(MachineConfig(ram=options.ram, driver=driver, stats_interval=0,
                                             policy=options.policy, seed=options.seed,
                                             workload_ops=1 << 62))

    async def boot(self, nursery: trio.Nursery) -> None:
        """Device up, driver probed (reset .. DRIVER_OK), its work started; probes attached."""
        m = self.machine
        await nursery.start(m.device.run)
        m.driver.probe()
        reporting = m.driver.reporting
        if reporting is not None and self.options.reporting_capacity != reporting.core.capacity:
            reporting.core.unregister()
            reporting.core = PageReporting(m.mm, clock=trio.current_time,
                                           capacity=self.options.reporting_capacity,
                                           wakeup=reporting.wakeup)
            reporting.core.register()
        hinting = m.driver.hinting
        if hinting is not None and hinting.mode == HintMode.WALK:
            # the composition root wraps the walker it gave the driver, to see its visits
            hinting._walk = traced_walk(hinting._walk)
        await nursery.start(m.driver.run)
        rings = [RingGeometry(vq.index, vq.name, vq.size, vq.ring.desc, vq.ring.avail,
                              vq.ring.used) for q, vq in m.driver.vqs.items() if q in self.focus]
        self.recorder.probes += [RingProbe(m.memory, rings), RecordsProbe(m.device.records),
                                 FreeListProbe(m.mm)]
        teach_log.info("teach.scenario", name=self.name, ram=self.options.ram,
                       features=names(m.driver.features),
                       queues={vq.name: vq.index for vq in m.driver.vqs.values()},
                       focus=[r.to_dict() for r in rings],
                       reporting_capacity=(reporting.core.capacity if reporting else None),
                       hint_mode=str(self.options.hint_mode), policy=str(self.options.policy),
                       options={k: str(v) for k, v in dataclasses.asdict(self.options).items()})

    def chapter(self, title: str, text: str) -> None:
        """What happens next, and why (a ``teach.chapter`` event)."""
        teach_log.info("teach.chapter", title=title, text=text)

    def free_lists(self, label: str) -> None:
        """A copy of every free list (a ``teach.free_lists`` event)."""
        teach_log.info("teach.free_lists", **free_lists_record(self.machine.mm, label))


# ---- the scenarios ---------------------------------------------------------------------------


async def _reporting(stage: Stage) -> None:
    m = stage.machine
    cap = stage.options.reporting_capacity
    async with trio.open_nursery() as nursery:
        await stage.boot(nursery)
        stage.free_lists("before: after boot, free memory sits in a few large blocks, none of "
                         "them Reported")
        stage.chapter(
            "Free page reporting wakes up",
            f"page_reporting_register() asked for a pass; it runs PAGE_REPORTING_DELAY (2 s) "
            f"later. A pass takes up to {cap} free blocks of order >= 9 (2 MiB) off their "
            f"lists (isolates them, so nobody allocates them meanwhile) and reports them as ONE "
            f"chain of device-writable descriptors.")
        await trio.sleep(2.5)
        await trio.sleep(2.0)
        stage.free_lists("after two passes: every large block is Reported and sits at the tail "
                         "of its list")
        stage.chapter(
            "The guest reuses memory",
            "The workload allocates two order-10 blocks (allocations take the list HEAD, so "
            "reported memory is reused last) and frees them. A freed block is no longer "
            "Reported, and a free of order >= 9 asks for another pass.")
        w = m.workload
        taken = [op.pfn for op in (w.alloc(10), w.alloc(10)) if op.kind == "alloc"]
        for pfn in taken:
            w.free(pfn)
        stage.free_lists("after the reuse: the two freed blocks are at the head, unreported")
        await trio.sleep(2.5)
        stage.free_lists("final: the third pass skipped the Reported blocks and reported only "
                         "the new ones")
        nursery.cancel_scope.cancel()


async def _hinting(stage: Stage) -> None:
    m = stage.machine
    async with trio.open_nursery() as nursery:
        await stage.boot(nursery)
        stage.chapter(
            "The guest has been busy",
            "The workload fills free memory with order-9 allocations, writes every page and "
            "frees it all: the free memory now holds stale data that a migration would copy "
            "unless the guest says it is free.")
        w = m.workload
        taken = []
        while (op := w.alloc(9)).kind == "alloc":
            taken.append(op.pfn)
        for pfn in taken:
            w.free(pfn)
        stage.free_lists("before the migration: the burst merged back into order-10 blocks")
        stage.chapter(
            "The host starts a live migration",
            "QEMU's precopy puts every page in the to-send bitmap. After each bitmap sync the "
            "balloon gets a new command ID and a config interrupt (virtio §5.5.6.5): the "
            "guest answers with the ID, then hints free blocks, then STOP.")
        await m.vmm.migrate(MigrationParams(bandwidth=32 * MiB, downtime_limit=0.05),
                            resume_after=True)
        await trio.sleep(0.1)
        stage.free_lists("after the migration: hinting in walk mode holds nothing, the hinted "
                         "blocks rotated to the tails")
        nursery.cancel_scope.cancel()


async def _wait_for_target(stage: Stage) -> None:
    with trio.move_on_after(30):
        while stage.machine.driver.towards_target():
            await trio.sleep(0.01)
    await trio.sleep(0.01)


async def _inflate(stage: Stage) -> None:
    m = stage.machine
    ram = stage.options.ram
    async with trio.open_nursery() as nursery:
        await stage.boot(nursery)
        stage.free_lists("before: nothing is in the balloon")
        stage.chapter(
            "The host asks for 1 MiB back",
            "QMP 'balloon' with a target 1 MiB below RAM: num_pages = 256. The config interrupt "
            "wakes update_balloon_size_func(), which allocates 256 pages and tells the host "
            "their PFNs in one buffer (fill_balloon, tell_host).")
        m.device.balloon(ram - MiB)
        await _wait_for_target(stage)
        stage.free_lists("after inflating: 256 order-0 pages left the free lists (a block was "
                         "split to provide them)")
        stage.chapter(
            "The host gives it back",
            "Target = all of RAM: num_pages = 0. leak_balloon() tells the host first (the "
            "PFNs on deflateq, MUST_TELL_HOST order) and only then frees the pages.")
        m.device.balloon(ram)
        await _wait_for_target(stage)
        stage.free_lists("after deflating: the pages are back and merged again")
        nursery.cancel_scope.cancel()


def tamper(mem: Any, ring: Any, head: int, rule: str) -> None:
    """Rewrite the two-descriptor chain at ``head`` of ``ring`` (a
    :class:`~virtqueue.driver.DriverQueue`: desc[head] readable, then desc[tail] writable) in
    guest memory ``mem`` so that it breaks ``rule`` (one of :data:`TAMPER_RULES`); logs
    ``teach.tamper`` with what changed."""
    n = ring.size

    def desc(i: int) -> list[int]:
        return list(DESC.unpack(mem.read(ring.desc + 16 * i, 16)))

    def put(i: int, fields: list[int]) -> None:
        mem.write(ring.desc + 16 * i, DESC.pack(*fields))

    d0 = desc(head)
    tail = d0[3]
    d1 = desc(tail)
    where, old, new = "", 0, 0
    rows = [tail]
    if rule == "DC-01":
        rows = [head]
        where, old, new = f"desc[{head}].next", d0[3], n + 3
        put(head, [d0[0], d0[1], d0[2], new])
    elif rule == "DC-02":
        where, old = f"desc[{tail}].flags/next", f"flags={d1[2]} next={d1[3]}"
        new = f"flags={d1[2] | DescFlags.NEXT} next={head}"
        put(tail, [d1[0], d1[1], d1[2] | DescFlags.NEXT, head])
    elif rule == "DC-05":
        where, old, new = f"desc[{tail}].len", d1[1], 0
        put(tail, [d1[0], 0, d1[2], d1[3]])
    elif rule == "DC-06":
        rows = [head, tail]
        where = f"desc[{head}].flags, desc[{tail}].flags"
        old, new = f"{d0[2]}, {d1[2]}", f"{d0[2] | DescFlags.WRITE}, 0"
        put(head, [d0[0], d0[1], d0[2] | DescFlags.WRITE, d0[3]])
        put(tail, [d1[0], d1[1], 0, d1[3]])
    elif rule == "DC-07":
        where, old, new = f"desc[{tail}].addr", hex(d1[0]), hex(mem.end)
        put(tail, [mem.end, d1[1], d1[2], d1[3]])
    else:  # AV-03: the avail ring entry names a head beyond the queue size
        rows = []
        slot = (ring.avail_idx_shadow - 1) % n
        where, old, new = f"avail.ring[{slot}]", head, n + 1
        mem.write(ring.avail + 4 + 2 * slot, (n + 1).to_bytes(2, "little"))
    r = RULES[rule]
    teach_log.info("teach.tamper", queue=ring.index, head=head, rule=rule, section=r.section,
                   summary=r.summary, where=where, old=old, new=new, rows=rows)


async def _malformed(stage: Stage) -> None:
    m = stage.machine
    rule = RULES[stage.options.rule]
    async with trio.open_nursery() as nursery:
        await stage.boot(nursery)
        stage.chapter(
            "A driver with a bug",
            f"We add a valid two-descriptor chain to inflateq with the driver's own "
            f"virtqueue_add (a readable PFN array, then a writable word), then rewrite it in "
            f"guest memory before the kick so that it breaks {rule.id}: {rule.summary} "
            f"(virtio §{rule.section}).")
        page = m.mm.alloc_pages(0, MigrateType.UNMOVABLE)
        buf = page << PAGE_SHIFT
        m.memory.write(buf, page.to_bytes(4, "little") * 2)
        ring = m.driver.vqs[BalloonQueue.INFLATE].ring
        head = ring.add([(buf, 8)], [(buf + 8, 8)], "villain")
        tamper(m.memory, ring, head, rule.id)
        ring.kick()
        await trio.sleep(0.05)
        v = m.device.needs_reset
        status = m.transport.get_status().name
        summary = m.device.summary()
        teach_log.info("teach.outcome", title="Afterwards: what the device did about it",
                       policy=str(stage.options.policy),
                       needs_reset=None if v is None else v.rule_id, status=status,
                       lines=[f"device status: {status}",
                              f"policy {stage.options.policy}: device stopped by "
                              f"{v.rule_id if v else 'nothing (it keeps serving)'}",
                              f"device counters: violations {summary.get('violations', 0)}, "
                              f"truncated chains {summary.get('truncated_chains', 0)}, "
                              f"inflate chains {summary.get('inflate_chains', 0)}"])
        nursery.cancel_scope.cancel()


_Scenario = Callable[[Stage], Awaitable[None]]
SCENARIOS: dict[str, tuple[_Scenario, tuple[BalloonQueue, ...], str]] = {
    "reporting": (_reporting, (BalloonQueue.REPORTING,),
                  "free page reporting: free blocks to reporting_vq, discarded by the host"),
    "hinting": (_hinting, (BalloonQueue.FREE_PAGE,),
                "free page hinting during a live migration, with the free-block walker"),
    "inflate": (_inflate, (BalloonQueue.INFLATE, BalloonQueue.DEFLATE),
                "a balloon target: inflate 256 pages, then deflate them"),
    "malformed": (_malformed, (BalloonQueue.INFLATE,),
                  "one malformed chain, rejected with its rule ID and spec section"),
}
"""name -> (scenario, queues watched, one-line description)."""


def run_trace(name: str, options: TraceOptions | None = None) -> Trace:
    """Run scenario ``name`` in virtual time and return everything it logged.

    Raises:
        ConfigError: an unknown scenario name.
    """
    if name not in SCENARIOS:
        raise ConfigError(f"unknown trace scenario {name!r}; choose one of "
                          f"{', '.join(SCENARIOS)}")
    options = options or TraceOptions()
    scenario, focus, _ = SCENARIOS[name]

    async def main(recorder: Recorder) -> None:
        stage = Stage(recorder, options, name=name, focus=focus)
        try:
            await scenario(stage)
        finally:
            stage.machine.close()

    seed_scheduler(options.seed)
    with recording() as recorder:
        trio.run(main, recorder, clock=trio.testing.MockClock(autojump_threshold=0))
    return Trace(name, options, recorder.records)


def seed_scheduler(seed: int) -> None:
    """Seed trio's task-order randomisation so a trace is the same on every run.

    trio shuffles each batch of runnable tasks with a module-level ``random.Random`` (to keep
    programs from relying on an order); it has no public seed, so this reaches into
    ``trio._core._run._r`` and does nothing if that ever moves. Virtual time does the rest.
    """
    rng = getattr(getattr(getattr(trio, "_core", None), "_run", None), "_r", None)
    if rng is not None and hasattr(rng, "seed"):
        rng.seed(seed)
