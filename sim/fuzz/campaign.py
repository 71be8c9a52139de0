"""A coverage-guided fuzzing campaign: seed a corpus, run libFuzzer in a child, read its stats.

:func:`run_campaign` is what ``vballoon fuzz`` and the fuzz benchmark call. The child is
``python -m sim.fuzz.runner`` (atheris keeps libFuzzer in-process and ends the process when the
time is up); its final statistics (``stat::number_of_executed_units``,
``stat::average_exec_per_sec``, ``Done N runs in S second(s)``) come back on its stderr.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError, PeerError
from sim.fuzz.findings import is_finding
from sim.fuzz.seeds import write_corpus

__all__ = ["CampaignResult", "atheris_available", "run_campaign"]

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_UNITS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_EXEC_S = re.compile(r"stat::average_exec_per_sec:\s*(\d+)")
_GRACE = 120.0


@dataclass(frozen=True, slots=True)
class CampaignResult:
    """What one campaign did."""

    executions: int
    seconds: float
    """libFuzzer's own fuzzing time."""
    exec_per_s: float
    wall_seconds: float
    seeds_written: int
    corpus_files: int
    new_findings: tuple[str, ...]
    findings_dir: str


def atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _findings(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if is_finding(p)} if directory.is_dir() else set()


def run_campaign(seconds: float, *, findings: str | Path, corpus: str | Path | None = None,
                 policy: str | None = None, max_len: int = 12000) -> CampaignResult:
    """Fuzz for ``seconds`` (at least 1); ConfigError without atheris, PeerError if the child
    fails or hangs."""
    if not atheris_available():
        raise ConfigError("atheris is not installed; install the fuzz extra: "
                          "pip install 'vballoon[fuzz]'")
    findings = Path(findings)
    if findings.exists() and not findings.is_dir():
        raise ConfigError(f"findings path {findings} exists and is not a directory")
    temp = None if corpus is not None else tempfile.mkdtemp(prefix="vballoon-corpus-")
    corpus_dir = Path(corpus if corpus is not None else temp)
    if corpus_dir.exists() and not corpus_dir.is_dir():
        raise ConfigError(f"corpus path {corpus_dir} exists and is not a directory")
    try:
        seeded = write_corpus(corpus_dir)
        before = _findings(findings)
        cmd = [sys.executable, "-m", "sim.fuzz.runner", "--findings", str(findings)]
        if policy:
            cmd += ["--policy", policy]
        cmd += ["--", str(corpus_dir), f"-max_total_time={max(1, round(seconds))}",
                "-print_final_stats=1", "-timeout=20", "-rss_limit_mb=4096",
                f"-max_len={max_len}"]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                  timeout=seconds + _GRACE, env=_child_env())
        except subprocess.TimeoutExpired as exc:
            raise PeerError(f"the libFuzzer process did not stop within {seconds + _GRACE} s"
                            ) from exc
        wall = time.perf_counter() - started
        units, done, rate = (_UNITS.search(proc.stderr), _DONE.search(proc.stderr),
                             _EXEC_S.search(proc.stderr))
        if units is None and done is None:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise PeerError(f"the libFuzzer process failed (exit status {proc.returncode}):\n"
                            f"{tail}")
        runs = int(units[1]) if units else int(done[1])
        spent = max(float(done[2]) if done else wall, 1e-9)
        return CampaignResult(
            executions=runs, seconds=spent,
            exec_per_s=float(rate[1]) if rate else runs / spent, wall_seconds=wall,
            seeds_written=seeded, corpus_files=sum(1 for _ in corpus_dir.iterdir()),
            new_findings=tuple(sorted(_findings(findings) - before)),
            findings_dir=str(findings))
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
