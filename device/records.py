"""What the balloon device records about the guest: ranges per kind, rejected PFNs, counters.

A host VMM keeps no per-page state for a balloon (QEMU discards and forgets); vballoon keeps
what the guest *said* so tests, the VMM model and a teaching view can ask "which memory is in
the balloon, reported, hinted?". Everything is in guest-physical bytes as merged
:class:`~device.ranges.RangeSet` ranges, never pages, so a 1 TiB guest stays cheap.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from device.ranges import RangeSet

__all__ = ["REJECTED_KEEP", "BalloonRecords"]

REJECTED_KEEP = 1024
"""How many rejected PFNs are kept (the newest); the counter keeps the total."""


@dataclass(slots=True)
class BalloonRecords:
    """Host-side records of one balloon device.

    Attributes:
        ballooned: memory currently in the balloon (inflated, not deflated since).
        reported: memory the guest reported free (free page reporting), cumulative.
        hinted: memory hinted free (free page hinting) over all rounds.
        hinted_round: memory hinted in the current round (cleared by ``hint_start``).
        rejected: the newest PFNs that named no RAM (bounded, see ``rejected_limit``).
        counters: event counts (``inflate_chains``, ``pfns_inflated``, ``discarded_bytes``...).
    """

    rejected_limit: int = REJECTED_KEEP
    ballooned: RangeSet = field(default_factory=RangeSet)
    reported: RangeSet = field(default_factory=RangeSet)
    hinted: RangeSet = field(default_factory=RangeSet)
    hinted_round: RangeSet = field(default_factory=RangeSet)
    rejected: deque[int] = field(init=False)
    counters: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rejected = deque(maxlen=self.rejected_limit)

    def reject(self, pfn: int) -> None:
        """Record a PFN that named no guest RAM."""
        self.rejected.append(pfn)
        self.counters["pfns_rejected"] += 1

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def summary(self) -> dict[str, Any]:
        """Totals as plain values (bytes and counts), for logs, the CLI and assertions."""
        return {
            "ballooned_bytes": self.ballooned.total,
            "reported_bytes": self.reported.total,
            "hinted_bytes": self.hinted.total,
            "hinted_round_bytes": self.hinted_round.total,
            "rejected_pfns": self.counters["pfns_rejected"],
            **{k: v for k, v in sorted(self.counters.items()) if k != "pfns_rejected"},
        }
