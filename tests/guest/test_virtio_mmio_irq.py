"""The guest's interrupt lines: the simulated device's event line and the polling line."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from guest.irq import EventInterruptLine, PollingInterruptLine
from protocol.errors import UsageError


async def test_a_raise_before_the_wait_is_not_lost(autojump_clock):
    line = EventInterruptLine()
    line.raise_()
    with trio.fail_after(1):
        await line.wait()
    with trio.move_on_after(1) as scope:  # consumed: the next wait blocks
        await line.wait()
    assert scope.cancelled_caught


async def test_raises_coalesce_into_one_wake_up(autojump_clock):
    line = EventInterruptLine()
    woken = []

    async def waiter():
        while True:
            await line.wait()
            woken.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        line.raise_()
        line.raise_()
        await trio.testing.wait_all_tasks_blocked()
        assert len(woken) == 1 and line.raises == 2
        line.raise_()
        await trio.testing.wait_all_tasks_blocked()
        assert len(woken) == 2
        nursery.cancel_scope.cancel()


class Status:
    def __init__(self) -> None:
        self.value = 0
        self.reads = 0

    def read_interrupt_status(self) -> int:
        self.reads += 1
        return self.value


async def test_polling_line_returns_when_status_is_set(autojump_clock):
    status = Status()
    line = PollingInterruptLine(status, period=0.01)

    async def device():
        await trio.sleep(0.105)
        status.value = 2

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device)
        start = trio.current_time()
        await line.wait()
        assert 0.105 <= trio.current_time() - start < 0.12
    assert 11 <= status.reads <= 13  # one read per period


async def test_polling_line_ignores_undefined_bits(autojump_clock):
    status = Status()
    status.value = 4  # not a defined InterruptStatus bit
    line = PollingInterruptLine(status, period=0.01)
    with trio.move_on_after(0.05) as scope:
        await line.wait()
    assert scope.cancelled_caught


def test_polling_period_must_be_positive():
    with pytest.raises(UsageError, match="positive"):
        PollingInterruptLine(Status(), period=0)
