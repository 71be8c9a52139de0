"""``vballoon conform``: reports (table, JSON, JUnit), coverage and the command line."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from device.monitor import driver_requirements
from guest.villain import CATALOGUE, SUITE_CHECKS, catalogue
from protocol.requirements import REQUIREMENTS
from sim.cli import main
from sim.conform.coverage import automated_by, coverage_table
from sim.conform.device import run_ours_mmio_sync
from sim.conform.model import ModelRun, run_model_sync
from sim.conform.report import Report, Row, device_report, driver_report, junit

VERDICTS = {"PASS", "FAIL", "NOT-EXERCISED", "REJECT", "WEDGED", "SKIP"}


@pytest.fixture(scope="module")
def model_report() -> Report:
    return driver_report(run_model_sync(ModelRun(workload_steps=0)))


@pytest.fixture(scope="module")
def device_rep() -> Report:
    result = run_ours_mmio_sync("needs-reset", catalogue(["VALID", "DC-01", "BL-01"]))
    return device_report(result, {"policy": "needs-reset"})


def _check_json(body: dict) -> None:
    assert set(body) >= {"kind", "subject", "meta", "summary", "results"}
    assert sum(body["summary"].values()) == len(body["results"])
    for r in body["results"]:
        assert set(r) >= {"id", "verdict", "evidence"}
        assert r["verdict"] in VERDICTS and isinstance(r["evidence"], str) and r["evidence"]
    json.dumps(body)  # plain JSON all the way down


def test_driver_json_has_one_result_per_driver_requirement(model_report):
    body = model_report.to_json()
    _check_json(body)
    assert [r["id"] for r in body["results"]] == [r.id for r in driver_requirements()]
    assert body["kind"] == "driver" and body["meta"]["transport"] == "virtio-mmio"
    noted = {r["id"] for r in body["results"] if r.get("note")}
    assert noted == {"GEN-D-20", "BAL-D-7"} and body["unexplained_failures"] == 0


def test_device_json_lists_cases_then_suite_checks(device_rep):
    body = device_rep.to_json()
    _check_json(body)
    ids = [r["id"] for r in body["results"]]
    assert ids == ["VALID", "DC-01", "BL-01", *SUITE_CHECKS]
    dc01 = body["results"][1]
    assert dc01["verdict"] == "REJECT" and dc01["values"]["needs_reset"] is True


def test_junit_maps_verdicts_to_failures_and_skips(model_report, device_rep):
    root = ET.fromstring(junit([model_report, device_rep]))
    suites = root.findall("testsuite")
    assert len(suites) == 2
    for suite, report in zip(suites, (model_report, device_rep), strict=True):
        cases = suite.findall("testcase")
        assert len(cases) == len(report.rows) == int(suite.get("tests"))
        failed = [c for c in cases if c.find("failure") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        assert len(failed) == int(suite.get("failures"))
        assert len(skipped) == int(suite.get("skipped"))
        for case, row in zip(cases, report.rows, strict=True):
            assert case.get("name").startswith(row.id)
            assert (case.find("failure") is not None) == (row.verdict in ("FAIL", "WEDGED"))
            assert (case.find("skipped") is not None) == (
                row.verdict in ("NOT-EXERCISED", "SKIP"))
    gen20 = next(c for c in suites[0] if c.get("name", "").startswith("GEN-D-20"))
    assert "init_vqs" in gen20.find("failure").text


def test_a_failure_without_a_note_makes_the_report_fail():
    rows = (Row("A", "PASS", "ok"), Row("B", "FAIL", "bad", note="known"))
    assert Report("driver", "x", rows).ok
    assert not Report("device", "x", (*rows, Row("C", "WEDGED", "stuck"))).ok


def test_coverage_counts_what_is_built():
    table = coverage_table()
    assert table["total"] == len(REQUIREMENTS)
    assert 0 < table["automated"] <= table["declared"] <= table["total"]
    target = table["target"]
    assert target["automated"] + target["unobservable"] <= target["total"]
    assert target["automated"] >= 45
    assert automated_by(REQUIREMENTS["GEN-D-20"]) == ["monitor"]
    assert automated_by(REQUIREMENTS["SPL-V-4"]) == ["device suite"]
    assert automated_by(REQUIREMENTS["DC-01"]) == ["virtqueue", "device suite"]
    assert automated_by(REQUIREMENTS["LEG-1"]) == []
    gaps = {g["id"] for g in table["gaps"]}
    assert "GEN-D-20" not in gaps and "SPL-D-5" in gaps  # IN_ORDER is never offered


# ---- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["conform"],
    ["conform", "driver"],
    ["conform", "driver", "--model", "--uml"],
    ["conform", "device", "--ours", "--qemu"],
    ["conform", "driver", "--ours"],
    ["conform", "device", "--ours", "--policy", "lenient"],
    ["conform", "device", "--ours", "--transport", "pci"],
    ["conform", "device", "--ours", "--case", "NO-SUCH"],
    ["conform", "device", "--coverage"],
    ["conform", "device", "--ours", "--init-on-free"],
])
def test_bad_options_exit_2_naming_the_problem(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and err.count("\n") <= 3


def test_driver_model_json_and_junit(tmp_path, capsys):
    out = tmp_path / "model.xml"
    assert main(["conform", "driver", "--model", "--json", "--junit", str(out)]) == 0
    body = json.loads(capsys.readouterr().out)
    _check_json(body)
    assert body["summary"]["FAIL"] == 2
    suite = ET.parse(out).getroot().find("testsuite")
    assert int(suite.get("failures")) == 2


def test_device_ours_table_for_all_policies(capsys):
    code = main(["conform", "device", "--ours", "--policy", "all", "--case", "DC-01",
                 "--case", "VALID", "--brief"])
    assert code == 0
    out = capsys.readouterr().out
    for policy in ("needs-reset", "truncate", "skip"):
        assert f"policy {policy}" in out
    assert "DC-01" in out and "REJECT" in out


def test_coverage_json(capsys):
    assert main(["conform", "--coverage", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["target"]["total"] >= body["target"]["automated"] > 0
    assert {row["family"] for row in body["by_family"]} >= {"monitor", "suite", "ring"}


def test_every_case_has_a_report_title():
    rows = device_report(run_ours_mmio_sync("needs-reset", catalogue(["BL-16"]))).rows
    assert rows[0].title == next(c.title for c in CATALOGUE if c.id == "BL-16")
