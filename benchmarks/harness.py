"""Run the benchmarks and report every measurement against its target, as a table or as JSON.

``python -m benchmarks [NAME ...] [--json]`` runs the named benchmarks (all of
:data:`REGISTRY` when none is named) in registry order. The row format a benchmark returns is
described in :mod:`benchmarks`. Messages about skipped or failing benchmarks go to stderr, so
the JSON on stdout stays parseable.

Exit status: 0 when every benchmark ran or was not available (missed targets included:
benchmarks are measurements, not tests); 1 when a benchmark raised or returned a malformed
row; 2 for a usage error such as an unknown benchmark name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import operator
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from protocol.errors import PeerError, UsageError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "JSON_KEYS",
    "REGISTRY",
    "BenchmarkUnavailable",
    "Row",
    "evaluate_target",
    "load",
    "main",
    "normalize_row",
    "render_plain",
    "render_rich",
    "run_benchmark",
]

REGISTRY: dict[str, str] = {
    "ring": "benchmarks.ring",
    "reporting": "benchmarks.reporting",
    "migration": "benchmarks.migration",
    "scale": "benchmarks.scale",
    "uml": "benchmarks.uml",
    "fuzz": "benchmarks.fuzz",
    "ranges": "benchmarks.ranges",
}
"""Benchmark name -> module exposing ``run() -> list[dict]``."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
JSON_KEYS = ("name", "value", "unit", "target", "met")
"""The keys of every JSON row, in this order."""

_OPTIONAL = {"unit": "", "target": None, "met": None}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
}
_TARGET = re.compile(r"\s*(<=|>=|==|<|>)\s*([-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class BenchmarkUnavailable(Exception):  # noqa: N818 - a condition, not an error of ours
    """A benchmark cannot run here (not implemented yet, a dependency or a peer missing)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One reported measurement."""

    name: str
    value: int | float | None
    unit: str
    target: str | None
    met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in JSON_KEYS}


def evaluate_target(target: str | None, value: int | float | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 1e6"``); None without a target or a value."""
    if target is None:
        return None
    match = _TARGET.fullmatch(target)
    if match is None:
        raise UsageError(f"target {target!r} is not '<op> <number>' with op in "
                         f"{', '.join(_COMPARE)}")
    if value is None:
        return None
    return _COMPARE[match[1]](value, float(match[2]))


def normalize_row(benchmark: str, raw: object) -> Row:
    """Check one row a benchmark returned and fill in the defaults; UsageError if malformed."""
    if not isinstance(raw, Mapping):
        raise UsageError(f"{benchmark}: a row must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(JSON_KEYS))
    if unknown:
        raise UsageError(f"{benchmark}: row {raw.get('name')!r} has unknown keys {unknown}")
    row = {**_OPTIONAL, **raw}
    name, value, unit, target, met = (row.get(key) for key in JSON_KEYS)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{benchmark}: row without a name: {dict(raw)!r}")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
        raise UsageError(f"{benchmark}: {name}: value must be a finite number or None, "
                         f"got {value!r}")
    if not isinstance(unit, str):
        raise UsageError(f"{benchmark}: {name}: unit must be a string, got {unit!r}")
    if target is not None and not isinstance(target, str):
        raise UsageError(f"{benchmark}: {name}: target must be a string like '>= 1e6', "
                         f"got {target!r}")
    if met is not None and not isinstance(met, bool):
        raise UsageError(f"{benchmark}: {name}: met must be true, false or None, got {met!r}")
    try:
        computed = evaluate_target(target, value)
    except UsageError as exc:
        if met is None:
            raise UsageError(f"{benchmark}: {name}: {exc}") from None
        computed = None  # a target in words, judged by the benchmark itself
    if not name.startswith(f"{benchmark}."):
        name = f"{benchmark}.{name}"
    return Row(name, value, unit, target, met if met is not None else computed)


def load(name: str) -> Callable[[], Sequence[object]]:
    """The ``run`` function of benchmark ``name``; BenchmarkUnavailable saying why not."""
    path = REGISTRY[name]
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            raise BenchmarkUnavailable(f"module {path} is not implemented yet") from None
        raise BenchmarkUnavailable(f"{path} needs {exc.name!r}, which is not installed") from None
    except ImportError as exc:
        raise BenchmarkUnavailable(f"{path} cannot be imported: {exc}") from None
    run = getattr(module, "run", None)
    if not callable(run):
        raise BenchmarkUnavailable(f"{path} has no run() function")
    return run


def run_benchmark(name: str) -> list[Row]:
    """Load and run one benchmark and check its rows (BenchmarkUnavailable, UsageError)."""
    run = load(name)
    try:
        raw_rows = run()
    except PeerError as exc:
        raise BenchmarkUnavailable(f"a peer is missing: {exc}") from None
    if not isinstance(raw_rows, list | tuple):
        raise UsageError(f"{name}: run() must return a list of dicts, got "
                         f"{type(raw_rows).__name__}")
    return [normalize_row(name, raw) for raw in raw_rows]


# ---- rendering ---------------------------------------------------------------------------

def _fmt_value(value: int | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or 0.01 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.3e}"


def _fmt_met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def _cells(rows: Sequence[Row]) -> list[tuple[str, str, str, str, str]]:
    return [(r.name, _fmt_value(r.value), r.unit, r.target or "-", _fmt_met(r.met))
            for r in rows]


_HEADERS = ("name", "value", "unit", "target", "met")


def render_plain(rows: Sequence[Row], out: TextIO) -> None:
    """An aligned text table; the value column is right-aligned."""
    table = [_HEADERS, *_cells(rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i == 1 else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    out.write(line(_HEADERS) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for cells in table[1:]:
        out.write(line(cells) + "\n")


def render_rich(rows: Sequence[Row], out: TextIO) -> None:
    """The same table drawn by rich (colours only on a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vballoon benchmarks", title_justify="left")
    for header in _HEADERS:
        table.add_column(header, justify="right" if header == "value" else "left", no_wrap=True)
    for row, cells in zip(rows, _cells(rows), strict=True):
        style = {True: "green", False: "bold red", None: "dim"}[row.met]
        table.add_row(*cells[:4], f"[{style}]{cells[4]}[/]")
    needed = sum(max(len(c[i]) for c in [_HEADERS, *_cells(rows)]) for i in range(5)) + 20
    Console(file=out, width=max(needed, 80)).print(table)


def _render_table(rows: Sequence[Row], out: TextIO) -> None:
    try:
        render_rich(rows, out)
    except ImportError:
        render_plain(rows, out)


# ---- command line ------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run vballoon's benchmarks and compare each measurement with its target.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(REGISTRY)})")
    parser.add_argument("--json", action="store_true",
                        help="print the rows as a JSON list of {name, value, unit, target, met}")
    parser.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list:
        print("\n".join(REGISTRY))
        return EXIT_OK
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        print(f"error: unknown benchmark {', '.join(map(repr, unknown))}; "
              f"valid names: {', '.join(REGISTRY)}", file=sys.stderr)
        return EXIT_USAGE
    names = list(dict.fromkeys(args.names)) or list(REGISTRY)
    rows: list[Row] = []
    status = EXIT_OK
    for name in names:
        try:
            rows += run_benchmark(name)
        except BenchmarkUnavailable as exc:
            print(f"{name}: not available, skipped ({exc})", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - report any crash, run the rest
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            if not isinstance(exc, UsageError):
                traceback.print_exc(file=sys.stderr)
            status = EXIT_FAILED
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif rows:
        _render_table(rows, sys.stdout)
    else:
        print("no benchmark produced results", file=sys.stderr)
    return status
