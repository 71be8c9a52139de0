"""``vballoon serve``: the balloon device for a real guest over vhost-user, told line by line.

Runs :class:`sim.serve.BalloonServer` on ``--socket`` until Ctrl-C or SIGTERM and prints one
readable line per event (negotiation, queues, inflate/deflate runs, ``actual``, stats, free page
reports and hints, findings), or one JSON object per line with ``--json-events``, then a summary.
A guest connects as the vhost-user front-end, e.g. User-Mode Linux with
``virtio_uml.device=SOCKET:5`` (README: "Real driver: Linux over vhost-user").

While it runs, commands typed on stdin steer the device (when stdin is a terminal in the
foreground or a pipe): ``balloon SIZE`` (the RAM the guest keeps, QEMU's ``balloon``; a plain
number is MiB), ``inflate SIZE``, ``deflate``, ``hint start|stop|done``, ``stats``, ``summary``,
``help``, ``quit``.

Exit status: 0 after a clean stop, 1 when the driver or front-end broke a rule (a finding),
2 for a bad option.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

import trio

from protocol.errors import ConfigError, UsageError, VballoonError
from protocol.features import BalloonFeature, names
from sim.serve import (
    SERVE_FEATURES,
    BalloonServer,
    ServeEvent,
    parse_features,
    parse_size,
    unwrap_single,
)

__all__ = ["EventPrinter", "add_arguments", "main", "run_command"]

_FLUSH_EVERY = 0.5
"""Seconds after which a run of inflate/deflate/hint events is printed even if it goes on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="Unix socket to listen on (the guest's vhost-user front-end "
                             "connects to it)")
    parser.add_argument("--features", metavar="LIST",
                        help="features to offer: names (STATS_VQ,REPORTING), sets (default, "
                             "all, qemu, none) or changes "
                             "(--features=-PAGE_POISON,+MUST_TELL_HOST); default: "
                             + ",".join(_balloon_names(SERVE_FEATURES)))
    parser.add_argument("--target", metavar="MiB",
                        help="balloon target once the driver is ready: the RAM the guest "
                             "keeps, in MiB (or with a unit: 200M, 1G)")
    parser.add_argument("--stats-interval", metavar="S", default="0",
                        help="poll the guest's memory statistics every S seconds (default 0: "
                             "only at start and on the 'stats' command)")
    parser.add_argument("--json-events", action="store_true",
                        help="print every event as one JSON object per line")


def _balloon_names(features: int) -> list[str]:
    return [n for n in names(features) if n in BalloonFeature.__members__]


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--stats-interval must be a number of seconds, not {text!r}") \
            from None
    if not value >= 0 or value > 0xFFFF_FFFF:
        raise ConfigError(f"--stats-interval must be between 0 and 2^32-1 seconds, not {text}")
    return value


def main(args: argparse.Namespace) -> int:
    features = SERVE_FEATURES if args.features is None else parse_features(args.features)
    target = None if args.target is None else parse_size(args.target)
    server = BalloonServer(args.socket, features=features, target_bytes=target,
                           stats_interval=_interval(args.stats_interval))
    printer = EventPrinter(sys.stdout, json_lines=args.json_events)
    server.on_event = printer.event
    return trio.run(_serve, server, printer, _control_wanted())


def _control_wanted() -> bool:
    """Read commands from stdin unless it is a terminal this process does not own (a
    background job reading its terminal would be stopped by SIGTTIN)."""
    try:
        if os.isatty(0):
            return os.tcgetpgrp(0) == os.getpgrp()
        os.fstat(0)
    except OSError:
        return False
    return True


async def _serve(server: BalloonServer, printer: EventPrinter, control: bool) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            nursery.start_soon(printer.flush_periodically)
            if control:
                nursery.start_soon(_read_commands, server, printer, nursery.cancel_scope)
            async for signum in signals:
                printer.note(f"{signal.Signals(signum).name}: stopping")
                break
            nursery.cancel_scope.cancel()
    printer.finish()
    printer.summary(server.summary())
    return 1 if server.findings else 0


async def _read_commands(server: BalloonServer, printer: EventPrinter,
                         scope: trio.CancelScope) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return  # end of input: keep serving, stop listening for commands
        if not line.strip():
            continue
        try:
            reply = run_command(server, line)
        except VballoonError as exc:
            printer.note(f"error: {exc}")
            continue
        if reply == "quit":
            printer.note("quit: stopping")
            scope.cancel()
            return
        if reply == "summary":
            printer.flush()
            printer.summary(server.summary())
        elif reply:
            printer.note(reply)


_HELP = ("commands: balloon SIZE (RAM the guest keeps; 64M, 1G, plain number = MiB) | "
         "inflate SIZE | deflate | hint start|stop|done | stats | summary | help | quit")


def run_command(server: BalloonServer, line: str) -> str:
    """Apply one control command to ``server``; returns a reply (``quit``/``summary`` are
    actions for the caller). UsageError or ConfigError for a bad command."""
    words = line.split()
    verb, rest = words[0].lower(), words[1:]
    if verb in ("quit", "exit", "q"):
        return "quit"
    if verb == "summary":
        return "summary"
    if verb == "help":
        return _HELP
    if verb == "balloon" and len(rest) == 1:
        server.balloon(parse_size(rest[0]))
        return "" if server.connected else "no driver yet: target kept for when one is ready"
    if verb == "inflate" and len(rest) == 1:
        server.inflate_by(parse_size(rest[0]))
        return ""
    if verb == "deflate" and not rest:
        if not server.connected:
            raise UsageError("no driver is ready yet")
        server.balloon(server.device.ram_size)
        return ""
    if verb == "hint" and len(rest) == 1 and rest[0] in ("start", "stop", "done"):
        getattr(server, f"hint_{rest[0]}")()
        return ""
    if verb == "stats" and not rest:
        return "" if server.request_stats() else "no stats buffer parked (STATS_VQ not " \
                                                 "negotiated or no driver yet)"
    raise UsageError(f"unknown command {line.strip()!r}; {_HELP}")


# ---- rendering ----------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


_STAT_LABELS = (("stat-total-memory", "total", True), ("stat-free-memory", "free", True),
                ("stat-available-memory", "available", True), ("stat-disk-caches", "caches", True),
                ("stat-swap-in", "swap-in", True), ("stat-swap-out", "swap-out", True),
                ("stat-major-faults", "major-faults", False),
                ("stat-minor-faults", "minor-faults", False),
                ("stat-oom-kills", "oom-kills", False))


class EventPrinter:
    """Turns :class:`ServeEvent` objects into lines on ``out`` (see the module doc).

    Runs of inflate/deflate chains (with their ``actual`` updates) and of hinted blocks are
    printed as one line each: when something else happens, when ``actual`` reaches the target,
    or every :data:`_FLUSH_EVERY` seconds while the run goes on.
    """

    def __init__(self, out: TextIO, *, json_lines: bool = False) -> None:
        self.out = out
        self.json_lines = json_lines
        self._run: dict[str, Any] | None = None
        self._queues: list[str] = []
        self._activate: ServeEvent | None = None

    # ---- output -------------------------------------------------------------------------------
    def _line(self, t: float, kind: str, text: str) -> None:
        self.out.write(f"[{t:8.3f}] {kind:<9} {text}\n")
        self.out.flush()

    def note(self, text: str) -> None:
        """A line of the command's own (replies, stopping)."""
        if self.json_lines:
            self.out.write(json.dumps({"event": "note", "text": text}) + "\n")
        else:
            self.out.write(f"{'':>10} {text}\n")
        self.out.flush()

    def summary(self, data: dict[str, Any]) -> None:
        if self.json_lines:
            self.out.write(json.dumps({"event": "summary", **data}, default=str) + "\n")
            self.out.flush()
            return
        d = data["device"]
        negotiated = ", ".join(data["negotiated"] or ["nothing"])
        findings = data["findings"] or ["none"]
        lines = [
            f"summary: {data['sessions']} session(s); negotiated {negotiated}",
            f"  guest RAM {_size(data['ram_bytes'])}; returned to the host "
            f"{_size(data['returned_bytes'])}",
            f"  balloon: inflated {d.get('pfns_inflated', 0)} pages "
            f"({d.get('inflate_chains', 0)} chains), deflated {d.get('pfns_deflated', 0)} "
            f"pages; now {_size(d['ballooned_bytes'])}, num_pages {d['num_pages']}, "
            f"actual {d['actual']}",
            f"  stats: {d['stats_updates']} buffer(s)",
            f"  reporting: {d.get('report_chains', 0)} chain(s), "
            f"{_size(d.get('reported_bytes', 0))} reported",
            f"  hinting: {d.get('hint_rounds', 0)} round(s), {_size(d['hinted_bytes'])} hinted",
            "  findings: " + "; ".join(findings),
        ]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    # ---- events -------------------------------------------------------------------------------
    def event(self, e: ServeEvent) -> None:
        if self.json_lines:
            self.out.write(json.dumps(e.as_dict(), default=str) + "\n")
            self.out.flush()
            return
        group = {"inflate": "balloon", "deflate": "balloon", "actual": "balloon",
                 "hint": "hint"}.get(e.kind)
        if self._run is not None and self._run["group"] != group:
            self.flush()
        if e.kind == "queue":
            self._queues.append(f"{str(e.fields['queue']).lower()}={e.fields['index']}"
                                f" ({e.fields['size']} entries)")
            return
        if e.kind == "activate" and self._queues:  # UML attaches some queues after it
            self._activate = e
            return
        self._flush_setup(e.time)
        if group is not None:
            self._accumulate(group, e)
            return
        render = _RENDER.get(e.kind)
        if render is not None:
            text = render(e.fields)
            if text:
                self._line(e.time, e.kind, text)

    def _flush_setup(self, t: float) -> None:
        """Print the queues attached so far (one line) and a held-back activation."""
        if self._queues:
            self._line(t, "queues", ", ".join(self._queues))
            self._queues = []
        if self._activate is not None:
            e, self._activate = self._activate, None
            self._line(e.time, e.kind, _RENDER["activate"](e.fields))

    def _accumulate(self, group: str, e: ServeEvent) -> None:
        if self._run is None:
            self._run = {"group": group, "t": e.time, "inflate": [0, 0], "deflate": [0, 0],
                         "actual": None, "hint": [0, 0], "cmd_id": None, "round": 0,
                         "opened": _clock()}
        run, f = self._run, e.fields
        if e.kind in ("inflate", "deflate"):
            run[e.kind][0] += 1
            run[e.kind][1] += f["applied"]
            run["ballooned"] = f["ballooned_bytes"]
        elif e.kind == "actual":
            run["actual"] = (f["pages"], f["num_pages"])
            run["t_end"] = e.time
            if f["pages"] == f["num_pages"]:
                self.flush()
        else:
            run["hint"][0] += 1
            run["hint"][1] += f["bytes"]
            run["cmd_id"], run["round"] = f["cmd_id"], f["round_bytes"]
            run["t_end"] = e.time

    def finish(self) -> None:
        """Print everything still held back (the command is stopping)."""
        self._flush_setup(self._activate.time if self._activate is not None else 0.0)
        self.flush()

    def flush(self) -> None:
        """Print the pending run of inflate/deflate or hint events, if any."""
        run, self._run = self._run, None
        if run is None:
            return
        t = run.get("t_end", run["t"])
        if run["group"] == "hint":
            self._line(t, "hint", f"{run['hint'][0]} block(s), {_size(run['hint'][1])} "
                       f"hinted for command ID {run['cmd_id']:#x} (round so far "
                       f"{_size(run['round'])})")
            return
        parts = []
        for kind, sign in (("inflate", "+"), ("deflate", "-")):
            chains, pages = run[kind]
            if chains:
                parts.append(f"{kind} {sign}{_size(pages << 12)} in {chains} chain(s)")
        if "ballooned" in run:
            parts.append(f"balloon now {_size(run['ballooned'])}")
        if run["actual"] is not None:
            actual, target = run["actual"]
            parts.append(f"actual {actual} pages" + (" = target" if actual == target else
                                                     f" (target {target})"))
        self._line(t, "balloon", "; ".join(parts))

    async def flush_periodically(self) -> None:
        """Print a long run of events every :data:`_FLUSH_EVERY` seconds while it goes on."""
        while True:
            await trio.sleep(_FLUSH_EVERY)
            if self._run is not None and _clock() - self._run["opened"] >= _FLUSH_EVERY:
                self.flush()


def _clock() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # used outside trio (tests rendering events): no periodic flush
        return 0.0


def _features(f: dict[str, Any]) -> str:
    text = "driver accepted " + (", ".join(f["accepted"]) or "nothing")
    if f["not_accepted"]:
        text += "; not accepted: " + ", ".join(f["not_accepted"])
    return text + ("; REFUSED by the device" if f["refused"] else "")


def _stats(f: dict[str, Any]) -> str:
    values = f["values"]
    parts = []
    for name, label, is_bytes in _STAT_LABELS:
        if name in values:
            parts.append(f"{label} {_size(values[name]) if is_bytes else values[name]}")
    return ", ".join(parts) or "empty buffer"


def _report(f: dict[str, Any]) -> str:
    orders = "/".join("?" if o is None else str(o) for o in f["orders"])
    text = (f"{len(f['ranges'])} range(s), {_size(f['bytes'])} (order {orders}"
            f"{', aligned' if f['aligned'] else ', NOT aligned'}); ")
    if f["discarded"]:
        return text + (f"discarded {_size(f['discarded'])}, still resident "
                       f"{_size(f['resident'])}")
    return text + f"kept (poison_val {f['poison_val']:#x})"


def _hint_cmd(f: dict[str, Any]) -> str:
    cmd = {0: "STOP", 1: "DONE"}.get(f["cmd_id"], f"{f['cmd_id']:#x}")
    return f"driver sent command ID {cmd} ({f['old']} -> {f['new']})"


def _hint_host(f: dict[str, Any]) -> str:
    if f["skipped"]:
        return f"host: hint {f['verb']} skipped (FREE_PAGE_HINT not negotiated)"
    return f"host: hint {f['verb']} (command ID {f['cmd_id']:#x}, state {f['state']})"


def _target(f: dict[str, Any]) -> str:
    if f.get("pending"):
        return f"guest should keep {_size(f['target_bytes'])} (applied when a driver is ready)"
    return (f"guest should keep {_size(f['target_bytes'])} of {_size(f['ram_bytes'])}: "
            f"num_pages {f['num_pages']} ({_size(f['num_pages'] << 12)} in the balloon)")


def _finding(f: dict[str, Any]) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in f["detail"].items())
    return (f"{'FATAL ' if f['fatal'] else ''}[{f['rule']}] {f['summary']} ({f['section']}"
            f"{'; ' + detail if detail else ''})")


_RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "listen": lambda f: f"listening on {f['path']}; offering {', '.join(f['offered'])}",
    "connect": lambda f: "front-end connected",
    "features": _features,
    "activate": lambda f: f"driver ready; guest RAM {_size(f['ram_bytes'])}",
    "target": _target,
    "notify": lambda f: "" if f["sent"] else "config change NOT delivered (no back-end "
                                             "channel or CONFIG not negotiated)",
    "poison_val": lambda f: f"driver wrote poison_val {f['value']:#010x}",
    "stats": _stats,
    "report": _report,
    "hint_cmd": _hint_cmd,
    "hint_host": _hint_host,
    "finding": _finding,
    "reset": lambda f: "device reset (the front-end left or reset the device)",
    "disconnect": lambda f: f"front-end gone: {f['reason']} after {f['messages']} message(s)"
                            + (f"; {f['error']}" if f["error"] else ""),
}
