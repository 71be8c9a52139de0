"""Precopy live migration of guest RAM, as QEMU's ``migration/ram.c`` does it, in virtual time.

The model follows QEMU's loop (``migration_iteration_run``, ``ram_save_iterate``,
``migration_bitmap_sync_precopy``):

- **Setup.** Every RAM page is set in the to-send bitmap, dirty logging starts, and the first
  bitmap sync runs.
- **Live rounds.** Pages leave the bitmap in address order, ``chunk_bytes`` of wire at a time,
  with ``trio.sleep(bytes / bandwidth)`` after each chunk, so guest tasks run meanwhile and
  dirty pages or send hints. When what is left to send is at most ``bandwidth x
  downtime_limit`` bytes, the bitmap is synced again: pages the dirty log caught are added, a
  new round begins. If the bitmap is still that small, or ``max_rounds`` live rounds ran, the
  VM is stopped.
- **Last round.** A final sync with the VM stopped, then everything left is sent; the time the
  VM stayed stopped is the downtime.

Wire cost (QEMU's stream format): a page whose memory is a hole (never written, or discarded)
or, with ``zero_detect``, reads all zeros goes as a *zero page*: an 8-byte header
(``offset | RAM_SAVE_FLAG_ZERO``) plus one fill byte = **9 bytes** (``ram.duplicate``); any
other page is an 8-byte header plus 4096 bytes (``ram.normal``). The qtest run in
research/qtest-hint.md checks it: 130,579 x 4104 + 512 x 9 is within 698 bytes (block names,
section headers) of the 535,901,522 bytes QEMU counted. Holes are found with SEEK_DATA
(:meth:`~virtqueue.memory.GuestMemory.data_ranges_bounded`, whose cost is bounded by what a
chunk takes) and never read: reading a memfd hole through its mapping would allocate it.

Simplifications: the dirty log is re-protected eagerly at each sync (no KVM manual-protect
lazy clear), and a hint leaves the dirty log alone (QEMU also clears the KVM log for the hinted
range; either is safe because the guest does not rely on a page it hinted until it writes it).
A round's remaining bytes are estimated as pages x 4096, as QEMU does, so the last round may
run slightly over the downtime limit (headers, zero pages).

Free page hinting is driven at QEMU's precopy notifier points
(``virtio_balloon_free_page_hint_notify``): ``hint_stop`` before each bitmap sync,
``hint_start`` (a new command ID) after it while the VM runs (``hint_done`` instead when it is
stopped), and ``hint_done`` at cleanup, also after a failure or cancellation. A hint
(``qemu_guest_free_page_hint``) clears its pages from the bitmap of the current round only:
pages already sent are unaffected, and a later guest write dirties the page again through the
dirty log, so it is sent in a later round. Hints are ignored once the VM is stopped (QEMU's
hint iothread is blocked then).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from protocol.errors import ConfigError, UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

from . import events
from .dirty_log import PAGE_SHIFT, DirtyLog
from .memcheck import MemoryCheck, compare_memory
from .migration_report import MigrationReport, MigrationState, RoundStats
from .ranges import RangeSet
from .vcpu import VmControl

__all__ = [
    "NORMAL_PAGE_BYTES",
    "PAGE_HEADER_BYTES",
    "CHUNK_TIME",
    "ZERO_PAGE_BYTES",
    "HintingDevice",
    "Migration",
    "MigrationParams",
    "Relied",
]

PAGE_HEADER_BYTES = 8
"""``save_page_header``: a big-endian u64 of page offset | flags (RAM_SAVE_FLAG_CONTINUE set)."""
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1
"""A zero page: header with RAM_SAVE_FLAG_ZERO plus the one fill byte (0)."""
NORMAL_PAGE_BYTES = PAGE_HEADER_BYTES + PAGE_SIZE
"""A normal page: header with RAM_SAVE_FLAG_PAGE plus the page."""
CHUNK_TIME = 0.01
"""Default chunk: 10 ms of wire. QEMU rate-limits in 100 ms windows (``BUFFER_DELAY``) but
its guest runs on other threads meanwhile; here the guest runs between chunks, so chunks are
kept shorter than a window to let hints and writes interleave with sending as finely."""

_PAGE_MASK = PAGE_SIZE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)
_READ_PIECE = 1 << 20

HintCallback = Callable[[int, int], object]
Relied = RangeSet | Iterable[tuple[int, int]]


class HintingDevice(Protocol):
    """The control verbs of a balloon device with VIRTIO_BALLOON_F_FREE_PAGE_HINT.

    The VMM sets ``on_hint`` to receive ``(gpa, length)`` of every range the device accepts
    (in START with the current command ID). ``hint_start`` returns the new command ID, or None
    when the driver did not negotiate the feature. The verbs may also be coroutines.
    """

    on_hint: HintCallback | None

    def hint_stop(self) -> object: ...

    def hint_start(self) -> int | None: ...

    def hint_done(self) -> object: ...


@dataclass(frozen=True, slots=True)
class MigrationParams:
    """Knobs of one migration (QEMU: ``max-bandwidth``, ``downtime-limit``).

    ``bandwidth`` is bytes per (virtual) second; ``downtime_limit`` seconds; ``max_rounds``
    bounds the live rounds when the guest dirties faster than the link; ``chunk_bytes`` is the
    wire sent between two sleeps (default: 10 ms of bandwidth); ``hinting`` False
    runs the same migration without any hint verb; ``zero_detect`` also sends written pages
    that read all zeros as zero pages, as QEMU does.
    """

    bandwidth: float
    downtime_limit: float = 0.3
    max_rounds: int = 30
    chunk_bytes: int | None = None
    hinting: bool = True
    zero_detect: bool = True

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ConfigError(f"migration bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")
        if not self.downtime_limit >= 0:
            raise ConfigError(f"downtime limit must be >= 0 s, got {self.downtime_limit!r}")
        if self.max_rounds < 1:
            raise ConfigError(f"max_rounds must be >= 1, got {self.max_rounds!r}")
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes must be >= 1, got {self.chunk_bytes!r}")

    @property
    def threshold_bytes(self) -> float:
        """Stop iterating once at most this much is left (QEMU ``threshold_size``)."""
        return self.bandwidth * self.downtime_limit

    @property
    def chunk(self) -> int:
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return max(NORMAL_PAGE_BYTES, int(self.bandwidth * CHUNK_TIME))


class _Round:
    """Counters of the round in progress."""

    __slots__ = ("index", "final", "cmd_id", "dirty_pages", "bitmap_pages", "normal", "zero",
                 "hinted", "bytes", "started")

    def __init__(self, index: int, final: bool, dirty_pages: int, bitmap_pages: int,
                 started: float) -> None:
        self.index, self.final, self.started = index, final, started
        self.dirty_pages, self.bitmap_pages = dirty_pages, bitmap_pages
        self.cmd_id: int | None = None
        self.normal = self.zero = self.hinted = self.bytes = 0

    def freeze(self, ended: float) -> RoundStats:
        return RoundStats(self.index, self.final, self.cmd_id, self.dirty_pages,
                          self.bitmap_pages, self.normal, self.zero, self.hinted, self.bytes,
                          self.started, ended)


class Migration:
    """One precopy migration of ``source`` RAM into ``dest`` (see the module docstring).

    ``dest`` is a fresh GuestMemory with the same regions (pages sent are copied there, zero
    pages leave it a hole) or None for a null sink that only counts (``exec:cat > /dev/null``).
    ``vm`` pauses the guest for the last round; ``device`` is the hinting balloon, if any.
    Run it once with :meth:`run`; :attr:`report` is set when it ends, whatever the outcome.
    """

    def __init__(self, source: GuestMemory, dest: GuestMemory | None, params: MigrationParams,
                 *, vm: VmControl, device: HintingDevice | None = None) -> None:
        if dest is not None:
            if [(r.gpa, r.size) for r in dest.regions] != [(r.gpa, r.size) for r in source.regions]:
                raise UsageError("the destination RAM must have the source's regions")
            if dest.allocated_bytes():
                raise UsageError("the destination RAM must be fresh (no page written)")
        self.source, self.dest, self.params, self.vm, self.device = source, dest, params, vm, device
        self.state = MigrationState.NONE
        self.report: MigrationReport | None = None
        self._log = DirtyLog(source)
        self._ram = RangeSet((r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT) for r in source.regions)
        self._bitmap = RangeSet()
        self._pending = 0
        self._dest_written = RangeSet()
        self._round: _Round | None = None
        self._rounds: list[RoundStats] = []
        self._cmd_ids: list[int] = []
        self._hints = self._hinted_bytes = self._ignored = 0
        self._paused_by_us = False
        self._paused_writes = 0
        self._previous_hook: HintCallback | None = None
        self._t0 = 0.0
        self._t_pause: float | None = None
        self._t_end: float | None = None

    @property
    def hinting(self) -> bool:
        """Whether this migration drives free page hinting."""
        return self.params.hinting and self.device is not None

    @property
    def pending_pages(self) -> int:
        """Pages left to send in the current round."""
        return self._pending

    # ---- the hint hook (qemu_guest_free_page_hint) ----------------------------------------
    def hint(self, gpa: int, length: int) -> int:
        """Clear the pages of [gpa, gpa + length) from this round; returns how many were set.

        Only whole pages count (a partial page may hold live data). Outside RAM nothing is set.
        Ignored (0) unless the migration is running with hinting and the VM runs.
        """
        live = self.state in (MigrationState.SETUP, MigrationState.ACTIVE)
        if not (live and self.hinting and self.vm.running) or length <= 0:
            self._ignored += 1
            if events.ENABLED:
                events.emit("migration.hint", gpa=gpa, length=length, pages=0, ignored=True,
                            state=self.state.value)
            return 0
        first = (gpa + _PAGE_MASK) >> PAGE_SHIFT
        end = (gpa + length) >> PAGE_SHIFT
        cleared = self._bitmap.remove(first, end)
        self._pending -= cleared
        self._hints += 1
        self._hinted_bytes += length
        if self._round is not None:
            self._round.hinted += cleared
        if events.ENABLED:
            events.emit("migration.hint", gpa=gpa, length=length, pages=cleared, ignored=False,
                        round=None if self._round is None else self._round.index)
        return cleared

    # ---- the migration ----------------------------------------------------------------------
    async def run(self, *, relied: Relied | Callable[[], Relied] | None = None,
                  resume_after: bool = False) -> MigrationReport:
        """Migrate; returns the report. ``relied`` (or a callable giving it at the end, with
        the VM stopped) enables the final check; ``resume_after`` restarts the source VM after
        success (QEMU leaves it stopped). On failure or cancellation the source VM runs again.
        """
        if self.state is not MigrationState.NONE:
            raise UsageError("a Migration runs only once")
        self._t0 = trio.current_time()
        self.state = MigrationState.SETUP
        outcome = MigrationState.FAILED
        check: MemoryCheck | None = None
        try:
            self._setup()
            await self._sync("setup")
            self.state = MigrationState.ACTIVE
            await self._live_rounds()
            await self._last_round()
            if relied is not None and self.dest is not None:
                check = self._check(relied() if callable(relied) else relied)
            outcome = MigrationState.COMPLETED
        except trio.Cancelled:
            outcome = MigrationState.CANCELLED
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup(outcome, resume_after)
            self.report = self._make_report(outcome, check)
            self.state = outcome
            fields = self.report.to_dict()
            fields.pop("rounds")
            events.emit("migration.done", **fields)
        return self.report

    def _setup(self) -> None:
        self._log.start()
        self._bitmap = self._ram.copy()
        self._pending = self._ram.total
        if self.hinting:
            assert self.device is not None
            self._previous_hook = self.device.on_hint
            self.device.on_hint = self.hint

    async def _live_rounds(self) -> None:
        p = self.params
        while True:
            if self._pending * PAGE_SIZE <= p.threshold_bytes:
                await self._sync("iterate")
                if self._pending * PAGE_SIZE <= p.threshold_bytes or self._log.syncs > p.max_rounds:
                    return
                continue
            sent = self._send_chunk(p.chunk)
            await trio.sleep(sent / p.bandwidth)

    async def _last_round(self) -> None:
        if self.vm.running:
            self._paused_by_us = True  # before awaiting: a cancel while it waits still resumes
            await self.vm.pause()
        self._t_pause = trio.current_time()
        self.state = MigrationState.DEVICE
        await self._sync("complete")
        while self._bitmap:
            sent = self._send_chunk(self.params.chunk)
            await trio.sleep(sent / self.params.bandwidth)
        self._t_end = trio.current_time()
        self._close_round(self._t_end)

    async def _sync(self, reason: str) -> None:
        """A dirty-bitmap sync with the precopy notifiers around it; opens the next round."""
        now = trio.current_time()
        self._close_round(now)
        if self.hinting:
            await self._verb("hint_stop")  # PRECOPY_NOTIFY_BEFORE_BITMAP_SYNC
        dirty_pages = self._log.dirty_pages
        dirty = self._log.sync()
        if not self._bitmap:
            self._bitmap, self._pending = dirty, dirty_pages
        else:
            for s, e in dirty:
                self._pending += self._bitmap.add(s, e)
        running = self.vm.running
        self._round = _Round(self._log.syncs, reason == "complete", dirty_pages, self._pending, now)
        if self.hinting:  # PRECOPY_NOTIFY_AFTER_BITMAP_SYNC
            if running:
                cmd_id = await self._verb("hint_start")
                if cmd_id is not None:  # None: the guest did not negotiate FREE_PAGE_HINT
                    self._round.cmd_id = cmd_id
                    self._cmd_ids.append(cmd_id)
            else:
                await self._verb("hint_done")
        events.emit("migration.sync", sync=self._log.syncs, reason=reason, running=running,
                    dirty_pages=dirty_pages, bitmap_pages=self._pending,
                    cmd_id=self._round.cmd_id)

    def _close_round(self, now: float) -> None:
        if self._round is None:
            return
        stats = self._round.freeze(now)
        self._rounds.append(stats)
        self._round = None
        events.emit("migration.round", **stats.to_dict())

    async def _verb(self, name: str) -> object:
        result = getattr(self.device, name)()
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _cleanup(self, outcome: MigrationState, resume_after: bool) -> None:
        """PRECOPY_NOTIFY_CLEANUP: DONE, dirty logging off, the hook gone, the VM running."""
        self._close_round(trio.current_time())
        if self._t_end is None:
            self._t_end = trio.current_time()
        self._paused_writes = self._log.dirty_pages if outcome is MigrationState.COMPLETED else 0
        if self._paused_writes:
            events.warn("migration.check", paused_writes=self._paused_writes,
                        reason="pages written after the last sync with the VM stopped")
        self._log.stop()
        if self.hinting:
            assert self.device is not None
            if self.device.on_hint == self.hint:
                self.device.on_hint = self._previous_hook
            await self._verb("hint_done")
        if self._paused_by_us and (outcome is not MigrationState.COMPLETED or resume_after):
            await self.vm.resume()

    def _check(self, relied: Relied) -> MemoryCheck:
        assert self.dest is not None
        check = compare_memory(self.source, self.dest, relied)
        emit = events.emit if check.ok else events.warn
        emit("migration.check", **check.to_dict())
        return check

    # ---- sending ----------------------------------------------------------------------------
    def _send_chunk(self, budget: int) -> int:
        """Send pages from the front of the bitmap until ``budget`` wire bytes are spent."""
        spent = 0
        head = stop = -1
        for first, end in self._bitmap:
            if head < 0:
                head = first
            stop, cost = self._send_range(first, end, budget - spent)
            spent += cost
            if stop < end or spent >= budget:
                break
        if head >= 0:
            self._pending -= self._bitmap.remove(head, stop)
        return spent

    def _send_range(self, first: int, end: int, budget: int) -> tuple[int, int]:
        """Send pages from ``first`` (before ``end``) until ``budget`` bytes; (stop, cost)."""
        end = min(end, first + budget // ZERO_PAGE_BYTES + 1)  # more could never fit
        cost = 0
        for is_data, s, e in self._runs(first << PAGE_SHIFT, end << PAGE_SHIFT):
            unit = NORMAL_PAGE_BYTES if is_data else ZERO_PAGE_BYTES
            pages = min((e - s) >> PAGE_SHIFT, -(-(budget - cost) // unit))
            stop = s + (pages << PAGE_SHIFT)
            cost += self._send_data(s, stop) if is_data else self._send_zero(s, stop)
            if stop < e or cost >= budget:
                return stop >> PAGE_SHIFT, cost
        return end, cost

    def _runs(self, start: int, end: int):
        """(is_data, start, end) page-aligned runs covering [start, end): data or hole."""
        pos = start
        for ds, de in self.source.data_ranges_bounded(start, end - start):
            ds = max(pos, ds & ~_PAGE_MASK)
            de = min(end, (de + _PAGE_MASK) & ~_PAGE_MASK)
            if ds > pos:
                yield False, pos, ds
            if de > ds:
                yield True, ds, de
            pos = max(pos, de)
        if pos < end:
            yield False, pos, end

    def _send_zero(self, start: int, end: int) -> int:
        pages = (end - start) >> PAGE_SHIFT
        self._round.zero += pages  # type: ignore[union-attr]
        if self.dest is not None and self._dest_written:
            first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
            for s, e in list(self._dest_written.clip(first, last)):
                self.dest.discard(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT)
            self._dest_written.remove(first, last)
        cost = pages * ZERO_PAGE_BYTES
        self._round.bytes += cost  # type: ignore[union-attr]
        return cost

    def _send_normal(self, start: int, pages: int, data: bytes | memoryview | None) -> int:
        """Count ``pages`` normal pages at ``start``; copy ``data`` (their bytes) if any."""
        if self.dest is not None and data is not None:
            self.dest.write(start, data)
            self._dest_written.add(start >> PAGE_SHIFT, (start >> PAGE_SHIFT) + pages)
        cost = pages * NORMAL_PAGE_BYTES
        self._round.normal += pages  # type: ignore[union-attr]
        self._round.bytes += cost  # type: ignore[union-attr]
        return cost

    def _send_data(self, start: int, end: int) -> int:
        """Send the written pages of [start, end); all-zero ones as zero pages if asked."""
        cost = 0
        pos = start
        copy = self.dest is not None
        while pos < end:
            n = min(_READ_PIECE, end - pos)
            if not self.params.zero_detect:
                data = self.source.read(pos, n) if copy else None
                cost += self._send_normal(pos, n >> PAGE_SHIFT, data)
                pos += n
                continue
            buf = self.source.read(pos, n)
            view = memoryview(buf) if copy else None
            run = 0  # start offset of the current run of non-zero pages
            for off in range(0, n, PAGE_SIZE):
                if buf.startswith(_ZERO_PAGE, off):
                    if off > run:
                        cost += self._send_normal(pos + run, (off - run) >> PAGE_SHIFT,
                                                  view[run:off] if view is not None else None)
                    cost += self._send_zero(pos + off, pos + off + PAGE_SIZE)
                    run = off + PAGE_SIZE
            if n > run:
                cost += self._send_normal(pos + run, (n - run) >> PAGE_SHIFT,
                                          view[run:n] if view is not None else None)
            pos += n
        return cost

    def _make_report(self, outcome: MigrationState, check: MemoryCheck | None
                     ) -> MigrationReport:
        rounds = tuple(self._rounds)
        final = [r for r in rounds if r.final]
        downtime_bytes = sum(r.bytes for r in final)
        total = sum(r.bytes for r in rounds)
        end = self._t_end if self._t_end is not None else self._t0
        paused = self._t_pause if self._t_pause is not None else end
        return MigrationReport(
            outcome=outcome.value,
            hinting=self.hinting,
            ram_pages=self._ram.total,
            rounds=rounds,
            syncs=self._log.syncs,
            cmd_ids=tuple(self._cmd_ids),
            normal_pages=sum(r.normal_pages for r in rounds),
            zero_pages=sum(r.zero_pages for r in rounds),
            hinted_pages=sum(r.hinted_pages for r in rounds),
            total_bytes=total,
            precopy_bytes=total - downtime_bytes,
            downtime_bytes=downtime_bytes,
            total_time=end - self._t0,
            downtime=(end - paused) if final else 0.0,
            bandwidth=self.params.bandwidth,
            downtime_limit=self.params.downtime_limit,
            hints=self._hints,
            hinted_bytes=self._hinted_bytes,
            hints_ignored=self._ignored,
            dirty_faults=self._log.faults,
            paused_writes=self._paused_writes,
            check=check,
        )
