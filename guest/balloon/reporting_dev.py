"""The balloon as a free page reporting device (Linux ``virtballoon_free_page_report``).

:class:`~guest.reporting.PageReporting` (``mm/page_reporting.c``) decides *what* to report and
*when*; this module is its trio edge and its ``report`` callback:

- :meth:`ReportingDevice.serve` sleeps until the core's next deadline (the 2 s
  ``PAGE_REPORTING_DELAY``, on the trio clock) and runs the pass, one batch at a time;
- :meth:`ReportingDevice.report` puts a batch on the reporting queue as ONE chain of
  device-writable descriptors (address ``pfn << 12``, length ``4096 << order``; through an
  indirect table when INDIRECT_DESC was negotiated and the batch has more than one entry, as
  Linux ``virtqueue_add`` chooses), kicks, waits until the device used it, and returns 0, or a
  negative errno when the chain cannot be added (``-ENOSPC``), which ends the pass.

:meth:`ReportingDevice.stop` is ``page_reporting_unregister``: no new pass, and a running one
finishes first (blocks out with the host must not be handed back early).
"""

from __future__ import annotations

import errno
from typing import Any

import structlog
import trio

from guest.balloon.work import WaitQueue
from guest.reporting import PageReporting, ReportBatch
from virtqueue.driver import QueueFull

__all__ = ["ReportingDevice"]

log = structlog.get_logger("vballoon.guest")


class ReportingDevice:
    """``vb->pr_dev_info`` and ``vb->reporting_vq``."""

    def __init__(self, vq: Any, acked: WaitQueue) -> None:
        self.core: PageReporting = None  # type: ignore[assignment]  # set at registration
        self.vq = vq
        self.acked = acked
        self._lot = trio.lowlevel.ParkingLot()
        self._stopped = False
        self._in_pass = False
        self.reports = 0
        self.errors = 0

    def wakeup(self) -> None:
        """The core scheduled a pass (its ``wakeup`` hook)."""
        self._lot.unpark_all()

    async def report(self, batch: ReportBatch) -> int:
        """Report one batch; 0 or ``-errno``."""
        ring = self.vq.ring
        sg = batch.sg()
        use_indirect = ring.indirect and ring.indirect_area is not None and len(sg) > 1
        try:
            ring.add([], sg, batch, use_indirect=use_indirect)
        except QueueFull:
            self.errors += 1
            log.warning("driver.report_failed", nents=len(sg), num_free=ring.num_free)
            return -errno.ENOSPC
        ring.kick()
        await self.acked.wait_event(ring.get_buf)
        self.reports += 1
        log.info("driver.report", nents=len(sg), bytes=batch.nbytes, zone=batch.zone.name,
                 indirect=use_indirect)
        return 0

    async def run_pass(self) -> int:
        """One due pass of the core; the error that ended it."""
        gen = self.core.process()
        self._in_pass = True
        try:
            batch = next(gen)
            while True:
                batch = gen.send(await self.report(batch))
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()
            self._in_pass = False
            self._lot.unpark_all()

    async def serve(self) -> None:
        """The reporting work item: sleep until each pass is due, run it, until :meth:`stop`."""
        while not self._stopped:
            deadline = self.core.next_deadline()
            if deadline is None:
                await self._lot.park()
                continue
            if trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._lot.park()  # woken early only by stop()
                continue
            await self.run_pass()

    async def stop(self) -> None:
        """``page_reporting_unregister``: cancel the scheduled pass, wait for a running one."""
        self._stopped = True
        self._lot.unpark_all()
        while self._in_pass:
            await self._lot.park()
        self.core.unregister()
        await trio.lowlevel.checkpoint()
