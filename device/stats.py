"""Memory statistics, device side: the parked buffer, the polling timer, the values.

virtio §5.5.6.3 and QEMU ``virtio_balloon_receive_stats`` / ``balloon_stats_poll_cb`` /
``balloon_stats_set_poll_interval``. The flow runs backwards: the driver makes one buffer of
10-byte ``{le16 tag; le64 val}`` records available; the device reads it and *keeps* it
(parked); to ask for fresh values it gives the buffer back (used length 0, interrupt) and the
driver refills and re-queues it.

QEMU details kept here:
- every stat is reset to "unset" (all ones) before a buffer is parsed, so a guest that now
  reports fewer tags leaves no stale values; tags it does not know are ignored (BL-13); a
  trailing partial record is ignored (BL-11);
- a second buffer while one is parked gives the old one back first (BL-14);
- the poll timer is one-shot: parsing a buffer re-arms it, firing gives the buffer back, and
  firing with nothing parked just re-arms it; enabling polling fires at once; interval 0
  disables it; negative or above 2^32-1 seconds is refused (QEMU's error texts).

Sans-I/O: time comes in as ``now`` (virtual seconds), the trio edge asks :meth:`next_deadline`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.events import emit, warn
from device.transport import HostMemory
from protocol.balloon import StatTag
from protocol.errors import ConfigError

if TYPE_CHECKING:
    from virtqueue.device import DescriptorChain

__all__ = [
    "MAX_STATS_BYTES",
    "STAT_NAMES",
    "STAT_RECORD",
    "STAT_UNSET",
    "StatsCollector",
    "StatsParse",
    "parse_stats",
    "receive_stats_chain",
]

STAT_UNSET = 0xFFFF_FFFF_FFFF_FFFF
"""The value of a stat the guest did not report (QEMU's ``-1`` as a u64)."""

STAT_RECORD = struct.Struct("<HQ")
"""Precompiled ``protocol.balloon.StatRecord`` (10 bytes, packed; tests prove them equal)."""

MAX_STATS_BYTES = 4096
"""At most this many bytes of a stats buffer are parsed (BL-12; Linux sends 16 * 10 at most)."""

STAT_NAMES: dict[StatTag, str] = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
    StatTag.OOM_KILL: "stat-oom-kills",
    StatTag.ALLOC_STALL: "stat-alloc-stalls",
    StatTag.ASYNC_SCAN: "stat-async-scans",
    StatTag.DIRECT_SCAN: "stat-direct-scans",
    StatTag.ASYNC_RECLAIM: "stat-async-reclaims",
    StatTag.DIRECT_RECLAIM: "stat-direct-reclaims",
}
"""QOM ``guest-stats`` names, in tag order (QEMU ``balloon_stat_names``)."""

_INTERVAL_MAX = 0xFFFF_FFFF
_KNOWN_TAGS = {int(tag): tag for tag in StatTag}


@dataclass(frozen=True, slots=True)
class StatsParse:
    """One parsed buffer: known values by tag, and what was ignored."""

    values: dict[StatTag, int]
    unknown_tags: tuple[int, ...] = ()
    trailing: int = 0
    """Bytes after the last whole record (BL-11)."""


def parse_stats(data: bytes) -> StatsParse:
    """Parse packed ``virtio_balloon_stat`` records; a later record of a tag wins."""
    whole = len(data) - len(data) % STAT_RECORD.size
    values: dict[StatTag, int] = {}
    unknown: list[int] = []
    for tag, val in STAT_RECORD.iter_unpack(memoryview(data)[:whole]):
        member = _KNOWN_TAGS.get(tag)
        if member is None:
            unknown.append(tag)
        else:
            values[member] = val
    return StatsParse(values, tuple(unknown), len(data) - whole)


class StatsCollector:
    """The stats queue's device state: the parked head, the values, the poll timer.

    Args:
        interval: polling interval in (virtual) seconds; 0 disables polling.
    """

    def __init__(self, interval: float = 0.0) -> None:
        _check_interval(interval)
        self.interval = float(interval)
        self.parked: int | None = None
        self.values: dict[StatTag, int] = dict.fromkeys(StatTag, STAT_UNSET)
        self.last_update = 0.0
        self.updates = 0
        self._deadline: float | None = None

    def next_deadline(self) -> float | None:
        """When the poll timer fires next (None: not armed)."""
        return self._deadline

    def receive(self, head: int, parse: StatsParse, now: float) -> int | None:
        """Park the buffer ``head`` with its parsed contents.

        Returns the head of a buffer that was already parked (to be given back, BL-14).
        """
        old, self.parked = self.parked, head
        self.values = dict.fromkeys(StatTag, STAT_UNSET)
        self.values.update(parse.values)
        self.last_update = now
        self.updates += 1
        if self.interval > 0:
            self._deadline = now + self.interval
        return old

    def handle_timer(self, now: float, *, can_give_back: bool = True) -> int | None:
        """The poll timer fired: the parked head to give back, or None (timer re-armed)."""
        if self.parked is None or not can_give_back:
            self._deadline = now + self.interval if self.interval > 0 else None
            return None
        head, self.parked = self.parked, None
        self._deadline = None  # re-armed when the refilled buffer arrives
        return head

    def set_interval(self, interval: float, now: float) -> None:
        """QEMU's ``guest-stats-polling-interval`` setter (raises ConfigError when invalid)."""
        _check_interval(interval)
        interval = float(interval)
        if interval == self.interval:
            return
        was_enabled, self.interval = self.interval > 0, interval
        if interval == 0:
            self._deadline = None
        elif was_enabled:
            self._deadline = now + interval
        else:
            self._deadline = now  # a new timer fires at once

    def unpark(self) -> int | None:
        """Forget the parked buffer (reset, ring stop); returns its head."""
        head, self.parked = self.parked, None
        return head

    def reset(self) -> None:
        """Device reset: forget the parked buffer and every value."""
        self.parked = None
        self.values = dict.fromkeys(StatTag, STAT_UNSET)
        self.last_update = 0.0

    def by_name(self) -> dict[str, int]:
        """Values keyed by QEMU's stat names, in tag order."""
        return {STAT_NAMES[tag]: self.values[tag] for tag in StatTag}


def receive_stats_chain(collector: StatsCollector, chain: DescriptorChain, memory: HostMemory,
                        *, now: float, queue: int) -> int | None:
    """Parse and park a stats chain (QEMU ``virtio_balloon_receive_stats``).

    Returns the head of a buffer that was already parked, to give back first (BL-14).
    """
    parse = parse_stats(chain.read(memory, MAX_STATS_BYTES))
    old = collector.receive(chain.head, parse, now)
    emit("balloon.stats", queue=queue, head=chain.head, parked=True,
         tags=sorted(int(t) for t in parse.values))
    if old is not None:
        warn("balloon.stats", queue=queue, rule="BL-14", returned=old, parked=chain.head)
    if parse.unknown_tags:
        emit("balloon.stats", queue=queue, rule="BL-13", unknown=list(parse.unknown_tags))
    if chain.readable_len > MAX_STATS_BYTES:
        warn("balloon.stats", queue=queue, rule="BL-12", length=chain.readable_len,
             parsed=MAX_STATS_BYTES)
    elif parse.trailing:
        warn("balloon.stats", queue=queue, rule="BL-11", trailing_bytes=parse.trailing)
    return old


def _check_interval(interval: float) -> None:
    if not isinstance(interval, int | float) or math.isnan(interval):
        raise ConfigError(f"stats polling interval must be a number of seconds, not {interval!r}")
    if interval < 0:
        raise ConfigError("timer value must be greater than zero")
    if interval > _INTERVAL_MAX:
        raise ConfigError("timer value is too big")
