"""A synthetic guest for the migration benchmarks: used memory, stale free memory, churn, hints.

Stands in for the simulated guest (guest allocator + hinting driver + balloon device) until the
benchmarks are wired to it: it is the guest driver and the device's hinting verbs in one object
(:class:`~device.migration.HintingDevice`), answering a new command ID at once (REQUESTED ->
START) and hinting every free ``block`` (4 MiB: MAX_ORDER - 1 pages on Linux 6.1 x86-64) in
address order, in batches, under the vCPU gate; it holds the hinted blocks until DONE, as
Linux does. Used memory is ``runs`` of ``run_bytes`` at seeded random places; with
``stale=True`` every free page holds old data (a guest that has run a while), else free pages
are holes (a freshly booted one). Churn rewrites used memory at ``churn_bytes_per_s`` (virtual
time) in ``CHURN_RUN`` pieces.
"""

from __future__ import annotations

import random

import trio

from device.ranges import RangeSet
from device.vcpu import VcpuGate
from protocol.errors import UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

__all__ = ["BLOCK", "CHURN_RUN", "SyntheticGuest"]

BLOCK = 4 << 20
CHURN_RUN = 64 << 10
CHURN_TICK = 0.01
HINT_BATCH = 1024
HINT_BATCH_TIME = 0.001


class SyntheticGuest:
    """See the module docstring. ``run()`` is the guest; ``relied()`` what it relies on."""

    def __init__(self, memory: GuestMemory, gate: VcpuGate, *, seed: int, runs: int,
                 run_bytes: int, stale: bool, churn_bytes_per_s: float = 0.0,
                 block: int = BLOCK) -> None:
        if memory.size % block or run_bytes % PAGE_SIZE or block % run_bytes:
            raise UsageError("block must divide RAM, and run_bytes (page aligned) the block")
        self.memory, self.gate, self.block = memory, gate, block
        self.rng = random.Random(seed)
        self.churn_bytes_per_s = churn_bytes_per_s
        base = memory.regions[0].gpa
        slots = memory.size // run_bytes
        starts = sorted(self.rng.sample(range(slots), runs))
        self.used = RangeSet((base + s * run_bytes, base + (s + 1) * run_bytes) for s in starts)
        self._runs = [(base + s * run_bytes, run_bytes) for s in starts]
        self.free_blocks = [b for b in range(base, base + memory.size, block)
                            if not self.used.overlap(b, b + block)]
        self.held = RangeSet()
        self.on_hint = None
        self.state = "stop"
        self.cmd_id = 0
        self.hints = 0
        self._cursor = 0  # free_blocks before it are held
        self._started = trio.Event()
        self._stamp = 0
        if stale:
            memory.fill(base, memory.size, 0x5A)
        for gpa, length in self._runs:
            self._write(gpa, length)

    # ---- the device's hinting verbs, answered by the driver at once -------------------------
    def hint_stop(self) -> None:
        self.state = "stop"

    def hint_start(self) -> int:
        self.cmd_id = 0x8000_0000 + self.cmd_id % 0x8000_0000 + 1
        self.state = "start"  # the driver echoes the ID at once: REQUESTED -> START
        self._started.set()
        return self.cmd_id

    def hint_done(self) -> None:
        self.state = "done"
        self.held = RangeSet()  # the driver frees its blocks: all may be hinted again
        self._cursor = 0

    # ---- the guest ------------------------------------------------------------------------
    def relied(self) -> RangeSet:
        """Bytes the guest relies on: its used runs (never the held or free blocks)."""
        return self.used.copy()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hinter)
            if self.churn_bytes_per_s > 0:
                nursery.start_soon(self._churn)

    async def _hinter(self) -> None:
        """Hint free blocks from where the last round stopped; each batch is one vCPU unit."""
        while True:
            await self._started.wait()
            self._started = trio.Event()
            while self._cursor < len(self.free_blocks) and self.state == "start":
                batch = self.free_blocks[self._cursor:self._cursor + HINT_BATCH]
                async with self.gate.vcpu():
                    if self.state != "start":
                        break
                    for gpa in batch:
                        self.held.add(gpa, gpa + self.block)
                        if self.on_hint is not None:
                            self.on_hint(gpa, self.block)
                    self._cursor += len(batch)
                    self.hints += len(batch)
                await trio.sleep(HINT_BATCH_TIME)

    async def _churn(self) -> None:
        per_tick = max(1, round(self.churn_bytes_per_s * CHURN_TICK / CHURN_RUN))
        while True:
            async with self.gate.vcpu():
                for _ in range(per_tick):
                    gpa, length = self.rng.choice(self._runs)
                    n = min(CHURN_RUN, length)
                    off = self.rng.randrange(0, length - n + 1, PAGE_SIZE)
                    self._write(gpa + off, n)
            await trio.sleep(CHURN_TICK)

    def _write(self, gpa: int, length: int) -> None:
        """Fresh contents: a fill byte that changes each time, and a stamp per page."""
        self._stamp += 1
        self.memory.fill(gpa, length, 0xA0 | (self._stamp & 0xF))
        stamp = self._stamp.to_bytes(8, "little")
        if length <= 4 * PAGE_SIZE:
            for page in range(gpa, gpa + length, PAGE_SIZE):
                self.memory.write(page, stamp)
