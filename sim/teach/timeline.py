"""Sample a simulated guest's memory over (virtual) time: what each guest-physical byte is.

:func:`record_timeline` runs a *tour* on a :class:`~sim.machine.Machine`: churn, a balloon
target, a burst of allocations freed again (page reporting then reports the free memory), a
live migration with free page hints, and a deflate. A sampler task copies, every ``interval``
virtual seconds, which ranges of guest RAM are

- ``ballooned``: in the device's balloon record (:attr:`BalloonDevice.ballooned`);
- ``hinted``: hinted in the current hinting round (:attr:`BalloonDevice.hinted_round`) while
  the round matters (the device is not in DONE);
- ``reported``: free blocks flagged Reported (Linux ``PageReported``);
- ``free``: other free blocks;
- ``allocated``: everything else (the workload, the kernel's reserved low memory, the
  driver's rings and buffers, blocks held for hinting).

The kinds are disjoint, in that order of precedence. Each sample also counts free blocks per
(order, migratetype), Reported ones apart, for the free-list picture.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio
import trio.testing

from device.hint import HintState
from device.migration import MigrationParams
from device.ranges import RangeSet
from guest.balloon import BalloonOptions
from guest.mm import Gfp, MigrateType
from protocol.balloon import PFN_SHIFT
from protocol.errors import ConfigError
from sim.machine import Machine, MachineConfig

__all__ = ["KINDS", "Sample", "Timeline", "TimelineConfig", "record_timeline"]

MiB = 1 << 20
KINDS = ("allocated", "free", "reported", "hinted", "ballooned")
"""Range kinds of a sample, lowest precedence first."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One moment: ``ranges[kind]`` are disjoint ``(start, end)`` byte ranges covering RAM;
    ``free_blocks[(order, migratetype name, reported)]`` counts free blocks."""

    t: float
    ranges: dict[str, tuple[tuple[int, int], ...]]
    free_blocks: dict[tuple[int, str, bool], int]

    def kind_at(self, gpa: int) -> str | None:
        """The kind of the byte at ``gpa`` (None outside RAM)."""
        for kind, ranges in self.ranges.items():
            if any(s <= gpa < e for s, e in ranges):
                return kind
        return None


@dataclass(slots=True)
class Timeline:
    """Samples of a tour, and when each phase started."""

    ram: int
    interval: float
    samples: list[Sample] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)

    def at(self, t: float) -> Sample:
        """The last sample taken at or before ``t``."""
        best = self.samples[0]
        for s in self.samples:
            if s.t <= t:
                best = s
        return best

    def phase_time(self, name: str) -> float:
        return next(t for t, label in self.phases if label == name)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelineConfig:
    """The tour's knobs (virtual seconds and bytes)."""

    ram: int = 128 * MiB
    interval: float = 0.05
    seed: int = 0
    balloon: int = 16 * MiB
    deflate_to: int = 4 * MiB
    burst_fraction: float = 0.3
    migration_bandwidth: float = 32 * MiB

    def __post_init__(self) -> None:
        if not 64 * MiB <= self.ram <= 1024 * MiB or self.ram % (2 * MiB):
            raise ConfigError(f"timeline guest RAM must be a multiple of 2 MiB from 64 MiB to "
                              f"1 GiB, not {self.ram} bytes")
        if not 0 < self.interval <= 1:
            raise ConfigError(f"sampling interval must be in (0, 1] s, not {self.interval}")
        if not 0 <= self.deflate_to <= self.balloon <= self.ram // 4:
            raise ConfigError("balloon sizes must satisfy 0 <= deflate_to <= balloon <= RAM/4")


def sample(machine: Machine, t: float) -> Sample:
    """Classify every byte of ``machine``'s RAM now (see the module docstring)."""
    dev, mm = machine.device, machine.mm
    taken = RangeSet()
    out: dict[str, tuple[tuple[int, int], ...]] = {}

    def claim(kind: str, rs: RangeSet) -> None:
        mine = rs.copy()
        mine.difference_update(taken)
        taken.update(mine)
        out[kind] = tuple(mine)

    claim("ballooned", dev.ballooned)
    hinted = dev.hinted_round if dev.hint.state is not HintState.DONE else RangeSet()
    claim("hinted", hinted)
    reported, free = RangeSet(), RangeSet()
    counts: Counter[tuple[int, str, bool]] = Counter()
    for b in mm.free_blocks():
        start = b.pfn << PFN_SHIFT
        (reported if b.reported else free).add(start, start + (4096 << b.order))
        counts[b.order, b.mt.name, b.reported] += 1
    claim("reported", reported)
    claim("free", free)
    claim("allocated", RangeSet((r.gpa, r.end) for r in machine.memory.regions))
    return Sample(t, {k: out[k] for k in KINDS}, dict(counts))


async def _tour(machine: Machine, config: TimelineConfig, timeline: Timeline) -> None:
    ram = config.ram

    def phase(name: str) -> None:
        timeline.phases.append((trio.current_time(), name))

    async def sampler() -> None:
        while True:
            timeline.samples.append(sample(machine, trio.current_time()))
            await trio.sleep(config.interval)

    async def churn() -> None:
        await machine.workload_steps(1 << 30, per_step=0.01)

    async with trio.open_nursery() as nursery:
        await machine.start(nursery)
        phase("boot")
        nursery.start_soon(sampler)
        nursery.start_soon(churn)
        await trio.sleep(1.0)
        phase("balloon")
        machine.device.balloon(ram - config.balloon)
        await trio.sleep(0.5)
        phase("burst")
        mm, memory = machine.mm, machine.memory
        taken = []
        for _ in range(int(ram * config.burst_fraction) >> (PFN_SHIFT + 9)):
            async with machine.gate.vcpu():
                pfn = mm.alloc_pages(9, MigrateType.MOVABLE, gfp=Gfp.NOWARN)
                if pfn is None:
                    break
                memory.fill(pfn << PFN_SHIFT, 2 * MiB, 0x5A)  # a page cache being filled
            taken.append(pfn)
        await trio.sleep(0.3)
        for pfn in taken:
            async with machine.gate.vcpu():
                mm.free_pages(pfn, 9)
        await trio.sleep(3.2)
        phase("migration")
        await machine.vmm.migrate(MigrationParams(bandwidth=config.migration_bandwidth,
                                                  downtime_limit=0.05), resume_after=True)
        await trio.sleep(0.5)
        phase("deflate")
        machine.device.balloon(ram - config.deflate_to)
        await trio.sleep(1.5)
        timeline.samples.append(sample(machine, trio.current_time()))
        nursery.cancel_scope.cancel()


def record_timeline(config: TimelineConfig | None = None) -> Timeline:
    """Run the tour in virtual time on a fresh machine and return its samples."""
    config = config or TimelineConfig()
    timeline = Timeline(config.ram, config.interval)
    machine_config = MachineConfig(ram=config.ram, seed=config.seed, stats_interval=0,
                                   workload_ops=1 << 62, max_live=64,
                                   driver=BalloonOptions(max_queue_size=64))

    async def main() -> None:
        machine = Machine(machine_config)
        try:
            await _tour(machine, config, timeline)
        finally:
            machine.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return timeline
