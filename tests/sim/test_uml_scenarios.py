"""Linux 6.1's real virtio_balloon (User-Mode Linux) drives our real device end over vhost-user.

Every test that boots UML is marked ``peer`` (skipped with a reason without UML, failed under
VBALLOON_REQUIRE_PEERS=1). Scenarios come from :mod:`sim.uml_scenarios`; each boot serves a fresh
:class:`sim.serve.BalloonServer`. Two boots are shared by several tests (module fixtures), so
each test reads one scenario's result: ``host_driven`` (stats, inflate/deflate, hinting; no
DEFLATE_ON_OOM so MemTotal moves, no REPORTING so nothing discards behind the inflation's back)
and ``reporting`` (everything offered, default kernel). Two more boot with init_on_free=1 for
the negotiation rules, and one runs ``vballoon serve`` as a separate process. Each boot takes
2-7 s; the guest waits on files the host creates, and the host waits on device events.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from protocol.balloon import StatTag
from protocol.features import BalloonFeature, bit
from sim.serve import SERVE_FEATURES
from sim.uml import UmlMachine, boot, find_kernel
from sim.uml_scenarios import (
    MIB,
    REPORTING_DELAY,
    BootResult,
    Hinting,
    Inflate,
    Reporting,
    Stats,
    linux_accepts,
    run_boot,
)

try:
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.peers import require_peer

ROOT = Path(__file__).resolve().parents[2]
BOOT_SECONDS = 10.0
"""Every boot must power off well within this (spawn to exit)."""
REPORT_SLACK = 1.0
"""Seconds allowed past Linux's 2 s reporting delay (worker scheduling, UML's timer)."""
POISON = bit(BalloonFeature.PAGE_POISON)
REPORTING = bit(BalloonFeature.REPORTING)
DEFLATE_ON_OOM = bit(BalloonFeature.DEFLATE_ON_OOM)
ORDER_9 = 2 * MIB
LINUX_61_STATS = {StatTag.SWAP_IN, StatTag.SWAP_OUT, StatTag.MAJFLT, StatTag.MINFLT,
                  StatTag.MEMFREE, StatTag.MEMTOT, StatTag.AVAIL, StatTag.CACHES}
"""What 6.1 sends without hugetlb (the HTLB tags need CONFIG_HUGETLB_PAGE; the OOM and
reclaim tags came later)."""


@pytest.fixture(scope="module")
def uml_kernel():
    return require_peer("User-Mode Linux", find_kernel)


def _boot(**options) -> BootResult:
    result = trio.run(functools.partial(run_boot, **options))
    assert result.uml.duration < BOOT_SECONDS, result.uml.duration
    return result


@pytest.fixture(scope="module")
def host_driven(uml_kernel) -> BootResult:
    return _boot(scenarios=[Stats(), Inflate(), Hinting()], kernel=uml_kernel,
                 features=SERVE_FEATURES & ~DEFLATE_ON_OOM & ~REPORTING)


@pytest.fixture(scope="module")
def reporting(uml_kernel) -> BootResult:
    return _boot(scenarios=[Reporting()], kernel=uml_kernel)


# ---- negotiation ------------------------------------------------------------------------------

def _check_negotiation(result: BootResult) -> None:
    n = result.negotiation
    assert n.matches_linux, (n.rounds, n.expected)
    assert n.guest_view == n.final  # /sys/bus/virtio/devices/*/features agrees with the device


@pytest.mark.peer
def test_negotiation_default_kernel_drops_page_poison(reporting):
    n = reporting.negotiation
    _check_negotiation(reporting)
    # validate() clears PAGE_POISON on a kernel without poisoning; UML then sends the second
    # SET_FEATURES. Reporting stays (free pages need not keep a pattern).
    assert n.rounds == (SERVE_FEATURES, SERVE_FEATURES & ~POISON)
    assert n.poison_val is None and n.reporting_enabled
    assert n.queues == ("INFLATE", "DEFLATE", "STATS", "FREE_PAGE", "REPORTING")


@pytest.mark.peer
@pytest.mark.parametrize("offer_poison", [True, False], ids=["page-poison", "no-page-poison"])
def test_negotiation_with_init_on_free(uml_kernel, offer_poison):
    offered = SERVE_FEATURES if offer_poison else SERVE_FEATURES & ~POISON
    result = _boot(features=offered, cmdline=("init_on_free=1",), kernel=uml_kernel)
    n = result.negotiation
    _check_negotiation(result)
    assert not result.findings and not result.kernel_problems
    if offer_poison:
        # Poisoning is on and the host can be told: one round, and poison_val 0 (freed pages
        # read zeros with init_on_free), reporting on.
        assert n.rounds == (offered,) and n.poison_val == 0 and n.reporting_enabled
    else:
        # Freed pages must read zeros but the host cannot be told: Linux gives up reporting,
        # so the reporting queue is not even created.
        assert n.rounds == (offered, offered & ~REPORTING)
        assert not n.reporting_enabled and "REPORTING" not in n.queues
        assert n.poison_val is None


def test_linux_rules_table():
    every = SERVE_FEATURES
    assert linux_accepts(every, poisoning=False) == (every, every & ~POISON)
    assert linux_accepts(every, poisoning=True) == (every,)
    assert linux_accepts(every & ~POISON, poisoning=True) == (every & ~POISON,
                                                               every & ~POISON & ~REPORTING)
    unknown = bit(6) | bit(50)
    assert linux_accepts(every | unknown, poisoning=True) == (every,)


# ---- inflate, stats, hinting ------------------------------------------------------------------

@pytest.mark.peer
def test_inflate_to_a_host_target_and_back(host_driven, record_property):
    r = host_driven.results["inflate"]
    assert not r.deflate_on_oom
    assert r.num_pages == r.size >> 12 and r.actual_inflated == r.num_pages
    assert r.ballooned_bytes == r.size
    assert r.resident_bytes == 0  # every ballooned page is a hole in UML's RAM file
    assert r.returned_bytes >= r.size // 2  # the guest had dirtied its free pages first
    # Without DEFLATE_ON_OOM each ballooned page leaves MemTotal (adjust_managed_page_count).
    assert r.before.total - r.inflated.total == r.size
    assert abs((r.before.free - r.inflated.free) - r.size) <= 4 * MIB
    assert r.actual_deflated == 0 and r.ballooned_after_deflate == 0
    assert r.deflated.total == r.before.total
    record_property("inflate_64MiB_seconds", round(r.seconds_inflate, 3))
    record_property("deflate_64MiB_seconds", round(r.seconds_deflate, 3))


@pytest.mark.peer
def test_stats_agree_with_proc_meminfo(host_driven):
    r = host_driven.results["stats"]
    sent = {tag for tag, v in r.values.items() if v != 2**64 - 1}
    assert sent == LINUX_61_STATS
    assert r.values[StatTag.MEMTOT] == r.guest.total  # both are totalram_pages
    assert abs(r.free_diff) <= r.tolerance, r.free_diff
    assert abs(r.available_diff) <= r.tolerance, r.available_diff


@pytest.mark.peer
def test_free_page_hinting_round(host_driven, record_property):
    r = host_driven.results["hinting"]
    assert r.cmd_id is not None and r.cmd_id >= 0x8000_0000
    # The driver answers with the host's ID, hints, then sends STOP (command ID 0).
    assert r.guest_cmd_ids[0] == (r.cmd_id, "REQUESTED", "START")
    assert r.guest_cmd_ids[-1] == (0, "START", "STOP")
    assert r.hinted_bytes > 0 and sum(r.blocks) == r.hinted_bytes
    assert set(r.blocks) == {4 * MIB}  # order MAX_ORDER - 1 blocks
    # The driver holds hinted blocks until DONE, then frees them.
    assert r.before.free - r.during.free >= r.hinted_bytes * 9 // 10
    assert r.after.free >= r.threshold
    record_property("hinted_MiB", r.hinted_bytes // MIB)


# ---- free page reporting ----------------------------------------------------------------------

@pytest.mark.peer
def test_free_page_reporting_after_a_large_free(reporting, record_property):
    r = reporting.results["reporting"]
    assert r.initial_reports >= 1  # the pass 2 s after the driver registered
    assert r.first_delay is not None and r.first_delay <= REPORTING_DELAY + REPORT_SLACK
    assert r.reported_bytes >= r.size * 3 // 4
    for gpa, length in r.ranges:
        assert length >= ORDER_9 and length & (length - 1) == 0, length
        assert gpa % length == 0, hex(gpa)
    assert r.resident_bytes == 0  # holes (read as zeros) when the chain went back
    assert r.returned_bytes >= r.size * 3 // 4
    assert r.allocated_before - r.allocated_after >= r.size * 3 // 4
    record_property("report_delay_seconds", round(r.first_delay, 3))


@pytest.mark.peer
@pytest.mark.parametrize("boot_name", ["host_driven", "reporting"])
def test_the_real_driver_breaks_no_rule(request, boot_name):
    result: BootResult = request.getfixturevalue(boot_name)
    assert result.findings == ()
    assert result.kernel_problems == ()
    assert result.summary["device"]["needs_reset"] is None
    _check_negotiation(result)


# ---- vballoon serve ---------------------------------------------------------------------------

class _Lines:
    """The output of a process, collected by a task; waitable for a pattern."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = trio.Event()

    async def collect(self, stream) -> None:
        async for chunk in stream:
            self.text += chunk.decode("utf-8", "replace")
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match:
        while (m := re.search(pattern, self.text)) is None:
            await self._changed.wait()
        return m


@pytest.mark.peer
async def test_vballoon_serve_against_linux(uml_kernel, tmp_path):
    sock = tmp_path / "vb.sock"
    go = tmp_path / "go"
    argv = [sys.executable, "-m", "sim.cli", "serve", "--socket", str(sock),
            "--features", "STATS_VQ,FREE_PAGE_HINT"]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = _Lines()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.collect, proc.stdout)
            with trio.fail_after(BOOT_SECONDS):
                await out.wait_for(r"listening on ")
                machine = UmlMachine(scenario=f"mark ready\nwhile [ ! -e {go} ]; do sleep 0.05;"
                                              " done\n", socket=sock, mem="256M", timeout=30)
                async with boot(machine, uml_kernel) as guest:
                    await guest.wait_for_marker("ready")
                    await proc.stdin.send_all(b"inflate 16M\n")
                    await out.wait_for(r"actual 4096 pages = target")
                    await proc.stdin.send_all(b"hint start\n")
                    await out.wait_for(r"driver sent command ID STOP")
                    go.touch()
                    (await guest.wait()).check()
                await out.wait_for(r"front-end gone")
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                await out.wait_for(r"findings: ")
                code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    text = out.text
    assert code == 0, text
    assert "driver accepted STATS_VQ, FREE_PAGE_HINT, RING_INDIRECT_DESC" in text
    assert re.search(r"queues +inflate=0 .*deflate=1 .*stats=2 .*free_page=3 \(256 entries\)\n"
                     r".* activate +driver ready", text), text
    assert re.search(r"stats +total \d", text)
    assert re.search(r"balloon +inflate \+16\.0 MiB in 16 chain", text)
    assert re.search(r"hint +\d+ block\(s\)", text)
    assert "SIGINT: stopping" in text and "findings: none" in text
