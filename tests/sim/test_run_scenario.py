"""The default ``vballoon run`` scenario end to end, in virtual time, on a small guest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from guest.workload import WorkloadProfile
from sim.scenario import RunConfig, run_scenario

SMALL = dict(ram=256 << 20, balloon_bytes=32 << 20, churn_seconds=1.0, settle_seconds=2.0)


async def test_default_scenario_small_guest(autojump_clock) -> None:
    """Safety holds, hints save bytes, reported memory is zeros and was really returned."""
    result = await run_scenario(RunConfig(**SMALL))
    data = result.to_dict()
    mig = data["migration"]
    assert mig["with_hints"]["pages_lost"] == 0
    assert mig["without_hints"]["pages_lost"] == 0
    assert mig["with_hints"]["bytes_sent"] < mig["without_hints"]["bytes_sent"]
    assert mig["with_hints"]["hinted_pages_skipped"] > 0
    assert mig["without_hints"]["hinted_pages_skipped"] == 0
    assert data["reported_bytes"] > 0
    assert data["reported_reads_zero"]
    # Everything the device discarded was guest RAM the workload had written, so the memfd
    # gave back exactly the discarded bytes that held data; never more than was discarded.
    assert 0 < data["host_returned_bytes"] <= data["discarded_bytes"]
    assert data["balloon"]["actual"] == data["balloon"]["num_pages"] == (32 << 20) >> 12
    assert data["stats"]["stats"]["stat-total-memory"] > 0


async def test_idle_guest_hints_beat_no_hints(autojump_clock) -> None:
    """An idle guest after a burst: most free memory is stale data that only hints skip."""
    cfg = RunConfig(**SMALL, profile=WorkloadProfile.IDLE, reporting=False)
    data = (await run_scenario(cfg)).to_dict()
    mig = data["migration"]
    assert data["reported_bytes"] == 0
    assert mig["with_hints"]["bytes_sent"] < 0.5 * mig["without_hints"]["bytes_sent"]
    assert mig["with_hints"]["pages_lost"] == mig["without_hints"]["pages_lost"] == 0


def _vballoon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_run_json_has_the_documented_keys() -> None:
    proc = _vballoon("run", "--ram", "128M", "--balloon", "16M", "--duration", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("reported_bytes", "discarded_bytes", "host_returned_bytes"):
        assert isinstance(data[key], int)
    for run in ("with_hints", "without_hints"):
        assert isinstance(data["migration"][run]["bytes_sent"], int)
        assert data["migration"][run]["pages_lost"] == 0


@pytest.mark.parametrize("args", [
    ("run", "--ram", "12Q"),
    ("run", "--ram", "1M"),
    ("run", "--profile", "nonsense"),
    ("run", "--duration", "-3"),
    ("run", "--balloon", "3G", "--ram", "1G"),
    ("run", "--no-such-option"),
])
def test_bad_options_exit_2_with_a_message(args: tuple[str, ...]) -> None:
    proc = _vballoon(*args)
    assert proc.returncode == 2
    assert "error" in proc.stderr
    assert "Traceback" not in proc.stderr
