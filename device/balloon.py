"""The virtio-balloon device (virtio §5.5) as QEMU's ``hw/virtio/virtio-balloon.c`` behaves.

:class:`BalloonDevice` is what a transport (:mod:`device.mmio`, :mod:`device.vhost_user`)
drives through :class:`~device.transport.VirtioBackendDevice`, and what the host side (the VMM,
tests, the CLI) controls with QMP-named verbs: :meth:`~BalloonDevice.balloon`,
:meth:`~BalloonDevice.query_balloon`, :meth:`~BalloonDevice.guest_stats`, and the free page
hinting verbs the migration code calls (:meth:`~BalloonDevice.hint_start`, ``hint_stop``,
``hint_done``).

Structure: the queue work is done by sans-I/O handlers (:mod:`device.inflate`,
:mod:`device.stats`, :mod:`device.hint`, :mod:`device.reporting`, :mod:`device.config`); this
module is the trio edge that owns the negotiated queues and runs them.

Resource handling: :meth:`BalloonDevice.run` opens one nursery with one task per balloon queue
(each woken by :meth:`~BalloonDevice.kick`, which never blocks) and one stats-poll timer task;
cancel the caller's scope to stop them. A queue's chains are only ever popped by its own task.

Error handling: a :class:`~protocol.errors.DriverViolation` raised by ``DeviceQueue.pop`` (the
needs-reset policy) or found by a handler (BL-16) puts the whole device in the needs-reset
state, as QEMU's ``virtio_error`` does: ``on_needs_reset`` is called once, no queue is served
until :meth:`~BalloonDevice.reset`. Under the truncate and skip policies the ring layer handles
ring violations itself and the device keeps serving; hostile payloads (PFNs outside RAM,
unaligned reports, unknown stats tags) are never fatal, they are recorded and logged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio

from device.config import BalloonConfigSpace
from device.events import emit, warn
from device.free_page import handle_hint_chain
from device.hint import FreePageHint, HintTransition
from device.inflate import MAX_PFNS_PER_CHAIN, deflate, inflate
from device.ranges import RangeSet
from device.records import REJECTED_KEEP, BalloonRecords
from device.reporting import report
from device.stats import StatsCollector, receive_stats_chain
from device.transport import HostMemory, NotifyUsed, RingConfig
from protocol.balloon import PFN_SHIFT, VIRTIO_ID_BALLOON, BalloonQueue, queue_numbering
from protocol.errors import ConfigError, DriverViolation, ProtocolViolation, UsageError
from protocol.features import BalloonFeature, TransportFeature, bit, has, mask, names
from protocol.split_ring import MAX_QUEUE_SIZE
from virtqueue.device import DescriptorChain, DeviceQueue
from virtqueue.policy import ErrorPolicy

__all__ = [
    "DEFAULT_FEATURES",
    "QEMU_DEFAULT_FEATURES",
    "QUEUE_SIZES",
    "SUPPORTED_FEATURES",
    "BalloonDevice",
]

_TRANSPORT = mask(TransportFeature.RING_INDIRECT_DESC, TransportFeature.RING_EVENT_IDX,
                  TransportFeature.VERSION_1)
QEMU_DEFAULT_FEATURES = mask(BalloonFeature.STATS_VQ, BalloonFeature.PAGE_POISON) | _TRANSPORT
"""What QEMU offers by default: STATS_VQ (always), PAGE_POISON (``page-poison=on``), and the
transport bits INDIRECT_DESC, EVENT_IDX, VERSION_1."""
DEFAULT_FEATURES = QEMU_DEFAULT_FEATURES | bit(BalloonFeature.REPORTING)
"""vballoon's default: QEMU's plus free page reporting (QEMU ``free-page-reporting=on``)."""
SUPPORTED_FEATURES = mask(*BalloonFeature) | _TRANSPORT
"""Every bit this device can offer: all balloon bits and the split-ring transport bits."""

QUEUE_SIZES: dict[BalloonQueue, int] = {
    BalloonQueue.INFLATE: 128,
    BalloonQueue.DEFLATE: 128,
    BalloonQueue.STATS: 128,
    BalloonQueue.FREE_PAGE: 1024,  # VIRTQUEUE_MAX_SIZE
    BalloonQueue.REPORTING: 32,
}
"""Queue sizes QEMU creates (``virtio_add_queue``); the MMIO transport shows them as max."""

_DRAIN_BATCH = 64
"""Chains handled before a queue task lets the others run."""
_U32_MAX = 0xFFFF_FFFF


@dataclass(slots=True)
class _Queue:
    """One attached queue: its kind, transport index, ring state and how to interrupt."""

    kind: BalloonQueue
    index: int
    vq: DeviceQueue
    ring: RingConfig
    memory: HostMemory
    notify_used: NotifyUsed


def _ignore_config_change() -> None:
    pass


def _ignore_needs_reset(violation: ProtocolViolation) -> None:
    pass


class BalloonDevice:
    """The balloon device: queues, config space, records and host verbs (see module doc).

    Args:
        memory: guest RAM (``None`` until a vhost-user memory table arrives; ``attach_queue``
            then provides it).
        features: the offered feature mask (default :data:`DEFAULT_FEATURES`).
        policy: what a ring violation does (:class:`~virtqueue.policy.ErrorPolicy`).
        stats_interval: stats polling interval in virtual seconds, 0 = off (QEMU
            ``guest-stats-polling-interval``).
        queue_sizes: per-queue maximum sizes (default :data:`QUEUE_SIZES`).
        numbering: ``"offered"`` numbers queues densely over the offered features, as QEMU;
            ``"negotiated"`` over the negotiated ones, as Linux does (for interop experiments).
        max_pfns_per_chain: inflate/deflate work bound per chain (BL-02).
        rejected_limit: how many rejected PFNs are kept.

    Raises:
        ConfigError: an unsupported feature bit, no VERSION_1, a bad queue size or policy.
    """

    device_id = VIRTIO_ID_BALLOON

    def __init__(self, memory: HostMemory | None = None, *, features: int = DEFAULT_FEATURES,
                 policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                 stats_interval: float = 0.0,
                 queue_sizes: Mapping[BalloonQueue, int] | None = None,
                 numbering: Literal["offered", "negotiated"] = "offered",
                 max_pfns_per_chain: int = MAX_PFNS_PER_CHAIN,
                 rejected_limit: int = REJECTED_KEEP) -> None:
        if features & ~SUPPORTED_FEATURES:
            raise ConfigError(f"balloon cannot offer {names(features & ~SUPPORTED_FEATURES)}")
        if not has(features, TransportFeature.VERSION_1):
            raise ConfigError("balloon must offer VERSION_1 (virtio-mmio version 2 is modern)")
        try:
            self.policy = ErrorPolicy(policy)
        except ValueError:
            raise ConfigError(f"unknown error policy {policy!r}; choose one of "
                              f"{[p.value for p in ErrorPolicy]}") from None
        if numbering not in ("offered", "negotiated"):
            raise ConfigError(f"numbering must be 'offered' or 'negotiated', not {numbering!r}")
        sizes = dict(QUEUE_SIZES) | dict(queue_sizes or {})
        for kind, n in sizes.items():
            if not 1 <= n <= MAX_QUEUE_SIZE or n & (n - 1):
                raise ConfigError(f"{kind.name} queue size {n} is not a power of two <= 32768")
        if max_pfns_per_chain < 1 or rejected_limit < 0:
            raise ConfigError("max_pfns_per_chain must be >= 1 and rejected_limit >= 0")
        self.memory = memory
        self.numbering = numbering
        self.queue_sizes = sizes
        self.max_pfns_per_chain = max_pfns_per_chain
        self._offered = features
        self._features = 0
        self._features_set = False
        self.config = BalloonConfigSpace(features)
        self.hint = FreePageHint()
        self.stats = StatsCollector(stats_interval)
        self.records = BalloonRecords(rejected_limit)
        self._queues: dict[BalloonQueue, _Queue] = {}
        self._active = False
        self._vm_running = True
        self._violation: ProtocolViolation | None = None
        self._wakeups = {kind: trio.Event() for kind in BalloonQueue}
        self._timer_scope: trio.CancelScope | None = None
        self._running = False
        self.on_config_change: Callable[[], None] = _ignore_config_change
        self.on_needs_reset: Callable[[ProtocolViolation], None] = _ignore_needs_reset
        self.on_hint: Callable[[int, int], None] | None = None
        """Called with (gpa, length) for each range hinted in START (the VMM clears dirty
        bits, as QEMU's ``qemu_guest_free_page_hint``)."""
        self.on_chain: Callable[[BalloonQueue, DescriptorChain, Any], None] | None = None
        """Observer called with (queue kind, chain, what its handler returned) after each chain
        is handled and before it is given back, so the driver cannot reuse its pages yet: a
        :class:`~device.inflate.PfnResult` (inflate, deflate), a
        :class:`~device.reporting.ReportResult`, a :class:`~device.free_page.HintChainResult`,
        or None (stats: see :attr:`stats`). For watchers such as ``vballoon serve``."""

    # ---- features and queue layout (VirtioBackendDevice) --------------------------------
    def offered_features(self) -> int:
        return self._offered

    @property
    def features(self) -> int:
        """The negotiated features (0 before set_features)."""
        return self._features

    def set_features(self, mask: int) -> bool:
        """Take the driver's features; refuse bits not offered, or any change once active."""
        if self._active or mask & ~self._offered:
            warn("balloon.features", refused=names(mask), unoffered=names(mask & ~self._offered),
                 active=self._active, rule="GEN-D-5")
            return False
        self._features, self._features_set = mask, True
        emit("balloon.features", accepted=names(mask))
        return True

    def _layout(self) -> dict[int, BalloonQueue]:
        basis = self._offered
        if self.numbering == "negotiated" and self._features_set:
            basis = self._features
        return _queue_layout(basis)

    def num_queues(self, features: int) -> int:
        basis = self._offered if self.numbering == "offered" else features & self._offered
        return len(queue_numbering(basis))

    def queue_max_size(self, index: int) -> int:
        kind = self._layout().get(index)
        return 0 if kind is None else self.queue_sizes[kind]

    def queue_index(self, kind: BalloonQueue) -> int | None:
        """The transport index of queue ``kind`` (None if it does not exist)."""
        return next((i for i, k in self._layout().items() if k is kind), None)

    # ---- config space ---------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size, self.hint.config_value)

    def write_config(self, offset: int, data: bytes) -> None:
        w = self.config.write(offset, bytes(data), cmd_id=self.hint.config_value,
                              poison_negotiated=has(self._features, BalloonFeature.PAGE_POISON),
                              now=_now(), ram_size=self.ram_size)
        if w.actual_changed:
            self.records.count("actual_updates")

    def _config_changed(self) -> None:
        self.records.count("config_changes")
        self.on_config_change()

    # ---- queues (VirtioBackendDevice) -----------------------------------------------------
    def attach_queue(self, index: int, ring: RingConfig, memory: HostMemory,
                     notify_used: NotifyUsed) -> None:
        kind = self._layout().get(index)
        try:
            if kind is None:
                raise DriverViolation(rule_id="CFG-01", section="4.2.3.2",
                                      message="queue does not exist", index=index, max_size=0)
            vq = DeviceQueue(index=index, size=ring.size, desc=ring.desc, avail=ring.avail,
                             used=ring.used, memory=memory,
                             event_idx=has(self._features, TransportFeature.RING_EVENT_IDX),
                             indirect=has(self._features, TransportFeature.RING_INDIRECT_DESC),
                             policy=self.policy, next_avail=ring.next_avail,
                             next_used=ring.next_used)
        except DriverViolation as v:
            if self.policy is ErrorPolicy.NEEDS_RESET:
                self._enter_needs_reset(v)
            raise
        assert kind is not None
        if kind is BalloonQueue.STATS and kind in self._queues:
            self.stats.unpark()  # a re-attached ring starts over (its parked head is gone)
        self._queues[kind] = _Queue(kind, index, vq, ring, memory, notify_used)
        self.memory = memory
        emit("balloon.attach", queue=index, kind=kind.name, size=ring.size)
        if self._active:
            self._wake(kind)

    def detach_queue(self, index: int) -> int:
        kind = self._layout().get(index)
        q = self._queues.pop(kind, None) if kind is not None else None
        if q is None:
            raise UsageError(f"queue {index} is not attached")
        next_avail = q.vq.next_avail
        if kind is BalloonQueue.STATS and self.stats.unpark() is not None:
            next_avail = (next_avail - 1) & 0xFFFF  # QEMU unpops the parked stats buffer
        emit("balloon.detach", queue=index, kind=q.kind.name, next_avail=next_avail)
        return next_avail

    def activate(self) -> None:
        """DRIVER_OK: start serving; buffers made available (and kicked) before now are taken."""
        self._active = True
        emit("balloon.activate", features=names(self._features), queues=len(self._queues))
        for kind in self._queues:
            self._wake(kind)

    def kick(self, index: int) -> None:
        kind = self._layout().get(index)
        if kind is None or kind not in self._queues:
            warn("balloon.kick", queue=index, rule="CFG-06", reason="queue not ready")
            return
        self.records.count("kicks")
        if self._active:
            self._wake(kind)

    def reset(self) -> None:
        """Device reset (virtio §2.4), with QEMU's balloon reset on top.

        Hinting stops, the parked stats buffer and every stat are forgotten, poison_val goes
        to 0; num_pages and actual are kept (QEMU). The guest regains every ballooned page,
        so the ``ballooned`` record is cleared (counted as ``reset_released_bytes``).
        """
        if has(self._features, BalloonFeature.FREE_PAGE_HINT):
            self.hint.stop()
        self.stats.reset()
        self.config.reset()
        self._queues.clear()
        self._features, self._features_set = 0, False
        self._active = False
        self._violation = None
        released = self.records.ballooned.total
        self.records.ballooned.clear()
        self.records.count("reset_released_bytes", released)
        self.records.count("resets")
        emit("balloon.reset", released_bytes=released)

    @property
    def active(self) -> bool:
        return self._active

    def vm_stop(self) -> None:
        """The VM stopped (QEMU ``virtio_vmstate_change``): queues are not served until
        :meth:`vm_start`; kicks meanwhile are remembered."""
        self._vm_running = False

    def vm_start(self) -> None:
        """The VM runs again: serve whatever was kicked while it was stopped."""
        self._vm_running = True
        if self._active:
            for kind in self._queues:
                self._wake(kind)

    @property
    def needs_reset(self) -> ProtocolViolation | None:
        """The violation that stopped the device, or None while it is serviceable."""
        return self._violation

    def _enter_needs_reset(self, violation: ProtocolViolation) -> None:
        if self._violation is not None:
            return
        self._violation = violation
        self.records.count("violations")
        warn("balloon.needs_reset", rule=violation.rule_id, section=violation.section,
             message=violation.message, values={k: v for k, v in violation.values.items()})
        self.on_needs_reset(violation)

    # ---- the trio edge --------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the device until cancelled: one task per queue and the stats poll timer."""
        if self._running:
            raise UsageError("BalloonDevice.run is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                for kind in BalloonQueue:
                    nursery.start_soon(self._serve_queue, kind,
                                       name=f"balloon-{kind.name.lower()}")
                nursery.start_soon(self._stats_timer, name="balloon-stats-timer")
                task_status.started(self)
        finally:
            self._running = False

    def _wake(self, kind: BalloonQueue) -> None:
        self._wakeups[kind].set()

    async def _serve_queue(self, kind: BalloonQueue) -> None:
        while True:
            await self._wakeups[kind].wait()
            self._wakeups[kind] = trio.Event()
            await self._drain(kind)

    def _serving(self, q: _Queue | None) -> bool:
        return (q is not None and self._active and self._vm_running
                and self._violation is None and self._queues.get(q.kind) is q)

    async def _drain(self, kind: BalloonQueue) -> None:
        while self.poll_queue(kind):
            await trio.lowlevel.checkpoint()

    def poll_queue(self, queue: BalloonQueue | int, *, budget: int = _DRAIN_BATCH) -> bool:
        """Handle up to ``budget`` available chains of ``queue`` (a kind or transport index).

        The sans-I/O step the queue tasks repeat (and single-threaded harnesses call
        directly). Driver notifications are off while it runs (QEMU, vhost). Returns True if
        more chains may be waiting: call again.
        """
        kind = queue if isinstance(queue, BalloonQueue) else self._layout().get(queue)
        q = self._queues.get(kind) if kind is not None else None
        if q is None or not self._serving(q):
            return False
        q.vq.disable_notification()
        for _ in range(budget):
            try:
                chain = q.vq.pop()
            except DriverViolation as v:
                self._enter_needs_reset(v)
                return False
            if chain is None:
                break
            self._handle(q, chain)
            if not self._serving(q):
                return False
        else:
            self._interrupt_if_needed(q)
            return True
        self._interrupt_if_needed(q)  # chains the skip policy returned inside pop()
        return q.vq.enable_notification()

    def _handle(self, q: _Queue, chain: DescriptorChain) -> None:
        if chain.violation is not None:
            self.records.count("truncated_chains")
        kind = q.kind
        if kind is BalloonQueue.INFLATE or kind is BalloonQueue.DEFLATE:
            walk = inflate if kind is BalloonQueue.INFLATE else deflate
            result = walk(chain, q.memory, self.records, queue=q.index,
                          max_pfns=self.max_pfns_per_chain)
            self._observe(kind, chain, result)
            self._give_back(q, chain.head)
        elif kind is BalloonQueue.STATS:
            self._receive_stats(q, chain)
        elif kind is BalloonQueue.FREE_PAGE:
            self._free_page_hints(q, chain)
        else:
            result = report(chain, q.memory, self.records, poison_val=self.config.poison_val,
                            queue=q.index)
            self._observe(kind, chain, result)
            self._give_back(q, chain.head)

    def _observe(self, kind: BalloonQueue, chain: DescriptorChain, result: Any) -> None:
        if self.on_chain is not None:
            self.on_chain(kind, chain, result)

    def _give_back(self, q: _Queue, head: int) -> None:
        """Return ``head`` used with length 0 (every balloon queue) and interrupt if wanted."""
        q.vq.push(head, 0)
        self._interrupt_if_needed(q)

    def _interrupt_if_needed(self, q: _Queue) -> None:
        if q.vq.needs_interrupt():
            self.records.count("interrupts")
            q.notify_used()

    # ---- stats ----------------------------------------------------------------------------
    def _receive_stats(self, q: _Queue, chain: DescriptorChain) -> None:
        old = receive_stats_chain(self.stats, chain, q.memory, now=_now(), queue=q.index)
        self._observe(BalloonQueue.STATS, chain, None)
        if old is not None:
            self._give_back(q, old)
        self._retime()

    def _retime(self) -> None:
        if self._timer_scope is not None:
            deadline = self.stats.next_deadline()
            self._timer_scope.deadline = math.inf if deadline is None else deadline

    async def _stats_timer(self) -> None:
        while True:
            deadline = self.stats.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._poll_stats()

    def _poll_stats(self) -> None:
        """The poll timer fired: give the parked buffer back so the guest refills it."""
        q = self._queues.get(BalloonQueue.STATS)
        can = self._serving(q) and has(self._features, BalloonFeature.STATS_VQ)
        head = self.stats.handle_timer(_now(), can_give_back=can)
        if head is not None and q is not None:
            emit("balloon.stats", queue=q.index, head=head, requested=True)
            self._give_back(q, head)

    def set_stats_polling_interval(self, seconds: float) -> None:
        """QEMU's ``guest-stats-polling-interval`` property (0 disables; ConfigError if bad)."""
        self.stats.set_interval(seconds, _now())
        self._retime()

    # ---- free page hinting ------------------------------------------------------------------
    def _free_page_hints(self, q: _Queue, chain: DescriptorChain) -> None:
        r = handle_hint_chain(chain, q.memory, self.hint, self.records, policy=self.policy,
                              queue=q.index, on_hint=self.on_hint)
        self._observe(BalloonQueue.FREE_PAGE, chain, r)
        if not r.give_back:
            assert r.violation is not None
            self._enter_needs_reset(r.violation)  # QEMU virtio_error: nothing is pushed
            return
        self._give_back(q, chain.head)

    def _log_hint(self, step: str, t: HintTransition, **fields: Any) -> None:
        emit("balloon.hint", step=step, old=t.old.name, new=t.new.name, notify=t.notify,
             current=self.hint.cmd_id, **fields)

    def _hint_host(self, verb: str, step: Callable[[], HintTransition]) -> HintTransition | None:
        if not has(self._features, BalloonFeature.FREE_PAGE_HINT):
            emit("balloon.hint", step=verb, skipped="FREE_PAGE_HINT not negotiated")
            return None
        t = step()
        self._log_hint(verb, t)
        if t.notify:
            self._config_changed()
        return t

    def hint_start(self) -> int | None:
        """Open a hinting round (QEMU after a dirty-bitmap sync): new command ID, REQUESTED.

        Returns the new command ID, or None when FREE_PAGE_HINT is not negotiated (QEMU's
        notifier then does nothing). Clears ``hinted_round``.
        """
        if self._hint_host("start", self.hint.start) is None:
            return None
        self.records.hinted_round.clear()
        self.records.count("hint_rounds")
        return self.hint.cmd_id

    def hint_stop(self) -> bool:
        """Stop hinting (QEMU before a dirty-bitmap sync); True if the state changed."""
        t = self._hint_host("stop", self.hint.stop)
        return t is not None and t.old is not t.new

    def hint_done(self) -> bool:
        """End hinting (migration over): the guest may reuse hinted pages; True if changed."""
        t = self._hint_host("done", self.hint.done)
        return t is not None and t.old is not t.new

    # ---- host control verbs (QMP names) -----------------------------------------------------
    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM (QEMU's ``get_current_ram_size``)."""
        return self.memory.size if self.memory is not None else 0

    def balloon(self, target_bytes: int) -> None:
        """QMP ``balloon``: ask the guest to shrink to ``target_bytes`` of RAM.

        ``num_pages = (ram - target) >> 12``; a target above RAM is clamped, 0 is ignored
        (BL-27), then the driver gets a config change.
        """
        if not isinstance(target_bytes, int) or target_bytes < 0:
            raise UsageError(f"balloon target must be a byte count >= 0, not {target_bytes!r}")
        ram = self.ram_size
        if target_bytes > ram:
            warn("balloon.target", rule="BL-27", target=target_bytes, clamped_to=ram)
            target_bytes = ram
        if target_bytes == 0:
            warn("balloon.target", rule="BL-27", target=0, ignored=True)
            return
        self.config.num_pages = min((ram - target_bytes) >> PFN_SHIFT, _U32_MAX)
        emit("balloon.target", target=target_bytes, num_pages=self.config.num_pages)
        self._config_changed()

    def query_balloon(self) -> dict[str, int]:
        """QMP ``query-balloon``: ``actual`` = RAM the guest has left, in bytes."""
        return {"actual": self.ram_size - (self.config.actual << PFN_SHIFT)}

    def guest_stats(self) -> dict[str, Any]:
        """QOM ``guest-stats``: every stat by QEMU name (unset = 2^64-1), and last-update."""
        return {"stats": self.stats.by_name(), "last-update": int(self.stats.last_update)}

    # ---- records --------------------------------------------------------------------------
    @property
    def ballooned(self) -> RangeSet:
        return self.records.ballooned

    @property
    def reported(self) -> RangeSet:
        return self.records.reported

    @property
    def hinted(self) -> RangeSet:
        return self.records.hinted

    @property
    def hinted_round(self) -> RangeSet:
        return self.records.hinted_round

    @property
    def rejected(self) -> list[int]:
        return list(self.records.rejected)

    def summary(self) -> dict[str, Any]:
        """Records and device state as plain values."""
        return {
            **self.records.summary(),
            "num_pages": self.config.num_pages,
            "actual": self.config.actual,
            "poison_val": self.config.poison_val,
            "hint_state": self.hint.state.name,
            "hint_cmd_id": self.hint.cmd_id,
            "stats_updates": self.stats.updates,
            "features": names(self._features),
            "active": self._active,
            "needs_reset": None if self._violation is None else self._violation.rule_id,
        }


def _now() -> float:
    """Virtual time inside trio (MockClock in tests), 0.0 outside a run."""
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0


@functools.lru_cache(maxsize=64)
def _queue_layout(features: int) -> dict[int, BalloonQueue]:
    """Transport index -> queue for a feature mask (shared and read-only: every kick asks)."""
    return {index: kind for kind, index in queue_numbering(features).items()}
