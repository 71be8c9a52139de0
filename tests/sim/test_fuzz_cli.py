"""``vballoon fuzz``: a real short libFuzzer run, and its errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sim import cli
from sim.fuzz import campaign

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not campaign.atheris_available(), reason="atheris is not installed")
def test_fuzz_three_seconds_exits_0_and_prints_exec_per_s(tmp_path: Path) -> None:
    corpus, findings = tmp_path / "corpus", tmp_path / "findings"
    proc = subprocess.run(
        [sys.executable, "-m", "sim.cli", "fuzz", "--seconds", "3", "--corpus", str(corpus),
         "--findings", str(findings)],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"([\d,]+) executions in \d+ s: ([\d,]+) exec/s", proc.stdout)
    assert match, proc.stdout
    assert int(match[1].replace(",", "")) > 0 and int(match[2].replace(",", "")) > 0
    assert "no findings" in proc.stdout
    assert sum(1 for p in corpus.iterdir() if p.name.startswith("seed-")) > 100


@pytest.mark.skipif(not campaign.atheris_available(), reason="atheris is not installed")
def test_fuzz_json_with_a_fixed_policy(tmp_path: Path, capsys) -> None:
    code = cli.main(["fuzz", "--seconds", "1", "--policy", "skip", "--json",
                     "--findings", str(tmp_path / "f"), "--corpus", str(tmp_path / "c")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["policy"] == "skip" and out["executions"] > 0
    assert out["new_findings"] == []


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--seconds", "soon"],
                                  ["--layouts", "-3", "--differential"],
                                  ["--policy", "panic"]])
def test_bad_options_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["fuzz", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_atheris_is_a_clear_error(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(campaign, "atheris_available", lambda: False)
    assert cli.main(["fuzz", "--seconds", "1", "--findings", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "atheris is not installed" in err and "vballoon[fuzz]" in err


def test_findings_path_that_is_a_file_exits_2(tmp_path: Path, capsys) -> None:
    if not campaign.atheris_available():
        pytest.skip("atheris is not installed")
    path = tmp_path / "file"
    path.write_text("x")
    assert cli.main(["fuzz", "--seconds", "1", "--findings", str(path)]) == 2
    assert "not a directory" in capsys.readouterr().err
