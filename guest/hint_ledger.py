"""What happened to hinted pages before the host said DONE: the measure of a hinting design.

A free page hint tells the host "you may skip this page" (virtio spec §5.5.6.5). The hint is
only as good as the page staying unused until the host is done with it: a page the guest
allocates or writes after hinting it must be sent after all (the host's dirty log catches the
write). Linux's design holds the hinted blocks allocated, so the guest cannot reuse them (except
through the shrinker); the seed's walker design leaves them free, so it can. The ledger counts
both effects on the same workload:

- ``pages_reused``: hinted pages *allocated* again before DONE (:meth:`HintLedger.note_alloc`,
  fed by an allocator allocation hook),
- ``pages_written``: hinted pages *written* before DONE (:meth:`HintLedger.note_write`, fed by
  the guest memory's write observer). The observer sees every write, fill and discard of guest
  RAM, so a hinted free page the host discards (free page reporting, walk mode only) counts
  too: its content changed under the hint just the same.

A page counts once per ledger period (from the first hint after a DONE to the next DONE).
Ranges, not pages: hinted blocks are naturally aligned buddy blocks of order >= ``min_order``,
so lookups walk at most ``MAX_ORDER`` aligned bases.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import UsageError

__all__ = ["HintLedger", "LedgerTotals"]

_MAX_ORDER = 11
_PAGE_SHIFT = 12


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Counts of one ledger period."""

    blocks_hinted: int
    pages_hinted: int
    pages_reused: int
    pages_written: int


class _Touched:
    """Disjoint [start, end) page ranges inside one hinted block, merged on insert."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> int:
        """Add [start, end); return how many pages were new."""
        before = sum(e - s for s, e in self.ranges)
        merged = []
        for s, e in self.ranges:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged
        return sum(e - s for s, e in merged) - before


class HintLedger:
    """Hinted blocks of the current period and the pages reused or written since."""

    def __init__(self, min_order: int) -> None:
        if not 0 <= min_order < _MAX_ORDER:
            raise UsageError(f"min_order {min_order} outside 0..{_MAX_ORDER - 1}")
        self.min_order = min_order
        self._blocks: dict[int, int] = {}
        self._reused: dict[int, _Touched] = {}
        self._written: dict[int, _Touched] = {}
        self.blocks_hinted = 0
        self.pages_hinted = 0
        self.pages_reused = 0
        self.pages_written = 0
        self.ignore_allocs = False
        """Set while the hinting code allocates for itself (those are not reuse)."""

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def add(self, pfn: int, order: int) -> None:
        """Record a hinted block (a block hinted twice in a period counts twice as hinted)."""
        if order < self.min_order or pfn & ((1 << order) - 1):
            raise UsageError(f"hinted block pfn={pfn:#x} order={order} is not an aligned "
                             f"block of order >= {self.min_order}")
        self._blocks[pfn] = order
        self.blocks_hinted += 1
        self.pages_hinted += 1 << order

    def note_alloc(self, pfn: int, order: int) -> None:
        """An allocation of ``1 << order`` pages at ``pfn`` happened (allocator hook)."""
        if self._blocks and not self.ignore_allocs:
            self.pages_reused += self._touch(self._reused, pfn, pfn + (1 << order))

    def note_write(self, gpa: int, length: int) -> None:
        """``length`` bytes at ``gpa`` were written (guest memory write observer)."""
        if self._blocks and length > 0:
            start = gpa >> _PAGE_SHIFT
            end = (gpa + length + (1 << _PAGE_SHIFT) - 1) >> _PAGE_SHIFT
            self.pages_written += self._touch(self._written, start, end)

    def close(self) -> LedgerTotals:
        """End the period (DONE): return its totals and forget every hinted block."""
        totals = LedgerTotals(self.blocks_hinted, self.pages_hinted, self.pages_reused,
                              self.pages_written)
        self._blocks.clear()
        self._reused.clear()
        self._written.clear()
        self.blocks_hinted = self.pages_hinted = self.pages_reused = self.pages_written = 0
        return totals

    def totals(self) -> LedgerTotals:
        return LedgerTotals(self.blocks_hinted, self.pages_hinted, self.pages_reused,
                            self.pages_written)

    def _touch(self, book: dict[int, _Touched], start: int, end: int) -> int:
        """Mark pages [start, end) inside hinted blocks as touched; return the new ones."""
        new = 0
        step = 1 << self.min_order
        pos = start
        while pos < end:
            block = self._block_at(pos)
            if block is None:
                pos = (pos | (step - 1)) + 1  # next min_order-aligned base
                continue
            base, order = block
            stop = min(end, base + (1 << order))
            new += book.setdefault(base, _Touched()).add(pos, stop)
            pos = stop
        return new

    def _block_at(self, pfn: int) -> tuple[int, int] | None:
        blocks = self._blocks
        for order in range(self.min_order, _MAX_ORDER):
            base = pfn & ~((1 << order) - 1)
            if blocks.get(base) == order:
                return base, order
        return None
