"""Scenarios in which Linux 6.1's real ``virtio_balloon`` (User-Mode Linux) drives our device.

Each scenario is a guest part (shell) and a host part (a coroutine) for
:func:`sim.uml_boot.run_boot`, which runs a list of them in one boot: :class:`Stats`,
:class:`Inflate`, :class:`Reporting`, :class:`Hinting`. Results are plain values; the checks
live in the tests (tests/sim/test_uml_scenarios.py) and the timings in ``benchmarks/uml.py``.

Linux facts these scenarios rely on (6.1, UML config: no PAGE_POISONING, no hugetlb, HZ=100):

* page reporting works on pageblock_order blocks, order 10 (4 MiB) here; a first pass runs 2 s
  after the driver registers, later ones 2 s after a free of such a block, and a pass runs
  only while the zone has ``low watermark + 32 * 4 MiB`` free (so guests need > 160 MiB);
* hinting allocates order-10 blocks until the allocator refuses, holds them until DONE;
* without DEFLATE_ON_OOM every ballooned page leaves MemTotal (``adjust_managed_page_count``);
  with it MemTotal stays and only MemFree drops;
* on power-off the driver deflates the whole balloon before the device goes away.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import trio

from protocol.balloon import StatTag
from protocol.errors import PeerError
from protocol.features import BalloonFeature, has
from sim.serve import ServeEvent
from sim.uml_boot import (
    BOOT_BUDGET,
    LINUX_DRIVER_FEATURES,
    MIB,
    BootResult,
    Meminfo,
    Negotiation,
    Scenario,
    ScenarioContext,
    linux_accepts,
    mount_tmpfs,
    run_boot,
    write_pattern,
)

__all__ = [
    "BOOT_BUDGET",
    "LINUX_DRIVER_FEATURES",
    "MIB",
    "REPORTING_DELAY",
    "BootResult",
    "Hinting",
    "HintingResult",
    "Inflate",
    "InflateResult",
    "Meminfo",
    "Negotiation",
    "Reporting",
    "ReportingResult",
    "Scenario",
    "ScenarioContext",
    "Stats",
    "StatsResult",
    "linux_accepts",
    "run_boot",
]

REPORTING_DELAY = 2.0
"""Linux ``PAGE_REPORTING_DELAY`` (2 * HZ)."""


# ---- stats ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatsResult:
    """The guest's /proc/meminfo and the stats buffer the driver sent right after it.

    ``tolerance``: the two reads are not simultaneous. The guest's shell prints meminfo (awk
    runs and exits), prints the marker, then forks ``sleep`` every 50 ms while it polls for the
    host's file; the host then asks for stats and the driver's work item reads the counters.
    Each of those processes holds well under 1 MiB, so MemFree may move by a few MiB between
    the reads; MemTotal cannot move at all.
    """

    guest: Meminfo
    values: dict[StatTag, int]
    tolerance: int
    seconds: float
    """From the host's request to the fresh buffer."""

    @property
    def free_diff(self) -> int:
        return self.values[StatTag.MEMFREE] - self.guest.free

    @property
    def available_diff(self) -> int:
        return self.values[StatTag.AVAIL] - self.guest.available


@dataclass(frozen=True)
class Stats:
    """Ask for fresh stats while the guest waits and compare them with its /proc/meminfo."""

    tolerance: int = 4 * MIB
    name: str = "stats"

    def guest(self) -> str:
        return "step stats\n"

    async def host(self, ctx: ScenarioContext) -> StatsResult:
        guest = await ctx.reached("stats")
        stats = ctx.device.stats
        before, t0 = stats.updates, time.perf_counter()
        if not ctx.server.request_stats():
            raise PeerError("no stats buffer is parked: the driver never sent one")
        await ctx.wait("fresh stats", lambda: stats.updates > before)
        seconds = time.perf_counter() - t0
        values = {tag: v for tag, v in stats.values.items()}
        ctx.go("stats")
        assert guest is not None
        return StatsResult(guest, values, self.tolerance, seconds)


# ---- inflate and deflate ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InflateResult:
    """A host target, the driver filling the balloon, then deflating it back to 0."""

    size: int
    num_pages: int
    before: Meminfo
    inflated: Meminfo
    deflated: Meminfo
    actual_inflated: int
    ballooned_bytes: int
    resident_bytes: int
    """Bytes with data left in the ballooned ranges of the RAM file (0: all discarded)."""
    returned_bytes: int
    """Bytes the RAM file gave back to the host (allocated blocks) during the inflation."""
    seconds_inflate: float
    """From the target being set to ``actual`` reaching it."""
    actual_deflated: int
    ballooned_after_deflate: int
    seconds_deflate: float
    deflate_on_oom: bool


@dataclass(frozen=True)
class Inflate:
    """Balloon ``size`` bytes out of the guest, check RAM and MemTotal, then give them back.

    With ``dirty`` the guest first fills and frees ``size`` bytes (a tmpfs file), so its free
    pages hold data in the RAM file and the inflation has something to give back to the host.
    """

    size: int = 64 * MIB
    dirty: bool = True
    name: str = "inflate"

    def guest(self) -> str:
        fill = (mount_tmpfs(self.size) + "step inflate-fill\n"
                + 'cp "$RUN/pattern" "$RUN/tmpfs/fill" && rm "$RUN/tmpfs/fill" && '
                + 'umount "$RUN/tmpfs" || exit 1\n') if self.dirty else ""
        return fill + "step inflate-before\nstep inflate-after\nstep inflate-deflated\n"

    async def host(self, ctx: ScenarioContext) -> InflateResult:
        if self.dirty:
            await ctx.reached("inflate-fill")
            pattern = write_pattern(ctx, self.size)
            ctx.go("inflate-fill")
        before = await ctx.reached("inflate-before")
        if self.dirty:
            os.unlink(pattern)
        device, config = ctx.device, ctx.device.config
        returned = device.memory.returned_bytes
        t0 = time.perf_counter()
        num_pages = ctx.server.balloon(device.ram_size - self.size)
        await ctx.wait("actual reaching num_pages", lambda: config.actual == num_pages)
        seconds_inflate = time.perf_counter() - t0
        returned = device.memory.returned_bytes - returned
        actual_inflated, ballooned = config.actual, device.ballooned.copy()
        resident = ctx.resident(ballooned)  # the driver holds these pages: no race
        ctx.go("inflate-before")
        inflated = await ctx.reached("inflate-after")
        t0 = time.perf_counter()
        ctx.server.balloon(device.ram_size)
        await ctx.wait("actual back to 0", lambda: config.actual == 0)
        seconds_deflate = time.perf_counter() - t0
        ctx.go("inflate-after")
        deflated = await ctx.reached("inflate-deflated")
        ctx.go("inflate-deflated")
        assert before is not None and inflated is not None and deflated is not None
        return InflateResult(
            size=self.size, num_pages=num_pages or 0, before=before, inflated=inflated,
            deflated=deflated, actual_inflated=actual_inflated,
            ballooned_bytes=ballooned.total, resident_bytes=resident, returned_bytes=returned,
            seconds_inflate=seconds_inflate, actual_deflated=config.actual,
            ballooned_after_deflate=device.ballooned.total, seconds_deflate=seconds_deflate,
            deflate_on_oom=has(device.features, BalloonFeature.DEFLATE_ON_OOM))


# ---- free page reporting ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReportingResult:
    """Reports after the guest freed ``size`` bytes it had filled (a tmpfs file)."""

    size: int
    initial_reports: int
    """Report chains of the first pass (2 s after the driver registered)."""
    filled: Meminfo
    freed: Meminfo
    first_delay: float | None
    """Seconds from the host seeing the free to the first report chain (None: none came)."""
    ranges: tuple[tuple[int, int], ...]
    """(gpa, length) of every range reported after the free."""
    reported_bytes: int
    resident_bytes: int
    """Bytes with data in those ranges when the device returned them (0: all discarded)."""
    returned_bytes: int
    """Bytes the RAM file gave back to the host (its allocated blocks) through those reports."""
    allocated_before: int
    allocated_after: int


@dataclass(frozen=True)
class Reporting:
    """Fill then free ``size`` bytes in the guest and watch the reports that follow."""

    size: int = 64 * MIB
    quiet: float = 0.3
    """No report for this long ends the first pass (a pass sends its chains back to back,
    each as soon as the previous one is used; the next pass comes >= 2 s later)."""
    name: str = "reporting"

    def guest(self) -> str:
        return (
            mount_tmpfs(self.size)
            + "step report-fill\n"
            + 'cp "$RUN/pattern" "$RUN/tmpfs/fill"\n'
            + "step report-filled\n"
            + 'rm "$RUN/tmpfs/fill"\n'
            + "step report-freed\n"
            + 'umount "$RUN/tmpfs"\n'
        )

    async def host(self, ctx: ScenarioContext) -> ReportingResult:
        await ctx.reached("report-fill")
        if not has(ctx.device.features, BalloonFeature.REPORTING):
            raise PeerError("the driver did not negotiate REPORTING: nothing to watch")
        pattern = write_pattern(ctx, self.size)
        ctx.go("report-fill")
        filled = await ctx.reached("report-filled")
        os.unlink(pattern)
        # Let the first pass (2 s after the driver registered) go by: it reports whatever is
        # free and would hide when the freed memory is reported.
        await ctx.wait("the first reporting pass", lambda: ctx.server.counts.get("report", 0) > 0)
        await ctx.quiet("report", self.quiet)
        initial = ctx.server.counts["report"]
        memory = ctx.device.memory
        allocated_before, returned_before = memory.allocated_bytes(), memory.returned_bytes
        ctx.go("report-filled")
        freed = await ctx.reached("report-freed")
        t_freed = ctx.now

        def reported() -> int:
            return sum(e.fields["bytes"] for e in ctx.events_since(t_freed, "report"))

        with trio.move_on_after(2 * REPORTING_DELAY + 1.0):  # up to two passes
            await ctx.wait("reports of the freed memory", lambda: reported() >= self.size * 3 // 4)
        reports = ctx.events_since(t_freed, "report")
        ctx.go("report-freed")
        assert filled is not None and freed is not None
        return ReportingResult(
            size=self.size, initial_reports=initial, filled=filled, freed=freed,
            first_delay=reports[0].time - t_freed if reports else None,
            ranges=tuple(tuple(r) for e in reports for r in e.fields["ranges"]),
            reported_bytes=sum(e.fields["bytes"] for e in reports),
            resident_bytes=sum(e.fields["resident"] for e in reports),
            returned_bytes=memory.returned_bytes - returned_before,
            allocated_before=allocated_before, allocated_after=memory.allocated_bytes())


# ---- free page hinting ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HintingResult:
    """One hinting round the host opened, the driver's answers, then DONE."""

    cmd_id: int | None
    guest_cmd_ids: tuple[tuple[int, str, str], ...]
    """(command ID, old state, new state) for each command-ID buffer the driver sent."""
    hinted_bytes: int
    blocks: tuple[int, ...]
    """Length of each hinted range."""
    seconds_round: float
    before: Meminfo
    during: Meminfo
    """While the driver holds the hinted blocks (after its STOP, before DONE)."""
    after: Meminfo
    """After DONE, once MemFree passed ``threshold`` (or the guest gave up waiting)."""
    threshold: int


@dataclass(frozen=True)
class Hinting:
    """Open a hinting round, let the driver hint and stop, then DONE: MemFree recovers."""

    name: str = "hinting"
    recover_polls: int = 100
    """How many 50 ms polls the guest waits for MemFree to recover after DONE."""

    def guest(self) -> str:
        return (
            "step hint-before\n"
            "step hint-during\n"
            'want=$(cat "$RUN/go-hint-during"); n=0\n'
            "while [ $(awk '/^MemFree:/ {print $2}' /proc/meminfo) -lt \"$want\" ] && "
            f"[ $n -lt {self.recover_polls} ]; do n=$((n+1)); sleep 0.05; done\n"
            "step hint-after\n"
        )

    async def host(self, ctx: ScenarioContext) -> HintingResult:
        before = await ctx.reached("hint-before")
        t0, t_start = time.perf_counter(), ctx.now
        cmd_id = ctx.server.hint_start()

        def answers() -> list[ServeEvent]:
            return ctx.events_since(t_start, "hint_cmd")

        def stopped() -> bool:
            seen = [(e.fields["cmd_id"], e.fields["new"]) for e in answers()]
            return (cmd_id, "START") in seen and seen[-1][1] == "STOP"

        if cmd_id is not None:
            await ctx.wait("the driver's STOP", stopped)
        seconds = time.perf_counter() - t0
        blocks = tuple(length for e in ctx.events_since(t_start, "hint")
                       for length in _hint_lengths(ctx, e))
        hinted = ctx.device.hinted_round.total if cmd_id is not None else 0
        ctx.go("hint-before")
        during = await ctx.reached("hint-during")
        assert before is not None and during is not None
        ctx.server.hint_done()
        threshold = during.free + hinted * 9 // 10
        ctx.go("hint-during", str(threshold >> 10))
        after = await ctx.reached("hint-after")
        ctx.go("hint-after")
        assert after is not None
        return HintingResult(
            cmd_id=cmd_id,
            guest_cmd_ids=tuple((e.fields["cmd_id"], e.fields["old"], e.fields["new"])
                                for e in answers()),
            hinted_bytes=hinted, blocks=blocks, seconds_round=seconds, before=before,
            during=during, after=after, threshold=threshold)


def _hint_lengths(ctx: ScenarioContext, event: ServeEvent) -> list[int]:
    """Hint events carry a byte count and a range count; Linux hints equal blocks."""
    n = event.fields["ranges"]
    return [event.fields["bytes"] // n] * n if n else []
