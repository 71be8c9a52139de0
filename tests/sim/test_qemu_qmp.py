"""sim.qemu.qmp on a real QEMU: replies by id, typed errors, events, the commands we use."""

from __future__ import annotations

import pytest
import trio

from protocol.errors import PeerError, UsageError
from sim.qemu.process import BalloonProperties, QemuMode, QemuOptions, run_qemu
from sim.qemu.qmp import QmpCommandError

pytestmark = pytest.mark.peer

MiB = 1 << 20


async def test_greeting_and_typed_command_errors(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        assert qemu.qmp.greeting["version"]["qemu"]["major"] >= 7
        with pytest.raises(QmpCommandError) as info:
            await qemu.qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(QmpCommandError, match="GenericError|DeviceNotFound"):
            await qemu.qmp.qom_get("/machine/peripheral/nothing", "type")
        with pytest.raises(UsageError):
            await qemu.qmp.balloon(0)
        assert await qemu.qmp.query_status() == "prelaunch"  # still usable


async def test_concurrent_commands_get_their_own_replies(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        results = {}

        async def ask(name, command):
            results[name] = await qemu.qmp.execute(command)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(ask, f"status{i}", "query-status")
                nursery.start_soon(ask, f"balloon{i}", "query-balloon")
        for i in range(5):
            assert results[f"status{i}"]["status"] == "prelaunch"
            assert results[f"balloon{i}"] == {"actual": 64 * MiB}


async def test_stop_and_cont_are_seen_as_events(qemu_binary):
    options = QemuOptions(binary=qemu_binary, memory=64 * MiB, mode=QemuMode.RUNNING)
    async with run_qemu(options) as qemu:
        qmp = qemu.qmp
        assert await qmp.query_status() == "running"
        since = len(qmp.events)
        await qmp.stop()
        await qmp.wait_event("STOP", since=since)
        assert await qmp.query_status() == "paused"
        since = len(qmp.events)
        await qmp.cont()
        await qmp.wait_event("RESUME", since=since)
        with pytest.raises(PeerError, match="no QMP event NEVER"):
            await qmp.wait_event("NEVER", timeout=0.05)


async def test_guest_stats_properties(qemu_binary):
    props = BalloonProperties(guest_stats_polling_interval=5)
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB, balloon=props)) as qemu:
        path = props.qom_path
        assert await qemu.qmp.qom_get(path, "guest-stats-polling-interval") == 5
        await qemu.qmp.set_stats_polling_interval(path, 2)
        assert await qemu.qmp.qom_get(path, "guest-stats-polling-interval") == 2
        stats = await qemu.qmp.guest_stats(path)
        assert stats["last-update"] == 0  # no driver has sent stats yet
        assert "stat-free-memory" in stats["stats"]
        names = {p["name"] for p in await qemu.qmp.qom_list(path)}
        assert {"guest-stats", "guest-stats-polling-interval"} <= names


async def test_migration_to_a_sink_completes(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=32 * MiB)) as qemu:
        qemu.memory.fill(0x100000, 4 * MiB, 0x5A)
        await qemu.qmp.migrate_set_parameters(max_bandwidth=1 << 30)
        params = await qemu.qmp.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == 1 << 30
        await qemu.qmp.migrate("exec:cat > /dev/null")
        info = await qemu.qmp.wait_migration(timeout=30)
        assert info["status"] == "completed"
        assert info["ram"]["normal"] >= 1024  # the 4 MiB of non-zero pages went as pages


async def test_quit_closes_the_connection_and_later_commands_are_peer_errors(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        await qemu.qmp.quit()
        assert await qemu.wait_exit(5)
        assert qemu.returncode == 0
        with pytest.raises(PeerError):
            await qemu.qmp.query_status()
        assert not qemu.qmp.connected
