"""How the device conformance suite grades a device, case by case (virtio-villain's verdicts).

The hostile driver attacks a device with one case at a time and says what the device did:

- ``PASS``: handled correctly. For valid input: processed exactly. For input the spec forbids
  the driver to send: consumed without harm (the spec lets a device accept it; the report
  says that the device did not check it).
- ``REJECT``: refused cleanly: an error with DEVICE_NEEDS_RESET, or the chain (or field) ignored
  or cut, and the device serviceable again after a reset, proven by a valid inflate.
- ``WEDGED``: stopped answering: nothing happened within a bounded wait, or the valid inflate
  after a reset was never used.
- ``FAIL``: a wrong result: a crash, valid work lost, bytes the device must not write written,
  a field the driver may not change changed, a used element for a buffer never made available.
- ``SKIP``: not run against this device, with the reason (e.g. a feature it does not offer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["CaseResult", "DeviceVerdict", "SuiteResult"]


class DeviceVerdict(StrEnum):
    """What the device did with one case (see the module docstring)."""

    PASS = "PASS"
    REJECT = "REJECT"
    WEDGED = "WEDGED"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case against one device.

    Attributes:
        case: the case ID (``DC-01``, ``BL-16``, ``GEN-V-5``...).
        rule: the catalogue ID (:data:`protocol.requirements.REQUIREMENTS`) the case exercises.
        verdict: see :class:`DeviceVerdict`.
        evidence: one sentence: what the device did.
        values: what was observed (used ring, status bits, pages discarded...).
        note: where the device and the spec disagree, or why a case was skipped.
        seconds: how long the case took (wall clock).
    """

    case: str
    rule: str
    verdict: DeviceVerdict
    evidence: str
    values: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SuiteResult:
    """Every case against one device, and the suite-wide checks graded along the way."""

    subject: str
    cases: tuple[CaseResult, ...]
    checks: tuple[CaseResult, ...] = ()
    """Requirements graded over all cases (GEN-V-2/3, SPL-V-2, SPL-V-9...)."""

    def summary(self) -> dict[str, int]:
        out = {v.value: 0 for v in DeviceVerdict}
        for r in self.cases:
            out[r.verdict.value] += 1
        return out

    def result(self, case: str) -> CaseResult:
        return next(r for r in (*self.cases, *self.checks) if r.case == case)
