"""Free page hinting, driver side (virtio spec §5.5.6.5; Linux 6.1 ``virtio_balloon.c``).

The host starts a hinting round by writing a new command ID (>= 2) to config
``free_page_hint_cmd_id`` and raising a config interrupt. The driver echoes the ID in a 4-byte
out-buffer, sends free page blocks as device-writable in-buffers, and closes with an out-buffer
holding STOP (0). The host may write STOP or a new ID at any time (the run ends), and DONE (1)
when it no longer needs the hinted pages (the driver frees what it held).

:class:`FreePageHinting` is that state machine, sans-I/O: no trio, no clock. The driver's task
layer calls :meth:`~FreePageHinting.config_changed` from the config interrupt and runs
:meth:`~FreePageHinting.work` (Linux ``report_free_page_func``) on its work item. ``work`` is a
generator that yields at each point where Linux could be preempted (after the start ID and after
each block), so a config interrupt, and the device consuming buffers, can happen mid-run.

Two designs (:class:`~guest.balloon.options.HintMode`):

- ``alloc`` (Linux since 4.20): allocate order-``order`` blocks with no reclaim
  (``__GFP_NORETRY | __GFP_NOWARN | __GFP_NOMEMALLOC``), send each while the ring has at least
  two free entries (one is kept for the STOP), free it at once if not (that hint is lost),
  stop when allocation fails; hold the blocks until DONE. :meth:`~FreePageHinting.shrink` is the
  shrinker that gives held blocks back early under memory pressure.
- ``walk`` (the seed thread's ``walk_free_mem_block``, 2018): walk the free lists with the
  restartable walker and hint blocks of at least ``order`` that stay free; a full ring stops the
  walk, which resumes from its cursor after the device had a chance to run. Nothing is held.

The command ID is re-read from config only after a config interrupt and cached
(``virtio_balloon_cmd_id_received``): QEMU reads 0 in its START state (research/qtest-hint.md
pitfall 1), so polling the field would look like STOP.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import structlog

from guest.hint_ledger import HintLedger, LedgerTotals
from guest.mm.types import Gfp, MigrateType
from protocol.balloon import CommandId
from protocol.errors import UsageError
from virtqueue.driver import QueueBroken, QueueFull

__all__ = [
    "BUSY",
    "HINT_ALLOC_GFP",
    "FreePageHinting",
    "HintAction",
    "HintChannel",
    "HintStatistics",
    "decide",
]

log = structlog.get_logger("vballoon.guest")

HINT_ALLOC_GFP = Gfp.NORETRY | Gfp.NOWARN | Gfp.NOMEMALLOC
"""Linux ``VIRTIO_BALLOON_FREE_PAGE_ALLOC_FLAG``: no reclaim, no warning, no reserves."""
BUSY = "busy"
"""What :meth:`FreePageHinting.work` yields after an iteration that made no progress (the ring
was full): Linux spins there until the host drains the ring or changes the ID; the task layer
lets simulated time pass instead of spinning on the spot."""
_U32 = struct.Struct("<I")
_PAGE_SHIFT = 12


class HintChannel(Protocol):
    """The free page queue as the hinting core drives it (the driver adapts its virtqueue)."""

    @property
    def num_free(self) -> int: ...
    def add_outbuf(self, gpa: int, length: int, token: object) -> None: ...
    def add_inbuf(self, gpa: int, length: int, token: object) -> None: ...
    def get_buf(self) -> tuple[Any, int] | None: ...
    def kick(self) -> None: ...


class _Allocator(Protocol):
    def alloc_pages(self, order: int = 0, migratetype: int = MigrateType.MOVABLE, *,
                    gfp: Gfp = Gfp.NONE) -> int | None: ...


Walk = Callable[..., Any]
""":func:`guest.walker.walk_free_blocks` bound to the allocator:
``walk(cursor, min_order, callback, budget=n) -> WalkResult``."""
_WALK_BUDGET = 32
"""Blocks offered per walker call before the run yields (Linux would ``cond_resched``)."""


class HintAction(StrEnum):
    """What ``report_free_page_func`` does with the received command ID."""

    FREE_ALL = "free_all"
    """DONE: give every held block back."""
    START_RUN = "start_run"
    """A new ID (neither STOP nor the active one): start a run."""
    NOTHING = "nothing"
    """STOP, or the ID of the run that already happened."""


def decide(received: int, active: int) -> HintAction:
    """Linux ``report_free_page_func``'s choice, as a pure function (the whole state table)."""
    if received == CommandId.DONE:
        return HintAction.FREE_ALL
    if received != CommandId.STOP and received != active:
        return HintAction.START_RUN
    return HintAction.NOTHING


@dataclass(frozen=True, slots=True)
class HintStatistics:
    """Counters since probe; ``reused``/``written`` are those of finished periods plus the
    current one (see :mod:`guest.hint_ledger`)."""

    runs: int
    blocks_hinted: int
    bytes_hinted: int
    blocks_held: int
    blocks_dropped_ring_full: int
    blocks_returned_by_shrinker: int
    send_errors: int
    pages_reused: int
    pages_written: int


class FreePageHinting:
    """The driver's hinting state (Linux ``cmd_id_*``, ``free_page_list``) and its work.

    Args:
        channel: the free page queue.
        read_cmd_id: read config ``free_page_hint_cmd_id`` (one le32 config read).
        mm: the page allocator (alloc mode allocates from it).
        free_block: how a held block goes back to the allocator (the driver poisons it first
            when the guest poisons freed pages).
        write: write guest memory (the 4-byte command ID buffers).
        cmd_active_gpa, cmd_stop_gpa: guest addresses of the two 4-byte ID buffers (Linux
            ``&vb->cmd_id_active``, ``&vb->cmd_id_stop``).
        mode: ``"alloc"`` or ``"walk"``.
        order: order of hinted blocks (Linux ``VIRTIO_BALLOON_HINT_BLOCK_ORDER``).
        walk: the walker (walk mode only).
    """

    def __init__(self, channel: HintChannel, *, read_cmd_id: Callable[[], int],
                 mm: _Allocator, free_block: Callable[[int, int], None],
                 write: Callable[[int, bytes], None], cmd_active_gpa: int, cmd_stop_gpa: int,
                 mode: str = "alloc", order: int = 10, walk: Walk | None = None) -> None:
        if mode not in ("alloc", "walk"):
            raise UsageError(f"hint mode must be 'alloc' or 'walk', not {mode!r}")
        if mode == "walk" and walk is None:
            raise UsageError("walk mode needs a free-list walker")
        self.channel = channel
        self._read_cmd_id = read_cmd_id
        self.mm = mm
        self._free_block = free_block
        self._write = write
        self.cmd_active_gpa = cmd_active_gpa
        self.cmd_stop_gpa = cmd_stop_gpa
        self.mode = mode
        self.order = order
        self._walk = walk
        # Linux probe: cmd_id_received_cache = cmd_id_active = cmd_id_stop = STOP.
        self.cmd_id_received_cache = int(CommandId.STOP)
        self.cmd_id_active = int(CommandId.STOP)
        self._read_pending = False  # bit VIRTIO_BALLOON_CONFIG_READ_CMD_ID
        self.held: list[int] = []  # free_page_list (LIFO, as balloon_page_push/pop)
        self.ledger = HintLedger(order)
        self.running = False
        self._write(cmd_stop_gpa, _U32.pack(CommandId.STOP))
        self._runs = 0
        self._blocks = 0
        self._dropped = 0
        self._shrunk = 0
        self._errors = 0
        self._past = LedgerTotals(0, 0, 0, 0)

    # ---- interrupt side ----------------------------------------------------------------
    def config_changed(self) -> bool:
        """``virtio_balloon_queue_free_page_work``: mark the ID for re-reading.

        Returns True when the work must be queued (False if a read was already pending: the
        work is queued already and will read the newest value).
        """
        if self._read_pending:
            return False
        self._read_pending = True
        return True

    def cmd_id_received(self) -> int:
        """``virtio_balloon_cmd_id_received``: read config once per interrupt, else cache."""
        if self._read_pending:
            self._read_pending = False
            self.cmd_id_received_cache = self._read_cmd_id() & 0xFFFFFFFF
        return self.cmd_id_received_cache

    # ---- the work item ------------------------------------------------------------------
    def work(self) -> Iterator[str | None]:
        """``report_free_page_func``: act on the received ID; yields at preemption points
        (None) and after iterations that found the ring full (:data:`BUSY`)."""
        received = self.cmd_id_received()
        action = decide(received, self.cmd_id_active)
        if action is HintAction.FREE_ALL:
            self.done()
        elif action is HintAction.START_RUN:
            yield from self._run()

    def _run(self) -> Iterator[str | None]:
        """``virtio_balloon_report_free_page``: start ID, blocks, STOP.

        Like Linux, a phase that cannot add its buffer (a ring the host does not drain) is
        logged (``driver.hint.error``) and the run goes on: a lost start ID leaves the host
        ignoring this round's blocks, a lost STOP leaves it waiting for the next sync.
        """
        self.running = True
        self._runs += 1
        try:
            if self._guard("start", self._send_cmd_id_start):
                log.info("driver.hint.start", cmd_id=self.cmd_id_active, mode=self.mode)
            yield
            sent = self._blocks
            reason = "error"
            try:
                if self.mode == "alloc":
                    reason = yield from self._send_free_pages()
                else:
                    reason = yield from self._walk_free_pages()
            except (QueueFull, QueueBroken) as exc:
                self._error("block", exc)
            self._guard("stop", self._send_cmd_id_stop)
            log.info("driver.hint.stop", cmd_id=self.cmd_id_active, reason=reason,
                     blocks=self._blocks - sent, held=len(self.held))
        finally:
            self.running = False

    def _guard(self, phase: str, send: Callable[[], None]) -> bool:
        try:
            send()
        except (QueueFull, QueueBroken) as exc:
            self._error(phase, exc)
            return False
        return True

    def _error(self, phase: str, exc: Exception) -> None:
        """Linux ``dev_err(dev, "Failed to send a start id / free page / stop id")``."""
        self._errors += 1
        log.warning("driver.hint.error", phase=phase, cmd_id=self.cmd_id_active, error=str(exc))

    def _drain(self) -> None:
        """Detach all used buffers (the queue has no callback: reaped lazily)."""
        while self.channel.get_buf() is not None:
            pass

    def _send_cmd_id_start(self) -> None:
        self._drain()
        self.cmd_id_active = self.cmd_id_received()
        self._write(self.cmd_active_gpa, _U32.pack(self.cmd_id_active))
        self.channel.add_outbuf(self.cmd_active_gpa, 4, "cmd_id_active")
        self.channel.kick()

    def _send_cmd_id_stop(self) -> None:
        self._drain()
        self.channel.add_outbuf(self.cmd_stop_gpa, 4, "cmd_id_stop")
        self.channel.kick()

    def _id_changed(self) -> bool:
        return self.cmd_id_active != self.cmd_id_received()

    def _send_free_pages(self) -> Iterator[str | None]:
        """``send_free_pages``: one block per iteration until the ID changes or memory ends."""
        while True:
            if self._id_changed():
                return "cmd_id_changed"
            sent = self._get_free_page_and_send()
            if sent is None:
                return "no_free_block"
            yield None if sent else BUSY

    def _get_free_page_and_send(self) -> bool | None:
        """``get_free_page_and_send``: None when allocation fails (the run is complete), else
        whether the block went out (False: the ring was full and the block was freed)."""
        self._drain()
        self.ledger.ignore_allocs = True  # our own allocation is not reuse
        try:
            pfn = self.mm.alloc_pages(self.order, MigrateType.MOVABLE, gfp=HINT_ALLOC_GFP)
        finally:
            self.ledger.ignore_allocs = False
        if pfn is None:
            return None
        if self.channel.num_free > 1:  # one entry is always kept for the STOP id
            self._send_block(pfn, self.order)
            self.held.append(pfn)
            return True
        self._dropped += 1
        self._free_block(pfn, self.order)
        return False

    def _send_block(self, pfn: int, order: int) -> None:
        self.channel.add_inbuf(pfn << _PAGE_SHIFT, 1 << (order + _PAGE_SHIFT), pfn)
        self.channel.kick()
        self.ledger.add(pfn, order)
        self._blocks += 1
        log.debug("driver.hint.block", cmd_id=self.cmd_id_active, pfn=pfn, order=order)

    def _walk_free_pages(self) -> Iterator[str | None]:
        """The seed design: walk free blocks of at least ``order`` and hint them in place.

        The callback runs under the (model's) zone lock, so it only touches the ring. A full
        ring or a changed ID stops the walk (the block stays the cursor's anchor); a full ring
        resumes after a yield, a changed ID ends the run.
        """
        assert self._walk is not None
        cursor = None
        stop: list[str] = []

        def report(zone: Any, pfn: int, order: int, mt: Any) -> int:
            if self._id_changed():
                stop.append("cmd_id_changed")
                return -1
            self._drain()
            if self.channel.num_free <= 1:  # keep one entry for the STOP id
                stop.append("ring_full")
                return -1
            self._send_block(pfn, order)
            return 0

        while True:
            stop.clear()
            result = self._walk(cursor, self.order, report, budget=_WALK_BUDGET)
            if result.complete:
                return "walk_complete"
            if stop and stop[0] == "cmd_id_changed":
                return "cmd_id_changed"
            cursor = result.cursor
            # ring full or budget spent: let the device run, then resume at the cursor
            yield BUSY if stop else None

    # ---- giving blocks back ------------------------------------------------------------
    def return_free_pages_to_mm(self, count: int) -> int:
        """``return_free_pages_to_mm``: free up to ``count`` held blocks; how many were."""
        freed = 0
        while freed < count and self.held:
            self._free_block(self.held.pop(), self.order)
            freed += 1
        return freed

    def done(self) -> int:
        """DONE: close the ledger period and free every held block; returns blocks freed."""
        totals = self.ledger.close()
        past = self._past
        self._past = LedgerTotals(past.blocks_hinted + totals.blocks_hinted,
                                  past.pages_hinted + totals.pages_hinted,
                                  past.pages_reused + totals.pages_reused,
                                  past.pages_written + totals.pages_written)
        freed = self.return_free_pages_to_mm(len(self.held))
        log.info("driver.hint.done", freed_blocks=freed, pages_hinted=totals.pages_hinted,
                 pages_reused=totals.pages_reused, pages_written=totals.pages_written)
        return freed

    def shrink_count(self) -> int:
        """Shrinker ``count_objects``: pages held."""
        return len(self.held) << self.order

    def shrink(self, nr_pages: int) -> int:
        """Shrinker ``scan_objects``: free whole blocks covering ``nr_pages``; pages freed."""
        if nr_pages <= 0:
            return 0
        per_block = 1 << self.order
        blocks = -(-nr_pages // per_block)
        freed = self.return_free_pages_to_mm(blocks)
        self._shrunk += freed
        return freed * per_block

    # ---- accounting ---------------------------------------------------------------------
    def statistics(self) -> HintStatistics:
        now = self.ledger.totals()
        return HintStatistics(
            runs=self._runs,
            blocks_hinted=self._blocks,
            bytes_hinted=(self._past.pages_hinted + now.pages_hinted) << _PAGE_SHIFT,
            blocks_held=len(self.held),
            blocks_dropped_ring_full=self._dropped,
            blocks_returned_by_shrinker=self._shrunk,
            send_errors=self._errors,
            pages_reused=self._past.pages_reused + now.pages_reused,
            pages_written=self._past.pages_written + now.pages_written,
        )
