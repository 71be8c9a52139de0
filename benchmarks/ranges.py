"""The host's range recorder (device/ranges.py RangeSet) against the ``portion`` library.

The brief said: take a kept library if it is fast enough, else a small sorted structure of our
own, measured. The workload is what the device does: many small ranges added and removed
(inflate PFNs, hints, dirty pages), with overlap queries. ``portion`` is not a dependency; when it
is absent its rows say so.
"""

from __future__ import annotations

import random
import time

from device.ranges import RangeSet

__all__ = ["run"]

OPS = 20_000


def _ops(seed: int = 1) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(OPS):
        start = rng.randrange(1 << 20) * 4096
        length = rng.choice((4096, 8192, 1 << 21, 4 << 20))
        out.append((rng.choice(("add", "add", "remove", "overlap")), start, start + length))
    return out


def _rangeset(ops: list[tuple[str, int, int]]) -> float:
    r = RangeSet()
    t0 = time.perf_counter()
    for op, s, e in ops:
        if op == "add":
            r.add(s, e)
        elif op == "remove":
            r.remove(s, e)
        else:
            r.overlap(s, e)
    return time.perf_counter() - t0


def _portion(ops: list[tuple[str, int, int]]) -> float | None:
    try:
        import portion as P
    except ImportError:
        return None
    r = P.empty()
    t0 = time.perf_counter()
    for op, s, e in ops:
        iv = P.closedopen(s, e)
        if op == "add":
            r = r | iv
        elif op == "remove":
            r = r - iv
        else:
            _ = r & iv
    return time.perf_counter() - t0


def run() -> list[dict]:
    ops = _ops()
    ours = _rangeset(ops)
    theirs = _portion(ops)
    rows = [{"name": "rangeset_ops_per_s", "value": round(OPS / ours), "unit": "ops/s"}]
    if theirs is None:
        rows.append({"name": "portion_ops_per_s", "value": None, "unit": "ops/s",
                     "target": "portion not installed (pip install portion)", "met": None})
    else:
        rows += [{"name": "portion_ops_per_s", "value": round(OPS / theirs), "unit": "ops/s"},
                 {"name": "rangeset_speedup_over_portion", "value": round(theirs / ours, 1),
                  "unit": "x", "target": ">= 1"}]
    return rows
