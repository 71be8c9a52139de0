"""Run one ``vballoon run`` scenario in a fresh interpreter and print its figures as JSON.

The migration and scale benchmarks measure the *whole* simulated machine (the Linux-like driver,
the device on virtio-mmio, the VMM) this way, so ``ru_maxrss`` is the peak of that run alone.
Usage: ``python -m benchmarks.scenario_child '{"ram": 8589934592, "profile": "idle", ...}'``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

__all__ = ["run_child"]


def _measure(fields: dict[str, Any]) -> dict[str, Any]:
    from guest.balloon import HintMode
    from guest.workload import WorkloadProfile
    from sim.logs import configure
    from sim.scenario import RunConfig, run_scenario_sync

    configure("error")
    if "profile" in fields:
        fields["profile"] = WorkloadProfile(fields["profile"])
    if "hint_mode" in fields:
        fields["hint_mode"] = HintMode(fields["hint_mode"])
    t0 = time.perf_counter()
    data = run_scenario_sync(RunConfig(**fields)).to_dict()
    wall = time.perf_counter() - t0
    mig = data["migration"]
    return {
        "wall_s": wall,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "with_bytes": mig["with_hints"]["bytes_sent"],
        "without_bytes": mig["without_hints"]["bytes_sent"],
        "pages_lost": max(mig["with_hints"]["pages_lost"], mig["without_hints"]["pages_lost"]),
        "hinted_bytes": data["hinted_bytes"],
        "reported_bytes": data["reported_bytes"],
        "hinted_pages_reused": data["hinted_pages_reused"],
    }


def run_child(fields: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`_measure` in a child interpreter; raises RuntimeError with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scenario_child", json.dumps(fields)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"scenario child failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_measure(json.loads(sys.argv[1]))) + "\n")
