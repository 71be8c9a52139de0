"""Differential fuzzing: the same layouts through our device end and QEMU's virtio-balloon.

Each layout (valid, or near-valid with one mutation; :mod:`virtqueue.strategies`) is placed in
guest RAM at the same addresses on both sides and made available on the inflate queue, whose
payload is le32 PFNs. Both devices then do what QEMU's inflate handler does: pop a chain, take
its readable bytes as PFNs, discard those pages, return the chain used with length 0, until the
queue is empty or a violation stops it (our side uses the ``needs-reset`` policy, QEMU's own).

What is compared, per layout (:class:`Verdict`): the heads returned used, in order; whether the
device stopped on a violation (our rule ID, QEMU's DEVICE_NEEDS_RESET); and which pages were
discarded. Every PFN a layout carries names a page of a pool filled with a pattern beforehand; a
page QEMU discarded reads back as zeros, so the pool shows exactly which 4-byte slots QEMU
consumed. Each disagreement is classified (:mod:`sim.fuzz.classify`).

QEMU runs paused (mode A): a queue notification is handled inside the MMIO write. One QEMU
process serves a whole batch; between layouts the device is reset and the queue set up again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol.errors import DriverViolation
from sim.fuzz.classify import Classification, Verdict, classify
from sim.fuzz.qemu_model import ModelChain, qemu_predict
from sim.fuzz.qemu_queue import InflateQueue
from sim.qemu import QemuOptions, find_balloon, run_qemu
from virtqueue.cases import Choices, Geometry, Layout, RandomChoices, choose
from virtqueue.strategies import Options, build_near_valid, build_valid, feasible_kinds

__all__ = ["DifferentialReport", "Outcome", "Verdict", "layouts_for_qemu", "our_verdict",
           "run_differential"]

log = structlog.get_logger("vballoon.sim")

RAM = 128 << 20
BIOS_HOLE = (0xF0000, 0x100000)
ARENA = (16 << 20, (16 << 20) + (512 << 10))
POOL_PFN = (32 << 20) >> 12
"""First page of the PFN pool; every PFN a layout carries is POOL_PFN + k."""
PATTERN = 0xA5
SIZES = (1, 2, 4, 8, 16, 32, 64)
_EXCLUDED = {"chain_too_big"}
"""Not sent to QEMU: a 2^32-byte chain of PFNs would discard the whole guest."""


def microvm_geometry(ram: int = RAM) -> Geometry:
    """microvm's RAM map (sim.qemu.memory) with harmless non-RAM ranges for bad addresses."""
    return Geometry(ram=((0, BIOS_HOLE[0]), (BIOS_HOLE[1], ram - BIOS_HOLE[1])), arena=ARENA,
                    outside=((ram, 0xC000_0000), (1 << 32, 1 << 40)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One layout, both verdicts, and the classification of any disagreement."""

    index: int
    layout: Layout
    ours: Verdict
    qemu: Verdict
    model: Verdict
    classification: Classification | None

    @property
    def agree(self) -> bool:
        return self.classification is None


@dataclass
class DifferentialReport:
    """All outcomes of a run, and how long it took."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    qemu_version: str = ""

    @property
    def disagreements(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.agree]

    def table(self) -> list[dict[str, Any]]:
        """One row per (category, deviation, rule, what differed): count and an example."""
        rows: dict[tuple, dict[str, Any]] = {}
        for o in self.disagreements:
            c = o.classification
            key = (c.category, c.deviation, c.rule or "-", c.difference)
            row = rows.setdefault(key, {"category": c.category, "deviation": c.deviation,
                                        "rule": c.rule or "-", "difference": c.difference,
                                        "count": 0, "known": c.known, "reason": c.reason,
                                        "example": o.index, "labels": Counter()})
            row["count"] += 1
            row["labels"][o.layout.label] += 1
        out = sorted(rows.values(), key=lambda r: (r["category"], r["deviation"] or "",
                                                   -r["count"]))
        for r in out:
            r["labels"] = dict(r["labels"])
        return out

    def summary(self) -> dict[str, Any]:
        by_cat = Counter(o.classification.category for o in self.disagreements)
        return {"layouts": len(self.outcomes), "agree": len(self.outcomes) - len(
            self.disagreements), "disagree": len(self.disagreements),
            "by_category": dict(by_cat), "seconds": round(self.seconds, 2),
            "layouts_per_s": round(len(self.outcomes) / self.seconds, 1) if self.seconds else
            None, "labels": dict(Counter(o.layout.label for o in self.outcomes))}


class _Pfns:
    """Payload source: every 4-byte slot of a readable buffer is the next pool PFN."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, ch: Choices, n: int) -> bytes:
        out = bytearray()
        for _ in range(n // 4):
            out += (POOL_PFN + self.count).to_bytes(4, "little")
            self.count += 1
        return bytes(out)


def layouts_for_qemu(count: int, seed: int | str = 0, *, sizes: tuple[int, ...] = SIZES,
                     valid_share: float = 0.3) -> list[tuple[Layout, int]]:
    """``count`` layouts for microvm, each with the number of pool PFNs it uses."""
    geometry = microvm_geometry()
    out = []
    kinds_by_size = {s: [k for k in feasible_kinds(s, geometry) if k not in _EXCLUDED]
                     for s in sizes}
    for i in range(count):
        ch = RandomChoices(f"{seed}-{i}")
        pfns = _Pfns()
        opts = Options(max_chains=6, max_buffers=5, max_len=16, big_len=16, align4=True,
                       payload=pfns, start=0)
        size = choose(ch, sizes)
        if ch.integer(0, 999) < valid_share * 1000:
            layout = build_valid(ch, size=size, geometry=geometry, options=opts)
        else:
            kind = choose(ch, kinds_by_size[size])
            layout = build_near_valid(ch, size=size, kind=kind, geometry=geometry,
                                      options=opts)
        out.append((layout, pfns.count))
    return out


def _pfns(data: bytes, pool: range) -> frozenset[int]:
    out = set()
    for k in range(0, len(data) - 3, 4):
        pfn = int.from_bytes(data[k:k + 4], "little")
        if pfn in pool:
            out.add(pfn)
    return frozenset(out)


def our_verdict(layout: Layout, memory: Any, pool: range) -> Verdict:
    """Our device end on ``layout`` (written in ``memory``) used as QEMU's inflate handler."""
    queue = layout.device_queue(memory, "needs-reset")
    chains: list[ModelChain] = []
    rule = None
    while True:
        try:
            chain = queue.pop()
        except DriverViolation as v:
            rule = v.rule_id
            head = v.values.get("head", -1)
            chains.append(ModelChain(head if isinstance(head, int) else -1, False, frozenset(),
                                     ()))
            break
        if chain is None:
            break
        pfns = _pfns(chain.read(memory), pool)
        queue.push(chain.head, 0)
        chains.append(ModelChain(chain.head, True, pfns, ()))
    accepted = [c for c in chains if c.accepted]
    return Verdict(len(accepted), tuple(c.head for c in accepted), rule is not None,
                   frozenset().union(*(c.pfns for c in accepted)), rule, tuple(chains))


def model_verdict(layout: Layout, memory: Any, pool: range) -> Verdict:
    """The QEMU model's verdict (:mod:`sim.fuzz.qemu_model`)."""
    chains, used_idx, slots = qemu_predict(memory, layout, pool)
    accepted = [c for c in chains if c.accepted]
    return Verdict(used_idx, slots, any(not c.accepted for c in chains),
                   frozenset().union(*(c.pfns for c in accepted)), None, tuple(chains))


class _QemuSide:
    """The batch state on the QEMU side: the queue, the arena image size, the pool."""

    def __init__(self, qemu: Any) -> None:
        self.qtest = qemu.qtest
        _, bus = find_balloon(self.qtest)
        self.queue = InflateQueue(bus)
        self.extent = 0
        self.pool_filled = 0

    def run(self, layout: Layout, pool: int) -> Verdict:
        qt = self.qtest
        if pool > self.pool_filled:  # new pool pages: fill them with the pattern once
            qt.memset((POOL_PFN + self.pool_filled) << 12, (pool - self.pool_filled) << 12,
                      PATTERN)
            self.pool_filled = pool
        lo, hi = ARENA
        image = bytearray(max(self.extent, 16))
        self.queue.setup(size=layout.size, desc=layout.desc, avail=layout.avail,
                         used=layout.used, indirect=layout.indirect)
        pieces = [(layout.desc, layout.table)]
        scratch = _Capture()
        layout.write_into(scratch)
        for gpa, data in scratch.writes:
            if lo <= gpa and gpa + len(data) <= hi:
                end = gpa - lo + len(data)
                if end > len(image):
                    image.extend(bytes(end - len(image)))
                image[gpa - lo:end] = data
            elif gpa >= hi or gpa + len(data) <= lo:
                pieces.append((gpa, data))
        for gpa, data in pieces[1:]:  # writes outside the arena (none from our builders)
            qt.b64write(gpa, data)
        qt.b64write(lo, bytes(image))
        self.extent = len(image) if len(image) > self.extent else self.extent
        self.queue.notify()
        run = self.queue.result(layout.used, layout.size)
        discarded: frozenset[int] = frozenset()
        if pool:
            pages = qt.b64read(POOL_PFN << 12, pool << 12)
            discarded = frozenset(POOL_PFN + k for k in range(pool)
                                  if pages[k << 12] != PATTERN)
            if discarded:
                qt.memset(POOL_PFN << 12, pool << 12, PATTERN)
        return Verdict(run.used_idx, tuple(h for h, _ in run.used), run.needs_reset, discarded)


class _Capture:
    """A write sink that records what ``Layout.write_into`` stores."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, bytes(data)))

    def contains(self, gpa: int, n: int) -> bool:
        return True


async def run_differential(count: int, *, seed: int | str = 0, binary: str | None = None,
                           batch: int = 2000, sizes: tuple[int, ...] = SIZES,
                           progress: Callable[[int], None] | None = None
                           ) -> DifferentialReport:
    """Run ``count`` layouts through both devices (``batch`` layouts per QEMU process)."""
    started = time.perf_counter()
    cases = layouts_for_qemu(count, seed, sizes=sizes)
    report = DifferentialReport()
    options = QemuOptions(memory=RAM, binary=binary)
    for first in range(0, len(cases), batch):
        async with run_qemu(options) as qemu:
            side = _QemuSide(qemu)
            for i in range(first, min(first + batch, len(cases))):
                layout, pfns = cases[i]
                pool = range(POOL_PFN, POOL_PFN + pfns)
                memory = layout.geometry.memory()
                try:
                    layout.write_into(memory)
                    model = model_verdict(layout, memory, pool)
                    ours = our_verdict(layout, memory, pool)
                finally:
                    memory.close()
                theirs = side.run(layout, pfns)
                report.outcomes.append(Outcome(i, layout, ours, theirs, model,
                                               classify(ours, theirs, model)))
                if progress is not None:
                    progress(i + 1)
    report.seconds = time.perf_counter() - started
    log.info("fuzz.differential", layouts=count, disagreements=len(report.disagreements),
             seconds=round(report.seconds, 1))
    return report
