"""The driver monitor on the real Linux 6.1 virtio_balloon (User-Mode Linux over vhost-user).

Every FAIL of the real driver must be explained as documented upstream behaviour; what
vhost-user cannot show (status, registers, the guest's own RAM writes) must be NOT-EXERCISED
with that reason.
"""

from __future__ import annotations

import pytest
import trio

from device.monitor import Verdict
from sim.conform.uml import run_uml
from sim.uml import find_kernel

try:
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.peers import require_peer

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def uml_kernel():
    return require_peer("User-Mode Linux", find_kernel)


async def test_linux_driver_report(uml_kernel, record_property):
    with trio.fail_after(60):
        result = await run_uml(kernel=uml_kernel)
    fails = {g.id: g for g in result.grades if g.verdict is Verdict.FAIL}
    record_property("linux_summary", result.summary())
    record_property("linux_fails", {k: g.evidence for k, g in fails.items()})
    assert all(g.note for g in fails.values()), fails  # findings would be listed here
    for rid in ("GEN-D-5", "GEN-D-6", "GEN-D-8", "GEN-D-9", "GEN-D-21", "SPL-D-11", "SPL-D-16",
                "SPL-D-15", "BAL-D-1", "BAL-D-4", "BAL-D-13", "BAL-D-14", "BAL-D-17",
                "BAL-D-18", "BAL-D-23", "BAL-D-25", "BAL-D-29", "BAL-D-38", "BL-01", "BL-16",
                "DC-06", "AV-01"):
        assert result.grade(rid).verdict is Verdict.PASS, (rid, result.grade(rid))
    for rid in ("GEN-D-20", "GEN-D-18", "BAL-D-35"):
        g = result.grade(rid)
        assert g.verdict is Verdict.NOT_EXERCISED and "SET_STATUS" in g.evidence, rid
    assert "directly" in result.grade("BAL-D-12").evidence
