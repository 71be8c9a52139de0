"""The virtqueue trace: structlog events with stable names, and the switch that turns them off.

Events (logger ``vballoon.virtqueue``; every event carries ``queue``, the queue index):

=================  ======================================================================
``vq.add``         driver published a chain: head, readable/writable ``[addr, len]`` lists,
                   indirect, descriptors used, avail_idx after, num_free
``vq.kick``        driver's kick_prepare decision: old, new (avail idx), avail_event (None
                   without EVENT_IDX), used_flags (None with it), event_idx, notify
``vq.get_buf``     driver reaped a used buffer: head, len, last_used_idx after
``vq.pop``         device took a chain: head, readable/writable lists, indirect, avail_idx,
                   next_avail after, violation (rule ID when truncated, else None)
``vq.push``        device returned a chain used: head, written, used_idx after
``vq.interrupt``   device's needs_interrupt decision: old, new (used idx), used_event (None
                   without EVENT_IDX), avail_flags (None with it), event_idx, notify
``vq.reject``      a rule was broken: rule_id, section, message, values, policy (the device's
                   ErrorPolicy; ``broken`` on the driver side), side (who broke it)
=================  ======================================================================

Trace events are ``debug`` records and cost nothing when disabled: hot paths test the
module-level :data:`ENABLED` before building anything, e.g.
``if events.ENABLED: events.pop(...)``. ``vq.reject`` is a ``warning`` and is always emitted: it
is the log line the error policies promise (see :mod:`virtqueue.policy`), and it is off the hot
path. How records are rendered (console, JSON) is the application's structlog configuration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

__all__ = [
    "ENABLED",
    "add",
    "disabled",
    "get_buf",
    "interrupt",
    "kick",
    "pop",
    "push",
    "reject",
    "set_enabled",
]

ENABLED: bool = True
"""Whether trace events (everything but ``vq.reject``) are emitted; see :func:`set_enabled`."""

log = structlog.get_logger("vballoon.virtqueue")


def set_enabled(on: bool) -> bool:
    """Turn trace events on or off for the whole process; returns the previous setting."""
    global ENABLED
    previous = ENABLED
    ENABLED = bool(on)
    return previous


@contextmanager
def disabled() -> Iterator[None]:
    """Run a block with trace events off (benchmarks, long property tests)."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _pairs(segments: Sequence[tuple[int, int]]) -> list[list[int]]:
    return [[addr, length] for addr, length in segments]


def add(queue: int, head: int, readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]], *, indirect: bool, descs: int, avail_idx: int,
        num_free: int) -> None:
    log.debug("vq.add", queue=queue, head=head, readable=_pairs(readable),
              writable=_pairs(writable), indirect=indirect, descs=descs, avail_idx=avail_idx,
              num_free=num_free)


def kick(queue: int, *, old: int, new: int, event: int | None, used_flags: int | None,
         event_idx: bool, notify: bool) -> None:
    log.debug("vq.kick", queue=queue, old=old, new=new, avail_event=event,
              used_flags=used_flags, event_idx=event_idx, notify=notify)


def get_buf(queue: int, *, head: int, length: int, last_used_idx: int) -> None:
    log.debug("vq.get_buf", queue=queue, head=head, len=length, last_used_idx=last_used_idx)


def pop(queue: int, chain: Any, *, avail_idx: int, next_avail: int) -> None:
    log.debug("vq.pop", queue=queue, head=chain.head, readable=_pairs(chain.readable),
              writable=_pairs(chain.writable), indirect=chain.indirect, avail_idx=avail_idx,
              next_avail=next_avail,
              violation=None if chain.violation is None else chain.violation.rule_id)


def push(queue: int, *, head: int, written: int, used_idx: int) -> None:
    log.debug("vq.push", queue=queue, head=head, written=written, used_idx=used_idx)


def interrupt(queue: int, *, old: int, new: int, event: int | None, avail_flags: int | None,
              event_idx: bool, notify: bool) -> None:
    log.debug("vq.interrupt", queue=queue, old=old, new=new, used_event=event,
              avail_flags=avail_flags, event_idx=event_idx, notify=notify)


def reject(queue: int, violation: Any, *, policy: str, side: str) -> None:
    """Log a broken rule (always, whatever :data:`ENABLED` says)."""
    log.warning("vq.reject", queue=queue, rule_id=violation.rule_id, section=violation.section,
                message=violation.message, values=dict(violation.values), policy=policy,
                side=side)
