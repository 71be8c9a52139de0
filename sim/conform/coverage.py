"""``vballoon conform --coverage``: which catalogue requirements have an automated check.

Builds on :func:`protocol.requirements.coverage`, which counts what the catalogue *declares*
(each requirement's check name), and adds what is *built*: a requirement counts as automated
when one of its checks (the primary one or an ``also``) is implemented:

- ``ring.*``, ``balloon.*``, ``transport.*``, ``fuzz.*``: the device end's own validation and
  the fuzz harness (virtqueue/, device/, sim/fuzz), which raise or assert these rule IDs;
- ``monitor.*``: the driver conformance monitor grades it (:data:`device.monitor.IMPLEMENTED`);
- ``suite.*`` and ``villain:*``: the device suite gives it a verdict
  (:func:`guest.villain.graded_requirements`).

The target line follows the project's goal: every balloon and split-ring MUST (or MUST NOT)
that the other end can observe has an automated check; the rest are listed with the reason
they are not observable.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from device.monitor import IMPLEMENTED
from guest.villain import graded_requirements
from protocol.requirements import (
    CHECK_FAMILIES,
    REQUIREMENTS,
    Level,
    Requirement,
    check_family,
    coverage,
)

__all__ = ["automated_by", "coverage_table", "render_coverage"]

_LAYERS = {"ring": "virtqueue", "balloon": "device", "transport": "device.mmio",
           "fuzz": "sim.fuzz"}
_MUST = (Level.MUST, Level.MUST_NOT)
_TARGET_GROUPS = ("SPL", "BAL")


def automated_by(req: Requirement) -> list[str]:
    """The tools that check ``req`` (empty: no automated check)."""
    graded = graded_requirements()
    out = []
    for name in (req.check, *req.also):
        if name is None:
            continue
        family = check_family(name)
        if family in _LAYERS:
            tool = _LAYERS[family]
        elif family == "monitor" and req.id in IMPLEMENTED:
            tool = "monitor"
        elif family in ("suite", "villain") and (
                req.id in graded or name.split(":", 1)[-1] in graded):
            tool = "device suite"
        else:
            continue
        if tool not in out:
            out.append(tool)
    return out


def coverage_table() -> dict[str, Any]:
    """Declared and automated checks per side and family, and the balloon/split-ring target."""
    declared = coverage()
    families: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"declared": 0, "automated": 0})
    by_side: dict[str, dict[str, int]] = defaultdict(
        lambda: {"total": 0, "declared": 0, "automated": 0})
    gaps, unobservable = [], []
    target = {"total": 0, "automated": 0, "unobservable": 0}
    for req in REQUIREMENTS.values():
        tools = automated_by(req)
        side = by_side[req.side]
        side["total"] += 1
        side["declared"] += req.check is not None
        side["automated"] += bool(tools)
        if req.family is not None:
            row = families[(req.side, req.family)]
            row["declared"] += 1
            row["automated"] += bool(tools)
        if req.id.split("-")[0] in _TARGET_GROUPS and req.level in _MUST:
            target["total"] += 1
            if tools:
                target["automated"] += 1
            elif req.check is None:
                target["unobservable"] += 1
                unobservable.append({"id": req.id, "reason": req.unobservable})
            else:
                gaps.append({"id": req.id, "check": req.check, "summary": req.summary})
        elif req.check is not None and not tools:
            gaps.append({"id": req.id, "check": req.check, "summary": req.summary})
    return {
        "total": declared["total"],
        "declared": declared["checked"],
        "automated": sum(s["automated"] for s in by_side.values()),
        "by_side": dict(by_side),
        "by_family": [{"side": s, "family": f, **v} for (s, f), v in sorted(families.items())],
        "families": dict(CHECK_FAMILIES),
        "target": target | {"groups": list(_TARGET_GROUPS), "levels": [str(lv) for lv in _MUST]},
        "gaps": gaps,
        "target_unobservable": unobservable,
    }


def render_coverage(table: dict[str, Any], console: Any) -> None:
    """Print the coverage table (rich)."""
    from rich.table import Table

    t = Table(title="Automated checks per side and family (declared in the catalogue / built)")
    for col in ("side", "family", "declared", "automated"):
        t.add_column(col)
    for row in table["by_family"]:
        t.add_row(row["side"], row["family"], str(row["declared"]), str(row["automated"]))
    console.print(t)
    s = Table(title="Per side")
    for col in ("side", "requirements", "with a check declared", "automated"):
        s.add_column(col)
    for side, row in sorted(table["by_side"].items()):
        s.add_row(side, str(row["total"]), str(row["declared"]), str(row["automated"]))
    console.print(s)
    tg = table["target"]
    console.print(f"Target (balloon and split-ring MUST / MUST NOT): {tg['automated']} of "
                  f"{tg['total']} automated, {tg['unobservable']} not observable from the other "
                  f"end, {tg['total'] - tg['automated'] - tg['unobservable']} missing.")
    if table["gaps"]:
        console.print(f"Declared but not built ({len(table['gaps'])}):")
        for g in table["gaps"]:
            console.print(f"  {g['id']:10} {g['check']:24} {g['summary']}")
    console.print(f"{table['automated']} of {table['total']} requirements have an automated "
                  f"check ({table['declared']} declare one).")
