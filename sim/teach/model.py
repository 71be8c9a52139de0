"""The narrated trace as data: steps made of text lines and blocks, and the small formatters
the narrator and the renderer share.

A :class:`Step` is one screen of ``vballoon trace``: who acts (the guest's driver, the device,
the host), a title, a *why* line and a body. Blocks carry the state to draw (a ring copy, the
free lists, the device's records, a table); :mod:`sim.teach.render` turns them into rich
renderables, so the narration stays plain data that tests can inspect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FreeListBlock",
    "RecordsBlock",
    "RingBlock",
    "Step",
    "TableBlock",
    "chain_rows",
    "fmt_size",
    "need_event",
    "order_of",
]


@dataclass(frozen=True, slots=True)
class RingBlock:
    """A copy of one split ring (a ``teach.ring`` record) with what to highlight.

    ``rows`` are descriptor indices of the chain in play, ``avail_slot`` / ``used_slot`` the
    ring slots just written or read, ``fields`` the descriptor fields a tamper changed
    (``(index, field name)``).
    """

    name: str
    ring: dict[str, Any]
    rows: tuple[int, ...] = ()
    avail_slot: int | None = None
    used_slot: int | None = None
    fields: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FreeListBlock:
    """A copy of the free lists (a ``teach.free_lists`` record); ``hero`` is the pfn whose
    list is drawn head to tail."""

    snapshot: dict[str, Any]
    hero: int | None = None


@dataclass(frozen=True, slots=True)
class RecordsBlock:
    """The device's records (a ``teach.records`` record); ``hero`` is ``(gpa, length)``."""

    records: dict[str, Any]
    hero: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class TableBlock:
    """A plain table."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


Block = RingBlock | FreeListBlock | RecordsBlock | TableBlock


@dataclass(slots=True)
class Step:
    """One narrated step.

    ``actor`` is ``guest`` (the driver and the guest's mm), ``device``, ``host`` (the VMM and
    QMP verbs) or ``story`` (the scenario's own narration). ``events`` are the names of the
    records the step tells.
    """

    actor: str
    title: str
    why: str = ""
    t: float | None = None
    lines: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines told after the blocks (what followed at once, folded into this step)."""
    events: list[str] = field(default_factory=list)


def fmt_size(n: int) -> str:
    """Bytes as the shortest exact unit: ``4 MiB``, ``1 KiB``, ``12 B``, ``1.5 MiB``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:g} {unit}" if value * 10 == int(value * 10) else f"{value:.2f} {unit}"
    return f"{n} B"


def order_of(length: int) -> int | None:
    """The buddy order of a block of ``length`` bytes (None if not 4 KiB << order)."""
    pages, rest = divmod(length, 4096)
    if rest or pages <= 0 or pages & (pages - 1):
        return None
    return pages.bit_length() - 1


def need_event(event: int, new: int, old: int) -> tuple[bool, str]:
    """``vring_need_event`` with its arithmetic written out (virtio §2.7.7, §2.7.10)."""
    left = (new - event - 1) & 0xFFFF
    right = (new - old) & 0xFFFF
    result = left < right
    text = (f"(u16)({new} - {event} - 1) = {left} < (u16)({new} - {old}) = {right}"
            f"  ->  {'true' if result else 'false'}")
    return result, text


def chain_rows(ring: dict[str, Any], head: int) -> tuple[int, ...]:
    """Descriptor indices of the chain at ``head`` in a ring copy (following NEXT, bounded)."""
    desc = ring["desc"]
    n = len(desc)
    rows: list[int] = []
    i = head
    while 0 <= i < n and i not in rows and len(rows) <= n:
        rows.append(i)
        _, _, flags, nxt = desc[i]
        if not flags & 1:
            break
        i = nxt
    return tuple(rows)
