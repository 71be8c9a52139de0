"""Every saved fuzz finding replays clean: the bug it found stays fixed.

``tests/findings/`` holds inputs that once broke a check of the fuzz harness (``vballoon fuzz``
writes them as ``finding-*.json``; raw libFuzzer ``crash-*`` files are accepted too). Each file
is one test: decode it, run it through every check of :func:`sim.fuzz.target.fuzz_one` again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.fuzz.findings import is_finding, replay
from virtqueue import events

FINDINGS = Path(__file__).resolve().parents[1] / "findings"
FILES = sorted(p for p in FINDINGS.iterdir() if is_finding(p)) if FINDINGS.is_dir() else []


def test_the_findings_directory_is_not_empty() -> None:
    assert FILES, f"no findings in {FINDINGS}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_finding_replays_clean(path: Path) -> None:
    with events.disabled():
        replay(path)
