"""``vballoon run``: the default scenario (see :mod:`sim.scenario`) with a readable summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from guest.balloon import HintMode
from guest.workload import WorkloadProfile
from sim.scenario import RunConfig, RunResult, run_scenario_sync
from sim.units import size_argument

parse_size = size_argument()

__all__ = ["add_arguments", "main"]

def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


_DEFAULT = RunConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", type=parse_size, default=_DEFAULT.ram,
                   help="guest RAM size, 64M..1T (default 4G)")
    p.add_argument("--profile", choices=[x.value for x in WorkloadProfile],
                   default=_DEFAULT.profile.value, help="workload profile (default steady)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--hint-mode", choices=[x.value for x in HintMode],
                   default=_DEFAULT.hint_mode.value,
                   help="free page hinting: 'alloc' as Linux does, 'walk' as the 2018 seed "
                        "proposed")
    p.add_argument("--no-reporting", action="store_true",
                   help="do not offer free page reporting to the device")
    p.add_argument("--no-deflate-on-oom", action="store_true",
                   help="do not negotiate DEFLATE_ON_OOM")
    p.add_argument("--duration", type=_nonnegative, default=None, metavar="SECONDS",
                   help="virtual seconds of churn before the migration (default 10)")
    p.add_argument("--balloon", type=parse_size, default=_DEFAULT.balloon_bytes,
                   help="how much the host balloons out (default 512M; 0 = no target change)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    extra: dict[str, Any] = {}
    if args.duration is not None:
        extra["churn_seconds"] = args.duration * 0.4
        extra["settle_seconds"] = args.duration * 0.6
    return RunConfig(ram=args.ram, profile=WorkloadProfile(args.profile), seed=args.seed,
                     reporting=not args.no_reporting, hint_mode=HintMode(args.hint_mode),
                     deflate_on_oom=not args.no_deflate_on_oom, balloon_bytes=args.balloon,
                     **extra)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run_scenario_sync(config)
    data = result.to_dict()
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_summary(result, data)
    lost = [data["migration"][k]["pages_lost"] for k in ("with_hints", "without_hints")]
    return 0 if all(x == 0 for x in lost) and data["reported_reads_zero"] else 1


def _mib(n: int | float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def print_summary(result: RunResult, data: dict[str, Any]) -> None:
    """The human summary: what was reported, returned, hinted, and what migration cost."""
    from rich.console import Console
    from rich.table import Table

    c = result.config
    con = Console()
    con.print(f"[bold]vballoon run[/]: {c.ram >> 20} MiB guest, profile {c.profile.value}, "
              f"seed {c.seed}, reporting {'on' if c.reporting else 'off'}, "
              f"hinting by {c.hint_mode.value}")
    t = Table(title="Guest memory given back to the host", show_header=False)
    t.add_row("free page reporting: reported", _mib(data["reported_bytes"]))
    t.add_row("balloon: inflated", _mib(data["ballooned_bytes"]))
    t.add_row("discarded by the device (reported + inflated)", _mib(data["discarded_bytes"]))
    t.add_row("host memory returned (memfd blocks freed)", _mib(data["host_returned_bytes"]))
    t.add_row("reported pages read back as zeros", "yes" if data["reported_reads_zero"] else "NO")
    b = data["balloon"]
    t.add_row("balloon target / actual (4 KiB pages)", f"{b['num_pages']} / {b['actual']}")
    t.add_row("OOM events (deflate-on-oom)", str(data["oom_events"]))
    con.print(t)
    stats = {k: v for k, v in data["stats"].get("stats", {}).items() if v is not None
             and v != 2**64 - 1}
    if stats:
        s = Table(title="Guest stats as the host last saw them")
        s.add_column("stat")
        s.add_column("value", justify="right")
        for k, v in stats.items():
            s.add_row(k, f"{v:,}")
        con.print(s)
    m = Table(title="Live migration (same guest, same seed)")
    m.add_column("")
    m.add_column("with hints", justify="right")
    m.add_column("without hints", justify="right")
    w, wo = data["migration"]["with_hints"], data["migration"]["without_hints"]
    for label, key, fmt in (("bytes sent", "bytes_sent", _mib),
                            ("normal pages sent", "pages_sent", "{:,}".format),
                            ("zero pages sent", "zero_pages", "{:,}".format),
                            ("hinted pages skipped", "hinted_pages_skipped", "{:,}".format),
                            ("rounds", "rounds", str),
                            ("virtual time (s)", "total_time", "{:.3f}".format),
                            ("pages lost (safety check)", "pages_lost", str)):
        m.add_row(label, fmt(w[key]), fmt(wo[key]))
    con.print(m)
    saved = data["migration"]["saved_fraction"]
    con.print(f"hinted: {_mib(data['hinted_bytes'])}; free page hints saved "
              f"[bold]{saved:.0%}[/] of the migration bytes; "
              f"hinted pages the guest reused before DONE: {data['hinted_pages_reused']:,}")
    ok = w["pages_lost"] == 0 and wo["pages_lost"] == 0
    con.print("[green]safety check passed: no page the guest relies on was lost[/]" if ok else
              "[red]SAFETY CHECK FAILED: pages were lost[/]")

