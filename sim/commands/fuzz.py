"""``vballoon fuzz``: fuzz descriptor layouts against the device end, or against QEMU's device.

Coverage-guided (default): seeds a corpus with the unit tests' layouts (:mod:`sim.fuzz.seeds`),
runs libFuzzer through atheris in a child process (:mod:`sim.fuzz.runner`) for ``--seconds``,
saves every failing input under ``--findings`` as a replayable JSON file, and prints the
executions per second. Exit status 1 when new findings were written.

``--differential``: ``--layouts`` valid and near-valid layouts through our device end and QEMU's
virtio-balloon (over qtest, :mod:`sim.fuzz.differential`); prints a table of the disagreements
by classification (``--json`` for machines). Exit status 1 when a disagreement is classified
``our-bug`` or ``unexplained``.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from virtqueue.policy import ErrorPolicy

__all__ = ["add_arguments", "main"]

_POLICIES = [str(p) for p in ErrorPolicy]


def _positive(kind: type, name: str):
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, not {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=_positive(float, "--seconds"), default=10.0,
                        help="how long libFuzzer runs (default 10)")
    parser.add_argument("--corpus", metavar="DIR",
                        help="corpus directory, seeded and kept (default: a temporary one)")
    parser.add_argument("--findings", metavar="DIR", default="fuzz-findings",
                        help="where failing inputs are saved (default ./fuzz-findings)")
    parser.add_argument("--policy", choices=_POLICIES,
                        help="fix the device end's error policy (default: each input picks)")
    parser.add_argument("--differential", action="store_true",
                        help="compare our device end with QEMU's virtio-balloon over qtest")
    parser.add_argument("--layouts", type=_positive(int, "--layouts"), default=1000,
                        help="layouts for --differential (default 1000)")
    parser.add_argument("--seed", default="0", help="seed of the --differential layouts")
    parser.add_argument("--batch", type=_positive(int, "--batch"), default=2000,
                        help="layouts per QEMU process for --differential (default 2000)")
    parser.add_argument("--qemu", metavar="PATH", help="qemu-system-x86_64 to run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args: argparse.Namespace) -> int:
    import structlog

    from virtqueue import events

    # Rejections are the point of fuzzing: only errors are worth a log line here. The previous
    # logging setup and trace switch come back afterwards (the CLI may run in-process).
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        with events.disabled():
            if args.differential:
                return _differential(args)
            return _coverage_guided(args)
    finally:
        structlog.configure(**previous)


# ---- coverage-guided ---------------------------------------------------------------------

def _coverage_guided(args: argparse.Namespace) -> int:
    from sim.fuzz.campaign import run_campaign

    r = run_campaign(args.seconds, findings=args.findings, corpus=args.corpus,
                     policy=args.policy)
    policy = args.policy or "per-input"
    if args.json:
        print(json.dumps({"executions": r.executions, "seconds": r.seconds,
                          "exec_per_s": r.exec_per_s, "wall_seconds": round(r.wall_seconds, 2),
                          "policy": policy, "seeds_written": r.seeds_written,
                          "corpus_files": r.corpus_files, "findings_dir": r.findings_dir,
                          "new_findings": list(r.new_findings)}, indent=2))
    else:
        print(f"vballoon fuzz: {r.executions:,} executions in {r.seconds:.0f} s: "
              f"{r.exec_per_s:,.0f} exec/s (policy {policy}, corpus {r.corpus_files} inputs)")
        if r.new_findings:
            print(f"{len(r.new_findings)} new finding(s) in {r.findings_dir}/:")
            for name in r.new_findings:
                print(f"  {name}")
        else:
            print("no findings")
    return 1 if r.new_findings else 0


# ---- differential ------------------------------------------------------------------------

def _differential(args: argparse.Namespace) -> int:
    import trio

    from sim.fuzz.differential import run_differential
    from sim.qemu import find_qemu_binary

    binary = find_qemu_binary(args.qemu)
    report = trio.run(lambda: run_differential(args.layouts, seed=args.seed, binary=binary,
                                               batch=args.batch))
    summary = report.summary()
    table = report.table()
    bad = sum(summary["by_category"].get(c, 0) for c in ("our-bug", "unexplained"))
    if args.json:
        print(json.dumps({"summary": summary, "table": table}, indent=2))
        return 1 if bad else 0
    print(f"vballoon fuzz --differential: {summary['layouts']:,} layouts in "
          f"{summary['seconds']:.1f} s ({summary['layouts_per_s']} layouts/s): "
          f"{summary['agree']:,} agree, {summary['disagree']:,} disagree")
    _print_table(table)
    return 1 if bad else 0


def _print_table(table: list[dict[str, Any]]) -> None:
    if not table:
        return
    headers = ("category", "rule", "deviation", "differs", "count", "example", "known")
    rows = [(r["category"], r["rule"], r["deviation"] or "-", r["difference"], str(r["count"]),
             f"#{r['example']}", {True: "yes", False: "no", None: "-"}[r["known"]])
            for r in table]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    seen: set[str] = set()
    for r in table:
        key = r["deviation"] or r["category"]
        if key not in seen:
            seen.add(key)
            print(f"{key}: {r['reason']}")
