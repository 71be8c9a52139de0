"""sim.qemu.process: QEMU starts, always stops (no orphan), and failures are clear PeerErrors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from protocol.errors import ConfigError, PeerError
from sim.qemu.process import (
    DEBIAN_PACKAGE,
    HLT_FIRMWARE_SIZE,
    BalloonProperties,
    QemuMode,
    QemuOptions,
    find_qemu_binary,
    run_qemu,
)


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody reaps, in this sandbox)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return True
    return "Z" in state.split()[1]


async def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait on a pidfd (works for processes that are not our children) until ``pid`` exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return _gone(pid)


# ---- no QEMU needed ----------------------------------------------------------------------------


async def test_missing_binary_is_a_peer_error_naming_the_package(tmp_path):
    missing = tmp_path / "no-such-qemu"
    with pytest.raises(PeerError, match=DEBIAN_PACKAGE) as info:
        async with run_qemu(QemuOptions(binary=missing)):
            pass
    assert str(missing) in str(info.value)


def test_binary_not_on_path_is_a_peer_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PeerError, match=f"install the Debian package {DEBIAN_PACKAGE}"):
        find_qemu_binary()


@pytest.mark.parametrize(
    "options",
    [
        QemuOptions(memory=(128 << 20) + 4096),
        QemuOptions(memory=1 << 20),
        QemuOptions(accel="qtest"),
        QemuOptions(balloon=BalloonProperties(guest_stats_polling_interval=-1)),
        QemuOptions(start_timeout=0),
    ],
)
async def test_bad_options_are_config_errors_before_anything_runs(options):
    with pytest.raises(ConfigError):
        async with run_qemu(options):
            pass


def test_command_line_carries_the_device_properties(tmp_path):
    options = QemuOptions(
        memory=256 << 20,
        mode=QemuMode.RUNNING,
        balloon=BalloonProperties(
            free_page_reporting=True,
            free_page_hint=True,
            deflate_on_oom=True,
            page_poison=False,
            guest_stats_polling_interval=2,
        ),
    )
    argv = options.argv("/usr/bin/qemu-system-x86_64", tmp_path)
    joined = " ".join(argv)
    assert "-qtest-log /dev/null" in joined
    assert "-m 256M" in joined
    assert "-global virtio-mmio.force-legacy=false" in joined
    assert f"-bios {tmp_path / 'hlt.bin'}" in joined
    device = argv[argv.index("-device") + 1]
    for prop in (
        "free-page-reporting=on",
        "free-page-hint=on",
        "deflate-on-oom=on",
        "page-poison=off",
        "guest-stats-polling-interval=2",
        "iothread=",
    ):
        assert prop in device
    iothread = device.split("iothread=")[1].split(",")[0]
    assert f"iothread,id={iothread}" in argv
    plain = QemuOptions(force_legacy=True, balloon=None).argv("qemu", tmp_path)
    assert "-device" not in plain and "-bios" not in plain and "-global" not in plain


# ---- real QEMU ---------------------------------------------------------------------------------


@pytest.mark.peer
async def test_start_and_stop_leave_no_process_and_no_files(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        pid, workdir = qemu.pid, qemu.workdir
        assert qemu.is_alive() and not _gone(pid)
        assert (workdir / "qtest.sock").exists()
        assert await qemu.qmp.query_status() == "prelaunch"
        assert 0 < qemu.startup_seconds < 5
    assert qemu.returncode == 0  # it obeyed QMP quit
    assert _gone(pid)
    assert not workdir.exists()


@pytest.mark.peer
async def test_exception_and_cancellation_still_stop_qemu(qemu_binary):
    pids = []
    with pytest.raises(RuntimeError, match="boom"):
        async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
            pids.append(qemu.pid)
            raise RuntimeError("boom")
    with trio.CancelScope() as scope:
        async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
            pids.append(qemu.pid)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert all(_gone(pid) for pid in pids)


@pytest.mark.peer
async def test_qemu_killed_under_us_is_a_peer_error_with_its_exit_status(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        os.kill(qemu.pid, signal.SIGKILL)
        with pytest.raises(PeerError, match="QEMU died") as info:
            qemu.qtest.readl(0x100000)
        assert f"exit status {-signal.SIGKILL}" in str(info.value)
        with pytest.raises(PeerError):
            await qemu.qmp.query_status()
    assert _gone(qemu.pid)


@pytest.mark.peer
async def test_qemu_refusing_its_command_line_reports_its_stderr(qemu_binary):
    options = QemuOptions(binary=qemu_binary, extra_args=("-device", "no-such-device-xyz"))
    with pytest.raises(PeerError, match="no-such-device-xyz") as info:
        async with run_qemu(options):
            pass
    assert "exited during startup" in str(info.value)


@pytest.mark.peer
async def test_mode_b_runs_the_vcpu_on_hlt_firmware(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, mode=QemuMode.RUNNING)) as qemu:
        assert (qemu.workdir / "hlt.bin").read_bytes() == b"\xf4" * HLT_FIRMWARE_SIZE
        assert await qemu.qmp.query_status() == "running"
        # The halted vCPU does not touch RAM: what we write stays.
        qemu.memory.write(0x200000, b"vballoon")
        assert qemu.memory.read(0x200000, 8) == b"vballoon"


@pytest.mark.peer
async def test_qemu_dies_with_its_parent_even_after_kill_9(qemu_binary, tmp_path):
    """PR_SET_PDEATHSIG: SIGKILL the Python process that started QEMU; QEMU must go too."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, trio
            from sim.qemu.process import QemuOptions, run_qemu

            async def main():
                async with run_qemu(QemuOptions(binary={qemu_binary!r})) as qemu:
                    print("QEMU_PID", qemu.pid, flush=True)
                    await trio.sleep_forever()

            trio.run(main)
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(20):
            while not (line := await trio.to_thread.run_sync(parent.stdout.readline)).startswith(
                b"QEMU_PID "
            ):
                assert line, "the parent exited without starting QEMU"
        qemu_pid = int(line.split()[1])
        assert not _gone(qemu_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert await _wait_gone(qemu_pid, 10)
