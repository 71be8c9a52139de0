"""Free blocks and the intrusive doubly linked free lists that hold them (Linux ``list_head``).

A :class:`FreeBlock` stands for one buddy head page of Linux (``PageBuddy`` with its order in
``page->private``): one object per free block, never one per page, so memory and time scale with
the number of free blocks (a free 1 TiB guest is 262144 order-10 blocks). A block object lives
exactly as long as it sits on a free list: allocation, isolation and being absorbed by a merge
unlink it for good (``prev``/``next`` become ``None``); freeing creates a new object.

:class:`FreeList` is the list head (``zone->free_area[order].free_list[mt]``): a circular list
whose sentinel is the FreeList itself, so insertion at head or tail, removal of any block and
``list_rotate_to_front`` are O(1) and need no search.
"""

from __future__ import annotations

from collections.abc import Iterator

from guest.mm.types import MIGRATE_TYPES

__all__ = ["FreeArea", "FreeBlock", "FreeList"]


class FreeBlock:
    """One free block of ``1 << order`` pages starting at ``pfn`` (a Linux buddy head page).

    Attributes:
        pfn: first page frame number (guest-physical address >> 12), aligned to the order.
        order: 0..MAX_ORDER-1.
        mt: the migratetype of the list it is on (an int, see :class:`MigrateType`).
        reported: Linux ``PageReported``: the host was told this block is free.
        walk: id of the last walker pass that visited it (:mod:`guest.walker`); 0 = none.
        prev, next: list links; both ``None`` once the block has left its free list.
    """

    __slots__ = ("pfn", "order", "mt", "reported", "walk", "prev", "next")

    def __init__(self, pfn: int, order: int, mt: int) -> None:
        self.pfn = pfn
        self.order = order
        self.mt = mt
        self.reported = False
        self.walk = 0
        self.prev: FreeBlock | FreeList | None = None
        self.next: FreeBlock | FreeList | None = None

    @property
    def on_list(self) -> bool:
        """Whether the block is still free and on a list (a dead block never comes back)."""
        return self.next is not None

    def __repr__(self) -> str:
        flag = " reported" if self.reported else ""
        return f"FreeBlock(pfn={self.pfn:#x}, order={self.order}, mt={self.mt}{flag})"


class FreeList:
    """A list head: ``zone->free_area[order].free_list[mt]``; the sentinel of a circular list.

    ``count`` is the number of blocks on this list (Linux only counts per order, in
    :attr:`FreeArea.nr_free`; the per-list count is for tests and the teaching view).
    """

    __slots__ = ("prev", "next", "count", "order", "mt")

    def __init__(self, order: int, mt: int) -> None:
        self.prev: FreeBlock | FreeList = self
        self.next: FreeBlock | FreeList = self
        self.count = 0
        self.order = order
        self.mt = mt

    def empty(self) -> bool:
        """Linux ``list_empty``."""
        return self.next is self

    def first(self) -> FreeBlock | None:
        """Linux ``list_first_entry_or_null``: the head block, the next one to be allocated."""
        node = self.next
        return None if node is self else node  # type: ignore[return-value]

    def last(self) -> FreeBlock | None:
        """The tail block (reported and putback blocks gather here)."""
        node = self.prev
        return None if node is self else node  # type: ignore[return-value]

    def add(self, block: FreeBlock) -> None:
        """Linux ``list_add``: insert at the head."""
        first = self.next
        block.prev = self
        block.next = first
        first.prev = block
        self.next = block
        self.count += 1

    def add_tail(self, block: FreeBlock) -> None:
        """Linux ``list_add_tail``: insert at the tail."""
        last = self.prev
        block.next = self
        block.prev = last
        last.next = block
        self.prev = block
        self.count += 1

    def remove(self, block: FreeBlock) -> None:
        """Linux ``list_del``: unlink ``block`` (which must be on this list); it is dead after."""
        prev = block.prev
        nxt = block.next
        prev.next = nxt  # type: ignore[union-attr]
        nxt.prev = prev  # type: ignore[union-attr]
        block.prev = block.next = None
        self.count -= 1

    def move_tail(self, block: FreeBlock) -> None:
        """Move a block of this list to its tail (the walker's rotation of reported blocks)."""
        if self.prev is block:
            return
        prev = block.prev
        nxt = block.next
        prev.next = nxt  # type: ignore[union-attr]
        nxt.prev = prev  # type: ignore[union-attr]
        last = self.prev
        block.next = self
        block.prev = last
        last.next = block
        self.prev = block

    def rotate_to_front(self, block: FreeBlock) -> None:
        """Linux ``list_rotate_to_front``: make ``block`` the head, keeping the cyclic order.

        The blocks that were before it move, in order, to the tail. O(1): only the sentinel
        moves (``list_move_tail(head, block)``).
        """
        if self.next is block:
            return
        # unlink the sentinel
        first = self.next
        last = self.prev
        last.next = first  # type: ignore[union-attr]
        first.prev = last  # type: ignore[union-attr]
        # re-link it just before block
        before = block.prev
        before.next = self  # type: ignore[union-attr]
        self.prev = before  # type: ignore[assignment]
        self.next = block
        block.prev = self

    def __iter__(self) -> Iterator[FreeBlock]:
        """Blocks from head to tail (do not change the list while iterating)."""
        node = self.next
        while node is not self:
            yield node  # type: ignore[misc]
            node = node.next  # type: ignore[union-attr]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"FreeList(order={self.order}, mt={self.mt}, count={self.count})"


class FreeArea:
    """Linux ``struct free_area``: one list per migratetype and ``nr_free``.

    ``nr_free`` counts the blocks of this order on *all* its lists, as Linux 6.1 does (page
    reporting's budget is computed from it).
    """

    __slots__ = ("free_list", "nr_free", "order")

    def __init__(self, order: int) -> None:
        self.order = order
        self.free_list = tuple(FreeList(order, mt) for mt in range(MIGRATE_TYPES))
        self.nr_free = 0

    def __repr__(self) -> str:
        return f"FreeArea(order={self.order}, nr_free={self.nr_free})"
