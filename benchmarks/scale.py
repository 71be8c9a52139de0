"""Scale: live-migrating a 1 TiB guest, in wall time and peak RSS, with and without hints.

The guest is 1 TiB of sparse memfd RAM with 256 MiB in use, as 16 Ki runs of 16 KiB scattered
at random (so nearly every hint and every round meets a fragmented bitmap); the rest was never
written. Its synthetic driver hints every free 4 MiB block (about 246 Ki hints); 64 MiB/s of
churn rewrites used memory meanwhile. The link is 1 GiB/s, downtime limit 300 ms, all in
virtual time. The migration copies into a 1 TiB destination and checks the used memory.

Each mode runs in a fresh interpreter (``python -m benchmarks.scale --child MODE``) so that
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the peak of that migration alone; it includes
the memfd pages the process touched (source and destination). Wall time is the migration's,
from the first bitmap sync to the end of the final check; building the guest is reported apart.
Targets: <= 10 s and <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from benchmarks.migration import migrate_synthetic
from benchmarks.synthetic import SyntheticGuest
from device import events
from device.migration import MigrationParams
from device.vcpu import VcpuGate
from protocol.errors import PeerError
from virtqueue.memory import GuestMemory

__all__ = ["measure", "run"]

TIB = 1 << 40
USED_RUNS_PER_TIB = 16 << 10
RUN_BYTES = 16 << 10
CHURN_PER_TIB = 64 << 20
BANDWIDTH = 1 << 30
DOWNTIME = 0.3
WALL_TARGET = 10.0
RSS_TARGET = 1 << 30


def measure(mode: str, ram: int = TIB) -> dict:
    """Build the guest and migrate it once (in this process); the figures as a dict."""
    previous, events.ENABLED = events.ENABLED, False
    t0 = time.perf_counter()
    try:
        with GuestMemory.create(ram, name="vballoon-scale-ram") as memory:
            runs = max(1, USED_RUNS_PER_TIB * ram // TIB)
            guest = SyntheticGuest(memory, VcpuGate(), seed=1, runs=runs, run_bytes=RUN_BYTES,
                                   stale=False, churn_bytes_per_s=CHURN_PER_TIB * ram / TIB)
            setup = time.perf_counter() - t0
            t1 = time.perf_counter()
            report = migrate_synthetic(guest, hinting=mode == "hint", copy=True,
                                       params=MigrationParams(bandwidth=BANDWIDTH,
                                                              downtime_limit=DOWNTIME))
            wall = time.perf_counter() - t1
    finally:
        events.ENABLED = previous
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "ram": ram, "setup_s": setup, "wall_s": wall, "peak_rss": rss,
            "total_bytes": report.total_bytes, "virtual_s": report.total_time,
            "syncs": report.syncs, "hints": report.hints, "pages_lost": report.pages_lost,
            "outcome": report.outcome}


def _child(mode: str, ram: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", mode,
                           "--ram", str(ram)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise PeerError(f"scale child ({mode}) failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ram: int = TIB) -> list[dict]:
    """Rows per mode (hint, nohint): wall time, peak RSS, bytes, pages lost."""
    rows: list[dict] = []
    size = f"{ram / TIB:g}tib" if ram >= TIB else f"{ram >> 30}gib"
    for mode in ("hint", "nohint"):
        r = _child(mode, ram)
        tag = f"{size}_{mode}"
        rows += [
            {"name": f"{tag}_wall_time", "value": round(r["wall_s"], 2), "unit": "s",
             "target": f"<= {WALL_TARGET:g}"},
            {"name": f"{tag}_peak_rss", "value": round(r["peak_rss"] / (1 << 20), 1),
             "unit": "MiB", "target": f"<= {RSS_TARGET >> 20}"},
            {"name": f"{tag}_setup_time", "value": round(r["setup_s"], 2), "unit": "s"},
            {"name": f"{tag}_bytes", "value": r["total_bytes"], "unit": "bytes"},
            {"name": f"{tag}_virtual_time", "value": round(r["virtual_s"], 3),
             "unit": "virtual s"},
            {"name": f"{tag}_pages_lost", "value": r["pages_lost"], "unit": "pages",
             "target": "== 0"},
        ]
    if ram == TIB:
        rows += run_simulated()
    return rows


def run_simulated() -> list[dict]:
    """A 1 TiB guest's whole ``vballoon run`` (the Linux-like driver on the simulated device,
    reporting, a balloon target, hints for every free 4 MiB block, then the migration with and
    without hints), in a fresh interpreter: wall time and peak RSS."""
    from benchmarks.scenario_child import run_child

    r = run_child({"ram": TIB, "burst_fraction": 0.0002, "balloon_bytes": 256 << 20,
                   "churn_seconds": 0.5, "settle_seconds": 2.0})
    return [
        {"name": "sim_1tib_whole_run_wall_time", "value": round(r["wall_s"], 2), "unit": "s",
         "target": f"<= {WALL_TARGET:g}"},
        {"name": "sim_1tib_whole_run_peak_rss", "value": round(r["peak_rss"] / (1 << 20), 1),
         "unit": "MiB", "target": f"<= {RSS_TARGET >> 20}"},
        {"name": "sim_1tib_whole_run_pages_lost", "value": r["pages_lost"], "unit": "pages",
         "target": "== 0"},
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--child", choices=("hint", "nohint"))
    parser.add_argument("--ram", type=int, default=TIB)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(measure(args.child, args.ram)) + "\n")
    else:
        for row in run(args.ram):
            sys.stdout.write(f"{row}\n")


if __name__ == "__main__":
    main()
