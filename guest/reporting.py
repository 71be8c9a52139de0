"""Free page reporting, as Linux 6.1 ``mm/page_reporting.c``, sans-I/O.

The guest tells the host which large free blocks it may discard. Linux's design, kept here step
for step (names in brackets are Linux's):

- **Notify** [``page_reporting_notify_free``]: the allocator calls :meth:`PageReporting.notify_free`
  with the *final merged order* of every free; orders below ``page_reporting_order``
  (``pageblock_order`` = 9, 2 MiB) are ignored, others request a pass.
- **State machine** [``__page_reporting_request``, ``page_reporting_process``]: IDLE,
  REQUESTED, ACTIVE (table :data:`TRANSITIONS`). A request from IDLE schedules a pass
  ``PAGE_REPORTING_DELAY`` (2 s) later "to allow a sizable queue to build"; a request during a
  pass (or a spent budget) makes the pass reschedule itself when it ends.
- **Pass** [``page_reporting_process``]: every zone in order; stop at the first error.
- **Zone** [``page_reporting_process_zone``]: skip the zone unless it has more than
  ``low_wmark + (capacity << order)`` free pages; walk orders ``order..MAX_ORDER-1`` and every
  migratetype but ISOLATE with one scatterlist of ``capacity`` (32) entries filled from the
  *end* (``sgl[31]`` first) and carried across lists; report what is left at the end.
- **List** [``page_reporting_cycle``]: ``budget = DIV_ROUND_UP(nr_free, capacity * 16)``; walk
  from the head skipping Reported blocks; isolate into the batch; when it is full, rotate the
  list so the next unprocessed block is its head, report, drain, ``budget--``, continue from the
  new head; when the budget is spent, request another pass and stop; the stop point becomes the
  head (the restart point of the next pass).
- **Drain** [``page_reporting_drain``]: put every block back at the tail
  (``__putback_isolated_page``: ``FPI_TO_TAIL``, no notification); mark it Reported only if the
  report succeeded and the block did not merge. A failed report puts blocks back unreported
  and ends the pass.

Why not :mod:`guest.walker`: the seed's walker only looks at free blocks and rotates reported
ones; the merged design *isolates* blocks (they leave the lists while the host works on them),
skips by the Reported flag instead of a pass stamp, and rotates the list to its restart point
under a per-list budget. Building that on the walker would hide the very steps the kernel shows,
so the Linux cycle is kept here as its own small loop.

Sans-I/O: :meth:`PageReporting.process` is a generator. It yields a :class:`ReportBatch` (the
scatterlist: ``(pfn, order)`` entries in descriptor order) and expects the report's result
(0 or a negative errno) back through ``send()``; its return value is the pass's error. The
trio edge (the balloon driver) sleeps until :meth:`next_deadline`, then runs::

    gen = reporting.process()
    batch = next(gen)                     # StopIteration: nothing to report
    while True:
        err = await report_on_vq(batch)   # add the chain, kick, wait for the used buffer
        batch = gen.send(err)             # StopIteration ends the pass

Closing the generator early (reset, cancellation) puts every isolated block back unreported.
Time comes from the ``clock`` callable the owner passes in (``trio.current_time`` at the edge, a
virtual clock in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum, IntEnum

import structlog

from guest.mm import (
    MAX_ORDER,
    MIGRATE_TYPES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGEBLOCK_ORDER,
    AllocFlags,
    MigrateType,
    PageAllocator,
    Zone,
    ZoneType,
    zone_watermark_ok,
)
from protocol.errors import UsageError

__all__ = [
    "EVENTS_ENABLED",
    "PAGE_REPORTING_CAPACITY",
    "PAGE_REPORTING_DELAY",
    "TRANSITIONS",
    "PageReporting",
    "PageReportingState",
    "ReportBatch",
    "ReportingEvent",
    "ReportingStatistics",
]

_log = structlog.get_logger("vballoon.guest")

EVENTS_ENABLED = True
"""Whether the ``report.batch`` and ``report.pass`` debug events are emitted (a benchmark or a
1 TiB run turns them off; the check is made before any event dict is built)."""

PAGE_REPORTING_CAPACITY = 32
"""Linux ``PAGE_REPORTING_CAPACITY``: scatterlist entries per report (a power of two)."""
PAGE_REPORTING_DELAY = 2.0
"""Linux ``PAGE_REPORTING_DELAY`` (``2 * HZ``): seconds from a request to its pass."""

_ISOLATE = int(MigrateType.ISOLATE)


class PageReportingState(IntEnum):
    """Linux's anonymous enum in ``mm/page_reporting.c``."""

    IDLE = 0
    """No pass scheduled; the next qualifying free requests one."""
    REQUESTED = 1
    """A pass is scheduled (or the running pass must run again when it ends)."""
    ACTIVE = 2
    """A pass is running and nobody asked for another since it started."""


class ReportingEvent(Enum):
    """What moves the state machine."""

    REQUEST = "request"
    """``__page_reporting_request``: a qualifying free, or registration."""
    WORK_START = "work_start"
    """``page_reporting_process`` begins (``atomic_set(ACTIVE)``)."""
    BUDGET_SPENT = "budget_spent"
    """``page_reporting_cycle`` ran out of budget (``atomic_set(REQUESTED)``)."""
    WORK_END = "work_end"
    """``page_reporting_process`` ends (``atomic_cmpxchg(ACTIVE, IDLE)``)."""


_S = PageReportingState
_E = ReportingEvent
TRANSITIONS: dict[tuple[PageReportingState, ReportingEvent], tuple[PageReportingState, bool]] = {
    # (state, event): (next state, schedule the pass PAGE_REPORTING_DELAY from now)
    (_S.IDLE, _E.REQUEST): (_S.REQUESTED, True),
    (_S.REQUESTED, _E.REQUEST): (_S.REQUESTED, False),  # already pending
    (_S.ACTIVE, _E.REQUEST): (_S.REQUESTED, False),  # the running pass reschedules at its end
    (_S.REQUESTED, _E.WORK_START): (_S.ACTIVE, False),
    (_S.ACTIVE, _E.BUDGET_SPENT): (_S.REQUESTED, False),
    (_S.REQUESTED, _E.BUDGET_SPENT): (_S.REQUESTED, False),
    (_S.ACTIVE, _E.WORK_END): (_S.IDLE, False),  # nothing new: sleep until the next free
    (_S.REQUESTED, _E.WORK_END): (_S.REQUESTED, True),  # more to do: run again in 2 s
}
"""The reporting state machine; any pair not listed is a :class:`UsageError`."""


@dataclass(frozen=True, slots=True)
class ReportBatch:
    """One report: the scatterlist handed to ``prdev->report(prdev, sgl, nents)``.

    ``entries`` are ``(pfn, order)`` in scatterlist order: ``sgl[offset]`` first, i.e. the block
    isolated *last* comes first (the list is filled from its end).
    """

    zone: ZoneType
    entries: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        """Total bytes reported (``PAGE_SIZE << order`` per entry)."""
        return sum(PAGE_SIZE << order for _, order in self.entries)

    def sg(self) -> list[tuple[int, int]]:
        """The descriptors a driver adds: ``(guest-physical address, length)`` per entry."""
        return [(pfn << PAGE_SHIFT, PAGE_SIZE << order) for pfn, order in self.entries]


@dataclass(frozen=True, slots=True)
class ReportingStatistics:
    """Counters of a :class:`PageReporting` since it was created."""

    passes: int
    batches: int
    failed_batches: int
    blocks_reported: int
    bytes_reported: int
    zones_skipped: int
    budget_spent: int
    isolate_failures: int


class PageReporting:
    """Linux ``page_reporting_dev_info`` plus ``mm/page_reporting.c``, for one allocator.

    Args:
        allocator: the guest's page allocator.
        clock: returns the current time in seconds (``trio.current_time`` at the edge).
        order: ``page_reporting_order``; None means ``pageblock_order`` (Linux 6.1:
            ``prdev->order ? : pageblock_order``).
        capacity: scatterlist entries per report, 1..32 (6.1 always uses 32; newer kernels let
            the driver lower it to its queue size).
        delay: seconds from a request to the pass (``PAGE_REPORTING_DELAY``).
        wakeup: called whenever a pass gets scheduled, so an edge waiting for
            :meth:`next_deadline` to become non-None can wake up.
    """

    def __init__(
        self,
        allocator: PageAllocator,
        *,
        clock: Callable[[], float],
        order: int | None = None,
        capacity: int = PAGE_REPORTING_CAPACITY,
        delay: float = PAGE_REPORTING_DELAY,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        if order is None:
            order = PAGEBLOCK_ORDER
        if not isinstance(order, int) or not 0 <= order < MAX_ORDER:
            raise UsageError(f"page_reporting_order {order!r} is outside 0..{MAX_ORDER - 1}")
        if not isinstance(capacity, int) or not 1 <= capacity <= PAGE_REPORTING_CAPACITY:
            raise UsageError(
                f"page reporting capacity {capacity!r} is outside 1..{PAGE_REPORTING_CAPACITY}"
            )
        self.allocator = allocator
        self.order = order
        self.capacity = capacity
        self.delay = delay
        self.state = PageReportingState.IDLE
        self._clock = clock
        self._wakeup = wakeup
        self._deadline: float | None = None
        self._registered = False
        self._active = False
        self._sgl: list[tuple[int, int] | None] = [None] * capacity
        self._offset = capacity
        self._zone: Zone | None = None
        self._passes = self._batches = self._failed = self._blocks = self._bytes = 0
        self._zones_skipped = self._budget_spent = self._isolate_failures = 0

    # ---- registration ---------------------------------------------------------------------
    def register(self) -> None:
        """``page_reporting_register``: hook the allocator and schedule the first full pass.

        Raises:
            UsageError: the allocator already has a reporting device (Linux ``-EBUSY``).
        """
        if self.allocator.on_free is not None:
            raise UsageError("page reporting: the allocator already has a reporting device")
        self.state = PageReportingState.IDLE
        self._registered = True
        self.allocator.on_free = self.notify_free
        self.request()

    def unregister(self) -> None:
        """``page_reporting_unregister``: unhook and cancel the scheduled pass.

        Raises:
            UsageError: a pass is running (close its generator first).
        """
        if self._active:
            raise UsageError("page reporting: unregister during a pass; close the pass first")
        if self.allocator.on_free == self.notify_free:
            self.allocator.on_free = None
        self._registered = False
        self._deadline = None

    @property
    def registered(self) -> bool:
        return self._registered

    # ---- requests -------------------------------------------------------------------------
    def notify_free(self, order: int, now: float | None = None) -> None:
        """``page_reporting_notify_free``: a block of final order ``order`` was freed."""
        if order < self.order or not self._registered:
            return
        self.request(now)

    def request(self, now: float | None = None) -> None:
        """``__page_reporting_request``: ask for a pass (scheduled only from IDLE).

        Does nothing while unregistered (Linux finds no ``pr_dev_info``).
        """
        if self._registered and self._apply(_E.REQUEST):
            self._schedule(now)

    def next_deadline(self) -> float | None:
        """When the scheduled pass is due, or None if none is scheduled."""
        return self._deadline

    def due(self, now: float) -> bool:
        """Whether a pass is scheduled and ``now`` has reached it."""
        return self._deadline is not None and now >= self._deadline

    def _apply(self, event: ReportingEvent) -> bool:
        key = (self.state, event)
        try:
            self.state, schedule = TRANSITIONS[key]
        except KeyError:
            raise UsageError(
                f"page reporting: event {event.value} is not allowed in state {self.state.name}"
            ) from None
        return schedule

    def _schedule(self, now: float | None) -> None:
        """``schedule_delayed_work(&prdev->work, PAGE_REPORTING_DELAY)``."""
        self._deadline = (self._clock() if now is None else now) + self.delay
        if self._wakeup is not None:
            self._wakeup()

    # ---- the pass -------------------------------------------------------------------------
    def process(self) -> Generator[ReportBatch, int, int]:
        """``page_reporting_process``: one pass over every zone; see the module docstring.

        Yields each batch; send back 0 (reported) or a negative errno. Returns the error that
        ended the pass (0 if none).

        Raises:
            UsageError: no pass is due (not registered, not scheduled, or ``clock()`` is before
                :meth:`next_deadline`), or a non-integer result was sent.
        """
        if not self._registered or self._deadline is None:
            raise UsageError("page reporting: no pass is scheduled")
        if self._clock() < self._deadline:
            raise UsageError(f"page reporting: the pass is due at {self._deadline}, not before")
        return self._pass()

    def _pass(self) -> Generator[ReportBatch, int, int]:
        self._deadline = None
        self._apply(_E.WORK_START)
        self._active = True
        self._passes += 1
        err = 0
        try:
            for zone in self.allocator.zones:
                err = yield from self._process_zone(zone)
                if err:
                    break
        finally:
            if self._offset < self.capacity:  # closed or failed while blocks were isolated
                self._drain(self._zone, self._sgl[self._offset:], reported=False)
                self._offset = self.capacity
            self._active = False
            if self._apply(_E.WORK_END):
                self._schedule(None)
            if EVENTS_ENABLED:
                _log.debug("report.pass", err=err, state=self.state.name, next=self._deadline)
        return err

    def _process_zone(self, zone: Zone) -> Generator[ReportBatch, int, int]:
        """``page_reporting_process_zone``: watermark gate, every list, then the leftovers."""
        capacity = self.capacity
        watermark = zone.watermark_low + (capacity << self.order)
        if not zone_watermark_ok(zone, 0, watermark, 0, AllocFlags.CMA):
            self._zones_skipped += 1
            return 0
        self._zone = zone
        self._offset = capacity
        for order in range(self.order, MAX_ORDER):
            for mt in range(MIGRATE_TYPES):
                if mt == _ISOLATE:
                    continue
                err = yield from self._cycle(zone, order, mt)
                if err:
                    return err
        if self._offset < capacity:
            return (yield from self._report(zone))
        return 0

    def _cycle(self, zone: Zone, order: int, mt: int) -> Generator[ReportBatch, int, int]:
        """``page_reporting_cycle``: fill, report, drain one free list under its budget."""
        area = zone.free_area[order]
        head = area.free_list[mt]
        if head.next is head:
            return 0
        capacity = self.capacity
        budget = -(-area.nr_free // (capacity * 16))  # DIV_ROUND_UP
        isolate = self.allocator.isolate_free_block
        sgl = self._sgl
        err = 0
        page = head.next
        nxt = head
        while page is not head:
            nxt = page.next
            if page.reported:
                page = nxt
                continue
            if budget < 0:
                # out of budget: ask for another pass, resume from this page then
                self._apply(_E.BUDGET_SPENT)
                self._budget_spent += 1
                nxt = page
                break
            if self._offset:
                if not isolate(zone, page):
                    self._isolate_failures += 1
                    nxt = page
                    break
                self._offset -= 1
                sgl[self._offset] = (page.pfn, order)
                page = nxt
                continue
            # the batch is full and page is the first unprocessed block: make it the head
            head.rotate_to_front(page)
            err = yield from self._report(zone)
            budget -= 1
            # the lists may have changed while the report was out: restart from the head
            nxt = head.next
            if err:
                break
            page = nxt
        else:
            nxt = head
        if nxt is not head and head.next is not nxt and nxt.next is not None:
            head.rotate_to_front(nxt)  # the restart point for the next pass
        return err

    def _report(self, zone: Zone) -> Generator[ReportBatch, int, int]:
        """``prdev->report(sgl + offset, nents)`` then ``page_reporting_drain``."""
        entries = tuple(self._sgl[self._offset:])
        err = yield ReportBatch(zone.idx, entries)  # type: ignore[arg-type]
        if not isinstance(err, int) or isinstance(err, bool) or err > 0:
            raise UsageError(f"page reporting: a report result must be 0 or -errno, not {err!r}")
        self._offset = self.capacity
        self._drain(zone, entries, reported=not err)
        self._batches += 1
        if err:
            self._failed += 1
        else:
            self._blocks += len(entries)
            self._bytes += sum(PAGE_SIZE << order for _, order in entries)
        if EVENTS_ENABLED:
            _log.debug("report.batch", zone=zone.name, nents=len(entries), err=err)
        return err

    def _drain(self, zone: Zone | None, entries: object, *, reported: bool) -> None:
        """``page_reporting_drain``: put back at the tail; Reported only if it did not merge."""
        putback = self.allocator.putback_isolated_block
        flags = zone.pageblock_flags  # type: ignore[union-attr]
        base = zone.pageblock_base  # type: ignore[union-attr]
        for pfn, order in entries:  # type: ignore[attr-defined]
            # the list is re-derived from the pageblock, which isolation may have changed
            block = putback(zone, pfn, order, flags[(pfn >> PAGEBLOCK_ORDER) - base])
            if reported and block.order == order:
                block.reported = True

    # ---- synchronous driving and statistics ----------------------------------------------
    def run_pass(self, report: Callable[[ReportBatch], int]) -> int:
        """Run one due pass with a synchronous ``report(batch) -> 0 | -errno``; its error."""
        gen = self.process()
        try:
            batch = next(gen)
            while True:
                batch = gen.send(report(batch))
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()

    def statistics(self) -> ReportingStatistics:
        """A snapshot of the counters."""
        return ReportingStatistics(
            passes=self._passes,
            batches=self._batches,
            failed_batches=self._failed,
            blocks_reported=self._blocks,
            bytes_reported=self._bytes,
            zones_skipped=self._zones_skipped,
            budget_spent=self._budget_spent,
            isolate_failures=self._isolate_failures,
        )
