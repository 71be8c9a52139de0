"""The virtio-balloon driver: Linux 6.1 ``drivers/virtio/virtio_balloon.c`` over virtio-mmio.

:class:`VirtioBalloon` is ``struct virtio_balloon`` plus the driver's entry points:

- :meth:`~VirtioBalloon.probe` (sync): reset, ACKNOWLEDGE, DRIVER, feature negotiation with
  Linux's ``validate``, FEATURES_OK, ``init_vqs`` (queues numbered densely by the negotiated
  features, rings in the guest's own unmovable pages, the stats buffer primed *and kicked before
  DRIVER_OK*, a Linux quirk against GEN-D-20 kept by default), hinting and reporting set-up,
  ``poison_val`` (BAL-D-35), DRIVER_OK, then a pending target is picked up.
- :meth:`~VirtioBalloon.run` (async): the interrupt dispatcher (``vm_interrupt``) and the work
  items (``update_balloon_size_work``, ``update_balloon_stats_work``, ``report_free_page_work``,
  the page reporting work), each a task of one nursery.
- :meth:`~VirtioBalloon.oom_notify` (deflate on OOM), :meth:`~VirtioBalloon.shrink` (the
  hinting shrinker), :meth:`~VirtioBalloon.remove` (``virtballoon_remove``).

Every step is a structlog event under ``vballoon.guest``: ``driver.probe``, ``driver.features``,
``driver.inflate``, ``driver.deflate``, ``driver.actual``, ``driver.stats``, ``driver.report``,
``driver.hint.start|block|stop|done``, ``driver.oom``, ``driver.remove``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import structlog
import trio

from guest.balloon.inflate import Balloon, release_pages
from guest.balloon.options import BalloonOptions, validate_features
from guest.balloon.reporting_dev import ReportingDevice
from guest.balloon.resources import (
    CMD_ACTIVE_OFFSET,
    CMD_STOP_OFFSET,
    PFNS_OFFSET,
    STATS_OFFSET,
    HintQueue,
    ProbeError,
    Rings,
)
from guest.balloon.stats import STAT_SIZE, VmEvents, collect_stats, pack_stats, stats_tags
from guest.balloon.work import WaitQueue, Work
from guest.hinting import BUSY, FreePageHinting, HintStatistics
from guest.mm.types import MigrateType
from guest.reporting import PAGE_REPORTING_CAPACITY, PageReporting
from guest.virtio_mmio import VirtioMmioTransport, VirtQueue
from guest.walker import walk_free_blocks
from protocol.balloon import (
    OOM_NR_PAGES,
    VIRTIO_ID_BALLOON,
    BalloonQueue,
    ConfigOffset,
    queue_numbering,
)
from protocol.errors import UsageError, VballoonError
from protocol.features import BalloonFeature, TransportFeature, has, names
from protocol.mmio import InterruptBit

__all__ = ["ProbeError", "VirtioBalloon"]

log = structlog.get_logger("vballoon.guest")

_PAGE_SHIFT = 12
_QUEUE_NAMES = {BalloonQueue.INFLATE: "inflate", BalloonQueue.DEFLATE: "deflate",
                BalloonQueue.STATS: "stats", BalloonQueue.FREE_PAGE: "free_page_vq",
                BalloonQueue.REPORTING: "reporting_vq"}


class VirtioBalloon:
    """The balloon driver bound to one device.

    Args:
        transport: the virtio-mmio transport (its ``irq`` must be set before :meth:`run`).
        mm: the guest's :class:`~guest.mm.PageAllocator`.
        memory: guest RAM.
        options: the guest's configuration (:class:`BalloonOptions`).
        vm_events: returns the workload's vm-event counters for the stats (default: zeros).
        clock: the time source of the reporting core (default ``trio.current_time``).
    """

    def __init__(self, transport: VirtioMmioTransport, mm: Any, memory: Any, *,
                 options: BalloonOptions | None = None,
                 vm_events: Callable[[], VmEvents] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.transport = transport
        self.mm = mm
        self.memory = memory
        self.options = options or BalloonOptions()
        self.vm_events = vm_events or VmEvents
        self._clock = clock or trio.current_time
        self.features = 0
        self.acked = WaitQueue()  # vb->acked
        self.stop_update = False
        self.vqs: dict[BalloonQueue, VirtQueue] = {}
        self.balloon: Balloon | None = None
        self.hinting: FreePageHinting | None = None
        self.reporting: ReportingDevice | None = None
        self._rings = Rings(mm)
        self._page: int | None = None
        self._stats_tags = stats_tags(self.options.stats_layout, hugetlb=self.options.hugetlb)
        self.size_work = Work("update_balloon_size", self._update_balloon_size)
        self.stats_work = Work("update_balloon_stats", self._stats_handle_request)
        self.hint_work = Work("report_free_page", self._report_free_page)
        self._dispatcher: trio.CancelScope | None = None
        self.last_stats: dict[Any, int] = {}
        """The values of the last stats buffer, by tag."""
        self.interrupts = 0
        self.spurious_interrupts = 0
        self.probed = False

    # ---- probe --------------------------------------------------------------------------
    def has(self, feature: int) -> bool:
        """``virtio_has_feature``."""
        return has(self.features, feature)

    def probe(self) -> None:
        """``virtio_dev_probe`` + ``virtballoon_probe``; on failure the device is left FAILED.

        Raises:
            DeviceViolation: the device broke a rule (bad magic, refused features...).
            NoDevice: the slot holds no balloon.
            ProbeError: a queue is too small or guest memory ran out.
        """
        t = self.transport
        t.begin(device_id=VIRTIO_ID_BALLOON)
        try:
            self.features = t.negotiate(self.options.features,
                                        lambda f: validate_features(f, self.options))
            log.info("driver.features", offered=t.device_features, accepted=self.features,
                     names=names(self.features))
            self._probe_body()
        except BaseException:
            try:
                self._release()
            except VballoonError:
                pass  # the device is already misbehaving; report the first error
            t.fail()
            raise
        t.device_ready()
        if self.has(BalloonFeature.STATS_VQ) and not self.options.stats_kick_before_driver_ok:
            self.vqs[BalloonQueue.STATS].ring.kick()
        self.probed = True
        log.info("driver.probe", features=names(self.features),
                 queues={self.vqs[q].name: self.vqs[q].index for q in self.vqs})
        if self.towards_target():
            self.changed()

    def _probe_body(self) -> None:
        page = self.mm.alloc_pages(0, MigrateType.UNMOVABLE)
        if page is None:
            raise ProbeError(errno.ENOMEM, "no page for the driver's buffers")
        self._page = page << _PAGE_SHIFT
        self.memory.write(self._page, bytes(1 << _PAGE_SHIFT))
        self._init_vqs()
        self.balloon = Balloon(
            mm=self.mm, memory=self.memory, pfns_gpa=self._page + PFNS_OFFSET, acked=self.acked,
            inflate_vq=self.vqs[BalloonQueue.INFLATE], deflate_vq=self.vqs[BalloonQueue.DEFLATE],
            deflate_on_oom=self.has(BalloonFeature.DEFLATE_ON_OOM),
            fill_byte=self.options.free_fill_byte)
        if self.has(BalloonFeature.FREE_PAGE_HINT):
            vq = self.vqs[BalloonQueue.FREE_PAGE]
            if vq.size < 2:  # one entry is always kept for the STOP id
                raise ProbeError(errno.ENOSPC, f"free page queue has {vq.size} entries, needs 2")
            self.hinting = FreePageHinting(
                HintQueue(vq), read_cmd_id=self._read_cmd_id, mm=self.mm,
                free_block=self._free_block, write=self.memory.write,
                cmd_active_gpa=self._page + CMD_ACTIVE_OFFSET,
                cmd_stop_gpa=self._page + CMD_STOP_OFFSET,
                mode=str(self.options.hint_mode), order=self.options.hint_order,
                walk=lambda cursor, order, cb, **kw: walk_free_blocks(self.mm, cursor, order,
                                                                      cb, **kw))
            self._hook_hint_ledger()
        if self.has(BalloonFeature.PAGE_POISON):
            self.transport.write_config32(ConfigOffset.POISON_VAL, self.options.poison_val)
        if self.has(BalloonFeature.REPORTING):
            vq = self.vqs[BalloonQueue.REPORTING]
            if vq.size < PAGE_REPORTING_CAPACITY:
                raise ProbeError(errno.ENOSPC, f"reporting queue has {vq.size} entries, "
                                 f"needs {PAGE_REPORTING_CAPACITY}")
            self.reporting = ReportingDevice(vq, self.acked)
            self.reporting.core = core = PageReporting(self.mm, clock=self._clock,
                                                       wakeup=self.reporting.wakeup)
            core.register()  # page_reporting_register: the first pass 2 s from now

    def _init_vqs(self) -> None:
        """``init_vqs``: find the queues (dense numbering), prime the stats queue."""
        callbacks = {BalloonQueue.INFLATE: self._balloon_ack,
                     BalloonQueue.DEFLATE: self._balloon_ack,
                     BalloonQueue.STATS: self._stats_request,
                     BalloonQueue.FREE_PAGE: None,
                     BalloonQueue.REPORTING: self._balloon_ack}
        cap = self.options.max_queue_size
        for queue, index in queue_numbering(self.features).items():
            max_size = cap
            if cap is not None and queue is BalloonQueue.REPORTING:
                max_size = max(cap, PAGE_REPORTING_CAPACITY)
            elif cap is not None and queue is BalloonQueue.FREE_PAGE:
                max_size = max(cap, 2)
            indirect = (PAGE_REPORTING_CAPACITY if queue is BalloonQueue.REPORTING
                        and has(self.features, TransportFeature.RING_INDIRECT_DESC) else 0)
            vq = self.transport.setup_vq(index, _QUEUE_NAMES[queue], callbacks[queue],
                                         self._rings, max_size=max_size,
                                         indirect_entries=indirect)
            if callbacks[queue] is None:
                vq.ring.disable_cb()  # a queue without callback asks for no interrupts
            self.vqs[queue] = vq
        if self.has(BalloonFeature.STATS_VQ):
            n = self._update_balloon_stats()
            vq = self.vqs[BalloonQueue.STATS]
            vq.ring.add([(self._page + STATS_OFFSET, STAT_SIZE * n)], [], self)
            if self.options.stats_kick_before_driver_ok:
                vq.ring.kick()  # Linux kicks here, before DRIVER_OK (GEN-D-20)

    def _release(self) -> None:
        """Undo probe (error path and remove): unhook reporting and the hint ledger, then
        QueueReady = 0 everywhere (``del_vqs``), free the rings and the private page."""
        if self.reporting is not None and self.reporting.core is not None:
            if self.reporting.core.registered:
                self.reporting.core.unregister()
        if self.hinting is not None:
            self._unhook_hint_ledger()
        try:
            self.transport.del_vqs(self._rings)
        finally:
            self.vqs.clear()
            if self._page is not None:
                self.mm.free_pages(self._page >> _PAGE_SHIFT, 0)
                self._page = None

    # ---- config -------------------------------------------------------------------------
    def target(self) -> int:
        """Config ``num_pages`` (``ALIGN(num_pages, VIRTIO_BALLOON_PAGES_PER_PAGE)`` = itself
        with 4 KiB guest pages)."""
        return self.transport.read_config32(ConfigOffset.NUM_PAGES)

    def towards_target(self) -> int:
        """``towards_target``: target minus the pages in the balloon."""
        return self.target() - (self.balloon.num_pages if self.balloon else 0)

    def update_balloon_size(self) -> None:
        """``update_balloon_size``: write ``actual`` (one le32 access)."""
        actual = self.balloon.num_pages if self.balloon else 0
        self.transport.write_config32(ConfigOffset.ACTUAL, actual)
        log.info("driver.actual", actual=actual)

    def _read_cmd_id(self) -> int:
        return self.transport.read_config32(ConfigOffset.FREE_PAGE_HINT_CMD_ID)

    # ---- interrupts and callbacks ------------------------------------------------------------
    def handle_interrupt(self) -> InterruptBit:
        """``vm_interrupt``: read and acknowledge InterruptStatus, then config, then queues."""
        status = self.transport.take_interrupt()
        self.interrupts += 1
        if not status:
            self.spurious_interrupts += 1
        if status & InterruptBit.CONFIG:
            self.changed()
        if status & InterruptBit.VRING:
            for vq in list(self.vqs.values()):  # vring_interrupt on every queue
                if vq.callback is not None and vq.ring.more_used():
                    vq.callback(vq)
        return status

    def changed(self) -> None:
        """``virtballoon_changed`` (the config change callback)."""
        if self.stop_update:
            return
        self.size_work.queue()
        if self.hinting is not None and self.hinting.config_changed():
            self.hint_work.queue()

    def _balloon_ack(self, vq: VirtQueue) -> None:
        self.acked.wake_up()

    def _stats_request(self, vq: VirtQueue) -> None:
        if not self.stop_update:
            self.stats_work.queue()

    # ---- work items -----------------------------------------------------------------------
    async def _update_balloon_size(self) -> None:
        """``update_balloon_size_func`` (6.1: nothing to do when the target is met)."""
        assert self.balloon is not None
        diff = self.towards_target()
        if not diff:
            return
        if diff > 0:
            diff -= await self.balloon.fill(diff)
        else:
            diff += await self.balloon.leak(-diff)
        self.update_balloon_size()
        if diff:
            self.size_work.queue()

    def _update_balloon_stats(self) -> int:
        """``update_balloon_stats`` into the stats buffer; the number of entries."""
        stats = collect_stats(self.mm, self.vm_events(), self._stats_tags)
        self.memory.write(self._page + STATS_OFFSET, pack_stats(stats))
        self.last_stats = dict(stats)
        return len(stats)

    async def _stats_handle_request(self) -> None:
        """``stats_handle_request``: refresh, take the buffer back, re-add it, kick."""
        n = self._update_balloon_stats()
        ring = self.vqs[BalloonQueue.STATS].ring
        if ring.get_buf() is None:
            return
        ring.add([(self._page + STATS_OFFSET, STAT_SIZE * n)], [], self)
        ring.kick()
        log.info("driver.stats", **{tag.name.lower(): v for tag, v in self.last_stats.items()})
        await trio.lowlevel.checkpoint()

    async def _report_free_page(self) -> None:
        """``report_free_page_func``, yielding where Linux could be preempted.

        Where Linux busy-loops on a full ring, simulated time passes
        (``options.hint_busy_wait``), so a device that drains the ring on a timer gets to.
        """
        assert self.hinting is not None
        for step in self.hinting.work():
            if step == BUSY:
                await trio.sleep(self.options.hint_busy_wait)
            else:
                await trio.lowlevel.checkpoint()

    # ---- the running driver -------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve interrupts and work items until :meth:`remove` (or cancellation)."""
        if not self.probed:
            raise UsageError("probe() the balloon before run()")
        if self.transport.irq is None:
            raise UsageError("the transport has no interrupt line")
        try:
            async with trio.open_nursery() as nursery:
                self._dispatcher = nursery.cancel_scope
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self.size_work.serve)
                nursery.start_soon(self.stats_work.serve)
                if self.hinting is not None:
                    nursery.start_soon(self.hint_work.serve)
                if self.reporting is not None:
                    nursery.start_soon(self.reporting.serve)
                task_status.started(self)
        finally:
            self._dispatcher = None

    async def _dispatch(self) -> None:
        while True:
            await self.transport.irq.wait()
            self.handle_interrupt()

    # ---- memory pressure ------------------------------------------------------------------
    async def oom_notify(self) -> int:
        """``virtio_balloon_oom_notify``: deflate up to 256 pages; pages freed.

        Registered by Linux only with DEFLATE_ON_OOM; without it this returns 0. The model's
        allocator has no OOM path, so whoever models the OOM killer calls this.
        """
        if self.balloon is None or not self.has(BalloonFeature.DEFLATE_ON_OOM):
            return 0
        freed = await self.balloon.leak(OOM_NR_PAGES)
        self.update_balloon_size()
        log.info("driver.oom", freed=freed, num_pages=self.balloon.num_pages)
        return freed

    def shrink_count(self) -> int:
        """The hinting shrinker's ``count_objects``: pages held for hinting."""
        return self.hinting.shrink_count() if self.hinting else 0

    def shrink(self, nr_pages: int) -> int:
        """The hinting shrinker's ``scan_objects``: give held hint blocks back; pages freed."""
        return self.hinting.shrink(nr_pages) if self.hinting else 0

    def hint_statistics(self) -> HintStatistics | None:
        return self.hinting.statistics() if self.hinting else None

    def _free_block(self, pfn: int, order: int) -> None:
        release_pages(self.mm, self.memory, [pfn], order, self.options.free_fill_byte)

    def _hook_hint_ledger(self) -> None:
        """Feed the hint ledger: allocator allocations (if it has the hook) and RAM writes."""
        ledger = self.hinting.ledger  # type: ignore[union-attr]
        if hasattr(self.mm, "on_alloc") and self.mm.on_alloc is None:
            self.mm.on_alloc = ledger.note_alloc
        if hasattr(self.memory, "add_write_observer"):
            self.memory.add_write_observer(ledger.note_write)

    # ---- remove -------------------------------------------------------------------------
    async def remove(self) -> None:
        """``virtballoon_remove``: stop the work, deflate everything, ``actual`` = 0, free the
        hinted blocks, reset the device, delete the queues; then :meth:`run` returns."""
        if not self.probed:
            raise UsageError("remove() of a balloon that was not probed")
        if self._dispatcher is None:  # not running: serve interrupts just for the teardown
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch)
                await self._remove()
                nursery.cancel_scope.cancel()
        else:
            await self._remove()
            self._dispatcher.cancel()

    async def _remove(self) -> None:
        assert self.balloon is not None
        if self.reporting is not None:
            await self.reporting.stop()
        self.stop_update = True
        await self.size_work.cancel_sync()
        await self.stats_work.cancel_sync()
        await self.hint_work.cancel_sync()
        while self.balloon.num_pages:  # remove_common
            await self.balloon.leak(self.balloon.num_pages)
        self.update_balloon_size()
        if self.hinting is not None:
            self.hinting.return_free_pages_to_mm(len(self.hinting.held))
        self.transport.reset()
        self._release()
        self.probed = False
        log.info("driver.remove")

    def _unhook_hint_ledger(self) -> None:
        ledger = self.hinting.ledger  # type: ignore[union-attr]
        if getattr(self.mm, "on_alloc", None) == ledger.note_alloc:
            self.mm.on_alloc = None
        if hasattr(self.memory, "remove_write_observer"):
            try:
                self.memory.remove_write_observer(ledger.note_write)
            except ValueError:
                pass

