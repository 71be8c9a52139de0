"""The VMM shell: vCPU gate (vm_stop / vm_start for trio guests), destination RAM, migrate()."""

from __future__ import annotations

import pytest
import trio

from device.migration import MigrationParams
from device.vcpu import VcpuGate, VmControl
from device.vmm import Vmm
from protocol.errors import UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

MIB = 1 << 20


async def test_pause_waits_for_work_in_flight_and_holds_new_work(autojump_clock):
    gate = VcpuGate()
    assert isinstance(gate, VmControl) and gate.running
    log: list[tuple[str, float]] = []

    async def guest(name: str, work: float) -> None:
        async with gate.vcpu():
            log.append((f"{name}-in", trio.current_time()))
            await trio.sleep(work)
            log.append((f"{name}-out", trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest, "a", 5.0)
        await trio.sleep(1)
        assert gate.in_flight == 1
        await gate.pause()  # returns only when "a" has left the vCPU
        assert trio.current_time() == 5.0 and not gate.running and gate.in_flight == 0
        nursery.start_soon(guest, "b", 1.0)
        await trio.sleep(10)
        assert [e for e, _ in log] == ["a-in", "a-out"]  # b is held back
        await gate.resume()
        await trio.sleep(2)
    assert log[-2:] == [("b-in", 15.0), ("b-out", 16.0)]
    assert gate.pauses == 1


async def test_pause_and_resume_are_idempotent(autojump_clock):
    gate = VcpuGate()
    await gate.pause()
    await gate.pause()
    assert gate.pauses == 1 and not gate.running
    await gate.resume()
    await gate.resume()
    assert gate.running
    await gate.wait_running()


def test_destination_has_the_source_layout():
    with GuestMemory.create(16 * MIB, base=MIB, holes=[(4 * MIB, 2 * MIB)]) as src:
        vmm = Vmm(src)
        with vmm.destination() as dst:
            assert dst.regions == src.regions
            assert dst.allocated_bytes() == 0


async def test_migrate_records_reports_and_refuses_overlap(autojump_clock):
    with GuestMemory.create(4 * MIB) as src:
        src.write(0, b"hello")
        vmm = Vmm(src)
        params = MigrationParams(bandwidth=MIB, downtime_limit=0.001)
        report = await vmm.migrate(params)  # null sink
        assert report.outcome == "completed" and report.normal_pages == 1
        assert vmm.migrations == [report] and not vmm.vm.running
        await vmm.vm.resume()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vmm.migrate, params)
            await trio.sleep(0.001)
            with pytest.raises(UsageError):
                await vmm.migrate(params)
        assert len(vmm.migrations) == 2


async def test_guest_waits_out_the_final_round(autojump_clock):
    """A guest task under the gate never writes between the last sync and the end."""
    with GuestMemory.create(8 * MIB) as src:
        src.fill(0, 8 * MIB, 0x11)
        vmm = Vmm(src)
        writes: list[float] = []

        async def writer() -> None:
            while True:
                async with vmm.vm.vcpu():
                    src.write(PAGE_SIZE, b"w")
                    writes.append(trio.current_time())
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            report = await vmm.migrate(
                MigrationParams(bandwidth=8 * MIB, downtime_limit=0.05), dest=None)
            nursery.cancel_scope.cancel()
        final = report.rounds[-1]
        assert final.final and report.paused_writes == 0
        assert all(t <= final.started for t in writes)
