"""Free page reporting of a 1 TiB guest at 90 % free: wall time and peak RSS.

The guest is QEMU microvm-shaped (1 TiB of RAM with the BIOS hole at 0xf0000); 10 % of it is
allocated as order-10 movable blocks, then page reporting (Linux 6.1 rules: 2 s delay, batches of
32, per-list budget) runs pass after pass in virtual time, with a device that acks every batch at
once, until no pass is scheduled. That is about 16 passes ("an idle system ... in about 30
seconds"), about 236K blocks isolated, reported and put back.

The measurement runs in a fresh subprocess so ``ru_maxrss`` is the benchmark's own peak. Rows:
wall time (target <= 5 s), peak RSS (target <= 1 GiB), the fraction of free memory reported
(everything at or above pageblock order outside the DMA zone, which never passes the watermark
gate), the passes and the virtual time they took.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from protocol.errors import PeerError

__all__ = ["measure", "run"]

TIB = 1 << 40
BIOS_HOLE = (0xF0000, 0x10000)
USED_FRACTION = 0.10
WALL_TARGET = 5.0
RSS_TARGET_MIB = 1024


def measure(ram: int = TIB) -> dict:
    """Build the guest, fill 10 %, report until idle (in this process); the figures."""
    import guest.reporting as reporting

    events, reporting.EVENTS_ENABLED = reporting.EVENTS_ENABLED, False
    try:
        return _measure(ram)
    finally:
        reporting.EVENTS_ENABLED = events


def _measure(ram: int) -> dict:
    import guest.reporting as reporting
    from guest.mm import MigrateType, PageAllocator, ZoneType

    t0 = time.perf_counter()
    mm = PageAllocator.for_size(ram, holes=[BIOS_HOLE])
    to_use = int(mm.totalram_pages() * USED_FRACTION)
    used = 0
    while used < to_use:
        if mm.alloc_pages(10, MigrateType.MOVABLE) is None:
            break
        used += 1024
    setup = time.perf_counter() - t0
    free_at_start = mm.nr_free_pages()

    now = [0.0]
    rep = reporting.PageReporting(mm, clock=lambda: now[0])
    t1 = time.perf_counter()
    rep.register()
    passes = 0
    while (deadline := rep.next_deadline()) is not None:
        now[0] = deadline
        rep.run_pass(lambda batch: 0)  # the device acks at once
        passes += 1
    wall = time.perf_counter() - t1

    reported = sum(1 << b.order for z in mm.zones for b in z.free_blocks.values() if b.reported)
    dma = sum(z.nr_free_pages for z in mm.zones if z.idx is ZoneType.DMA)
    stats = rep.statistics()
    return {
        "ram": ram,
        "setup_s": setup,
        "wall_s": wall,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "passes": passes,
        "virtual_s": now[0],
        "batches": stats.batches,
        "free_pages": free_at_start,
        "reported_pages": reported,
        "reportable_pages": free_at_start - dma,
    }


def _child(ram: int) -> dict:
    code = f"import json, benchmarks.reporting as b; print(json.dumps(b.measure({ram})))"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=root)
    if proc.returncode != 0:
        raise PeerError(f"reporting benchmark child failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ram: int = TIB) -> list[dict]:
    """Rows: wall time, peak RSS, reported fraction, passes and virtual time."""
    r = _child(ram)
    size = f"{ram / TIB:g}tib" if ram >= TIB else f"{ram >> 30}gib"
    fraction = r["reported_pages"] / r["reportable_pages"] if r["reportable_pages"] else 0.0
    return [
        {"name": f"report_all_{size}_wall", "value": round(r["wall_s"], 3), "unit": "s",
         "target": f"<= {WALL_TARGET}"},
        {"name": f"report_all_{size}_peak_rss", "value": round(r["peak_rss"] / (1 << 20), 1),
         "unit": "MiB", "target": f"<= {RSS_TARGET_MIB}"},
        {"name": f"report_all_{size}_reported_fraction", "value": round(fraction, 6),
         "unit": "", "target": ">= 0.999"},
        {"name": f"report_all_{size}_passes", "value": r["passes"], "unit": "",
         "target": None},
        {"name": f"report_all_{size}_virtual_time", "value": r["virtual_s"], "unit": "s",
         "target": None},
        {"name": f"report_all_{size}_setup", "value": round(r["setup_s"], 3), "unit": "s",
         "target": None},
    ]
