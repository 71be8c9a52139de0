"""Linux's deferred-work and wait-queue primitives, as trio objects the balloon driver uses.

- :class:`Work` is a ``work_struct`` on a workqueue: :meth:`Work.queue` is a no-op while the
  work is already pending (``queue_work`` returns false), and queueing it while it runs makes it
  run once more afterwards. :meth:`Work.cancel_sync` is ``cancel_work_sync``: it drops a pending
  run and waits for a running one to *finish* (never aborts it half-way, so a ``tell_host`` in
  flight completes and the balloon's books stay consistent).
- :class:`WaitQueue` is a ``wait_queue_head_t`` with ``wait_event(wq, condition)`` and
  ``wake_up``: the driver's ``acked`` queue, woken by the used-buffer callback.

trio runs every task on one thread, so "check the condition, then park" cannot lose a wake-up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["WaitQueue", "Work"]

T = TypeVar("T")


class WaitQueue:
    """``wait_queue_head_t``: tasks wait for a condition; callbacks wake them to re-check."""

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    def wake_up(self) -> None:
        self._lot.unpark_all()

    async def wait_event(self, condition: Callable[[], T | None]) -> T:
        """Return the first non-None (and non-False) value of ``condition()``, re-checked on
        every wake-up (spurious wake-ups just re-check)."""
        while True:
            value = condition()
            if value is not None and value is not False:
                await trio.lowlevel.checkpoint()
                return value
            await self._lot.park()


class Work:
    """A work item served by one task (:meth:`serve`), with Linux ``queue_work`` semantics."""

    def __init__(self, name: str, func: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._func = func
        self._pending = False
        self._running = False
        self._stopped = False
        self._lot = trio.lowlevel.ParkingLot()
        self.runs = 0

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def running(self) -> bool:
        return self._running

    def queue(self) -> bool:
        """Mark the work pending; False if it already was (or the work is cancelled)."""
        if self._pending or self._stopped:
            return False
        self._pending = True
        self._lot.unpark_all()
        return True

    async def serve(self) -> None:
        """Run the work each time it is queued, until :meth:`cancel_sync`."""
        while not self._stopped:
            if not self._pending:
                await self._lot.park()
                continue
            self._pending = False
            self._running = True
            try:
                await self._func()
            finally:
                self._running = False
                self.runs += 1
                self._lot.unpark_all()

    async def cancel_sync(self) -> None:
        """``cancel_work_sync``: no further runs; wait for a running one to finish."""
        self._stopped = True
        self._pending = False
        self._lot.unpark_all()
        while self._running:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
