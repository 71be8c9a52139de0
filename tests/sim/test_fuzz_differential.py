"""Differential fuzzing against QEMU: the classifier, the QEMU model, and a real run (peer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from sim.fuzz.classify import CATEGORIES, Verdict, classify
from sim.fuzz.differential import (
    POOL_PFN,
    layouts_for_qemu,
    microvm_geometry,
    model_verdict,
    our_verdict,
    run_differential,
)
from sim.fuzz.qemu_model import DEVIATIONS, ModelChain
from virtqueue import events
from virtqueue.cases import RandomChoices
from virtqueue.strategies import Options, build_near_valid, build_valid

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet():
    with events.disabled():
        yield


def _chain(head: int, ok: bool = True, pfns=(), devs=()) -> ModelChain:
    return ModelChain(head, ok, frozenset(pfns), tuple(devs))


def _verdict(chains, stopped: bool, rule=None) -> Verdict:
    ok = [c for c in chains if c.accepted]
    return Verdict(len(ok), tuple(c.head for c in ok), stopped,
                   frozenset().union(*(c.pfns for c in ok)), rule, tuple(chains))


def test_classify_agreement_gap_bug_and_unexplained() -> None:
    ours = _verdict([_chain(0, pfns={1}), _chain(3, False)], True, "IN-01")
    model = _verdict([_chain(0, pfns={1}), _chain(3, pfns={2},
                                                  devs=["indirect-without-feature"])], False)
    qemu = Verdict(model.used_idx, model.slots, False, model.discarded)
    assert classify(ours, Verdict(1, (0,), True, frozenset({1})), ours) is None
    c = classify(ours, qemu, model)
    assert (c.category, c.rule, c.deviation, c.known, c.entry, c.difference) == (
        "qemu-gap", "IN-01", "indirect-without-feature", True, 1, "verdict")
    plain = _verdict([_chain(0, pfns={1}), _chain(3, pfns={2})], False)
    assert classify(ours, qemu, plain).category == "our-bug"
    odd = Verdict(5, (0, 0, 0, 0, 0), False, frozenset())
    assert classify(ours, odd, model).category == "unexplained"
    assert {d.category for d in DEVIATIONS.values()} <= set(CATEGORIES)


def _both(layout, pool_size: int):
    memory = layout.geometry.memory()
    try:
        layout.write_into(memory)
        pool = range(POOL_PFN, POOL_PFN + pool_size)
        return model_verdict(layout, memory, pool), our_verdict(layout, memory, pool)
    finally:
        memory.close()


def test_model_and_ours_agree_on_valid_direct_layouts() -> None:
    for layout, pool in layouts_for_qemu(60, seed="unit", valid_share=1.0):
        model, ours = _both(layout, pool)
        assert not ours.stopped and ours.used_idx == len(layout.expected)
        assert ours.discarded == frozenset(range(POOL_PFN, POOL_PFN + pool))
        if not any(dev for c in model.chains for dev in c.deviations):
            assert model.same(ours), layout.describe()


def test_model_records_the_known_deviations() -> None:
    geometry = microvm_geometry()
    opts = Options(align4=True, max_len=16, big_len=16, start=0, max_chains=3)
    for kind, dev in (("indirect_without_feature", "indirect-without-feature"),
                      ("nested_indirect", "nested-indirect"),
                      ("avail_idx_jump", "avail-idx-unchecked")):
        hits = 0
        for seed in range(10):
            layout = build_near_valid(RandomChoices(seed), size=8, kind=kind, geometry=geometry,
                                      options=opts)
            model, _ = _both(layout, 0)
            hits += any(dev in c.deviations for c in model.chains)
        assert hits, kind
    layout = build_valid(RandomChoices(1), size=4, geometry=geometry, options=opts)
    model, ours = _both(layout, 0)
    assert ours.stopped is False


@pytest.mark.peer
def test_differential_run_against_qemu(qemu_binary: str) -> None:
    report = trio.run(lambda: run_differential(150, seed="test", binary=qemu_binary, batch=80))
    assert len(report.outcomes) == 150
    summary = report.summary()
    assert summary["agree"] > 0
    for o in report.disagreements:
        c = o.classification
        assert c.category in CATEGORIES and c.reason
        assert c.category not in ("our-bug", "unexplained"), (o.index, o.layout.describe(), c)
    for o in report.outcomes:  # the QEMU model predicts QEMU on every layout
        assert o.model.same(o.qemu), (o.index, o.layout.describe())
    assert "qemu-gap" in summary["by_category"]  # e.g. INDIRECT without the feature


@pytest.mark.peer
def test_differential_cli_json(qemu_binary: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sim.cli", "fuzz", "--differential", "--layouts", "40",
         "--seed", "cli", "--json", "--qemu", qemu_binary],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["summary"]["layouts"] == 40
    assert all(row["category"] in ("qemu-gap", "spec-ambiguity") for row in out["table"])
