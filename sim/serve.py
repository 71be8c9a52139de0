"""Serve vballoon's balloon device to a real guest over vhost-user, and tell what it does.

:class:`BalloonServer` runs the real device end (:class:`~device.balloon.BalloonDevice`) behind
the vhost-user back-end (:class:`~device.vhost_user.VhostUserBackend`) in one nursery, so a real
front-end (Linux 6.1's User-Mode Linux ``virtio_uml``, QEMU's ``vhost-user-device``) drives it.
Set for UML: every queue is 256 entries (``virtio_uml`` always asks for 256) and queues are
numbered over the *negotiated* features, as Linux's ``virtio_balloon`` numbers them.

Three faces:

- **events**: every step is published as a :class:`ServeEvent` (a front-end connects, the
  features the driver accepted, queues, inflate and deflate chains, ``actual``, stats buffers,
  free page reports and hints, config-change notifications, the session's end) to ``on_event``
  and to :meth:`BalloonServer.wait_for` waiters. They come from a thin wrapper on the
  transport seam and from the device's ``on_chain`` observer, never from log parsing.
- **control**: the host verbs: :meth:`~BalloonServer.balloon` (QEMU's ``balloon``: the RAM the
  guest keeps), :meth:`~BalloonServer.hint_start` / ``hint_stop`` / ``hint_done``,
  :meth:`~BalloonServer.request_stats` (give the parked stats buffer back now).
- **findings**: every rule the front-end or driver broke, as the device judged it (a
  needs-reset violation, a vhost-user violation that closed the session, or the non-fatal
  payload rules the handlers report: PFNs outside RAM, unaligned reports, hints outside a
  round...). A finding is data, not an exception: the session goes on where the device does.

Nothing here prints: ``vballoon serve`` (:mod:`sim.commands.serve`) renders the events. What
it offers by default and how options are read: :mod:`sim.serve_options` (re-exported here).
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from device.balloon import BalloonDevice
from device.free_page import HintChainResult
from device.inflate import PfnResult
from device.reporting import ReportResult
from device.stats import STAT_UNSET
from device.transport import HostMemory, NotifyUsed, RingConfig, VirtioBackendDevice
from device.vhost_user import VHOST_USER_RULES, VhostUserBackend
from protocol.balloon import PFN_SHIFT, BalloonQueue
from protocol.errors import ConfigError, ProtocolViolation, UsageError
from protocol.features import BalloonFeature, has, names
from protocol.rules import RULES
from sim.serve_options import SERVE_FEATURES, parse_features, parse_size
from virtqueue.chain import DescriptorChain
from virtqueue.policy import ErrorPolicy

__all__ = [
    "SERVE_FEATURES",
    "UML_QUEUE_SIZE",
    "BalloonServer",
    "Finding",
    "ServeEvent",
    "parse_features",
    "parse_size",
    "serve",
    "serving",
    "unwrap_single",
]

log = structlog.get_logger("vballoon.sim")

UML_QUEUE_SIZE = 256
"""Linux 6.1's ``virtio_uml`` sets every vring to 256 entries (``vu_setup_vq``)."""

_POISON_OFFSET = 12
"""``poison_val`` in ``struct virtio_balloon_config``."""
_ONE_SHOT = 3600.0
"""Stats interval used to ask for one fresh buffer when polling is off (reset on arrival)."""
EVENTS_KEEP = 10_000
"""How many events :attr:`BalloonServer.events` keeps (the newest)."""


# ---- what the server tells --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServeEvent:
    """One thing that happened: ``kind`` (``connect``, ``features``, ``queue``, ``activate``,
    ``target``, ``notify``, ``actual``, ``poison_val``, ``inflate``, ``deflate``, ``stats``,
    ``report``, ``hint_cmd``, ``hint``, ``hint_host``, ``finding``, ``reset``, ``disconnect``,
    ``listen``), ``time`` in seconds since the server started, and key/value ``fields``."""

    time: float
    kind: str
    fields: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.time, 4), "event": self.kind, **self.fields}


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule the front-end or driver broke, as the device judged it.

    ``fatal``: the device stopped (needs reset) or the back-end closed the session.
    """

    rule: str
    section: str
    summary: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    fatal: bool = False
    time: float = 0.0

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"[{self.rule}] {self.summary} ({self.section}{'; ' + extra if extra else ''})"


def _rule_text(rule: str) -> tuple[str, str]:
    if rule in RULES:
        return f"virtio {RULES[rule].section}", RULES[rule].summary
    if rule in VHOST_USER_RULES:
        section, summary = VHOST_USER_RULES[rule]
        return f"vhost-user: {section}", summary
    return "?", rule


def _order(length: int) -> int | None:
    """Buddy order of a 4 KiB-page block of ``length`` bytes (None: not a power of two)."""
    pages = length >> PFN_SHIFT
    if pages <= 0 or pages & (pages - 1) or length & ((1 << PFN_SHIFT) - 1):
        return None
    return pages.bit_length() - 1


# ---- the server ---------------------------------------------------------------------------

class BalloonServer:
    """The balloon device served over vhost-user on ``socket_path``; see the module doc.

    Args:
        features: the offered feature mask (default :data:`SERVE_FEATURES`).
        target_bytes: a balloon target (RAM the guest keeps) set as soon as a driver is ready.
        stats_interval: stats polling interval in seconds (0: only on :meth:`request_stats`).
        queue_size: every queue's maximum size (UML always uses 256).
        policy: the device's error policy for ring violations.
        on_event: called with each :class:`ServeEvent` (from the trio thread).
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, features: int = SERVE_FEATURES,
                 target_bytes: int | None = None, stats_interval: float = 0.0,
                 queue_size: int = UML_QUEUE_SIZE,
                 policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                 on_event: Callable[[ServeEvent], None] | None = None) -> None:
        if target_bytes is not None and target_bytes < 1 << 20:
            raise ConfigError(f"balloon target must be at least 1 MiB, not {target_bytes} bytes")
        self.device = BalloonDevice(features=features, numbering="negotiated",
                                    stats_interval=stats_interval, policy=policy,
                                    queue_sizes={q: queue_size for q in BalloonQueue})
        self.device.on_chain = self._on_chain
        self._seam = _Seam(self)
        self.backend = VhostUserBackend(socket_path, self._seam)
        self.on_event = on_event
        self.events: deque[ServeEvent] = deque(maxlen=EVENTS_KEEP)
        self.counts: dict[str, int] = {}
        self.findings: list[Finding] = []
        self.negotiated: list[int] = []
        """Every feature set the driver accepted (SET_FEATURES), in order, all sessions."""
        self.pending_target = target_bytes
        self._returned_before = 0
        self._accounted: HostMemory | None = None
        self._stats_one_shot = False
        self._t0 = 0.0
        self._changed = trio.Event()
        self._connected = False

    # ---- events and findings ----------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the server started (the clock of :attr:`ServeEvent.time`)."""
        try:
            return trio.current_time() - self._t0
        except RuntimeError:
            return 0.0

    def _emit(self, _kind: str, /, **fields: Any) -> None:
        event = ServeEvent(self.now(), _kind, fields)
        self.events.append(event)
        self.counts[_kind] = self.counts.get(_kind, 0) + 1
        if self.on_event is not None:
            self.on_event(event)
        self._changed.set()
        self._changed = trio.Event()

    def _find(self, rule: str, *, fatal: bool = False, **detail: Any) -> None:
        section, summary = _rule_text(rule)
        finding = Finding(rule, section, summary, detail, fatal, self.now())
        self.findings.append(finding)
        log.warning("serve.finding", rule=rule, fatal=fatal, **detail)
        self._emit("finding", rule=rule, section=section, summary=summary, fatal=fatal,
                   detail=dict(detail))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked now and after every event."""
        while not predicate():
            await self._changed.wait()

    # ---- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(self)`` once the socket listens."""
        self._t0 = trio.current_time()
        with unwrap_single():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.device.run)
                await nursery.start(self.backend.serve)
                self._emit("listen", path=self.backend.path,
                           offered=names(self.device.offered_features()))
                nursery.start_soon(self._watch_sessions)
                task_status.started(self)

    async def _watch_sessions(self) -> None:
        ended = 0
        while True:
            result = await self.backend.wait_sessions_ended(ended + 1)
            ended += 1
            error = result.error
            if isinstance(error, ProtocolViolation):
                self._find(error.rule_id, fatal=True, message=error.message,
                           **{k: v for k, v in error.values.items()})
            self._emit("disconnect", reason=result.reason, messages=result.messages,
                       error=None if error is None else str(error))

    # ---- host verbs ---------------------------------------------------------------------------
    @property
    def seam(self) -> VirtioBackendDevice:
        """The device as the back-end drives it (a VirtioBackendDevice that reports to us);
        another transport, or a test playing the front-end, can drive it the same way."""
        return self._seam

    @property
    def connected(self) -> bool:
        """A front-end's memory is mapped and the driver is ready (queues served)."""
        return self.device.active

    def balloon(self, target_bytes: int) -> int | None:
        """QEMU ``balloon``: the guest should keep ``target_bytes`` of RAM; returns num_pages.

        Before a driver is ready the target is kept and applied when it is (returns None).
        """
        if target_bytes < 1:
            raise UsageError(f"balloon target must be a byte count >= 1, not {target_bytes}")
        if not self.connected:
            self.pending_target = target_bytes
            self._emit("target", target_bytes=target_bytes, pending=True)
            return None
        self.pending_target = None
        self.device.balloon(target_bytes)
        num_pages = self.device.config.num_pages
        self._emit("target", target_bytes=min(target_bytes, self.device.ram_size),
                   num_pages=num_pages, ram_bytes=self.device.ram_size)
        return num_pages

    def inflate_by(self, size_bytes: int) -> int | None:
        """Ask for ``size_bytes`` more in the balloon than its current target."""
        if not self.connected:
            raise UsageError("no driver is ready yet")
        ram = self.device.ram_size
        held = self.device.config.num_pages << PFN_SHIFT
        return self.balloon(max(ram - held - size_bytes, 1 << PFN_SHIFT))

    def _hint(self, verb: str, step: Callable[[], Any]) -> Any:
        value = step()
        state = self.device.hint.state.name
        self._emit("hint_host", verb=verb, cmd_id=self.device.hint.cmd_id, state=state,
                   skipped=not has(self.device.features, BalloonFeature.FREE_PAGE_HINT))
        return value

    def hint_start(self) -> int | None:
        """Open a free page hinting round; the new command ID (None: not negotiated)."""
        return self._hint("start", self.device.hint_start)

    def hint_stop(self) -> bool:
        """Ask the driver to stop hinting (QEMU before a dirty-bitmap sync)."""
        return bool(self._hint("stop", self.device.hint_stop))

    def hint_done(self) -> bool:
        """End hinting: the driver gives the hinted pages back to its allocator."""
        return bool(self._hint("done", self.device.hint_done))

    def request_stats(self) -> bool:
        """Give the parked stats buffer back now so the driver refills it (False: no buffer).

        With polling off this arms a one-shot poll (the interval returns to 0 when the fresh
        buffer arrives); with polling on it restarts the period now.
        """
        stats = self.device.stats
        if stats.parked is None or not self.connected:
            return False
        interval = stats.interval
        self.device.set_stats_polling_interval(0)
        self.device.set_stats_polling_interval(interval or _ONE_SHOT)
        self._stats_one_shot = interval == 0
        return True

    # ---- what the device saw ------------------------------------------------------------------
    def _on_chain(self, kind: BalloonQueue, chain: DescriptorChain, result: Any) -> None:
        if chain.violation is not None:
            self._find(chain.violation.rule_id, queue=kind.name, head=chain.head,
                       message=chain.violation.message)
        if isinstance(result, PfnResult):
            self._pfns(kind, chain, result)
        elif isinstance(result, ReportResult):
            self._report(chain, result)
        elif isinstance(result, HintChainResult):
            self._hint_chain(chain, result)
        elif kind is BalloonQueue.STATS:
            if self._stats_one_shot:
                self._stats_one_shot = False
                self.device.set_stats_polling_interval(0)
            values = {name: v for name, v in self.device.stats.by_name().items()
                      if v != STAT_UNSET}
            self._emit("stats", values=values, bytes=chain.readable_len)

    def _pfns(self, kind: BalloonQueue, chain: DescriptorChain, r: PfnResult) -> None:
        name = "inflate" if kind is BalloonQueue.INFLATE else "deflate"
        for rule, count in (("BL-04", r.rejected), ("BL-01", r.trailing),
                            ("BL-02", r.over_cap), ("BL-09", r.unknown)):
            if count:
                self._find(rule, queue=name, head=chain.head, count=count)
        if chain.writable:
            self._find("BL-03", queue=name, head=chain.head, writable=chain.writable_len)
        self._emit(name, pfns=r.pfns, applied=r.applied,
                   ballooned_bytes=self.device.ballooned.total)

    def _report(self, chain: DescriptorChain, r: ReportResult) -> None:
        ranges = [(seg.addr, seg.len) for seg in chain.writable]
        memory = self.device.memory
        resident = 0
        if r.discarded and memory is not None:
            for gpa, length in ranges:  # measured before the chain goes back: pages isolated
                resident += sum(e - s for s, e in memory.data_ranges(gpa, length))
        if r.unaligned:
            self._find("BL-19", head=chain.head, ranges=r.unaligned)
        if chain.readable:
            self._find("BL-21", head=chain.head, readable=chain.readable_len)
        orders = sorted({_order(n) for _, n in ranges}, key=lambda o: -1 if o is None else o)
        self._emit("report", ranges=ranges, bytes=r.reported, discarded=r.discarded,
                   resident=resident, orders=orders,
                   aligned=all(_order(n) is not None and gpa % n == 0 for gpa, n in ranges),
                   poison_val=self.device.config.poison_val)

    def _hint_chain(self, chain: DescriptorChain, r: HintChainResult) -> None:
        if r.violation is not None:
            self._find(r.violation.rule_id, fatal=not r.give_back, head=chain.head,
                       message=r.violation.message)
        if r.cmd_id is not None and r.transition is not None:
            self._emit("hint_cmd", cmd_id=r.cmd_id, old=r.transition.old.name,
                       new=r.transition.new.name, current=self.device.hint.cmd_id)
        if chain.writable and not r.hinted_bytes:
            self._find("BL-17", head=chain.head, ignored_bytes=chain.writable_len,
                       state=self.device.hint.state.name)
        if r.hinted_bytes:
            self._emit("hint", bytes=r.hinted_bytes, ranges=len(chain.writable),
                       cmd_id=self.device.hint.cmd_id,
                       round_bytes=self.device.hinted_round.total)

    # ---- summary ------------------------------------------------------------------------------
    def _account_memory(self) -> None:
        """A session ends: keep what its RAM mapping gave back (the mapping goes away)."""
        memory = self.device.memory
        if memory is not None and memory is not self._accounted:
            self._returned_before += getattr(memory, "returned_bytes", 0)
            self._accounted = memory

    @property
    def returned_bytes(self) -> int:
        """Bytes of guest RAM given back to the host by discards (hole punches), all sessions,
        measured from the RAM file's allocated blocks (:attr:`GuestMemory.returned_bytes`)."""
        memory = self.device.memory
        live = 0
        if memory is not None and memory is not self._accounted:
            live = getattr(memory, "returned_bytes", 0)
        return self._returned_before + live

    def summary(self) -> dict[str, Any]:
        """What was served, as plain values (bytes, counts, names)."""
        return {
            "sessions": len(self.backend.sessions) + (self.backend.session is not None),
            "offered": names(self.device.offered_features()),
            "negotiated": names(self.negotiated[-1]) if self.negotiated else None,
            "ram_bytes": self.device.ram_size,
            "returned_bytes": self.returned_bytes,
            "events": dict(sorted(self.counts.items())),
            "findings": [str(f) for f in self.findings],
            "device": self.device.summary(),
        }


class _Seam:
    """The device as the back-end sees it: every call goes through; the server hears it."""

    def __init__(self, server: BalloonServer) -> None:
        self._server = server
        self._device = server.device
        self._config_change: Callable[[], Any] = lambda: None
        self._needs_reset: Callable[[ProtocolViolation], None] = lambda v: None
        self._device.on_config_change = self._notify_config
        self._device.on_needs_reset = self._on_needs_reset
        self.device_id = self._device.device_id

    # the back-end installs its callbacks here; the device calls ours, which call them
    @property
    def on_config_change(self) -> Callable[[], Any]:
        return self._config_change

    @on_config_change.setter
    def on_config_change(self, callback: Callable[[], Any]) -> None:
        self._config_change = callback

    @property
    def on_needs_reset(self) -> Callable[[ProtocolViolation], None]:
        return self._needs_reset

    @on_needs_reset.setter
    def on_needs_reset(self, callback: Callable[[ProtocolViolation], None]) -> None:
        self._needs_reset = callback

    def _notify_config(self) -> None:
        sent = self._config_change()
        self._server._emit("notify", what="config_change", sent=sent is not False)

    def _on_needs_reset(self, violation: ProtocolViolation) -> None:
        self._server._find(violation.rule_id, fatal=True, message=violation.message,
                           **{k: v for k, v in violation.values.items()})
        self._needs_reset(violation)

    def _connect(self) -> None:
        if not self._server._connected:
            self._server._connected = True
            self._server._emit("connect", offered=names(self._device.offered_features()))

    # VirtioBackendDevice
    def offered_features(self) -> int:
        self._connect()
        return self._device.offered_features()

    def set_features(self, features: int) -> bool:
        self._connect()
        ok = self._device.set_features(features)
        if ok:
            self._server.negotiated.append(features)
        offered = self._device.offered_features()
        self._server._emit("features", accepted=names(features), mask=features,
                           not_accepted=names(offered & ~features), refused=not ok)
        return ok

    def num_queues(self, features: int) -> int:
        return self._device.num_queues(features)

    def queue_max_size(self, index: int) -> int:
        return self._device.queue_max_size(index)

    def read_config(self, offset: int, size: int) -> bytes:
        return self._device.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        config = self._device.config
        old_actual, old_poison = config.actual, config.poison_val
        self._device.write_config(offset, data)
        server = self._server
        if config.actual != old_actual:
            if config.actual << PFN_SHIFT > self._device.ram_size:
                server._find("BL-24", actual=config.actual,
                             ram_pages=self._device.ram_size >> PFN_SHIFT)
            server._emit("actual", pages=config.actual, num_pages=config.num_pages,
                         bytes=config.actual << PFN_SHIFT,
                         guest_bytes=server.device.query_balloon()["actual"])
        if offset <= _POISON_OFFSET < offset + len(data) or config.poison_val != old_poison:
            server._emit("poison_val", value=config.poison_val)

    def attach_queue(self, index: int, ring: RingConfig, memory: HostMemory,
                     notify_used: NotifyUsed) -> None:
        self._device.attach_queue(index, ring, memory, notify_used)
        kind = next((k for k in BalloonQueue if self._device.queue_index(k) == index), None)
        self._server._emit("queue", index=index, queue=None if kind is None else kind.name,
                           size=ring.size, desc=ring.desc, avail=ring.avail, used=ring.used)

    def detach_queue(self, index: int) -> int:
        return self._device.detach_queue(index)

    def activate(self) -> None:
        self._device.activate()
        server = self._server
        server._emit("activate", features=names(self._device.features),
                     ram_bytes=self._device.ram_size)
        if server.pending_target is not None:
            server.balloon(server.pending_target)

    def kick(self, index: int) -> None:
        self._device.kick(index)

    def reset(self) -> None:
        self._server._account_memory()
        self._device.reset()
        self._server._connected = False
        self._server._emit("reset")


# ---- entry points -------------------------------------------------------------------------

async def serve(socket_path: str | os.PathLike[str], *, features: int = SERVE_FEATURES,
                target_bytes: int | None = None, stats_interval: float = 0.0,
                queue_size: int = UML_QUEUE_SIZE,
                policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET,
                on_event: Callable[[ServeEvent], None] | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the balloon on ``socket_path`` until cancelled (``nursery.start`` gives the
    :class:`BalloonServer` once it listens). ConfigError for bad options."""
    server = BalloonServer(socket_path, features=features, target_bytes=target_bytes,
                           stats_interval=stats_interval, queue_size=queue_size, policy=policy,
                           on_event=on_event)
    await server.run(task_status=task_status)


@asynccontextmanager
async def serving(socket_path: str | os.PathLike[str], **options: Any
                  ) -> AsyncIterator[BalloonServer]:
    """``async with serving(path, ...) as server``: :func:`serve` for the block's duration."""
    with unwrap_single():  # give the caller's own error (or ours) back unwrapped
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve, socket_path, **options))
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise an exception group holding one exception (trio nurseries wrap everything) as
    that exception, so a ConfigError reaches the CLI as a ConfigError."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None

