"""The default scenario of ``vballoon run``: a guest that churns, reports, inflates, is asked for
stats, and is live-migrated twice from the same seed: once with free page hints, once without.

Timeline (virtual seconds; the whole run is in trio's virtual time):

1. boot: device, driver probe (reset ... DRIVER_OK), reporting registered;
2. churn: the workload allocates and frees for ``churn_seconds``;
3. balloon: the host sets a target ``balloon_bytes`` below RAM; the driver inflates to it;
4. burst: a large area (``burst_fraction`` of RAM) is allocated, written and freed, which
   leaves dirty free memory and wakes free page reporting (2 s later, 1/16 per pass);
5. settle: ``settle_seconds`` of churn while reporting and stats polling go on;
6. migration: precopy with churn running, hints on or off; the final check compares every
   page the workload relies on between source and destination.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from device.migration import MigrationParams
from device.migration_report import MigrationReport
from guest.balloon import BalloonOptions, HintMode
from guest.workload import WorkloadProfile
from protocol.balloon import PFN_SHIFT
from protocol.errors import ConfigError
from sim.machine import Machine, MachineConfig

__all__ = ["RunConfig", "RunResult", "run_scenario", "run_scenario_sync"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``vballoon run`` can change; defaults are the embedded default scenario."""

    ram: int = 4 << 30
    profile: WorkloadProfile = WorkloadProfile.STEADY
    seed: int = 0
    reporting: bool = True
    hint_mode: HintMode = HintMode.ALLOC
    deflate_on_oom: bool = True
    churn_seconds: float = 4.0
    burst_fraction: float = 0.5
    balloon_bytes: int = 512 << 20
    settle_seconds: float = 3.0
    stats_interval: float = 2.0
    bandwidth: float = float(1 << 30)
    chunk_bytes: int = 1 << 20
    downtime_limit: float = 0.05
    step_seconds: float = 0.005
    max_live: int = 256

    def __post_init__(self) -> None:
        for name in ("churn_seconds", "settle_seconds", "step_seconds", "stats_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 0, "
                                  f"not {getattr(self, name)}")
        if not 0 <= self.burst_fraction <= 0.9:
            raise ConfigError(f"burst fraction must be between 0 and 0.9, "
                              f"not {self.burst_fraction}")
        if not 0 <= self.balloon_bytes <= self.ram // 2:
            raise ConfigError(f"balloon target must be between 0 and half of RAM "
                              f"({self.ram // 2} bytes), not {self.balloon_bytes}")
        if self.bandwidth <= 0:
            raise ConfigError(f"migration bandwidth must be > 0, not {self.bandwidth}")
        MachineConfig(ram=self.ram)  # validates the size

    def machine(self) -> MachineConfig:
        base = MachineConfig()
        features = base.driver.features
        if not self.reporting:
            features &= ~(1 << 5)
        if not self.deflate_on_oom:
            features &= ~(1 << 2)
        return MachineConfig(
            ram=self.ram, profile=self.profile, seed=self.seed,
            stats_interval=self.stats_interval, max_live=self.max_live,
            workload_ops=1 << 62,
            driver=BalloonOptions(features=features, hint_mode=self.hint_mode),
        )


@dataclass(slots=True)
class Phase:
    """What one pass of the scenario measured (one machine, one migration)."""

    hinting: bool
    migration: MigrationReport
    reported_bytes: int = 0
    discarded_bytes: int = 0
    host_returned_bytes: int = 0
    ballooned_bytes: int = 0
    hinted_bytes: int = 0
    actual_pages: int = 0
    num_pages: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    oom_events: int = 0
    workload_pages: int = 0
    peak_allocated_bytes: int = 0
    final_allocated_bytes: int = 0
    reported_zero: bool = True
    hints_reused_pages: int = 0


@dataclass(slots=True)
class RunResult:
    """Both passes; ``to_dict`` is what ``vballoon run --json`` prints."""

    config: RunConfig
    with_hints: Phase
    without_hints: Phase

    def to_dict(self) -> dict[str, Any]:
        w, wo = self.with_hints, self.without_hints
        return {
            "config": {k: (v.value if hasattr(v, "value") else v)
                       for k, v in dataclasses.asdict(self.config).items()},
            "reported_bytes": w.reported_bytes,
            "discarded_bytes": w.discarded_bytes,
            "host_returned_bytes": w.host_returned_bytes,
            "ballooned_bytes": w.ballooned_bytes,
            "hinted_bytes": w.hinted_bytes,
            "hinted_pages_reused": w.hints_reused_pages,
            "reported_reads_zero": w.reported_zero,
            "balloon": {"num_pages": w.num_pages, "actual": w.actual_pages},
            "stats": w.stats,
            "oom_events": w.oom_events,
            "allocated_bytes": {"peak": w.peak_allocated_bytes, "final": w.final_allocated_bytes},
            "migration": {
                "with_hints": _migration_dict(w.migration),
                "without_hints": _migration_dict(wo.migration),
                "saved_fraction": (1 - w.migration.total_bytes / wo.migration.total_bytes
                                   if wo.migration.total_bytes else 0.0),
            },
        }


def _migration_dict(m: MigrationReport) -> dict[str, Any]:
    return {
        "outcome": m.outcome,
        "bytes_sent": m.total_bytes,
        "pages_sent": m.normal_pages,
        "zero_pages": m.zero_pages,
        "hinted_pages_skipped": m.hinted_pages,
        "rounds": len(m.rounds),
        "total_time": m.total_time,
        "downtime": m.downtime,
        "cmd_ids": list(m.cmd_ids),
        "pages_lost": m.pages_lost,
        "per_round": [r.to_dict() for r in m.rounds],
    }


async def _churn(machine: Machine, seconds: float, step: float) -> None:
    if seconds <= 0:
        return
    await machine.workload_steps(max(1, int(seconds / step)), per_step=step)


async def _burst(machine: Machine, fraction: float) -> None:
    """Allocate ``fraction`` of RAM in pageblock-sized blocks, write it, then free it all."""
    w = machine.workload
    blocks = int(machine.config.ram * fraction) >> (PFN_SHIFT + 9)
    taken = []
    for _ in range(blocks):
        async with machine.gate.vcpu():
            op = w.alloc(9)
        if op.kind != "alloc":
            break
        taken.append(op.pfn)
    await trio.lowlevel.checkpoint()
    for pfn in taken:
        async with machine.gate.vcpu():
            w.free(pfn)


async def _wait_for_target(machine: Machine, timeout: float) -> None:
    """Wait (virtual time) until the driver's balloon reaches the host's target."""
    with trio.move_on_after(timeout):
        while machine.driver.towards_target() != 0:
            await trio.sleep(0.01)


def _reported_reads_zero(machine: Machine) -> bool:
    """Every free block still flagged Reported (not reused since its report) reads as zeros.

    Uses :meth:`GuestMemory.peek` and SEEK_DATA, so checking does not bring pages back.
    """
    mem = machine.memory
    for block in machine.mm.free_blocks():
        if not block.reported:
            continue
        start, length = block.pfn << PFN_SHIFT, (1 << block.order) << PFN_SHIFT
        for s, e in mem.data_ranges(start, length):
            data = mem.peek(s, e - s)
            if data.count(0) != len(data):
                return False
    return True


async def _one_pass(config: RunConfig, *, hinting: bool) -> Phase:
    machine = Machine(config.machine())
    try:
        async with trio.open_nursery() as nursery:
            await machine.start(nursery)
            await _churn(machine, config.churn_seconds, config.step_seconds)
            if config.balloon_bytes:
                machine.device.balloon(config.ram - config.balloon_bytes)
                await _wait_for_target(machine, timeout=60.0)
            await _burst(machine, config.burst_fraction)
            peak = machine.memory.allocated_bytes()
            await _churn(machine, config.settle_seconds, config.step_seconds)
            phase = Phase(hinting=hinting, migration=None)  # type: ignore[arg-type]
            phase.reported_zero = _reported_reads_zero(machine)
            phase.peak_allocated_bytes = peak
            dest = machine.vmm.destination()
            churn = trio.CancelScope()

            async def churn_during_migration() -> None:
                with churn:
                    await _churn(machine, 1e9, config.step_seconds)

            nursery.start_soon(churn_during_migration)
            params = MigrationParams(bandwidth=config.bandwidth, chunk_bytes=config.chunk_bytes,
                                     downtime_limit=config.downtime_limit, hinting=hinting)
            try:
                phase.migration = await machine.vmm.migrate(params, dest=dest,
                                                            relied=machine.relied_ranges,
                                                            resume_after=True)
            finally:
                churn.cancel()
                dest.close()
            await trio.sleep(0.1)  # let the driver act on DONE
            _measure(machine, phase)
            nursery.cancel_scope.cancel()
        return phase
    finally:
        machine.close()


def _measure(machine: Machine, phase: Phase) -> None:
    dev = machine.device
    phase.reported_bytes = dev.reported.total
    phase.ballooned_bytes = dev.ballooned.total
    phase.hinted_bytes = dev.hinted.total
    poison = dev.config.poison_val
    phase.discarded_bytes = phase.ballooned_bytes + (0 if poison else phase.reported_bytes)
    phase.host_returned_bytes = machine.memory.returned_bytes
    phase.final_allocated_bytes = machine.memory.allocated_bytes()
    phase.num_pages = dev.config.num_pages
    phase.actual_pages = dev.config.actual
    phase.stats = dev.guest_stats()
    phase.oom_events = machine.oom_events
    phase.workload_pages = machine.workload.live.pages
    stats = machine.driver.hint_statistics()
    phase.hints_reused_pages = getattr(stats, "pages_reused", 0) if stats else 0


async def run_scenario(config: RunConfig) -> RunResult:
    """Run the scenario twice from the same seed: with and without free page hints."""
    with_hints = await _one_pass(config, hinting=True)
    without_hints = await _one_pass(config, hinting=False)
    return RunResult(config, with_hints, without_hints)


def run_scenario_sync(config: RunConfig) -> RunResult:
    """Run :func:`run_scenario` under trio in virtual time (a fresh MockClock)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(run_scenario, config, clock=clock)
