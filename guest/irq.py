"""The guest's interrupt line: how a driver task waits for its device to interrupt it.

A virtio-mmio device has one line (virtio spec §4.2.3.4); what the interrupt was for is read from
InterruptStatus afterwards (Linux ``vm_interrupt``). So the line itself carries no data: a driver
awaits :meth:`InterruptLine.wait`, then reads and acknowledges the status. ``wait`` may return
when nothing happened (a spurious interrupt, which drivers must tolerate: SPL-D-15); it must not
miss an interrupt raised between two waits.

- :class:`EventInterruptLine`: the simulated device calls :meth:`~EventInterruptLine.raise_`
  from its interrupt callback (same trio thread). Edge-latched: a raise while nobody waits is
  remembered until the next ``wait``.
- :class:`PollingInterruptLine`: for a real peer (QEMU over qtest) whose line we cannot see
  without interception: polls InterruptStatus every ``period`` seconds. This poller is the one
  place in the guest that sleeps on the clock, because the peer runs in real time.

This module and the balloon's task layer are the trio edges of the otherwise sans-I/O guest.
"""

from __future__ import annotations

from typing import Protocol

import trio

from protocol.errors import UsageError

__all__ = ["EventInterruptLine", "InterruptLine", "InterruptStatusSource",
           "PollingInterruptLine"]


class InterruptLine(Protocol):
    """Something a driver can wait on for its device's interrupt."""

    async def wait(self) -> None:
        """Return after the line was raised (possibly spuriously); a checkpoint either way."""
        ...


class InterruptStatusSource(Protocol):
    """What a polling line reads: the transport's InterruptStatus (not acknowledged)."""

    def read_interrupt_status(self) -> int: ...


class EventInterruptLine:
    """An edge-latched line raised synchronously by a simulated device.

    ``raises`` counts every raise (for tests and statistics); several raises before a wait
    collapse into one wake-up, as coalesced interrupts do on real hardware.
    """

    def __init__(self) -> None:
        self._pending = False
        self._lot = trio.lowlevel.ParkingLot()
        self.raises = 0

    def raise_(self) -> None:
        """Raise the line (call from the trio thread, e.g. a device's irq callback)."""
        self.raises += 1
        self._pending = True
        self._lot.unpark_all()

    async def wait(self) -> None:
        if self._pending:
            await trio.lowlevel.checkpoint()
        else:
            await self._lot.park()
        self._pending = False


class PollingInterruptLine:
    """A line read by polling InterruptStatus of a real device every ``period`` seconds."""

    def __init__(self, source: InterruptStatusSource, period: float = 0.001) -> None:
        if not period > 0:
            raise UsageError(f"poll period must be positive, not {period!r}")
        self.source = source
        self.period = period

    async def wait(self) -> None:
        while not self.source.read_interrupt_status() & 0x3:
            await trio.sleep(self.period)
        await trio.lowlevel.checkpoint()
