"""sim.qemu.observe on simulated RAM: the chain tap reads what the driver published, and the
watched interrupt line credits only used buffers that came back without an interrupt *and*
that the driver's event index did not ask to hear about."""

from __future__ import annotations

import pytest
import trio

from protocol.errors import UsageError
from sim.qemu.observe import ChainTap, WatchedInterruptLine
from virtqueue.device import DeviceQueue
from virtqueue.layout import legacy_layout
from virtqueue.memory import GuestMemory

SIZE = 8


@pytest.fixture
def memory():
    mem = GuestMemory.create(1 << 20)
    yield mem
    mem.close()


def _rings(memory, *, event_idx=True, indirect=False):
    from virtqueue.driver import DriverQueue

    desc, avail, used, _ = legacy_layout(0x10000, SIZE, 4096)
    area = (0x40000, SIZE * 4 * 16) if indirect else None
    drv = DriverQueue(index=0, size=SIZE, desc=desc, avail=avail, used=used, memory=memory,
                      event_idx=event_idx, indirect=indirect, indirect_area=area)
    dev = DeviceQueue(index=0, size=SIZE, desc=desc, avail=avail, used=used, memory=memory,
                      event_idx=event_idx, indirect=indirect)
    return drv, dev


def test_chain_tap_reads_direct_and_indirect_chains_back_from_memory(memory):
    drv, _ = _rings(memory, indirect=True)
    tap = ChainTap(memory)
    tap.tap("q", drv)
    memory.write(0x80000, (0x80000001).to_bytes(4, "little"))
    drv.add([(0x80000, 4)], [], "id")
    drv.add([], [(0x100000 - 0x3000, 4096), (0x90000, 8192), (0xA0000, 4096)], "batch",
            use_indirect=True)
    drv.add([], [(0xB0000, 4096), (0xC0000, 4096)], "direct")
    assert [(c.indirect, len(c.segments)) for c in tap.chains] == [(False, 1), (True, 3),
                                                                   (False, 2)]
    assert tap.chains[0].out_data == (0x80000001).to_bytes(4, "little")
    assert tap.chains[1].nbytes == 16384 and all(w for _, _, w in tap.chains[1].segments)
    assert tap.of("other") == []
    tap.close()
    drv.add([(0x80000, 4)], [], "after close")
    assert len(tap.chains) == 3


class _Isr:
    def __init__(self) -> None:
        self.value = 0

    def read_interrupt_status(self) -> int:
        return self.value


async def _push_then_interrupt(dev, isr, count, *, delay=0.0105):
    await trio.sleep(delay)
    for _ in range(count):
        chain = dev.pop()
        dev.push(chain.head, 0)
    await trio.sleep(0.01)  # several polls see InterruptStatus 0 after the pushes
    isr.value = 1


async def _run(drv, dev, count):
    isr = _Isr()
    line = WatchedInterruptLine(isr, drv.memory, period=0.001)
    score = line.watch("q", drv)
    for i in range(count):
        drv.add([(0x80000 + 8 * i, 8)], [], i)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_push_then_interrupt, dev, isr, count)
        await line.wait()
    return line, score


async def test_buffers_back_without_interrupt_under_used_event_0_are_suppressed(
        memory, autojump_clock):
    drv, dev = _rings(memory)
    drv.disable_cb()  # Linux 6.1 with EVENT_IDX: used_event = 0
    drv.add([(0x80000, 8)], [], "first")
    dev.push(dev.pop().head, 0)  # used idx 0 -> 1 crossed used_event 0: not counted
    drv.get_buf()
    line, score = await _run(drv, dev, 3)
    assert score.suppressed == 3 and score.used_events == {0}
    assert line.interrupts == 1 and line.vring == 1 and line.config == 0


async def test_missing_interrupts_the_driver_asked_for_are_not_suppression(memory,
                                                                         autojump_clock):
    drv, dev = _rings(memory)
    assert drv.enable_cb()  # used_event = last_used_idx: the next used buffer must interrupt
    line, score = await _run(drv, dev, 3)
    assert score.used_seen == 3 and score.suppressed == 0


async def test_an_interrupt_seen_voids_the_proof(memory, autojump_clock):
    drv, dev = _rings(memory)
    drv.disable_cb()
    isr = _Isr()
    line = WatchedInterruptLine(isr, memory, period=0.001)
    score = line.watch("q", drv)
    drv.add([(0x80000, 8)], [], 0)

    async def push_with_interrupt():
        await trio.sleep(0.0105)
        dev.push(dev.pop().head, 0)
        isr.value = 1  # raised together with the push

    async with trio.open_nursery() as nursery:
        nursery.start_soon(push_with_interrupt)
        await line.wait()
    assert score.suppressed == 0 and line.interrupts == 1


def test_poll_period_must_be_positive(memory):
    with pytest.raises(UsageError):
        WatchedInterruptLine(_Isr(), memory, period=0)
