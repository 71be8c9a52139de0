"""Verdicts of the driver conformance monitor, and the ledger that turns observations into them.

Every check the monitor makes is an *observation* of one requirement of the catalogue
(:data:`protocol.requirements.REQUIREMENTS`): it held (:meth:`Ledger.ok`) or it was broken
(:meth:`Ledger.fail`, with the values that broke it). At the end each requirement gets one
:class:`Grade`:

- ``FAIL`` if it was broken at least once (the first failure is the evidence; the count says
  how often it happened);
- ``PASS`` if it was checked and always held (the evidence says how often and the last case);
- ``NOT-EXERCISED`` if the run never reached a situation where it applies, with the reason
  (the scenario never did it, the transport cannot show it, or the catalogue has no check).

A FAIL may carry a ``note``: an explanation attached by :mod:`device.monitor.deviations` when
the failure is a known, documented behaviour of upstream Linux.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Capabilities", "Grade", "Ledger", "Verdict", "jsonable"]


class Verdict(StrEnum):
    """What the monitor says about one driver requirement."""

    PASS = "PASS"
    FAIL = "FAIL"
    NOT_EXERCISED = "NOT-EXERCISED"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the transport lets the monitor see (the rest is NOT-EXERCISED with a reason).

    Attributes:
        transport: ``"virtio-mmio"`` or ``"vhost-user"`` (for the report).
        status: the driver's Status writes are visible (MMIO; vhost-user from Linux never sends
            SET_STATUS, so DRIVER_OK and FAILED are never seen).
        registers: individual register accesses are visible (MMIO only).
        guest_writes: the guest's own writes to its RAM are visible (the simulated machine,
            through :class:`~device.monitor.tap.GuestWriteTap`; a real guest writes its RAM
            directly).
    """

    transport: str
    status: bool
    registers: bool
    guest_writes: bool


def jsonable(value: Any) -> Any:
    """``value`` with tuples, sets and enums turned into plain JSON types (ints stay ints)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [jsonable(v) for v in items]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


@dataclass(frozen=True, slots=True)
class Grade:
    """The verdict on one requirement, with its evidence.

    Attributes:
        id: the requirement ID.
        verdict: PASS, FAIL or NOT-EXERCISED.
        evidence: one sentence: what was seen (the first failure, or the last pass), or why
            the requirement was not exercised.
        values: the offending (or checked) values, JSON-ready.
        note: an explanation, e.g. that a FAIL is documented behaviour of upstream Linux.
        checks: how many times the requirement was checked.
        failures: how many of those checks failed.
    """

    id: str
    verdict: Verdict
    evidence: str
    values: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None
    checks: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Record:
    checks: int = 0
    failures: int = 0
    evidence: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    fail_evidence: str | None = None
    fail_values: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """Observations per requirement ID, turned into :class:`Grade` objects by :meth:`grade`."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    def ok(self, req_id: str, evidence: str, **values: Any) -> None:
        """Requirement ``req_id`` was checked and held."""
        r = self._records.setdefault(req_id, _Record())
        r.checks += 1
        r.evidence = evidence
        r.values = {k: jsonable(v) for k, v in values.items()}

    def fail(self, req_id: str, evidence: str, **values: Any) -> None:
        """Requirement ``req_id`` was broken; the first failure is kept as evidence."""
        r = self._records.setdefault(req_id, _Record())
        r.checks += 1
        r.failures += 1
        if r.fail_evidence is None:
            r.fail_evidence = evidence
            r.fail_values = {k: jsonable(v) for k, v in values.items()}

    def check(self, req_id: str, held: bool, evidence: str, **values: Any) -> bool:
        """:meth:`ok` or :meth:`fail` depending on ``held``; returns ``held``."""
        (self.ok if held else self.fail)(req_id, evidence, **values)
        return held

    def seen(self, req_id: str) -> bool:
        """Whether ``req_id`` was checked at least once."""
        return req_id in self._records

    def failed(self, req_id: str) -> bool:
        r = self._records.get(req_id)
        return r is not None and r.failures > 0

    def grade(self, req_id: str, *, reason: str) -> Grade:
        """The grade of ``req_id``; ``reason`` explains a NOT-EXERCISED one."""
        r = self._records.get(req_id)
        if r is None:
            return Grade(req_id, Verdict.NOT_EXERCISED, reason)
        if r.failures:
            evidence = r.fail_evidence or ""
            if r.failures > 1:
                evidence += f" ({r.failures} of {r.checks} checks failed)"
            return Grade(req_id, Verdict.FAIL, evidence, r.fail_values, None, r.checks,
                         r.failures)
        evidence = r.evidence if r.checks == 1 else f"{r.checks} checks held; last: {r.evidence}"
        return Grade(req_id, Verdict.PASS, evidence, r.values, None, r.checks, 0)
