"""The ``vballoon`` command line: one subcommand per job, each a thin shell over ``sim/``.

Exit codes: 0 success (every check held), 1 a check failed or a peer misbehaved, 2 bad usage
(an unknown option, a malformed value) with a one-line message naming the option.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from protocol.errors import ConfigError, VballoonError
from sim.logs import LEVELS
from sim.logs import configure as configure_logs

__all__ = ["main"]

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("vballoon")
except Exception:  # not installed (running from a source tree)
    VERSION = "0.1.0"

# subcommand -> "module:function" that adds its arguments and returns the handler.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("sim.commands.run", "the default scenario: a simulated guest with reporting, "
            "hinting and a migration, with a summary"),
    "serve": ("sim.commands.serve", "serve the balloon device to a real guest over vhost-user"),
    "qemu": ("sim.commands.qemu", "drive QEMU's real virtio-balloon with our guest driver"),
    "conform": ("sim.commands.conform", "grade a driver or a device against the virtio spec"),
    "fuzz": ("sim.commands.fuzz", "fuzz descriptor layouts against the device end"),
    "trace": ("sim.commands.trace", "a narrated step-by-step trace of a scenario"),
    "plot": ("sim.commands.plot", "pictures of guest memory, free lists and migration"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vballoon",
        description="A virtio-balloon device emulator and guest driver model, for conformance "
        "testing, fuzzing and teaching virtio.",
    )
    parser.add_argument("--version", action="version", version=f"vballoon {VERSION}")
    parser.add_argument("--log-level", choices=LEVELS, default="warning",
                        help="show structlog events at this level and above (default warning)")
    parser.add_argument("--log-json", action="store_true", help="events as JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(handler=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    configure_logs(args.log_level, json=args.log_json)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"vballoon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except VballoonError as exc:
        print(f"vballoon {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
