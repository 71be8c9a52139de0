"""The device suite over vhost-user: the hostile front-end against our back-end and device.

Real Unix sockets, real fds (a memfd for RAM, eventfds for kicks, socketpairs for calls); the
back-end's only error signal is closing the connection, which the suite grades as its form of
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import os

import trio

from guest.villain import DeviceVerdict, catalogue
from sim.conform.device import run_ours_vhost_user

V = DeviceVerdict
CASES = ["VALID", "SPL-V-4", "DC-01", "IN-07", "BL-01", "BL-16", "GEN-V-5", "GEN-V-1",
         "SPL-V-7", "MMIO-V-5"]


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def test_needs_reset_over_vhost_user_rejects_by_hanging_up():
    before = _open_fds()
    with trio.fail_after(20):
        result = await run_ours_vhost_user("needs-reset", catalogue(CASES))
    verdicts = {r.case: r.verdict for r in result.cases}
    assert verdicts == {"VALID": V.PASS, "SPL-V-4": V.PASS, "DC-01": V.REJECT,
                        "IN-07": V.REJECT, "BL-01": V.PASS, "BL-16": V.REJECT,
                        "GEN-V-5": V.REJECT, "GEN-V-1": V.SKIP, "SPL-V-7": V.PASS,
                        "MMIO-V-5": V.PASS}
    assert "closed the connection" in result.result("DC-01").evidence
    assert result.result("GEN-V-3").verdict is V.SKIP  # no config interrupt to look at
    assert _open_fds() <= before  # sockets, memfds, eventfds all closed


async def test_skip_over_vhost_user_keeps_the_session():
    with trio.fail_after(20):
        result = await run_ours_vhost_user("skip", catalogue(["DC-01", "IN-07", "BL-01"]))
    for case in ("DC-01", "IN-07"):
        r = result.result(case)
        assert r.verdict is V.REJECT and "skipped" in r.evidence, case
        assert not r.values["needs_reset"]
