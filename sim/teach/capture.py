"""Record structlog events as plain dicts, with probes that add the teaching view's snapshots.

The trace is built from events, the same ones ``--log-level debug`` prints: ``vq.*`` from the
rings (:mod:`virtqueue.events`), ``balloon.*`` from the device, ``driver.*`` and ``report.*``
from the guest, ``migration.*`` from the VMM. :func:`recording` swaps structlog's processors for
one :class:`Recorder` for the duration of a run, lets every level through and turns the
virtqueue and device event switches on, then puts everything back.

A *probe* is called with each event as it is logged, while the emitting code is still inside
the operation, and may return extra ``teach.*`` records to append right after it (a copy of a
ring read with :meth:`~virtqueue.memory.GuestMemory.peek`, the device's records, a free list).
That is how the view shows state "after each add, pop and push" without the library knowing it
is watched.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
import trio

from device import events as device_events
from virtqueue import events as vq_events

__all__ = ["Probe", "Recorder", "jsonable", "recording", "teach_log"]

Probe = Callable[[dict[str, Any]], list[dict[str, Any]] | None]
"""``probe(record) -> extra records or None``; called for every recorded event."""

teach_log = structlog.get_logger("vballoon.teach")
"""The teaching layer's own events (``teach.*``): scenario chapters, walker visits, snapshots."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (enums by name, tuples as lists, others as ``str``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "name") and hasattr(value, "value"):  # an enum member
        return value.name
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def _now() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:
        return None


class Recorder:
    """A structlog processor that keeps every event and runs probes on it.

    Records are ``{"event": name, "level": ..., "t": seconds, **fields}`` with fields made
    JSON-ready (:func:`jsonable`); ``t`` is trio time since the first recorded event (virtual
    time under ``MockClock``), None outside trio. The event is then dropped, so nothing is
    printed.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.probes: list[Probe] = []
        self._t0: float | None = None

    def _t(self) -> float | None:
        now = _now()
        if now is None:
            return None
        if self._t0 is None:
            self._t0 = now
        return round(now - self._t0, 6)

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> Any:
        record: dict[str, Any] = {"event": event_dict.pop("event", "?"), "level": method_name,
                                  "t": self._t()}
        record.update(jsonable(event_dict))
        self.records.append(record)
        for probe in self.probes:
            extra = probe(record)
            if extra:
                for rec in extra:
                    rec.setdefault("t", record["t"])
                    self.records.append(rec)
        raise structlog.DropEvent


_PACKAGES = ("protocol", "virtqueue", "guest", "device", "sim")
_Proxy = type(structlog.get_logger())


def _uncache_loggers() -> int:
    """Make our modules' loggers bind afresh: undo ``cache_logger_on_first_use``.

    A cached ``BoundLoggerLazyProxy`` keeps the wrapper (level filter) and processors it was
    first used with, so a recording started after the CLI logged at ``warning`` would miss
    every debug event. structlog caches by setting an instance ``bind`` on the proxy;
    dropping it brings back the lazy class method. Returns how many proxies were reset.
    """
    reset = 0
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in _PACKAGES:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, _Proxy) and vars(value).pop("bind", None) is not None:
                reset += 1
    return reset


@contextmanager
def recording() -> Iterator[Recorder]:
    """Record every structlog event (all levels) into a :class:`Recorder` while inside.

    Turns on the virtqueue trace (:func:`virtqueue.events.set_enabled`) and device events, and
    restores structlog's processors, wrapper class, caching and both switches on exit. Loggers
    are not cached while recording, and our modules' loggers cached before it (the CLI's
    ``cache_logger_on_first_use``) are made to bind afresh, so no earlier level filter hides an
    event. Not thread-safe (nor is structlog's own ``capture_logs``).
    """
    recorder = Recorder()
    config = structlog.get_config()
    processors = config["processors"]
    saved_processors = list(processors)
    saved_wrapper = config["wrapper_class"]
    saved_cache = config["cache_logger_on_first_use"]
    saved_device = device_events.ENABLED, device_events.DEBUG
    previous_vq = vq_events.set_enabled(True)
    device_events.ENABLED = device_events.DEBUG = True
    # keep the list object: loggers bound earlier hold a reference to it (as capture_logs does)
    processors.clear()
    processors.append(recorder)
    _uncache_loggers()
    # no caching while recording: a logger cached now would keep the recorder's wrapper
    structlog.configure(processors=processors,
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        cache_logger_on_first_use=False)
    try:
        yield recorder
    finally:
        processors.clear()
        processors.extend(saved_processors)
        _uncache_loggers()  # nothing keeps the recorder's wrapper
        structlog.configure(processors=processors, wrapper_class=saved_wrapper,
                            cache_logger_on_first_use=saved_cache)
        vq_events.set_enabled(previous_vq)
        device_events.ENABLED, device_events.DEBUG = saved_device
