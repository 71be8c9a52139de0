"""The device conformance suite: run every attack case against one device and grade it.

:class:`Suite` runs the cases of :mod:`guest.villain.cases` one at a time over a
:class:`~guest.villain.port.DevicePort`. Each case starts from a reset, attacks, observes
(used ring, DEVICE_NEEDS_RESET, a pending config interrupt, which pool pages were discarded,
whether the descriptor table and the readable buffers are as the driver wrote them), then
proves the device serviceable with :meth:`~guest.villain.driver.HostileDriver.recover` and
grades it (:mod:`guest.villain.verdicts`). Layout cases are graded here; payload, config,
feature and status cases in :mod:`guest.villain.attacks`.

Along the way it grades requirements that every case exercises (:attr:`SuiteResult.checks`):
GEN-V-2 (DEVICE_NEEDS_RESET on an error), GEN-V-3 (with a configuration change notification),
SPL-V-2 (the device never writes device-readable buffers or the descriptor table), SPL-V-9
(``used.flags`` stays 0 or 1 without EVENT_IDX), SPL-V-6 (used lengths within the writable
bytes; a balloon writes none).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from guest.villain.cases import AttackCase
from guest.villain.driver import HostileDriver
from guest.villain.layouts import build_case_layout, lenient_pfns, pool_pfns
from guest.villain.port import DevicePort
from guest.villain.verdicts import CaseResult, DeviceVerdict, SuiteResult
from protocol.errors import VballoonError
from protocol.features import TransportFeature, bit, names
from protocol.requirements import REQUIREMENTS
from virtqueue.cases import Layout

__all__ = ["Outcome", "Suite"]

log = structlog.get_logger("vballoon.guest")

V = DeviceVerdict
_INDIRECT = bit(TransportFeature.RING_INDIRECT_DESC)


@dataclass(slots=True)
class Outcome:
    """What a case handler concluded."""

    verdict: DeviceVerdict
    evidence: str
    values: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


@dataclass(slots=True)
class _Observation:
    busy: bool
    alive: bool
    needs_reset: bool
    config_irq: bool | None
    used_idx: int
    used: list[tuple[int, int]]
    used_flags: int
    discarded: set[int]
    intact: bool
    stray: list[int] = field(default_factory=list)
    """Sentinel pages (named by no payload) the device discarded."""


def not_checked_note(case: AttackCase, device: str) -> str | None:
    """The report's note when a device consumed input the spec forbids the driver to send."""
    if case.breaks is None:
        return None
    req = REQUIREMENTS.get(case.breaks)
    what = f"{case.breaks} ({req.summary})" if req is not None else case.breaks
    return (f"The device took input that breaks {what} without refusing it. The spec forbids "
            "the driver to send it and lets a device carry on (§2.1.2), so this is not a "
            "device failure; a device that checks the rule (e.g. vballoon's needs-reset "
            "policy) refuses it.")


class Suite:
    """Runs cases against ``port`` (see the module docstring).

    Args:
        port: the device.
        skip: case ID -> reason for cases not to run against this device.
    """

    def __init__(self, port: DevicePort, *, skip: dict[str, str] | None = None) -> None:
        self.port = port
        self.driver = HostileDriver(port)
        self.skip = dict(skip or {})
        self._needs_reset: list[str] = []
        self._config_irq: list[tuple[str, bool | None]] = []
        self._written: list[str] = []
        self._flags: list[tuple[str, int]] = []
        self._used_len: list[tuple[str, int]] = []
        self._layout_cases = 0

    async def run(self, cases: Iterable[AttackCase]) -> SuiteResult:
        results = []
        for case in cases:
            results.append(await self.run_case(case))
        return SuiteResult(self.port.name, tuple(results), self.checks())

    async def run_case(self, case: AttackCase) -> CaseResult:
        from guest.villain.attacks import HANDLERS
        from guest.villain.behaviour import BEHAVIOUR

        started = time.perf_counter()
        if case.id in self.skip:
            out = Outcome(V.SKIP, self.skip[case.id], note=self.skip[case.id])
        elif case.needs and not self.driver.offers(case.needs):
            out = Outcome(V.SKIP, f"the device does not offer {names(case.needs)}")
        else:
            try:
                if case.kind in ("layout", "valid"):
                    out = await self._layout(case)
                else:
                    out = await (HANDLERS.get(case.id) or BEHAVIOUR[case.id])(self, case)
            except VballoonError as exc:
                alive = self.port.alive()
                out = Outcome(V.FAIL, f"the device {'failed' if alive else 'died'} during the "
                              f"case: {exc}", {"error": str(exc)})
        result = CaseResult(case.id, case.rule, out.verdict, out.evidence, out.values,
                            out.note, round(time.perf_counter() - started, 4))
        log.info("villain.case", case=case.id, verdict=str(out.verdict), device=self.port.name)
        return result

    # ---- layout cases ---------------------------------------------------------------------
    async def _layout(self, case: AttackCase) -> Outcome:
        port, drv = self.port, self.driver
        cl = build_case_layout(case.id, case.mutation, case.queue_size,
                               port.layout.geometry, drv.pool_first)
        layout = cl.layout
        if cl.pfns >= drv.pool_pages:
            raise VballoonError(f"case {case.id} needs {cl.pfns} pool pages, the port has "
                                f"{drv.pool_pages}")
        pool = range(drv.pool_first, drv.pool_first + cl.pfns)
        if not await port.begin(drv.features(_INDIRECT if layout.indirect else 0)):
            return Outcome(V.FAIL, "the device refused FEATURES_OK for features it offers")
        drv.fill_pool(cl.pfns)
        drv.fill_sentinel()
        layout.write_into(drv.memory)
        if not await port.setup_queue(0, layout.size, layout.desc, layout.avail, layout.used):
            return Outcome(V.SKIP, f"the device refused an inflate queue of {layout.size} "
                           "entries")
        await port.driver_ok()
        await port.notify(0)
        entries = len(layout.entries)

        async def done() -> bool:
            return (await port.needs_reset() or not port.alive()
                    or drv.used(layout.used, layout.size)[0] >= entries)

        await port.settle(until=done)
        obs = await self._observe(layout, cl.pfns)
        if case.mutation != "chain_too_big":  # its buffers span RAM: every PFN is named
            obs.stray = drv.sentinel_discarded()
        recovered, how = await drv.recover()
        self._record(case, obs)
        return _grade_layout(case, layout, pool, obs, recovered, how, port.name,
                             getattr(port, "reset_signal", "DEVICE_NEEDS_RESET set"))

    async def _observe(self, layout: Layout, pfns: int) -> _Observation:
        port, drv = self.port, self.driver
        busy = getattr(port, "stuck", False)
        alive = port.alive()
        needs_reset = await port.needs_reset() if alive else False
        irq = await port.config_interrupt() if alive and needs_reset else None
        idx, used, flags = drv.used(layout.used, layout.size)
        intact = all(drv.memory.read(gpa, len(data)) == data
                     for gpa, data in ((layout.desc, layout.table), *layout.writes)
                     if drv.memory.contains(gpa, len(data)))
        return _Observation(busy, alive, needs_reset, irq, idx, used, flags,
                            drv.discarded(pfns), intact)

    def _record(self, case: AttackCase, obs: _Observation) -> None:
        self._layout_cases += 1
        if obs.needs_reset:
            self._needs_reset.append(case.id)
            self._config_irq.append((case.id, obs.config_irq))
        if not obs.intact:
            self._written.append(case.id)
        self._flags.append((case.id, obs.used_flags))
        self._used_len.extend((case.id, n) for _, n in obs.used if n)

    def note_reset(self, case: AttackCase, needs_reset: bool, config_irq: bool | None) -> None:
        """Attack handlers report a needs-reset they saw (for GEN-V-2 / GEN-V-3)."""
        if needs_reset:
            self._needs_reset.append(case.id)
            self._config_irq.append((case.id, config_irq))

    # ---- suite-wide requirements ---------------------------------------------------------
    def checks(self) -> tuple[CaseResult, ...]:
        out = []
        n = self._layout_cases

        def row(rule: str, verdict: DeviceVerdict, evidence: str, **values: Any) -> None:
            out.append(CaseResult(rule, rule, verdict, evidence, values))

        if self._needs_reset:
            row("GEN-V-2", V.PASS, f"DEVICE_NEEDS_RESET set for {len(self._needs_reset)} "
                "violation(s)", cases=self._needs_reset)
            irq = [(c, i) for c, i in self._config_irq if i is not None]
            missing = [c for c, i in irq if not i]
            if not irq:
                row("GEN-V-3", V.SKIP, "config interrupts are not observable on this port")
            else:
                row("GEN-V-3", V.FAIL if missing else V.PASS,
                    f"a configuration change notification followed DEVICE_NEEDS_RESET in "
                    f"{len(irq) - len(missing)} of {len(irq)} case(s)", missing=missing)
        else:
            why = "the device never set DEVICE_NEEDS_RESET (it skips or cuts bad chains)"
            row("GEN-V-2", V.SKIP, why)
            row("GEN-V-3", V.SKIP, why)
        if n:
            row("SPL-V-2", V.FAIL if self._written else V.PASS,
                f"descriptor tables and device-readable buffers unchanged after {n} layout "
                f"cases" if not self._written else
                f"the device wrote device-readable memory in {self._written}",
                cases=self._written)
            bad = [(c, f) for c, f in self._flags if f not in (0, 1)]
            row("SPL-V-9", V.FAIL if bad else V.PASS, f"used.flags in {{0, 1}} after {n} "
                "cases without EVENT_IDX" if not bad else f"used.flags {bad[:4]}",
                bad=[list(b) for b in bad])
            row("SPL-V-6", V.FAIL if self._used_len else V.PASS,
                "every used length was 0 (balloon buffers carry no device-writable bytes)"
                if not self._used_len else f"non-zero used lengths {self._used_len[:4]}",
                nonzero=[list(x) for x in self._used_len])
        return tuple(out)


def _grade_layout(case: AttackCase, layout: Layout, pool: range, obs: _Observation,
                  recovered: bool, how: str, device: str, signal: str) -> Outcome:
    used_heads = [h for h, _ in obs.used]
    values: dict[str, Any] = {
        "layout": layout.describe(), "used_idx": obs.used_idx, "used": used_heads,
        "needs_reset": obs.needs_reset, "config_interrupt": obs.config_irq,
        "discarded": len(obs.discarded), "recovered": recovered, "busy": obs.busy}
    published = set(layout.entries)
    bogus = [h for h in used_heads if h >= layout.size or h not in published]
    if not obs.alive:
        return Outcome(V.FAIL, "the device died", values)
    if bogus:
        return Outcome(V.FAIL, f"used elements for heads never made available: {bogus}",
                       values)
    if not obs.intact:
        return Outcome(V.FAIL, "the device wrote the descriptor table or a device-readable "
                       "buffer (SPL-V-2)", values)
    stray = f"; pages no payload named were discarded: {obs.stray[:8]}" if obs.stray else ""
    values["stray_discarded"] = obs.stray[:16]
    expected = layout.expected or ()
    prefix = set().union(*(pool_pfns(c.data, pool) for c in expected))
    lost = sorted(prefix - obs.discarded)
    if case.kind == "valid":
        unused = [c.head for c in expected if c.head not in used_heads]
        if obs.needs_reset or unused or lost or obs.stray:
            return Outcome(V.FAIL, f"a valid layout was not processed exactly: needs_reset="
                           f"{obs.needs_reset}, chains not used {unused}, {len(lost)} PFNs not "
                           f"discarded{stray}", values | {"lost_pfns": lost[:8]})
        if not recovered:
            return Outcome(V.WEDGED, f"valid layout processed, then {how}", values)
        return Outcome(V.PASS, f"all {len(expected)} chains used and their {len(prefix)} PFNs "
                       "discarded", values)
    if obs.busy:
        return Outcome(V.WEDGED, "the device never became idle: it was still running (a busy "
                       f"loop) at the end of the bounded wait; after the case, {how}", values)
    if obs.stray:
        return Outcome(V.FAIL, f"the device took PFNs from bytes that are no payload{stray}",
                       values)
    if lost and not obs.needs_reset:
        return Outcome(V.FAIL, f"valid chains before the bad one were not processed "
                       f"({len(lost)} PFNs kept)", values | {"lost_pfns": lost[:8]})
    if not recovered:
        return Outcome(V.WEDGED, f"after the case, {how}", values)
    if obs.needs_reset:
        note = "valid chains before the bad one were dropped" if lost else None
        return Outcome(V.REJECT, signal + (
            ", with a configuration change notification" if obs.config_irq else "")
            + "; serviceable after a reset", values, note)
    j = len(expected)
    bad = layout.entries[j] if j < len(layout.entries) else None
    if bad is None or bad >= layout.size:
        if obs.used_idx > len(expected):
            return Outcome(V.PASS, f"consumed {obs.used_idx} entries past the bad avail "
                           "state without harm", values, not_checked_note(case, device))
        return Outcome(V.REJECT, "the bad avail entry was ignored; serviceable after a reset",
                       values)
    if used_heads.count(bad) <= sum(1 for c in expected if c.head == bad):
        return Outcome(V.REJECT, f"the bad chain (head {bad}) was not used (ignored); "
                       "serviceable after a reset", values)
    bad_pfns = lenient_pfns(layout, bad, pool) - prefix
    taken = bad_pfns & obs.discarded
    values |= {"bad_head": bad, "bad_chain_pfns": len(bad_pfns), "bad_pfns_discarded":
               len(taken)}
    if bad_pfns and taken == bad_pfns or case.mutation == "duplicate_head":
        return Outcome(V.PASS, f"the bad chain (head {bad}) was consumed without harm",
                       values, not_checked_note(case, device))
    if taken:
        return Outcome(V.REJECT, f"the bad chain (head {bad}) was cut: {len(taken)} of "
                       f"{len(bad_pfns)} PFNs taken, the rest ignored", values)
    return Outcome(V.REJECT, f"the bad chain (head {bad}) was returned used without being "
                   "processed (skipped)", values)
