"""The driver conformance monitor on vballoon's guest model (sim.conform.model), and its ledger.

The model reproduces Linux 6.1's driver, so its report must hold only PASS, NOT-EXERCISED and
FAILs that are explained as documented upstream Linux behaviour.
"""

from __future__ import annotations

import pytest

from device.monitor import Capabilities, DriverMonitor, Ledger, Verdict, driver_requirements
from device.monitor.deviations import LINUX_DEVIATIONS, explain
from device.monitor.grades import Grade
from guest.balloon import BalloonOptions
from protocol.requirements import REQUIREMENTS
from sim.conform.model import ModelRun, run_model_sync

PASS, FAIL, NOT = Verdict.PASS, Verdict.FAIL, Verdict.NOT_EXERCISED


@pytest.fixture(scope="module")
def linux_default():
    """The model as a default Linux guest (no page poisoning)."""
    return run_model_sync(ModelRun())


@pytest.fixture(scope="module")
def init_on_free():
    """The model with init_on_free: PAGE_POISON kept, poison_val 0."""
    return run_model_sync(ModelRun(options=BalloonOptions(init_on_free=True,
                                                          max_queue_size=64)))


# ---- the ledger ---------------------------------------------------------------------------------

def test_ledger_turns_observations_into_grades():
    led = Ledger()
    led.ok("A", "first", n=1)
    led.ok("A", "second", n=2)
    led.ok("B", "fine")
    led.fail("B", "broken here", head=3)
    led.fail("B", "broken again", head=4)
    a, b = led.grade("A", reason="-"), led.grade("B", reason="-")
    c = led.grade("C", reason="never happened")
    assert (a.verdict, a.checks, a.values) == (PASS, 2, {"n": 2})
    assert "second" in a.evidence
    assert (b.verdict, b.failures, b.checks) == (FAIL, 2, 3)
    assert b.evidence.startswith("broken here") and b.values == {"head": 3}  # first failure
    assert (c.verdict, c.evidence) == (NOT, "never happened")


def test_deviation_notes_only_explain_the_failure_they_describe():
    stats = Grade("GEN-D-20", FAIL, "kick", {"queue_name": "stats"})
    inflate = Grade("GEN-D-20", FAIL, "kick", {"queue_name": "inflate"})
    assert explain(stats, LINUX_DEVIATIONS).note and "init_vqs" in explain(stats).note
    assert explain(inflate).note is None
    assert explain(Grade("GEN-D-20", PASS, "ok")).note is None


def test_an_empty_run_grades_everything_not_exercised_with_reasons():
    mon = DriverMonitor(Capabilities("vhost-user", status=False, registers=False,
                                     guest_writes=False))
    result = mon.finish("nothing")
    assert [g.id for g in result.grades] == [r.id for r in driver_requirements()]
    assert all(g.verdict is NOT and g.evidence for g in result.grades)
    assert "SET_STATUS" in result.grade("GEN-D-18").evidence
    assert "no virtio-mmio registers" in result.grade("MMIO-D-1").evidence
    assert "simulated machine" in result.grade("BAL-D-12").evidence
    assert result.grade("SPL-D-19").evidence.startswith("not observable: memory barriers")


# ---- the guest model -------------------------------------------------------------------------

def test_every_driver_requirement_is_graded_once(linux_default):
    ids = [g.id for g in linux_default.grades]
    assert ids == [r.id for r in driver_requirements()]
    assert all(REQUIREMENTS[i].side in ("driver", "both") for i in ids)


def test_model_fails_only_where_upstream_linux_does(linux_default):
    fails = {g.id: g for g in linux_default.grades if g.verdict is FAIL}
    assert set(fails) == {"GEN-D-20", "BAL-D-7"}
    assert all(g.note for g in fails.values())
    assert fails["GEN-D-20"].values["queue_name"] == "stats"  # the stats kick in init_vqs
    assert fails["BAL-D-7"].values["then_reset"] is True  # remove_common deflating all


def test_model_passes_the_core_driver_rules(linux_default):
    for rid in ("GEN-D-1", "GEN-D-2", "GEN-D-5", "GEN-D-6", "GEN-D-8", "GEN-D-9", "GEN-D-12",
                "GEN-D-18", "GEN-D-21", "SPL-D-1", "SPL-D-2", "SPL-D-11", "SPL-D-14",
                "SPL-D-15", "SPL-D-16", "SPL-D-18", "BAL-D-1", "BAL-D-4", "BAL-D-9",
                "BAL-D-10", "BAL-D-12", "BAL-D-13", "BAL-D-14", "BAL-D-16", "BAL-D-17",
                "BAL-D-18", "BAL-D-19", "BAL-D-23", "BAL-D-24", "BAL-D-25", "BAL-D-26",
                "BAL-D-27", "BAL-D-28", "BAL-D-29", "BAL-D-39", "BAL-D-41", "MMIO-D-1",
                "MMIO-D-2", "MMIO-D-4", "MMIO-D-5", "MMIO-D-6", "MMIO-D-7", "MMIO-D-8",
                "DC-01", "DC-06", "IN-02", "AV-01", "AV-04", "BL-01", "BL-04", "BL-17",
                "BL-23"):
        g = linux_default.grade(rid)
        assert g.verdict is PASS and g.checks >= 1, (rid, g)


def test_model_declines_page_poison_so_its_rules_are_not_exercised(linux_default):
    for rid in ("BAL-D-34", "BAL-D-35", "BAL-D-36", "BAL-D-38"):
        g = linux_default.grade(rid)
        assert g.verdict is NOT and "PAGE_POISON" in g.evidence, (rid, g)


def test_init_on_free_grades_the_poison_rules(init_on_free):
    for rid in ("BAL-D-34", "BAL-D-35", "BAL-D-36", "BL-25"):
        assert init_on_free.grade(rid).verdict is PASS, rid
    assert init_on_free.grade("BAL-D-35").values["poison_val"] == 0


def test_init_on_free_reports_only_zeroed_pages(init_on_free):
    """Regression (monitor finding): freed workload pages are zeroed under init_on_free, as
    Linux's free_pages() does, so a reported page holds the poison value 0 (BAL-D-38)."""
    assert init_on_free.grade("BAL-D-38").verdict is PASS


def test_deferring_the_stats_kick_passes_gen_d_20():
    options = BalloonOptions(stats_kick_before_driver_ok=False, max_queue_size=64)
    result = run_model_sync(ModelRun(options=options, workload_steps=0))
    g = result.grade("GEN-D-20")
    assert g.verdict is PASS and g.checks > 1


def test_without_provocation_nothing_undefined_is_offered():
    result = run_model_sync(ModelRun(provoke=False, workload_steps=0))
    assert result.grade("GEN-D-8").verdict is NOT
    assert result.grade("SPL-D-15").verdict is NOT
    assert result.grade("GEN-D-6").verdict is PASS
    assert "injected" in result.grade("GEN-D-6").values
