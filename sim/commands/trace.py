"""``vballoon trace SCENARIO``: a narrated, step-by-step trace for people learning virtio.

Runs one of the teaching scenarios (:mod:`sim.teach.scenarios`: ``reporting``, ``hinting``,
``inflate``, ``malformed``) on a small simulated guest in virtual time, records every structlog
event, and tells it step by step (:mod:`sim.teach.narrate`, :mod:`sim.teach.render`): the free
lists, the walker's visits, the descriptor table and both rings after each add, pop and push,
each kick and interrupt decision with the ``vring_need_event`` arithmetic, what the device
recorded, and a *why* line per step citing the spec section and the Linux or QEMU function.

``--step`` waits for Enter between steps (only when stdin is a terminal). ``--json`` prints the
recorded events instead, one JSON object per line. ``--peer qemu`` runs the guest side against
QEMU's real virtio-balloon over qtest (:mod:`sim.teach.peers`): only our driver's end is
instrumented there, so the device's work shows as the used ring changing. ``--peer uml`` is the
other direction (``inflate`` and ``reporting``): Linux 6.1's real driver in User-Mode Linux
drives our device over vhost-user, and the trace tells what the device end saw (its pops,
pushes, interrupt decisions and records; the rings read from the mapped guest RAM).

Exit status: 0; 1 when the scenario's point did not happen (``malformed``: the device did not
reject the chain).
"""

from __future__ import annotations

import argparse
import json
import sys

from guest.balloon import HintMode
from sim.teach.scenarios import SCENARIOS, TAMPER_RULES, Trace, TraceOptions, run_trace
from sim.units import size_argument
from virtqueue.policy import ErrorPolicy

parse_size = size_argument()

__all__ = ["add_arguments", "main", "trace_ok"]

_DEFAULT = TraceOptions()


def _int(name: str):
    def parse(text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, not {text!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=list(SCENARIOS),
                   help="; ".join(f"{k}: {v[2]}" for k, v in SCENARIOS.items()))
    p.add_argument("--ram", type=parse_size, default=_DEFAULT.ram,
                   help="guest RAM, 64M..1G (default 64M)")
    p.add_argument("--queue-size", type=_int("--queue-size"), default=_DEFAULT.queue_size,
                   help="cap on the driver's queue sizes: 2, 4, 8, 16 or 32 (default 8; "
                        "reporting_vq stays 32 as Linux requires)")
    p.add_argument("--capacity", type=_int("--capacity"), default=_DEFAULT.reporting_capacity,
                   help="free page reporting: blocks per report, 1..32 (default 4)")
    p.add_argument("--seed", type=_int("--seed"), default=0, help="seed of the workload")
    p.add_argument("--rule", choices=TAMPER_RULES, default=_DEFAULT.rule,
                   help="malformed: the rule the chain breaks (default DC-06)")
    p.add_argument("--policy", choices=[str(x) for x in ErrorPolicy],
                   default=str(_DEFAULT.policy),
                   help="malformed: the device's error policy (default needs-reset, as QEMU)")
    p.add_argument("--hint-mode", choices=[str(x) for x in HintMode],
                   default=str(_DEFAULT.hint_mode),
                   help="hinting: 'walk' (the seed's free-block walker, default) or 'alloc' "
                        "(Linux 4.20+)")
    p.add_argument("--step", action="store_true",
                   help="wait for Enter between steps (when stdin is a terminal)")
    p.add_argument("--json", action="store_true",
                   help="print the recorded structlog events, one JSON object per line")
    p.add_argument("--width", type=_int("--width"), default=None,
                   help="columns to render for (default: the terminal's)")
    p.add_argument("--peer", choices=("sim", "qemu", "uml"), default="sim",
                   help="where the other end runs: our simulated device (default), QEMU's "
                        "virtio-balloon over qtest (our driver), or 'uml': Linux 6.1's driver "
                        "in User-Mode Linux against our device (inflate, reporting)")
    p.add_argument("--qemu", metavar="PATH", help="qemu-system-x86_64 for --peer qemu")


def options_from_args(args: argparse.Namespace) -> TraceOptions:
    """The :class:`TraceOptions` the arguments ask for (ConfigError if a value is bad)."""
    return TraceOptions(ram=args.ram, queue_size=args.queue_size, seed=args.seed,
                        reporting_capacity=args.capacity, rule=args.rule,
                        policy=ErrorPolicy(args.policy), hint_mode=HintMode(args.hint_mode))


def trace_ok(trace: Trace) -> bool:
    """Whether the scenario showed what it is for (``malformed``: the rule was enforced)."""
    if trace.scenario != "malformed":
        return True
    rule = trace.options.rule
    for rec in trace.records:
        if rec["event"] == "vq.reject" and rec.get("rule_id") == rule:
            return True
        if rec["event"] == "teach.outcome" and "NEEDS_RESET" in str(rec.get("status", "")):
            return True
    return False


def _pause() -> None:
    try:
        answer = input("-- Enter: next step, q: quit -- ")
    except EOFError:
        return
    if answer.strip().lower() == "q":
        raise _Quit


class _Quit(Exception):
    pass


def main(args: argparse.Namespace) -> int:
    from protocol.errors import ConfigError

    options = options_from_args(args)
    if args.width is not None and not 40 <= args.width <= 1000:
        raise ConfigError(f"--width must be between 40 and 1000 columns, not {args.width}")
    if args.peer == "uml":
        from sim.teach.peers import run_uml_trace

        trace = run_uml_trace(args.scenario, options)
    elif args.peer == "qemu":
        from sim.teach.peers import run_qemu_trace

        trace = run_qemu_trace(args.scenario, options, binary=args.qemu)
    else:
        trace = run_trace(args.scenario, options)
    if args.json:
        out = sys.stdout
        for rec in trace.records:
            out.write(json.dumps(rec, default=str) + "\n")
        return 0 if trace_ok(trace) else 1
    from rich.console import Console

    from sim.teach.narrate import narrate
    from sim.teach.render import print_steps

    console = Console(width=args.width, highlight=False)
    steps = narrate(trace.records)
    pause = _pause if args.step and sys.stdin.isatty() else None
    try:
        print_steps(steps, console, pause=pause)
    except _Quit:
        pass
    return 0 if trace_ok(trace) else 1
