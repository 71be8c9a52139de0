"""``vballoon qemu SCENARIO``: our guest driver against QEMU's real virtio-balloon.

Runs one scenario of :mod:`sim.qemu.scenarios` (``negotiation``, ``inflate``, ``stats``,
``reporting``, ``hinting``) or ``all`` of them, and prints what happened: the checks, the used
buffers per queue, the chains published, the QMP commands and QEMU's answers, QEMU's RSS.
``--json`` prints one object instead. Exit status 0 only when every check held, 1 when one
failed or QEMU is missing or died (one line naming the cause), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any

from sim.units import parse_size

__all__ = ["add_arguments", "main", "parse_ram"]

_CHOICES = ("negotiation", "inflate", "stats", "reporting", "hinting", "all")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=_CHOICES, metavar="SCENARIO",
                        help=f"one of {', '.join(_CHOICES)}")
    parser.add_argument("--qemu", metavar="PATH",
                        help="qemu-system-x86_64 to run (default: search PATH)")
    parser.add_argument("--ram", default="128M",
                        help="guest RAM, 64M..1G in steps of 4M (default 128M)")
    parser.add_argument("--accel", default="tcg", help="tcg (default) or kvm")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def parse_ram(text: str) -> int:
    """``128M``, ``1G``, ``262144K`` or a byte count; :class:`ConfigError` otherwise."""
    return parse_size(text)


def main(args: argparse.Namespace) -> int:
    import trio

    from sim.qemu.kit import ScenarioOptions
    from sim.qemu.scenarios import ORDER, run_scenarios

    options = ScenarioOptions(binary=args.qemu, memory=parse_ram(args.ram), accel=args.accel)
    options.validate()
    names = ORDER if args.scenario == "all" else (args.scenario,)
    started = time.perf_counter()
    results = trio.run(run_scenarios, names, options)
    seconds = time.perf_counter() - started
    ok = all(r.ok for r in results)
    if args.json:
        json.dump({"ok": ok, "seconds": round(seconds, 3),
                   "scenarios": [r.to_dict() for r in results]}, sys.stdout, indent=2,
                  default=str)
        sys.stdout.write("\n")
    else:
        print_summary(results, seconds)
    return 0 if ok else 1


# ---- the human summary ---------------------------------------------------------------------

def print_summary(results: list[Any], seconds: float) -> None:
    """Aligned tables per scenario: checks, used buffers, chains, QMP, RSS."""
    from rich.console import Console

    con = Console(highlight=False, width=max(Console().width, 120))
    for r in results:
        verdict = "[green]PASS[/]" if r.ok else "[red]FAIL[/]"
        con.print(f"\n[bold]vballoon qemu {r.scenario}[/]: {verdict}  "
                  f"{sum(c.held for c in r.checks)}/{len(r.checks)} checks held, "
                  f"{r.seconds:.2f} s")
        con.print(_checks(r))
        for table in (_queues(r), _chains(r), _qmp(r), _rss(r)):
            if table is not None:
                con.print(table)
    passed = sum(r.ok for r in results)
    con.print(f"\n[bold]{passed}/{len(results)} scenario(s) passed[/] in {seconds:.2f} s")
    for r in results:
        for c in r.failed():
            con.print(f"[red]failed[/] {r.scenario}: {c.name}: {c.detail}")


def _table(title: str, *columns: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def _checks(r: Any):
    t = _table("checks", "", "check", "what was seen")
    for c in r.checks:
        t.add_row("[green]ok[/]" if c.held else "[red]FAIL[/]", c.name, c.detail)
    return t


def _queues(r: Any):
    if not r.queues:
        return None
    t = _table("used buffers per queue", "variant", "queue", "index", "size", "made available",
               "kicks", "used by QEMU", "reaped by driver")
    for q in r.queues:
        t.add_row(q["variant"] or "-", str(q["queue"]), str(q["index"]), str(q["size"]),
                  str(q["avail_idx"]), str(q["kicks"]), str(q["used_idx"]), str(q["reaped"]))
    return t


def _chains(r: Any):
    if not r.chains:
        return None
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in r.chains:
        groups[(c["variant"], c["queue"])].append(c)
    t = _table("chains the driver published", "variant", "queue", "chains", "indirect",
               "entries", "bytes")
    for (variant, queue), chains in groups.items():
        t.add_row(variant or "-", queue, str(len(chains)), str(sum(c["indirect"] for c in chains)),
                  str(sum(c["entries"] for c in chains)),
                  f"{sum(c['bytes'] for c in chains):,}")
    return t


def _qmp(r: Any):
    if not r.qmp:
        return None
    t = _table("QMP commands and QEMU's answers", "at (s)", "variant", "command", "arguments",
               "answer")
    for q in r.qmp:
        t.add_row(f"{q.at:.2f}", q.variant or "-", q.command, _short(q.arguments),
                  _short(_digest(q.answer), 160))
    return t


def _rss(r: Any):
    if not r.rss:
        return None
    t = _table("QEMU's RssAnon", "when", "MiB")
    for label, value in r.rss.items():
        t.add_row(label, f"{value / (1 << 20):,.1f}")
    return t


def _digest(answer: Any) -> Any:
    """The fields of big answers a reader looks at (``--json`` has them all)."""
    if isinstance(answer, dict) and isinstance(answer.get("stats"), dict):
        keep = ("stat-free-memory", "stat-total-memory", "stat-available-memory")
        return {"last-update": answer.get("last-update")} | {
            k: answer["stats"].get(k) for k in keep}
    if isinstance(answer, dict) and isinstance(answer.get("ram"), dict):
        ram = answer["ram"]
        return {"status": answer.get("status"), "total-time": answer.get("total-time"),
                "ram.transferred": ram.get("transferred"), "ram.normal": ram.get("normal"),
                "ram.duplicate": ram.get("duplicate")}
    return answer


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str, separators=(",", ":")) if value not in ({}, None) \
        else "-"
    return text if len(text) <= limit else text[:limit - 3] + "..."
