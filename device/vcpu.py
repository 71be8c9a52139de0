"""Run state of the simulated vCPUs: what ``vm_stop`` / ``vm_start`` are to a migrating VMM.

QEMU stops the vCPUs for the last precopy round (stop-and-copy) and waits until every vCPU has
left guest mode before it syncs the dirty bitmap for the last time; a write after that sync
would be lost. Simulated guests are trio tasks, so the VMM cannot preempt them: they run each
unit of guest work inside :meth:`VcpuGate.vcpu`, and :meth:`VcpuGate.pause` waits for the units
in flight to finish and holds new ones back until :meth:`VcpuGate.resume`.

:class:`VmControl` is all the migration code needs; a caller with another kind of guest (a real
peer paused over QMP, say) supplies its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

import trio

__all__ = ["VcpuGate", "VmControl"]


@runtime_checkable
class VmControl(Protocol):
    """Pause and resume the guest; ``running`` says which (QEMU ``runstate_is_running``)."""

    @property
    def running(self) -> bool: ...

    async def pause(self) -> None:
        """Stop the guest; return only once no guest work is in flight (``vm_stop``)."""

    async def resume(self) -> None:
        """Let the guest run again (``vm_start``)."""


class VcpuGate:
    """A :class:`VmControl` for guests made of trio tasks.

    Guest tasks wrap each unit of work (a few writes, one driver step) in
    ``async with gate.vcpu():``. A unit must not wait on something that needs a paused guest to
    progress, or :meth:`pause` waits for ever; keep units short and synchronous where possible.
    """

    def __init__(self) -> None:
        self._running = True
        self._resumed = trio.Event()
        self._resumed.set()
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.pauses = 0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def in_flight(self) -> int:
        """Units of guest work running now."""
        return self._in_flight

    @asynccontextmanager
    async def vcpu(self) -> AsyncIterator[None]:
        """Run one unit of guest work; waits while the guest is paused."""
        while not self._running:
            await self._resumed.wait()
        if self._in_flight == 0:
            self._idle = trio.Event()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_running(self) -> None:
        """Block while the guest is paused (for guest loops that need no unit of work)."""
        while not self._running:
            await self._resumed.wait()

    async def pause(self) -> None:
        if self._running:
            self._running = False
            self._resumed = trio.Event()
            self.pauses += 1
        await self._idle.wait()

    async def resume(self) -> None:
        if not self._running:
            self._running = True
            self._resumed.set()
        await trio.lowlevel.checkpoint()
