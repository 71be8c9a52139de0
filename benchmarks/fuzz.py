"""Fuzz throughput: layouts per second through the checking harness, and atheris's exec/s.

``harness_layouts_per_s`` runs the seed corpus (valid, near-valid, arbitrary and hand-built
layouts in every size up to 256, builder and driver programs; :mod:`sim.fuzz.seeds`) through
:func:`sim.fuzz.target.fuzz_one` again and again for about two seconds of CPU time, with every
check on (reference model, step counter, checked memory, read-only snapshot), and divides by the
process CPU time: what one core does, whatever else the machine runs. Target: 2,000 layouts/s.
``atheris_exec_per_s`` is a five-second libFuzzer run (instrumented code, mutation, coverage
feedback included) when atheris is installed; informational.
"""

from __future__ import annotations

import logging
import tempfile
import time

import structlog

from sim.fuzz import target
from sim.fuzz.campaign import atheris_available, run_campaign
from sim.fuzz.seeds import seed_inputs
from virtqueue import events

__all__ = ["run"]

HARNESS_CPU_SECONDS = 2.0
ATHERIS_SECONDS = 5


def _harness() -> tuple[float, float, int]:
    inputs = [data for _, data in seed_inputs()]
    target.fuzz_one(inputs[0])  # warm up imports and caches
    runs = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.process_time() - cpu0 < HARNESS_CPU_SECONDS:
        for data in inputs:
            target.fuzz_one(data)
        runs += len(inputs)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return runs / cpu, runs / wall, target.STATS.max_steps


def run() -> list[dict]:
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        with events.disabled():
            cpu_rate, wall_rate, max_steps = _harness()
    finally:
        structlog.configure(**config)
    rows = [
        {"name": "harness_layouts_per_s", "value": round(cpu_rate), "unit": "layouts/s",
         "target": ">= 2000"},
        {"name": "harness_layouts_per_s_wall", "value": round(wall_rate), "unit": "layouts/s"},
        {"name": "max_parser_calls_per_pop", "value": max_steps, "unit": ""},
    ]
    exec_s = None
    if atheris_available():
        with tempfile.TemporaryDirectory(prefix="vballoon-bench-fuzz-") as tmp:
            result = run_campaign(ATHERIS_SECONDS, findings=f"{tmp}/findings",
                                  corpus=f"{tmp}/corpus")
            exec_s = round(result.exec_per_s)
    rows.append({"name": "atheris_exec_per_s", "value": exec_s, "unit": "exec/s"})
    return rows
