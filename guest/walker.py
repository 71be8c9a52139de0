"""The restartable free-block walker the 2018 ``walk_free_mem_block`` thread asked for.

Wei Wang's v24 ``walk_free_mem_block(opaque, min_order, report_pfn_range)`` walked every
populated zone, every order from ``MAX_ORDER - 1`` down to ``min_order`` and every migratetype,
calling back per free block. Michael S. Tsirkin's review (linux-mm, 2018-01-25) asked for three
things, all built here:

1. a callback returning ``int``: ``0`` = reported (move the block to the tail of its list, so
   the guest reuses hinted memory last), ``> 0`` = skipped, ``< 0`` = stop;
2. rotation *batched*: reported blocks move to the tail when the walk returns, not one by one;
3. a result that tells completion from an early stop, and a cursor to resume where it stopped.

This is not what Linux merged (free page reporting isolates blocks instead; see
:mod:`guest.reporting`), but it is what the thread designed, and it serves hinting-style users
that only need to *look* at free memory.

Guarantees (one *pass* runs from a call with ``cursor=None`` to a COMPLETE result):

- **At most once.** Each free block object is offered to the callback at most once per pass,
  whatever happens between calls. Visited blocks are stamped with the pass id
  (``FreeBlock.walk``); a block moved to a list not yet walked keeps its stamp and is skipped.
- **Completeness.** A block that stays free on the same list for the whole pass is offered
  exactly once (unless the caller stops for good).
- **Blocks that change between calls** are never offered stale: allocated, isolated or merged
  blocks leave the lists and are gone (a merge makes a *new* block, which, being larger, lands
  in an order this pass has usually walked already: it is offered in the next pass). Blocks
  freed between calls are offered in this pass if they land on a list the pass has not reached,
  or behind the resume point of the current list (tail insertions such as putbacks, and any
  block when the resume point itself vanished and the list is rescanned); a block put at the
  head of the current list, in front of the resume point, waits for the next pass.
- **Resume point.** The cursor holds the first block not yet offered (the *anchor*). If it is
  still free on the same list, the walk continues there; if not, the walk restarts the list
  from its head and skips the stamped blocks, so the cost is one rescan of that list.
- **Stop.** The block for which the callback returned ``< 0`` is not consumed: it is the anchor,
  offered again when the caller resumes.
- **Budget.** ``budget`` bounds callback calls per call, so a caller can yield (walking over
  already-stamped blocks is not counted).
- **One pass at a time per allocator.** Starting a pass invalidates older cursors (resuming one
  raises :class:`~protocol.errors.UsageError`): two interleaved passes would overwrite each
  other's stamps and lose the at-most-once guarantee.

The callback runs "under the zone lock": it must not change the allocator (allocate, free,
isolate). The walker checks ``allocator.seq`` after every call and raises ``UsageError`` if it
did; the rotations of that call are still applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from guest.mm import MAX_ORDER, FreeBlock, FreeList, MigrateType, PageAllocator, Zone
from protocol.errors import UsageError

__all__ = [
    "WALK_MIGRATETYPES",
    "WalkCallback",
    "WalkCursor",
    "WalkResult",
    "WalkStatus",
    "walk_free_blocks",
]

WalkCallback = Callable[[Zone, int, int, MigrateType], int]
"""``callback(zone, pfn, order, migratetype) -> int``: 0 reported, > 0 skipped, < 0 stop."""

WALK_MIGRATETYPES: tuple[MigrateType, ...] = tuple(
    mt for mt in MigrateType if mt != MigrateType.ISOLATE
)
"""Default lists to walk: every type but ISOLATE (the seed walked all ``MIGRATE_TYPES``; isolated
pageblocks are being taken away by offlining or CMA, so hinting them is pointless)."""

_MT = tuple(MigrateType)


class WalkStatus(IntEnum):
    """How a call to :func:`walk_free_blocks` ended."""

    COMPLETE = 0
    """Every list was walked: the pass is over; the next call starts a new one."""
    STOPPED = 1
    """The callback returned a negative value (``WalkResult.value``)."""
    BUDGET = 2
    """``budget`` callbacks were made; resume with the cursor."""


@dataclass(frozen=True, slots=True)
class WalkCursor:
    """Where a pass stopped: the list (zone index, order, migratetype) and its anchor."""

    pass_id: int
    min_order: int
    zone: int
    order: int
    mt_index: int
    """Index into the walked migratetypes."""
    anchor: FreeBlock | None = field(default=None, compare=False, repr=False)
    """The first block of that list not yet offered (None: the list's head)."""


@dataclass(frozen=True, slots=True)
class WalkResult:
    """What one call did: its status, the callback's stop value, and how to resume."""

    status: WalkStatus
    cursor: WalkCursor | None
    """Pass this back to resume; ``None`` after COMPLETE (the next call starts a new pass)."""
    value: int = 0
    """The callback's negative return value when STOPPED, else 0."""
    visited: int = 0
    """Callbacks made in this call."""
    reported: int = 0
    """Blocks the callback reported (returned 0) in this call, now at their lists' tails."""

    @property
    def complete(self) -> bool:
        return self.status is WalkStatus.COMPLETE


def walk_free_blocks(
    allocator: PageAllocator,
    cursor: WalkCursor | None,
    min_order: int,
    callback: WalkCallback,
    *,
    budget: int | None = None,
    migratetypes: Sequence[MigrateType] = WALK_MIGRATETYPES,
) -> WalkResult:
    """Walk free blocks of ``min_order`` and above: zones in order, orders high to low,
    migratetypes in order, each list head to tail; see the module docstring for guarantees.

    Args:
        allocator: the page allocator to walk.
        cursor: None to start a pass, or the cursor of the previous result to resume it.
        min_order: the smallest order walked (0..MAX_ORDER-1); fixed for a pass.
        callback: ``callback(zone, pfn, order, migratetype) -> int`` (0 reported, > 0 skipped,
            < 0 stop); reported blocks move to the tail of their list when this call returns.
        budget: at most this many callbacks in this call (None: no limit).
        migratetypes: the lists walked in each order, in this order; fixed for a pass.

    Raises:
        UsageError: bad ``min_order``/``budget``, a cursor of an older pass or another
            ``min_order``, or a callback that changed the allocator.
    """
    if not isinstance(min_order, int) or not 0 <= min_order < MAX_ORDER:
        raise UsageError(f"walk_free_blocks: min_order {min_order!r} outside 0..{MAX_ORDER - 1}")
    if budget is not None and (not isinstance(budget, int) or budget < 0):
        raise UsageError(f"walk_free_blocks: budget {budget!r} must be a count >= 0")
    mts = [int(mt) for mt in migratetypes]
    if cursor is None:
        allocator.walk_pass += 1
        pass_id = allocator.walk_pass
        zi, order, mi, anchor = 0, MAX_ORDER - 1, 0, None
    else:
        if cursor.pass_id != allocator.walk_pass:
            raise UsageError(
                f"walk cursor of pass {cursor.pass_id} is stale: pass {allocator.walk_pass} "
                "started since (one walker pass at a time per allocator)"
            )
        if cursor.min_order != min_order:
            raise UsageError(
                f"walk cursor was made with min_order {cursor.min_order}, not {min_order}"
            )
        pass_id = cursor.pass_id
        zi, order, mi, anchor = cursor.zone, cursor.order, cursor.mt_index, cursor.anchor
    limit = -1 if budget is None else budget
    visited = 0
    rotate: list[tuple[FreeList, FreeBlock]] = []
    seq = allocator.seq
    zones = allocator.zones
    try:
        while zi < len(zones):
            zone = zones[zi]
            while order >= min_order:
                lists = zone.free_area[order].free_list
                while mi < len(mts):
                    mt = mts[mi]
                    head = lists[mt]
                    node = _resume_point(zone, head, anchor)
                    anchor = None
                    mtype = _MT[mt]
                    while node is not head:
                        if node.walk == pass_id:
                            node = node.next
                            continue
                        if visited == limit:
                            return WalkResult(
                                WalkStatus.BUDGET,
                                WalkCursor(pass_id, min_order, zi, order, mi, node),
                                visited=visited, reported=len(rotate),
                            )
                        visited += 1
                        ret = callback(zone, node.pfn, order, mtype)
                        if allocator.seq != seq:
                            raise UsageError(
                                "walk_free_blocks: the callback changed the allocator "
                                "(it runs under the zone lock: no alloc, free or isolation)"
                            )
                        if ret < 0:
                            return WalkResult(
                                WalkStatus.STOPPED,
                                WalkCursor(pass_id, min_order, zi, order, mi, node),
                                value=ret, visited=visited, reported=len(rotate),
                            )
                        node.walk = pass_id
                        if ret == 0:
                            rotate.append((head, node))
                        node = node.next
                    mi += 1
                mi = 0
                order -= 1
            order = MAX_ORDER - 1
            zi += 1
        return WalkResult(WalkStatus.COMPLETE, None, visited=visited, reported=len(rotate))
    finally:
        # MST: "collect reported pages and then move them to tail when we exit"
        for head, node in rotate:
            if node.next is not None and node.mt == head.mt:
                head.move_tail(node)


def _resume_point(zone: Zone, head: FreeList, anchor: FreeBlock | None) -> FreeBlock | FreeList:
    """The anchor if it is still free on this very list, else the list's first block."""
    if (
        anchor is not None
        and anchor.next is not None
        and anchor.order == head.order
        and anchor.mt == head.mt
        and zone.free_blocks.get(anchor.pfn) is anchor
    ):
        return anchor
    return head.next
