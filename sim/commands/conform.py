"""``vballoon conform``: grade a driver or a device against the virtio spec, or show coverage.

``vballoon conform driver --model`` runs our guest driver model on a simulated machine under
the driver conformance monitor (:mod:`sim.conform.model`); ``--uml`` boots the real Linux 6.1
driver in User-Mode Linux over vhost-user (:mod:`sim.conform.uml`).
``vballoon conform device --ours`` attacks our device with the hostile driver, in process over
virtio-mmio and over vhost-user (``--transport``), under one error policy or all of them
(``--policy``); ``--qemu`` attacks QEMU's virtio-balloon over qtest (:mod:`sim.conform.device`).
``vballoon conform --coverage`` counts which catalogue requirements have an automated check.

Output: a table (rich), or ``--json``, and ``--junit FILE`` for CI. Exit status 0 when nothing
failed without an explanation, 1 otherwise, 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import ConfigError
from virtqueue.policy import ErrorPolicy

__all__ = ["add_arguments", "main"]

_POLICIES = [str(p) for p in ErrorPolicy]
_TRANSPORTS = ("mmio", "vhost-user", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", choices=("driver", "device"),
                        help="what to grade: a driver (monitor) or a device (attack suite)")
    parser.add_argument("--coverage", action="store_true",
                        help="count the catalogue requirements that have an automated check")
    what = parser.add_argument_group("subject")
    what.add_argument("--model", action="store_true",
                      help="driver: vballoon's guest driver model on a simulated machine")
    what.add_argument("--uml", action="store_true",
                      help="driver: the real Linux driver in User-Mode Linux over vhost-user")
    what.add_argument("--ours", action="store_true", help="device: vballoon's device")
    what.add_argument("--qemu", action="store_true",
                      help="device: QEMU's virtio-balloon over qtest")
    opts = parser.add_argument_group("options")
    opts.add_argument("--policy", default="needs-reset", metavar="P",
                      help=f"our device's error policy: {', '.join(_POLICIES)} or all "
                           "(default needs-reset)")
    opts.add_argument("--transport", default="both", metavar="T",
                      help="our device's transport: mmio, vhost-user or both (default both)")
    opts.add_argument("--case", action="append", metavar="ID",
                      help="device: run only this case (repeatable)")
    opts.add_argument("--no-provoke", action="store_true",
                      help="driver: do not offer undefined feature bits or send spurious "
                           "notifications")
    opts.add_argument("--init-on-free", action="store_true",
                      help="--model: a guest with init_on_free, which keeps PAGE_POISON and so "
                           "grades the page poison rules (--uml always boots with it)")
    opts.add_argument("--kernel", metavar="PATH", help="--uml: the linux.uml to boot")
    opts.add_argument("--qemu-binary", metavar="PATH", help="--qemu: qemu-system-x86_64")
    opts.add_argument("--brief", action="store_true",
                      help="table: leave out NOT-EXERCISED and SKIP rows")
    opts.add_argument("--json", action="store_true", help="print JSON instead of a table")
    opts.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    opts.add_argument("--verbose", action="store_true", help="show warnings from the run")


def _check(args: argparse.Namespace) -> None:
    if args.coverage:
        if args.target is not None:
            raise ConfigError("--coverage takes no driver/device target")
        return
    if args.target is None:
        raise ConfigError("say what to grade: 'driver', 'device' or --coverage")
    if args.target == "driver" and args.model == args.uml:
        raise ConfigError("conform driver needs exactly one of --model and --uml")
    if args.target == "device" and args.ours == args.qemu:
        raise ConfigError("conform device needs exactly one of --ours and --qemu")
    if args.target == "driver" and (args.ours or args.qemu):
        raise ConfigError("--ours and --qemu grade devices: use 'conform device'")
    if args.target == "device" and (args.model or args.uml):
        raise ConfigError("--model and --uml grade drivers: use 'conform driver'")
    if args.init_on_free and not args.model:
        raise ConfigError("--init-on-free applies to 'conform driver --model'")
    if args.policy not in (*_POLICIES, "all"):
        raise ConfigError(f"--policy must be one of {', '.join(_POLICIES)} or all, not "
                          f"{args.policy!r}")
    if args.transport not in _TRANSPORTS:
        raise ConfigError(f"--transport must be one of {', '.join(_TRANSPORTS)}, not "
                          f"{args.transport!r}")
    if args.case:
        from guest.villain import catalogue

        try:
            catalogue(args.case)
        except KeyError as exc:
            raise ConfigError(f"--case: {exc.args[0]}") from None
    if args.junit is not None and Path(args.junit).is_dir():
        raise ConfigError(f"--junit {args.junit} is a directory")


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Only critical log lines (or warnings with ``--verbose``) while the run lasts: attacks
    make devices log every violation they refuse. The previous settings come back after."""
    import structlog

    import device.events
    from virtqueue import events

    saved = structlog.get_config()
    was_trace, was_device = events.ENABLED, device.events.ENABLED
    level = logging.WARNING if verbose else logging.CRITICAL
    # no caching: a logger first used in here must not keep this level once we are done
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level),
                        cache_logger_on_first_use=False)
    events.set_enabled(False)
    device.events.ENABLED = verbose
    try:
        yield
    finally:
        structlog.configure(**saved)
        events.set_enabled(was_trace)
        device.events.ENABLED = was_device


def main(args: argparse.Namespace) -> int:
    _check(args)
    with _quiet(args.verbose):
        if args.coverage:
            return _coverage(args)
        reports = _driver(args) if args.target == "driver" else _device(args)
        return _emit(reports, args)


def _coverage(args: argparse.Namespace) -> int:
    from sim.conform.coverage import coverage_table, render_coverage

    table = coverage_table()
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        from rich.console import Console

        render_coverage(table, Console())
    return 0


def _driver(args: argparse.Namespace) -> list:
    import trio

    from sim.conform.report import driver_report

    if args.model:
        from guest.balloon import BalloonOptions
        from sim.conform.model import ModelRun, run_model_sync

        options = BalloonOptions(init_on_free=args.init_on_free, max_queue_size=64)
        run = ModelRun(provoke=not args.no_provoke, options=options)
        return [driver_report(run_model_sync(run))]
    from sim.conform.uml import UmlRun, run_uml

    run = UmlRun(provoke=not args.no_provoke, kernel=args.kernel)
    return [driver_report(trio.run(run_uml, run))]


def _device(args: argparse.Namespace) -> list:
    import trio

    from guest.villain import catalogue
    from sim.conform import device as suite
    from sim.conform.report import device_report

    cases = catalogue(args.case) if args.case else None
    if args.qemu:
        result = trio.run(lambda: suite.run_qemu(cases, binary=args.qemu_binary))
        return [device_report(result, {"transport": "virtio-mmio (qtest)"})]
    policies = _POLICIES if args.policy == "all" else [args.policy]
    transports = ("mmio", "vhost-user") if args.transport == "both" else (args.transport,)
    reports = []
    for policy in policies:
        for transport in transports:
            if transport == "mmio":
                result = suite.run_ours_mmio_sync(policy, cases)
            else:
                result = trio.run(suite.run_ours_vhost_user, policy, cases)
            reports.append(device_report(result, {"transport": transport, "policy": policy}))
    return reports


def _emit(reports: list, args: argparse.Namespace) -> int:
    from sim.conform.report import junit, render

    if args.junit is not None:
        try:
            Path(args.junit).write_text(junit(reports), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--junit {args.junit}: {exc.strerror}") from None
    if args.json:
        body = reports[0].to_json() if len(reports) == 1 else {
            "reports": [r.to_json() for r in reports]}
        json.dump(body, sys.stdout, indent=2)
        print()
    else:
        from rich.console import Console

        console = Console()
        for report in reports:
            render(report, console, brief=args.brief)
    return 0 if all(r.ok for r in reports) else 1
