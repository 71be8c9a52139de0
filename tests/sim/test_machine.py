"""The simulated machine as a whole: deflate-on-oom and the VM pause, in virtual time."""

from __future__ import annotations

import trio

from guest.balloon import BalloonOptions
from guest.workload import WorkloadProfile
from protocol.balloon import OOM_NR_PAGES
from protocol.features import BalloonFeature, bit
from sim.machine import Machine, MachineConfig


def _machine(**kw) -> Machine:
    return Machine(MachineConfig(ram=128 << 20, profile=WorkloadProfile.GROW, max_live=1 << 20,
                                 workload_ops=1 << 30, driver=BalloonOptions(max_queue_size=64),
                                 **kw))


async def _inflate(machine: Machine, nbytes: int) -> None:
    machine.device.balloon(machine.config.ram - nbytes)
    while machine.driver.towards_target():
        await trio.sleep(0.01)


async def test_oom_deflates_256_pages_per_event(autojump_clock) -> None:
    """A guest that runs out of memory with DEFLATE_ON_OOM takes 256 pages back per event
    (Linux virtio_balloon_oom_notify) and tells the host before using them."""
    m = _machine()
    try:
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            assert m.driver.has(BalloonFeature.DEFLATE_ON_OOM)
            await _inflate(m, 64 << 20)
            ballooned = m.device.ballooned.total
            assert ballooned == 64 << 20
            while m.oom_events < 3:
                await m.workload_steps(1)
            await trio.sleep(0.1)
            given_back = ballooned - m.device.ballooned.total
            assert given_back == m.oom_events * OOM_NR_PAGES * 4096
            assert m.device.config.actual == (64 << 20) // 4096 - m.oom_events * OOM_NR_PAGES
            nursery.cancel_scope.cancel()
    finally:
        m.close()


async def test_without_deflate_on_oom_the_balloon_holds(autojump_clock) -> None:
    features = MachineConfig().device_features & ~bit(BalloonFeature.DEFLATE_ON_OOM)
    m = _machine(device_features=features)
    try:
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            assert not m.driver.has(BalloonFeature.DEFLATE_ON_OOM)
            await _inflate(m, 64 << 20)
            while m.oom_events < 3:
                await m.workload_steps(1)
            await trio.sleep(0.1)
            assert m.device.ballooned.total == 64 << 20
            nursery.cancel_scope.cancel()
    finally:
        m.close()


async def test_pause_holds_the_workload_and_the_device(autojump_clock) -> None:
    m = _machine()
    try:
        async with trio.open_nursery() as nursery:
            await m.start(nursery)
            await m.vm.pause()
            assert not m.vm.running
            m.device.balloon(m.config.ram - (4 << 20))
            done = trio.Event()

            async def step() -> None:
                await m.workload_steps(1)
                done.set()

            nursery.start_soon(step)
            await trio.sleep(1.0)
            assert not done.is_set()  # the workload waits for the vCPU
            assert m.device.ballooned.total == 0  # queues are not served while stopped
            await m.vm.resume()
            await done.wait()
            while m.driver.towards_target():
                await trio.sleep(0.01)
            assert m.device.ballooned.total == 4 << 20
            nursery.cancel_scope.cancel()
    finally:
        m.close()
