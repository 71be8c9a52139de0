"""Seeded allocation and free churn that writes real bytes into guest memory.

A workload is what gives the allocator (and so page reporting, hinting and the balloon) something
to do. Each step is one operation (allocate a block, free a live one, or nothing), chosen by a
named :class:`WorkloadProfile` from a seeded ``random.Random``, so a seed and the allocator's
state reproduce a run exactly. The number of operations is a parameter, never derived from the
guest's size, so the same profile runs on a 64 MiB guest and on a 1 TiB one.

Every allocated page gets a *stamp*: its first 16 bytes are written through the memory object
(``write(gpa, data)``, so dirty tracking sees it) as ``b"vbwl"``, the allocation's generation
(u32, wraps) and the page's pfn (u64), see :func:`expected_page`. Writing whole pages would make
every allocation cost its size in host memory and time; the stamp is enough to catch a page that
was discarded (reads zeros), swapped with another (wrong pfn) or left over from an earlier
allocation (wrong generation). :meth:`Workload.verify` checks the stamps of all live
allocations; it verifies the stamp only, not the rest of the page. ``stamp_stride`` stamps only
every n-th page of an allocation, for very large runs.

Profiles:

- ``idle``: does nothing (each step is an ``idle`` operation): a guest at rest.
- ``steady``: churn: allocates mixed orders and migratetypes (mostly small and movable) while
  fewer than ``max_live`` allocations are live, and frees random live ones.
- ``burst``: allocates ``ops // 2`` blocks of ``burst_order`` (a large area: 1000 ops of order
  9 are 1 GiB), then frees them all in random order.
- ``grow``: only allocates (mixed orders) until the ops run out or memory does.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from guest.mm import MAX_ORDER, PAGE_SHIFT, Gfp, MigrateType, PageAllocator
from protocol.errors import UsageError

__all__ = [
    "STAMP_MAGIC",
    "STAMP_SIZE",
    "Allocation",
    "AllocationTracker",
    "Mismatch",
    "StampMemory",
    "Workload",
    "WorkloadOp",
    "WorkloadProfile",
    "expected_page",
]

STAMP_MAGIC = b"vbwl"
_STAMP = struct.Struct("<4sIQ")
STAMP_SIZE = _STAMP.size
"""Bytes of the stamp at the start of every stamped page (16)."""

_ORDERS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
_ORDER_WEIGHTS = (40, 15, 12, 10, 4, 4, 3, 3, 3, 4, 2)
_MTS = (MigrateType.MOVABLE, MigrateType.UNMOVABLE, MigrateType.RECLAIMABLE)
_MT_WEIGHTS = (80, 12, 8)


class StampMemory(Protocol):
    """What a workload needs of guest memory (``virtqueue.memory.GuestMemory`` has it)."""

    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...


def expected_page(pfn: int, generation: int) -> bytes:
    """The 16 bytes a stamped page must start with.

    >>> expected_page(0x1234, 7).hex()
    '7662776c070000003412000000000000'
    """
    return _STAMP.pack(STAMP_MAGIC, generation & 0xFFFFFFFF, pfn)


class WorkloadProfile(StrEnum):
    """The named workloads (see the module docstring)."""

    IDLE = "idle"
    STEADY = "steady"
    BURST = "burst"
    GROW = "grow"


@dataclass(frozen=True, slots=True)
class Allocation:
    """A live allocation made by a workload."""

    pfn: int
    order: int
    generation: int
    migratetype: MigrateType


@dataclass(frozen=True, slots=True)
class WorkloadOp:
    """One step: ``kind`` is "alloc", "alloc_fail", "free" or "idle"."""

    kind: str
    pfn: int | None = None
    order: int | None = None
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A stamped page whose first bytes are not what its allocation wrote."""

    pfn: int
    generation: int
    expected: bytes
    actual: bytes


class AllocationTracker:
    """Live allocations by first pfn, with O(1) add, remove and seeded random choice."""

    def __init__(self) -> None:
        self._by_pfn: dict[int, Allocation] = {}
        self._pfns: list[int] = []
        self._index: dict[int, int] = {}

    def add(self, alloc: Allocation) -> None:
        if alloc.pfn in self._by_pfn:
            raise UsageError(f"allocation tracker: pfn {alloc.pfn:#x} is already live")
        self._by_pfn[alloc.pfn] = alloc
        self._index[alloc.pfn] = len(self._pfns)
        self._pfns.append(alloc.pfn)

    def remove(self, pfn: int) -> Allocation:
        alloc = self._by_pfn.pop(pfn)
        i = self._index.pop(pfn)
        last = self._pfns.pop()
        if last != pfn:
            self._pfns[i] = last
            self._index[last] = i
        return alloc

    def choice(self, rng: random.Random) -> Allocation:
        return self._by_pfn[self._pfns[rng.randrange(len(self._pfns))]]

    def get(self, pfn: int) -> Allocation | None:
        return self._by_pfn.get(pfn)

    def pages(self) -> int:
        """Pages held by live allocations."""
        return sum(1 << a.order for a in self._by_pfn.values())

    def __len__(self) -> int:
        return len(self._pfns)

    def __iter__(self) -> Iterator[Allocation]:
        return iter(list(self._by_pfn.values()))


class Workload:
    """A seeded stream of allocations and frees on ``allocator``, stamping ``memory``.

    Args:
        allocator: the guest's page allocator.
        memory: guest memory (``read``/``write`` at guest-physical addresses).
        profile: a :class:`WorkloadProfile` or its name.
        seed: seed of every random choice.
        ops: number of steps before the workload is :attr:`done`.
        max_live: ``steady``: allocations kept live at most.
        burst_order: ``burst``: order of each block of the area.
        stamp_stride: stamp every n-th page of an allocation (1 = every page).
        gfp: flags of every allocation (failures are expected, so ``NOWARN`` by default).
        free_fill: the byte a freed block is filled with before it goes back to the allocator
            (Linux ``init_on_free``: 0; page poisoning: 0xaa), or None to leave it as it was.
    """

    def __init__(
        self,
        allocator: PageAllocator,
        memory: StampMemory,
        profile: WorkloadProfile | str = WorkloadProfile.STEADY,
        *,
        seed: int = 0,
        ops: int = 1000,
        max_live: int = 64,
        burst_order: int = 9,
        stamp_stride: int = 1,
        gfp: Gfp = Gfp.NOWARN,
        free_fill: int | None = None,
    ) -> None:
        try:
            self.profile = WorkloadProfile(profile)
        except ValueError:
            names = ", ".join(p.value for p in WorkloadProfile)
            raise UsageError(f"unknown workload profile {profile!r} (known: {names})") from None
        for name, value, low in (("ops", ops, 0), ("max_live", max_live, 1),
                                 ("stamp_stride", stamp_stride, 1)):
            if not isinstance(value, int) or value < low:
                raise UsageError(f"workload {name} must be an integer >= {low}, not {value!r}")
        if not isinstance(burst_order, int) or not 0 <= burst_order < MAX_ORDER:
            raise UsageError(f"workload burst_order {burst_order!r} outside 0..{MAX_ORDER - 1}")
        self.allocator = allocator
        self.memory = memory
        self.ops = ops
        self.max_live = max_live
        self.burst_order = burst_order
        self.stamp_stride = stamp_stride
        self.gfp = gfp
        self.free_fill = free_fill
        self.live = AllocationTracker()
        self.generation = 0
        self.steps = 0
        self.allocs = self.frees = self.alloc_failures = 0
        self._rng = random.Random(seed)
        self._step = {
            WorkloadProfile.IDLE: self._step_idle,
            WorkloadProfile.STEADY: self._step_steady,
            WorkloadProfile.BURST: self._step_burst,
            WorkloadProfile.GROW: self._step_grow,
        }[self.profile]

    @property
    def done(self) -> bool:
        """Whether all ``ops`` steps have run."""
        return self.steps >= self.ops

    def step(self) -> WorkloadOp | None:
        """Run one operation; None once the workload is done."""
        if self.steps >= self.ops:
            return None
        self.steps += 1
        return self._step()

    def run(self, steps: int | None = None) -> int:
        """Run up to ``steps`` operations (all remaining if None); how many ran."""
        n = 0
        while (steps is None or n < steps) and self.step() is not None:
            n += 1
        return n

    # ---- profiles -------------------------------------------------------------------------
    def _step_idle(self) -> WorkloadOp:
        return WorkloadOp("idle")

    def _step_steady(self) -> WorkloadOp:
        if len(self.live) < self.max_live and (not self.live or self._rng.random() < 0.6):
            return self.alloc(self._pick_order(), self._pick_mt())
        return self.free(self.live.choice(self._rng).pfn)

    def _step_burst(self) -> WorkloadOp:
        if self.steps <= self.ops // 2:
            return self.alloc(self.burst_order, MigrateType.MOVABLE)
        if self.live:
            return self.free(self.live.choice(self._rng).pfn)
        return WorkloadOp("idle")

    def _step_grow(self) -> WorkloadOp:
        return self.alloc(self._pick_order(), self._pick_mt())

    def _pick_order(self) -> int:
        return self._rng.choices(_ORDERS, _ORDER_WEIGHTS)[0]

    def _pick_mt(self) -> MigrateType:
        return self._rng.choices(_MTS, _MT_WEIGHTS)[0]

    # ---- operations -----------------------------------------------------------------------
    def alloc(self, order: int, migratetype: MigrateType = MigrateType.MOVABLE) -> WorkloadOp:
        """Allocate a block, stamp its pages and track it (also usable outside a profile)."""
        pfn = self.allocator.alloc_pages(order, migratetype, gfp=self.gfp)
        if pfn is None:
            self.alloc_failures += 1
            return WorkloadOp("alloc_fail", order=order)
        self.generation += 1
        gen = self.generation
        write = self.memory.write
        pack = _STAMP.pack
        g32 = gen & 0xFFFFFFFF
        for p in range(pfn, pfn + (1 << order), self.stamp_stride):
            write(p << PAGE_SHIFT, pack(STAMP_MAGIC, g32, p))
        self.live.add(Allocation(pfn, order, gen, MigrateType(migratetype)))
        self.allocs += 1
        return WorkloadOp("alloc", pfn, order, gen)

    def free(self, pfn: int) -> WorkloadOp:
        """Free a live allocation of this workload."""
        alloc = self.live.get(pfn)
        if alloc is None:
            raise UsageError(f"workload: pfn {pfn:#x} is not a live allocation of this workload")
        if self.free_fill is not None:  # kernel_init_pages / kernel_poison_pages on free
            self.memory.fill(pfn << PAGE_SHIFT, (1 << alloc.order) << PAGE_SHIFT, self.free_fill)
        self.allocator.free_pages(pfn, alloc.order)
        self.live.remove(pfn)
        self.frees += 1
        return WorkloadOp("free", pfn, alloc.order, alloc.generation)

    def free_all(self) -> int:
        """Free every live allocation; how many there were."""
        n = 0
        for alloc in self.live:
            self.free(alloc.pfn)
            n += 1
        return n

    def stamped_pages(self, alloc: Allocation) -> range:
        """The pfns of ``alloc`` that carry a stamp."""
        return range(alloc.pfn, alloc.pfn + (1 << alloc.order), self.stamp_stride)

    def verify(self) -> list[Mismatch]:
        """Read back the stamp of every stamped live page; the pages that differ."""
        bad = []
        read = self.memory.read
        for alloc in self.live:
            for p in self.stamped_pages(alloc):
                want = expected_page(p, alloc.generation)
                got = read(p << PAGE_SHIFT, STAMP_SIZE)
                if got != want:
                    bad.append(Mismatch(p, alloc.generation, want, got))
        return bad
