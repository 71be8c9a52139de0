"""The device conformance suite (guest.villain) against vballoon's device and broken devices.

Our device runs in process behind virtio-mmio in virtual time (sim.conform.device), so the
whole catalogue takes a fraction of a second per error policy.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from device.balloon import BalloonDevice
from device.mmio import MmioDevice
from guest.villain import (
    CATALOGUE,
    DeviceVerdict,
    MmioPort,
    Suite,
    catalogue,
    graded_requirements,
)
from guest.villain.layouts import build_case_layout, lenient_pfns, mixed_chains, pool_pfns
from protocol.requirements import REQUIREMENTS
from sim.conform.device import OUR_FEATURES, OUR_RAM, our_layout, run_ours_mmio_sync
from virtqueue.memory import GuestMemory

V = DeviceVerdict


@pytest.fixture(scope="module")
def needs_reset():
    return run_ours_mmio_sync("needs-reset")


def test_every_case_names_a_catalogue_requirement():
    assert len({c.id for c in CATALOGUE}) == len(CATALOGUE)
    for case in CATALOGUE:
        assert case.rule in REQUIREMENTS, case.id
        assert case.breaks is None or case.breaks in REQUIREMENTS, case.id
    assert graded_requirements() <= set(REQUIREMENTS)


def test_needs_reset_device_passes_or_rejects_every_case(needs_reset):
    verdicts = {r.case: r.verdict for r in needs_reset.cases}
    assert list(verdicts) == [c.id for c in CATALOGUE]
    assert set(verdicts.values()) <= {V.PASS, V.REJECT}, verdicts
    for case in CATALOGUE:
        if case.kind == "valid":
            assert verdicts[case.id] is V.PASS, case.id
        elif case.kind == "layout" and case.id != "AV-04":
            r = needs_reset.result(case.id)
            assert r.verdict is V.REJECT and r.values["needs_reset"], case.id
            assert r.values["config_interrupt"] and r.values["recovered"], case.id
    # a duplicate head that is no longer in flight is a fine chain for a serial device
    assert verdicts["AV-04"] is V.PASS


def test_needs_reset_device_meets_the_suite_wide_requirements(needs_reset):
    checks = {r.case: r.verdict for r in needs_reset.checks}
    assert checks == {"GEN-V-2": V.PASS, "GEN-V-3": V.PASS, "SPL-V-2": V.PASS,
                      "SPL-V-9": V.PASS, "SPL-V-6": V.PASS}


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_lenient_policies_never_fail(policy):
    result = run_ours_mmio_sync(policy)
    verdicts = {r.case: r.verdict for r in result.cases}
    assert set(verdicts.values()) <= {V.PASS, V.REJECT}
    # skip returns bad chains untouched; truncate takes what came before the violation
    assert result.result("DC-01").verdict is (V.REJECT if policy == "skip" else V.PASS)
    assert result.result("GEN-V-2").verdict is V.SKIP  # no violation needs a reset


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_lenient_policies_stay_idle_after_a_bogus_avail_idx(policy):
    """Regression (conformance suite finding): under skip/truncate a bogus avail.idx (AV-01)
    made the queue task spin, since enable_notification kept reporting more work."""
    result = run_ours_mmio_sync(policy, catalogue(["AV-01"]))
    assert result.result("AV-01").verdict is not V.WEDGED


# ---- broken devices are caught ---------------------------------------------------------------

class EagerDevice(BalloonDevice):
    """Serves its queues before DRIVER_OK."""

    def attach_queue(self, index, ring, memory, notify_used):
        super().attach_queue(index, ring, memory, notify_used)
        self.activate()


class StuckDevice(BalloonDevice):
    """Never takes a buffer: every queue looks empty to it."""

    def poll_queue(self, queue, *, budget=64):
        return False


class GreedyDevice(BalloonDevice):
    """Takes any feature set, offered or not."""

    def set_features(self, mask):
        return super().set_features(mask & self.offered_features())


def _suite(device_class, ids):
    async def main():
        memory = GuestMemory.create(OUR_RAM)
        try:
            device = device_class(memory, features=OUR_FEATURES)
            mmio = MmioDevice(device, memory, irq=lambda: None)
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                port = MmioPort(mmio, memory, our_layout(),
                                settle=trio.testing.wait_all_tasks_blocked,
                                alive=lambda: True, name=device_class.__name__, wait=2.0)
                result = await Suite(port).run(catalogue(ids))
                nursery.cancel_scope.cancel()
            return result
        finally:
            memory.close()

    return trio.run(main, clock=trio.testing.MockClock(rate=1.0, autojump_threshold=0))


def test_a_device_that_serves_before_driver_ok_fails_gen_v_1():
    r = _suite(EagerDevice, ["GEN-V-1"]).result("GEN-V-1")
    assert r.verdict is V.FAIL and r.values["used_before_driver_ok"]


def test_a_device_that_never_answers_is_wedged():
    result = _suite(StuckDevice, ["BL-01", "VALID"])
    bl01 = result.result("BL-01")
    assert bl01.verdict is V.WEDGED and "not used" in bl01.evidence
    assert result.result("VALID").verdict is V.FAIL


def test_a_device_that_takes_unoffered_features_fails_gen_v_5():
    r = _suite(GreedyDevice, ["GEN-V-5"]).result("GEN-V-5")
    assert r.verdict is V.FAIL and r.values["features_ok"]


# ---- the layouts ---------------------------------------------------------------------------

def test_case_layouts_are_reproducible_and_isolated():
    geometry = our_layout().geometry
    pool = our_layout().pool[0]
    for case in CATALOGUE:
        if case.kind not in ("layout", "valid"):
            continue
        a = build_case_layout(case.id, case.mutation, case.queue_size, geometry, pool)
        b = build_case_layout(case.id, case.mutation, case.queue_size, geometry, pool)
        assert a.layout.to_dict() == b.layout.to_dict(), case.id
        assert a.layout.rule == (None if case.kind == "valid" else case.rule), case.id
        assert mixed_chains(a.layout) == (1 if case.id == "SPL-V-4" else 0), case.id


def test_lenient_walk_follows_what_a_checkless_device_would_take():
    geometry, pool_first = our_layout().geometry, our_layout().pool[0]
    pool = range(pool_first, pool_first + 64)
    for case_id, pfns in (("SPL-V-3", 3), ("SPL-V-4", 3), ("SPL-V-1", 5)):
        cl = build_case_layout(case_id, None, 8, geometry, pool_first)
        taken = set().union(*(lenient_pfns(cl.layout, h, pool) for h in cl.layout.entries))
        assert taken == {pool_first + k for k in range(pfns)}, case_id
        expected = set().union(*(pool_pfns(c.data, pool) for c in cl.layout.expected))
        # SPL-V-1 straddles PFNs across descriptors: only whole chains give them all
        assert expected == taken, case_id
