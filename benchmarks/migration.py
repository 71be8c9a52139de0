"""Live-migration bytes with and without free page hinting, for an idle and a churning guest.

The guest is 8 GiB with 90 % free, and the free memory holds stale data (a guest that has run a
while; were it never written, it would go as 9-byte zero pages with or without hints, and
hinting could save nothing). Migrated over a 1 GiB/s link with QEMU's default 300 ms
downtime limit, in virtual time; with hints the synthetic driver hints every free 4 MiB block
as soon as the first command ID arrives. Runs with hints copy into a destination RAM and
check that every used page arrived (pages_lost); runs without hints go to a null sink (the
copy would need another 8 GiB of RAM), counting exactly the same bytes.

Target: with hints, at most 10 % of the bytes sent without (research/qtest-hint.md measured
-75 % on real QEMU with 75 % of RAM hinted). The guest is the synthetic one of
:mod:`benchmarks.synthetic` for now; it will be the full simulated guest (allocator, driver,
device) once wired.
"""

from __future__ import annotations

import time

import trio
import trio.testing

from benchmarks.synthetic import BLOCK, SyntheticGuest
from device import events
from device.migration import NORMAL_PAGE_BYTES, MigrationParams
from device.migration_report import MigrationReport
from device.vcpu import VcpuGate
from device.vmm import Vmm
from virtqueue.memory import PAGE_SIZE, GuestMemory

__all__ = ["migrate_synthetic", "run"]

GIB = 1 << 30
RAM = 8 * GIB
USED_FRACTION = 0.10
BANDWIDTH_PER_RAM = 1 / 8  # 1 GiB/s for 8 GiB: the whole RAM in 8 s
DOWNTIME = 0.3
CHURN = 128 << 20  # bytes/s rewritten in the used memory
RATIO_TARGET = 0.10


def migrate_synthetic(guest: SyntheticGuest, *, hinting: bool, copy: bool,
                      params: MigrationParams) -> MigrationReport:
    """One migration of ``guest.memory`` in virtual time, the guest running meanwhile.

    ``copy`` migrates into a fresh destination RAM and checks what the guest relies on;
    otherwise the stream goes to a null sink.
    """

    async def main() -> MigrationReport:
        vmm = Vmm(guest.memory, vm=guest.gate, hinting_device=guest if hinting else None)
        dest = vmm.destination() if copy else None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest.run)
                report = await vmm.migrate(params, dest=dest,
                                           relied=guest.relied if copy else None)
                nursery.cancel_scope.cancel()
            return report
        finally:
            if dest is not None:
                dest.close()

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _rows(tag: str, with_hints: MigrationReport, without: MigrationReport) -> list[dict]:
    ratio = with_hints.total_bytes / without.total_bytes
    relied = with_hints.check.relied_bytes if with_hints.check is not None else 0
    used = relied // PAGE_SIZE * NORMAL_PAGE_BYTES
    return [
        {"name": f"{tag}_bytes_without_hints", "value": without.total_bytes, "unit": "bytes"},
        {"name": f"{tag}_bytes_with_hints", "value": with_hints.total_bytes, "unit": "bytes"},
        {"name": f"{tag}_hint_bytes_ratio", "value": round(ratio, 4), "unit": "ratio",
         "target": f"<= {RATIO_TARGET}"},
        {"name": f"{tag}_used_bytes_ratio", "value": round(used / without.total_bytes, 4),
         "unit": "ratio"},  # the floor: used pages sent once, nothing else
        {"name": f"{tag}_pages_lost", "value": with_hints.pages_lost, "unit": "pages",
         "target": "== 0"},
        {"name": f"{tag}_time_without_hints", "value": round(without.total_time, 3),
         "unit": "virtual s"},
        {"name": f"{tag}_time_with_hints", "value": round(with_hints.total_time, 3),
         "unit": "virtual s"},
        {"name": f"{tag}_rounds_with_hints", "value": with_hints.syncs, "unit": "syncs"},
        {"name": f"{tag}_downtime_with_hints", "value": round(with_hints.downtime * 1e3, 2),
         "unit": "virtual ms"},
    ]


def run(ram: int = RAM, churn: float = CHURN) -> list[dict]:
    """Rows for the idle and the churning guest (tests pass a smaller ``ram``; the link and
    the churn then scale with it)."""
    previous, events.ENABLED = events.ENABLED, False
    rows: list[dict] = []
    params = MigrationParams(bandwidth=ram * BANDWIDTH_PER_RAM, downtime_limit=DOWNTIME)
    runs = round(ram // BLOCK * USED_FRACTION)
    t0 = time.perf_counter()
    try:
        with GuestMemory.create(ram, name="vballoon-bench-ram") as memory:
            for tag, rate in (("idle", 0.0), ("churn", churn)):
                reports = {}
                for hinting in (False, True):
                    guest = SyntheticGuest(memory, VcpuGate(), seed=1, runs=runs,
                                           run_bytes=BLOCK, stale=not reports and tag == "idle",
                                           churn_bytes_per_s=rate * ram / RAM)
                    reports[hinting] = migrate_synthetic(guest, hinting=hinting, copy=hinting,
                                                         params=params)
                rows += _rows(tag, reports[True], reports[False])
    finally:
        events.ENABLED = previous
    rows.append({"name": "wall_time", "value": round(time.perf_counter() - t0, 2), "unit": "s"})
    if ram == RAM:
        rows += run_simulated()
    return rows


def run_simulated(ram: int = RAM) -> list[dict]:
    """The same comparison on the whole simulated machine (sim.scenario: the Linux-like driver,
    reporting off so only hints can skip stale free memory), for both hinting designs: Linux's
    (allocate max-order blocks) and the 2018 seed's (walk the free lists)."""
    from benchmarks.scenario_child import run_child

    rows: list[dict] = []
    for mode in ("alloc", "walk"):
        for profile, tag in (("idle", "idle"), ("steady", "churn")):
            r = run_child({"ram": ram, "profile": profile, "hint_mode": mode,
                           "reporting": False, "balloon_bytes": 0})
            name = f"sim_{tag}_{mode}"
            ratio = r["with_bytes"] / r["without_bytes"] if r["without_bytes"] else None
            rows += [
                {"name": f"{name}_bytes_with_hints", "value": r["with_bytes"], "unit": "bytes"},
                {"name": f"{name}_bytes_without_hints", "value": r["without_bytes"],
                 "unit": "bytes"},
                {"name": f"{name}_ratio", "value": None if ratio is None else round(ratio, 4),
                 "unit": "with/without", "target": "<= 0.1"},
                {"name": f"{name}_pages_lost", "value": r["pages_lost"], "unit": "pages",
                 "target": "== 0"},
                {"name": f"{name}_hinted_bytes", "value": r["hinted_bytes"], "unit": "bytes"},
                {"name": f"{name}_hinted_pages_reused", "value": r["hinted_pages_reused"],
                 "unit": "pages"},
                {"name": f"{name}_wall_time", "value": round(r["wall_s"], 1), "unit": "s"},
            ]
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
