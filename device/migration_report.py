"""What a live migration sent, round by round: the values :class:`~device.migration.Migration`
returns, named after QEMU's ``query-migrate`` counters where one exists.

QEMU's names for the same things: ``zero_pages`` is ``ram.duplicate``, ``normal_pages`` is
``ram.normal``, ``total_bytes`` is ``ram.transferred``, ``syncs`` is ``dirty-sync-count``,
``precopy_bytes`` / ``downtime_bytes`` are the bytes sent before / after the VM stopped.
``hinted_pages`` has no QEMU counter: it is the number of to-send bits that free page hints
cleared (``qemu_guest_free_page_hint`` subtracting them from ``migration_dirty_pages``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from .memcheck import MemoryCheck

__all__ = ["MigrationReport", "MigrationState", "RoundStats"]


class MigrationState(Enum):
    """QEMU ``MigrationStatus`` values this model goes through."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # the VM is stopped for the last round
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RoundStats:
    """One round: from the bitmap sync that opened it to the next sync (or the end).

    ``dirty_pages`` are the pages the opening sync took from the dirty log; ``bitmap_pages`` is
    everything left to send right after it (round 1: all RAM; later rounds also carry what the
    previous round had not sent when it stopped under the downtime threshold).
    """

    index: int
    final: bool
    cmd_id: int | None
    dirty_pages: int
    bitmap_pages: int
    normal_pages: int
    zero_pages: int
    hinted_pages: int
    bytes: int
    started: float
    ended: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """Totals of one migration; ``rounds`` has the per-round detail.

    ``downtime`` is virtual seconds with the VM stopped; ``paused_writes`` counts pages written
    after the last sync (the guest or a device not respecting the pause: they would be lost);
    ``check`` is the final comparison of relied-on memory, when the caller asked for one.
    """

    outcome: str
    hinting: bool
    ram_pages: int
    rounds: tuple[RoundStats, ...]
    syncs: int
    cmd_ids: tuple[int, ...]
    normal_pages: int
    zero_pages: int
    hinted_pages: int
    total_bytes: int
    precopy_bytes: int
    downtime_bytes: int
    total_time: float
    downtime: float
    bandwidth: float
    downtime_limit: float
    hints: int
    hinted_bytes: int
    hints_ignored: int
    dirty_faults: int
    paused_writes: int
    check: MemoryCheck | None = None

    @property
    def pages_lost(self) -> int | None:
        """Relied-on pages that differ after migration (None when no check was made)."""
        return None if self.check is None else self.check.pages_lost

    @property
    def live_rounds(self) -> int:
        """Rounds run with the VM running."""
        return sum(1 for r in self.rounds if not r.final)

    @property
    def converged(self) -> bool:
        """Whether the last round fitted the downtime limit (else max_rounds forced it)."""
        return self.downtime <= self.downtime_limit

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready values (rounds and check as nested dicts)."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "rounds":
                value = [r.to_dict() for r in value]
            elif name == "check":
                value = None if value is None else value.to_dict()
            elif name == "cmd_ids":
                value = list(value)
            out[name] = value
        out["pages_lost"] = self.pages_lost
        out["live_rounds"] = self.live_rounds
        out["converged"] = self.converged
        return out
