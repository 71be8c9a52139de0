"""sim.uml: User-Mode Linux boots, runs a scenario, powers off, and never outlives its test."""

from __future__ import annotations

import pytest
import trio

from protocol.errors import ConfigError, PeerError
from sim.uml import (
    MARK_PREFIX,
    UmlKernel,
    UmlMachine,
    boot,
    find_kernel,
    group_members,
    run,
)

try:
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.peers import require_peer

BOOT_BUDGET = 10.0


@pytest.fixture(scope="module")
def uml_kernel() -> UmlKernel:
    return require_peer("User-Mode Linux", find_kernel)


def _group_gone(pgid: int) -> bool:
    """No live process left in UML's group (zombies nobody reaps in this sandbox are dead)."""
    return group_members(pgid) == []


# ---- no UML needed ---------------------------------------------------------------------------


def test_missing_binary_is_a_peer_error_naming_the_package(tmp_path):
    with pytest.raises(PeerError, match="apt-get install -y user-mode-linux kmod"):
        find_kernel(tmp_path / "no-such-linux.uml")


def test_missing_module_is_a_peer_error(tmp_path):
    if find_kernel_or_none() is None:
        pytest.skip("needs linux.uml to get as far as the module check")
    with pytest.raises(PeerError, match="virtio_balloon.ko"):
        find_kernel(modules_root=tmp_path)


def find_kernel_or_none() -> UmlKernel | None:
    try:
        return find_kernel()
    except PeerError:
        return None


@pytest.mark.parametrize("machine", [
    UmlMachine(mem="lots"),
    UmlMachine(timeout=0),
    UmlMachine(socket="/tmp/a:b"),
    UmlMachine(memory_dir="/no/such/dir"),
], ids=["mem", "timeout", "socket-colon", "memory-dir"])
async def test_bad_machine_is_a_config_error(machine):
    with pytest.raises(ConfigError):
        async with boot(machine, UmlKernel("/bin/false", "0", "/nonexistent")):
            pass


# ---- real UML --------------------------------------------------------------------------------


@pytest.mark.peer
async def test_boot_runs_the_scenario_and_powers_off(uml_kernel, record_property):
    machine = UmlMachine(scenario="mark hello world\ngrep -c . /proc/cpuinfo >/dev/null\n",
                         load_balloon=False, timeout=30)
    result = await run(machine, uml_kernel)
    assert result.check() is result
    assert result.powered_off and result.returncode == 0 and not result.timed_out
    assert result.markers == ["init", "hello world", "scenario-exit 0"]
    assert 0 < result.boot_time < result.duration < BOOT_BUDGET
    assert "Linux version " + uml_kernel.release in result.console
    record_property("uml_boot_seconds", round(result.boot_time, 3))


@pytest.mark.peer
async def test_module_loads_and_scenario_status_is_reported(uml_kernel):
    # No device attached: the module loads, and the driver simply has nothing to probe.
    machine = UmlMachine(scenario="grep -q '^virtio_balloon ' /proc/modules && mark loaded\n"
                                  "exit 3\n", timeout=30)
    result = await run(machine, uml_kernel)
    assert "module-loaded" in result.markers and "loaded" in result.markers
    assert result.scenario_status == 3 and result.powered_off
    with pytest.raises(PeerError, match="scenario=3"):
        result.check()


@pytest.mark.peer
async def test_timeout_kills_the_whole_process_group(uml_kernel):
    machine = UmlMachine(scenario="mark ready\nsleep 600\n", load_balloon=False, timeout=4)
    async with boot(machine, uml_kernel) as guest:
        with trio.fail_after(BOOT_BUDGET):
            await guest.wait_for_marker("ready")
        result = await guest.wait()
    assert result.timed_out and result.killed and result.returncode == -9
    assert not result.powered_off
    assert _group_gone(guest.pid)  # UML's helper processes went with it
    with pytest.raises(PeerError, match="timed_out=True"):
        result.check()


@pytest.mark.peer
async def test_leaving_early_kills_uml(uml_kernel):
    machine = UmlMachine(scenario="mark ready\nsleep 600\n", load_balloon=False, timeout=60)
    with trio.fail_after(BOOT_BUDGET):
        async with boot(machine, uml_kernel) as guest:
            await guest.wait_for_marker("ready")
    assert _group_gone(guest.pid)
    result = await guest.wait()
    assert result.killed and not result.timed_out


@pytest.mark.peer
async def test_an_error_in_the_block_kills_uml_and_propagates_unwrapped(uml_kernel):
    machine = UmlMachine(scenario="mark ready\nsleep 600\n", load_balloon=False, timeout=60)
    with pytest.raises(KeyError):  # not wrapped in trio's ExceptionGroup
        async with boot(machine, uml_kernel) as guest:
            await guest.wait_for_marker("ready")
            raise KeyError("boom")
    assert _group_gone(guest.pid)


@pytest.mark.peer
async def test_waiting_for_a_marker_that_never_comes_is_a_peer_error(uml_kernel):
    machine = UmlMachine(scenario="mark other\n", load_balloon=False, timeout=30)
    async with boot(machine, uml_kernel) as guest:
        with pytest.raises(PeerError, match="never-printed"):
            await guest.wait_for_marker("never-printed")


@pytest.mark.peer
async def test_memory_dir_is_where_uml_keeps_guest_ram(uml_kernel, tmp_path):
    machine = UmlMachine(scenario="", load_balloon=False, memory_dir=tmp_path, timeout=30)
    result = await run(machine, uml_kernel)
    result.check()
    assert f"tempdir...{tmp_path}" in result.console  # UML's own report of $TMPDIR
    assert MARK_PREFIX + "init" in result.console
