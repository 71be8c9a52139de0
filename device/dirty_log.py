"""The VMM's dirty page log: which guest pages were written since the last bitmap sync.

KVM logs dirty pages by write-protecting guest memory (``KVM_MEM_LOG_DIRTY_PAGES``): the first
write to a page after a sync faults, sets the page's bit and unprotects the page, so later writes
in the same round are free; ``KVM_GET_DIRTY_LOG`` (QEMU's ``migration_bitmap_sync``) hands the
bits over and protects everything again. Here every write, fill and discard of
:class:`~virtqueue.memory.GuestMemory` reaches :meth:`DirtyLog._on_write` through a write
observer, so the device's own writes (used rings, stats buffers) dirty pages too, as in QEMU.

The log is a :class:`~device.ranges.RangeSet` of page numbers (guest-physical address >> 12),
never a per-page structure: a 1 TiB guest costs one list entry per dirty *run* of pages.
"""

from __future__ import annotations

from protocol.errors import UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

from .ranges import RangeSet

__all__ = ["PAGE_SHIFT", "DirtyLog", "pages_of"]

PAGE_SHIFT = 12
"""Target page bits (QEMU ``TARGET_PAGE_BITS`` on x86): the log's unit is a 4 KiB page."""
assert 1 << PAGE_SHIFT == PAGE_SIZE


def pages_of(gpa: int, length: int) -> tuple[int, int]:
    """The page numbers [first, end) that any byte of [gpa, gpa + length) lies in."""
    if length <= 0:
        return gpa >> PAGE_SHIFT, gpa >> PAGE_SHIFT
    return gpa >> PAGE_SHIFT, (gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT


class DirtyLog:
    """Dirty logging over one GuestMemory: :meth:`start`, :meth:`sync` per round, :meth:`stop`.

    ``faults`` counts first writes to a page in a round since logging started (the
    write-protection faults KVM would take); ``dirty_pages`` is how many pages the next
    :meth:`sync` will hand over.
    """

    __slots__ = ("memory", "_dirty", "_pages", "_active", "faults", "syncs", "_seen")

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._dirty = RangeSet()
        self._pages = 0
        self._active = False
        self.faults = 0
        self.syncs = 0
        self._seen: set[int] = set()
        """Single pages already logged this round: the fast path for small writes (rings)."""

    @property
    def active(self) -> bool:
        return self._active

    @property
    def dirty_pages(self) -> int:
        """Pages written since the last sync (each counted once)."""
        return self._pages

    def start(self) -> None:
        """Begin logging with an empty log (every page write-protected)."""
        if self._active:
            raise UsageError("dirty logging is already on for this memory")
        self._dirty = RangeSet()
        self._pages = 0
        self._seen.clear()
        self.faults = 0
        self.memory.add_write_observer(self._on_write)
        self._active = True

    def stop(self) -> None:
        """End logging and drop what was logged; a no-op when logging is off."""
        if not self._active:
            return
        self.memory.remove_write_observer(self._on_write)
        self._active = False
        self._dirty = RangeSet()
        self._pages = 0
        self._seen.clear()

    def sync(self) -> RangeSet:
        """Hand over the pages written since the last sync and protect everything again."""
        dirty, self._dirty = self._dirty, RangeSet()
        self._pages = 0
        self._seen.clear()
        self.syncs += 1
        return dirty

    def peek(self) -> RangeSet:
        """A copy of the pages logged so far, without syncing (for checks and tests)."""
        return self._dirty.copy()

    def _on_write(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, end = pages_of(gpa, length)
        if end - first == 1:
            if first in self._seen:
                return
            self._seen.add(first)
        added = self._dirty.add(first, end)
        self._pages += added
        self.faults += added
