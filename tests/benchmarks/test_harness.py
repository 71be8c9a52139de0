"""The benchmark harness on fake benchmark modules injected through its registry."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import pytest

from benchmarks import harness
from benchmarks.harness import EXIT_FAILED, EXIT_OK, EXIT_USAGE, JSON_KEYS, Row
from protocol.errors import PeerError, UsageError

FAKE_ROWS = [
    {"name": "chains_per_s", "value": 2_500_000.0, "unit": "ops/s", "target": ">= 1e6"},
    {"name": "kick_latency", "value": 7.5, "unit": "us", "target": "<= 5"},
    {"name": "pages", "value": 4096, "unit": "pages"},
    {"name": "fake.violations", "value": 0, "unit": "", "target": "== 0"},
]


def _module(name: str, run=None) -> types.ModuleType:
    module = types.ModuleType(name)
    if run is not None:
        module.run = run
    return module


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> dict[str, str]:
    """fake (rows above), absent (no module), norun (no run()), crash (raises), peer (no UML)."""

    def fake_run() -> list[dict]:
        calls.append("fake")
        return [dict(r) for r in FAKE_ROWS]

    def crash() -> list[dict]:
        calls.append("crash")
        raise RuntimeError("ring exploded")

    def peer() -> list[dict]:
        raise PeerError("User-Mode Linux kernel not found")

    modules = {
        "vb_test_fake": _module("vb_test_fake", fake_run),
        "vb_test_norun": _module("vb_test_norun"),
        "vb_test_crash": _module("vb_test_crash", crash),
        "vb_test_peer": _module("vb_test_peer", peer),
    }
    for mod_name, module in modules.items():
        monkeypatch.setitem(sys.modules, mod_name, module)
    reg = {"fake": "vb_test_fake", "absent": "benchmarks.vb_test_absent",
           "norun": "vb_test_norun", "crash": "vb_test_crash", "peer": "vb_test_peer"}
    monkeypatch.setattr(harness, "REGISTRY", reg)
    return reg


def test_table_lists_every_row_and_exit_is_zero_with_missed_targets(
        registry: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.main(["fake"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines()
             if "fake." in line and len(line.split()) > 1}
    assert set(lines) == {"fake.chains_per_s", "fake.kick_latency", "fake.pages",
                          "fake.violations"}
    assert "2,500,000" in lines["fake.chains_per_s"] and ">= 1e6" in lines["fake.chains_per_s"]
    assert lines["fake.chains_per_s"].split()[-2] == "yes"
    assert "7.5" in lines["fake.kick_latency"] and "NO" in lines["fake.kick_latency"]
    assert "4,096" in lines["fake.pages"] and "yes" not in lines["fake.pages"]
    assert "yes" in lines["fake.violations"]
    for header in ("name", "value", "unit", "target", "met"):
        assert header in out


def test_plain_fallback_without_rich(registry: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails -> plain text
    assert harness.main(["fake"]) == EXIT_OK
    out = io.StringIO()
    harness.render_plain([harness.normalize_row("fake", r) for r in FAKE_ROWS], out)
    assert capsys.readouterr().out == out.getvalue()


def test_plain_table_layout() -> None:
    out = io.StringIO()
    harness.render_plain([Row("a.x", 1.5, "ms", "<= 2", True),
                          Row("a.longer_name", 123456, "ops/s", None, None),
                          Row("a.y", None, "", ">= 1", None)], out)
    assert out.getvalue().splitlines() == [
        "name             value  unit   target  met",
        "-------------  -------  -----  ------  ---",
        "a.x                1.5  ms     <= 2    yes",
        "a.longer_name  123,456  ops/s  -       -",
        "a.y                  -         >= 1    -",
    ]


def test_json_rows_have_exactly_the_five_keys(registry: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.main(["fake", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [tuple(r) for r in rows] == [JSON_KEYS] * len(FAKE_ROWS)
    assert rows == [
        {"name": "fake.chains_per_s", "value": 2_500_000.0, "unit": "ops/s", "target": ">= 1e6",
         "met": True},
        {"name": "fake.kick_latency", "value": 7.5, "unit": "us", "target": "<= 5", "met": False},
        {"name": "fake.pages", "value": 4096, "unit": "pages", "target": None, "met": None},
        {"name": "fake.violations", "value": 0, "unit": "", "target": "== 0", "met": True},
    ]


def test_unknown_name_is_a_usage_error(registry: dict[str, str], calls: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.main(["fake", "nosuch"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'nosuch'" in err
    assert all(name in err for name in registry)
    assert calls == [], "nothing runs when a name is wrong"


def test_unavailable_benchmarks_are_named_and_skipped(registry: dict[str, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.main(["--json", "absent", "norun", "peer", "fake"]) == EXIT_OK
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == len(FAKE_ROWS)
    err = captured.err.splitlines()
    assert err[0].startswith("absent: not available") and "benchmarks.vb_test_absent" in err[0]
    assert err[1].startswith("norun: not available") and "run()" in err[1]
    assert err[2].startswith("peer: not available") and "User-Mode Linux" in err[2]


def test_all_runs_the_whole_registry_in_order(registry: dict[str, str], calls: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert harness.main(["--json"]) == EXIT_FAILED  # crash fails; the others still report
    captured = capsys.readouterr()
    assert calls == ["fake", "crash"]
    assert len(json.loads(captured.out)) == len(FAKE_ROWS)
    assert "crash: FAILED: RuntimeError: ring exploded" in captured.err


@pytest.mark.parametrize(("row", "complaint"), [
    ({"value": 1}, "without a name"),
    ({"name": "x", "value": "fast"}, "finite number"),
    ({"name": "x", "value": float("nan")}, "finite number"),
    ({"name": "x", "value": True}, "finite number"),
    ({"name": "x", "value": 1, "targt": ">= 1"}, "unknown keys"),
    ({"name": "x", "value": 1, "target": 5}, "target must be a string"),
    ({"name": "x", "value": 1, "target": "fast enough"}, "not '<op> <number>'"),
    ({"name": "x", "value": 1, "met": "yes"}, "met must be"),
    ({"name": "x", "value": 1, "unit": 3}, "unit must be"),
    (["x", 1], "must be a dict"),
])
def test_malformed_rows_fail_the_run(monkeypatch: pytest.MonkeyPatch, row: object,
                                     complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "vb_test_bad", _module("vb_test_bad", lambda: [row]))
    monkeypatch.setattr(harness, "REGISTRY", {"bad": "vb_test_bad"})
    assert harness.main(["bad"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("bad: FAILED: UsageError") and complaint in err


@pytest.mark.parametrize(("target", "value", "met"), [
    (">= 10", 10, True), (">= 10", 9.99, False), ("< 5", 5, False), ("<=1e-3", 0.001, True),
    ("> -1", 0, True), ("== 0", 0.0, True), ("<= 2", None, None), (None, 3, None),
])
def test_evaluate_target(target: str | None, value: float | None, met: bool | None) -> None:
    assert harness.evaluate_target(target, value) is met


def test_explicit_met_wins_and_allows_a_worded_target() -> None:
    row = harness.normalize_row("b", {"name": "b.sound", "value": 3, "target": "all pass",
                                      "met": True})
    assert row == Row("b.sound", 3, "", "all pass", True)
    with pytest.raises(UsageError):
        harness.normalize_row("b", {"name": "x", "value": 3, "target": "all pass"})


def test_the_real_registry_lists_the_planned_benchmarks() -> None:
    assert list(harness.REGISTRY) == ["ring", "reporting", "migration", "scale", "uml", "fuzz",
                                      "ranges"]
    assert all(path == f"benchmarks.{name}" for name, path in harness.REGISTRY.items())


def test_python_dash_m_exit_code_for_unknown_name() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "nosuch"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == EXIT_USAGE
    assert "unknown benchmark 'nosuch'" in proc.stderr and "ring" in proc.stderr
