"""The QEMU scenarios: our guest driver against QEMU 7.2's real virtio-balloon, and the
``vballoon qemu`` command line (exit status 0 / 1 / 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from protocol.errors import ConfigError, PeerError
from sim.commands.qemu import parse_ram
from sim.qemu.kit import ScenarioOptions
from sim.qemu.scenarios import ORDER, run_scenario


def _held(result, *names: str) -> None:
    """Every check held, and the named ones were made (a scenario cannot pass by skipping)."""
    failed = [f"{c.name}: {c.detail}" for c in result.failed()]
    assert result.ok, "failed checks:\n" + "\n".join(failed)
    made = {c.name for c in result.checks}
    missing = [n for n in names if n not in made]
    assert not missing, f"checks not made: {missing}"


# ---- against QEMU ----------------------------------------------------------------------------

@pytest.mark.peer
async def test_negotiation(qemu_binary):
    r = await run_scenario("negotiation", ScenarioOptions(binary=qemu_binary))
    _held(r, "reporting: QEMU offers", "reporting: driver accepts (Linux rules)",
          "all-properties: QEMU offers", "poisoning-guest: poison_val written",
          "no-page-poison: driver accepts (Linux rules)",
          "reporting: no config interrupt before DRIVER_OK")
    assert "PAGE_POISON" not in r.facts["reporting"]["accepted"]
    assert "DEFLATE_ON_OOM" in r.facts["all-properties"]["accepted"]
    assert r.facts["all-properties"]["queue_num_max"] == [1024] * 5 + [0]


@pytest.mark.peer
async def test_inflate(qemu_binary):
    r = await run_scenario("inflate", ScenarioOptions(binary=qemu_binary))
    _held(r, "query-balloon after inflate", "inflated pages read back as zeros",
          "RSS drops by the inflated pages", "query-balloon after deflate")
    answers = [q.answer["actual"] for q in r.qmp if q.command == "query-balloon"]
    assert answers == [(128 - 32) << 20, 128 << 20]
    assert r.rss["filled"] - r.rss["inflated"] > 30 << 20


@pytest.mark.peer
async def test_stats(qemu_binary):
    r = await run_scenario("stats", ScenarioOptions(binary=qemu_binary))
    _held(r, "probe's buffer parsed: QEMU shows our values", "second update has changed values",
          "polling timer fires again", "QEMU keeps one stats buffer parked")
    gets = [q.answer["stats"]["stat-free-memory"] for q in r.qmp if q.command == "qom-get"]
    assert len(gets) == 3 and gets[0] > gets[1] > gets[2]


@pytest.mark.peer
async def test_reporting(qemu_binary):
    r = await run_scenario("reporting", ScenarioOptions(binary=qemu_binary))
    _held(r, "discard: reported blocks read back as zeros", "discard: neighbours intact",
          "discard: RSS drops by the reported bytes", "discard: multi-entry reports go indirect",
          "poison: reported blocks keep the poison pattern", "poison: RSS does not drop")
    assert r.facts["discard"]["rss_drop"] > 32 << 20
    assert any(c["indirect"] and c["entries"] > 1 for c in r.chains)


@pytest.mark.peer
async def test_hinting(qemu_binary):
    r = await run_scenario("hinting", ScenarioOptions(binary=qemu_binary))
    _held(r, "hints: START on QEMU's command ID", "hints: DONE frees the blocks",
          "hints: event idx suppressed interrupts", "hints save roughly the hinted pages")
    hinted, plain = r.facts["migration hints"], r.facts["migration no-hints"]
    assert hinted["normal"] < plain["normal"] // 2
    assert r.facts["hints"]["cmd_ids_echoed"][0] == "0x80000001"


# ---- the command line --------------------------------------------------------------------------

def _vballoon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("vballoon", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "sim.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.peer
def test_cli_inflate_exits_0_with_a_summary(qemu_binary):
    p = _vballoon("qemu", "inflate", "--qemu", qemu_binary)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vballoon qemu inflate" in p.stdout and "PASS" in p.stdout
    assert "query-balloon" in p.stdout and "RssAnon" in p.stdout


@pytest.mark.peer
def test_cli_json_reports_every_check(qemu_binary):
    p = _vballoon("qemu", "negotiation", "--qemu", qemu_binary, "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["ok"] is True and [s["scenario"] for s in data["scenarios"]] == ["negotiation"]
    assert all(c["held"] for c in data["scenarios"][0]["checks"])


def test_cli_unknown_scenario_is_usage_error():
    p = _vballoon("qemu", "bogus")
    assert p.returncode == 2
    assert "invalid choice" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [("--ram", "3M"), ("--ram", "lots"), ("--ram", "130M"),
                                  ("--accel", "hvf")])
def test_cli_bad_option_values_exit_2(args):
    p = _vballoon("qemu", "inflate", *args)
    assert p.returncode == 2, p.stderr
    assert "error" in p.stderr and "Traceback" not in p.stderr


def test_cli_missing_qemu_exits_1_with_the_package_name(tmp_path):
    p = _vballoon("qemu", "inflate", "--qemu", str(tmp_path / "no-qemu"))
    assert p.returncode == 1
    assert "qemu-system-x86" in p.stderr and "Traceback" not in p.stderr


def test_cli_qemu_dying_exits_1_with_a_message(tmp_path):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu: simulated crash' >&2\nexit 3\n")
    fake.chmod(0o755)
    p = _vballoon("qemu", "stats", "--qemu", str(fake), timeout=8)  # no wait for sockets
    assert p.returncode == 1
    assert "PeerError" in p.stderr and "simulated crash" in p.stderr
    assert "Traceback" not in p.stderr


# ---- no QEMU needed ------------------------------------------------------------------------

def test_all_runs_every_scenario_in_order():
    assert ORDER == ("negotiation", "inflate", "stats", "reporting", "hinting")


@pytest.mark.parametrize("options", [ScenarioOptions(memory=32 << 20),
                                     ScenarioOptions(memory=(128 << 20) + 4096),
                                     ScenarioOptions(accel="qtest"),
                                     ScenarioOptions(poll_period=0),
                                     ScenarioOptions(migration_bandwidth=10)])
async def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        await run_scenario("inflate", options)


async def test_unknown_scenario_is_a_config_error():
    with pytest.raises(ConfigError, match="choose from"):
        await run_scenario("bogus")


async def test_missing_qemu_is_a_peer_error(tmp_path):
    with pytest.raises(PeerError, match="qemu-system-x86"):
        await run_scenario("negotiation", ScenarioOptions(binary=tmp_path / "none"))


@pytest.mark.parametrize("text,value", [("128M", 128 << 20), ("1G", 1 << 30),
                                        ("262144K", 256 << 20), ("67108864", 64 << 20),
                                        ("128MiB", 128 << 20)])
def test_parse_ram(text, value):
    assert parse_ram(text) == value


def test_parse_ram_rejects_garbage():
    with pytest.raises(ConfigError):
        parse_ram("12X")
