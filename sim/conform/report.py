"""Conformance reports: one shape for the driver monitor and the device suite, three renderings.

A :class:`Report` is a subject (the driver or device graded), one :class:`Row` per requirement
or case with its verdict and evidence, and metadata (transport, policy, what was visible). It
renders as:

- a table in the terminal (:func:`render`, rich), with the evidence and any note;
- JSON (:meth:`Report.to_json`): ``{"kind", "subject", "meta", "summary", "results": [{"id",
  "verdict", "evidence", ...}]}``, one result per requirement (driver) or case (device);
- JUnit XML (:meth:`Report.to_junit`) for CI: one ``testcase`` per row; FAIL (and WEDGED) is a
  ``failure``, NOT-EXERCISED (and SKIP) is ``skipped``, everything else passes.

:attr:`Report.ok` is what the exit status follows: no FAIL or WEDGED that is not explained by a
note (a documented behaviour of upstream Linux or QEMU).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from device.monitor import MonitorResult
from device.monitor.grades import jsonable
from guest.villain import CATALOGUE, SuiteResult
from protocol.requirements import REQUIREMENTS

__all__ = ["Report", "Row", "device_report", "driver_report", "junit", "render"]

_BAD = ("FAIL", "WEDGED")
_SKIPPED = ("NOT-EXERCISED", "SKIP")
_STYLE = {"PASS": "green", "REJECT": "cyan", "FAIL": "bold red", "WEDGED": "bold magenta",
          "NOT-EXERCISED": "dim", "SKIP": "dim"}


@dataclass(frozen=True, slots=True)
class Row:
    """One graded requirement or case."""

    id: str
    verdict: str
    evidence: str
    title: str = ""
    rule: str | None = None
    level: str | None = None
    note: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "verdict": self.verdict,
                               "evidence": self.evidence}
        if self.title:
            out["title"] = self.title
        if self.rule and self.rule != self.id:
            out["rule"] = self.rule
        if self.level:
            out["level"] = self.level
        if self.note:
            out["note"] = self.note
        if self.values:
            out["values"] = jsonable(dict(self.values))
        return out


@dataclass(frozen=True, slots=True)
class Report:
    """A graded driver or device (see the module docstring)."""

    kind: Literal["driver", "device"]
    subject: str
    rows: tuple[Row, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return dict(Counter(r.verdict for r in self.rows))

    @property
    def unexplained(self) -> list[Row]:
        """Rows that failed without a note explaining them."""
        return [r for r in self.rows if r.verdict in _BAD and not r.note]

    @property
    def ok(self) -> bool:
        return not self.unexplained

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "meta": jsonable(dict(self.meta)),
                "summary": self.summary(), "unexplained_failures": len(self.unexplained),
                "results": [r.to_json() for r in self.rows]}

    def to_junit(self) -> str:
        return junit([self])

    def junit_suite(self, parent: ET.Element) -> None:
        """Add this report as one ``testsuite`` under ``parent``."""
        suite = ET.SubElement(
            parent, "testsuite", name=self.subject, tests=str(len(self.rows)),
            failures=str(sum(r.verdict in _BAD for r in self.rows)),
            skipped=str(sum(r.verdict in _SKIPPED for r in self.rows)), errors="0")
        props = ET.SubElement(suite, "properties")
        for key, value in self.meta.items():
            ET.SubElement(props, "property", name=str(key), value=str(jsonable(value)))
        for r in self.rows:
            group = r.id.split("-")[0]
            case = ET.SubElement(suite, "testcase", classname=f"vballoon.conform.{self.kind}."
                                 f"{group}", name=f"{r.id}: {r.title}" if r.title else r.id)
            if r.verdict in _BAD:
                failure = ET.SubElement(case, "failure", type=r.verdict, message=r.evidence)
                failure.text = r.note or ""
            elif r.verdict in _SKIPPED:
                ET.SubElement(case, "skipped", message=r.evidence)
            out = f"{r.verdict}: {r.evidence}" + (f"\nnote: {r.note}" if r.note else "")
            ET.SubElement(case, "system-out").text = out


def junit(reports: list[Report]) -> str:
    """JUnit XML with one ``testsuite`` per report."""
    kinds = sorted({r.kind for r in reports})
    suites = ET.Element("testsuites", name="vballoon conform " + "+".join(kinds))
    for report in reports:
        report.junit_suite(suites)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def driver_report(result: MonitorResult) -> Report:
    """The monitor's grades as a report, in catalogue order."""
    rows = []
    for g in result.grades:
        req = REQUIREMENTS[g.id]
        rows.append(Row(g.id, str(g.verdict), g.evidence, req.summary, None, str(req.level),
                        g.note, dict(g.values)))
    caps = result.capabilities
    meta = {"transport": caps.transport, "sees_status": caps.status,
            "sees_registers": caps.registers, "sees_guest_writes": caps.guest_writes,
            "features": result.features}
    return Report("driver", result.subject, tuple(rows), meta)


def device_report(result: SuiteResult, meta: Mapping[str, Any] | None = None) -> Report:
    """The suite's cases, then the requirements it graded over all cases."""
    titles = {c.id: c.title for c in CATALOGUE}
    rows = [Row(r.case, str(r.verdict), r.evidence, titles.get(r.case, ""), r.rule,
                _level(r.rule), r.note, dict(r.values)) for r in result.cases]
    for r in result.checks:
        req = REQUIREMENTS.get(r.rule)
        rows.append(Row(r.case, str(r.verdict), r.evidence, req.summary if req else "",
                        r.rule, _level(r.rule), r.note, dict(r.values)))
    return Report("device", result.subject, tuple(rows), dict(meta or {}))


def _level(rule: str | None) -> str | None:
    req = REQUIREMENTS.get(rule or "")
    return None if req is None else str(req.level)


def render(report: Report, console: Any, *, brief: bool = False) -> None:
    """Print ``report`` as a rich table (``brief``: leave out NOT-EXERCISED and SKIP rows)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{report.kind} conformance: {report.subject}", show_lines=False,
                  expand=True)
    table.add_column("ID", no_wrap=True)
    table.add_column("Level", no_wrap=True)
    table.add_column("Verdict", no_wrap=True)
    table.add_column("Evidence", ratio=1)
    for r in report.rows:
        if brief and r.verdict in _SKIPPED:
            continue
        evidence = Text(r.evidence)
        if r.title and report.kind == "device":
            evidence = Text(f"{r.title}: ", style="bold") + evidence
        if r.note:
            evidence.append(f"\nnote: {r.note}", style="italic yellow")
        table.add_row(r.id, r.level or "", Text(r.verdict, style=_STYLE.get(r.verdict, "")),
                      evidence)
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.summary().items()))
    unexplained = len(report.unexplained)
    console.print(f"{report.subject}: {counts}; "
                  + (f"[bold red]{unexplained} unexplained failure(s)[/]" if unexplained else
                     "no unexplained failure"))
