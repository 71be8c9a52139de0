"""One User-Mode Linux boot against vballoon's device, run as a list of scenarios.

A boot serves the real device end (:class:`sim.serve.BalloonServer`: BalloonDevice behind the
vhost-user back-end) and boots UML (:mod:`sim.uml`) with ``virtio_uml.device=SOCKET:5``. The
guest's init runs the host's own binaries through hostfs: a shell script made of one part per
scenario (:class:`Scenario`; the scenarios are in :mod:`sim.uml_scenarios`). Guest and host
take turns:

* the guest prints a marker (``step NAME`` prints ``/proc/meminfo`` as a ``meminfo NAME ...``
  marker, then ``NAME``) and polls for the file ``go-NAME`` in the run directory;
* the host waits for the marker, drives the device (a balloon target, a hinting round, a stats
  request), waits for the *device's* events (never a sleep), checks guest RAM while the guest
  waits, then creates ``go-NAME`` (its content, if any, is a value for the guest).

Every boot also records the feature negotiation (:class:`Negotiation`, checked against
:func:`linux_accepts`, Linux 6.1's rules), every finding the device made and any kernel warning
on the console (:class:`BootResult`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from device.balloon import BalloonDevice
from device.ranges import RangeSet
from protocol.errors import PeerError
from protocol.features import BalloonFeature, TransportFeature, bit, has, mask
from sim.serve import SERVE_FEATURES, BalloonServer, Finding, ServeEvent, serving
from sim.uml import MARK_PREFIX, UmlGuest, UmlKernel, UmlMachine, UmlResult, boot, find_kernel

__all__ = [
    "BOOT_BUDGET",
    "LINUX_DRIVER_FEATURES",
    "MIB",
    "PATTERN_BYTE",
    "BootResult",
    "Meminfo",
    "Negotiation",
    "Scenario",
    "ScenarioContext",
    "linux_accepts",
    "mount_tmpfs",
    "run_boot",
    "write_pattern",
]

MIB = 1 << 20
BOOT_BUDGET = 20.0
"""Seconds for one boot, spawn to power-off, before UML is killed (runs take 3-8 s)."""
LINUX_DRIVER_FEATURES = mask(*BalloonFeature) | mask(
    TransportFeature.RING_INDIRECT_DESC, TransportFeature.RING_EVENT_IDX,
    TransportFeature.VERSION_1)
"""The bits Linux 6.1's virtio_balloon (its feature table) and the virtio core accept, of those
vballoon can offer."""

_MEMINFO_RE = re.compile(r"meminfo (\S+) MemTotal=(\d+) MemFree=(\d+) MemAvailable=(\d+)")
_KERNEL_PROBLEM_RE = re.compile(r"WARNING:|BUG:|Oops|Call Trace|virtio.*(fail|error|puff)",
                                re.IGNORECASE)


# ---- Linux's negotiation rules ----------------------------------------------------------------

def linux_accepts(offered: int, *, poisoning: bool) -> tuple[int, ...]:
    """The SET_FEATURES rounds Linux 6.1 sends for ``offered`` (UML: one per change).

    First the driver's feature table applied to the offer; then ``virtballoon_validate()``:
    without page poisoning or init_on_free PAGE_POISON goes; with them but without PAGE_POISON
    negotiated, REPORTING goes (the host could not be told freed pages must keep a pattern).
    UML sends SET_FEATURES again only when validate() changed something.
    """
    first = offered & LINUX_DRIVER_FEATURES
    final = first
    if not poisoning:
        final &= ~bit(BalloonFeature.PAGE_POISON)
    elif not has(final, BalloonFeature.PAGE_POISON):
        final &= ~bit(BalloonFeature.REPORTING)
    return (first,) if final == first else (first, final)


@dataclass(frozen=True, slots=True)
class Negotiation:
    """What was offered and what the driver accepted in one boot."""

    offered: int
    rounds: tuple[int, ...]
    """Each SET_FEATURES, in order (without vhost-user's bit 30)."""
    expected: tuple[int, ...]
    """What :func:`linux_accepts` says Linux sends."""
    guest_view: int | None
    """The guest's ``/sys/bus/virtio/devices/*/features``."""
    poison_val: int | None
    """The last poison_val the driver wrote (None: never written)."""
    reporting_enabled: bool
    """The kernel printed "Free page reporting enabled"."""
    queues: tuple[str, ...]
    """Queue kinds by index, as attached."""

    @property
    def final(self) -> int | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def matches_linux(self) -> bool:
        return self.rounds == self.expected


# ---- guest-side values ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Meminfo:
    """The guest's /proc/meminfo at a step, in bytes."""

    total: int
    free: int
    available: int


@dataclass(frozen=True, slots=True)
class BootResult:
    """One boot: the UML run, the negotiation, each scenario's result by name, findings."""

    uml: UmlResult
    negotiation: Negotiation
    results: dict[str, Any]
    findings: tuple[Finding, ...]
    kernel_problems: tuple[str, ...]
    """Console lines with a kernel warning or a virtio error."""
    summary: dict[str, Any]
    events: tuple[ServeEvent, ...] = field(repr=False)


# ---- the host's side of a boot ---------------------------------------------------------------

class ScenarioContext:
    """What a scenario's host part works with: the server, the guest, the run directory."""

    def __init__(self, server: BalloonServer, guest: UmlGuest, rundir: str) -> None:
        self.server = server
        self.guest = guest
        self.rundir = rundir
        self.step = "boot"
        """The step being waited for (named in timeout errors)."""

    @property
    def device(self) -> BalloonDevice:
        return self.server.device

    @property
    def now(self) -> float:
        """Seconds on the server's clock (:attr:`ServeEvent.time`)."""
        return self.server.now()

    async def reached(self, name: str) -> Meminfo | None:
        """Wait for the guest's marker ``name``; its meminfo if the step printed one."""
        self.step = name
        await self.guest.wait_for_marker(name)
        return self.meminfo(name)

    def meminfo(self, name: str) -> Meminfo | None:
        found = None
        for m in _MEMINFO_RE.finditer(self.guest.console):
            if m.group(1) == name:
                found = Meminfo(*(int(m.group(i)) << 10 for i in (2, 3, 4)))
        return found

    def go(self, name: str, value: str = "") -> None:
        """Let the guest past step ``name`` (``value`` is the file's content)."""
        path = os.path.join(self.rundir, f"go-{name}")
        with open(path + ".tmp", "w") as f:
            f.write(value)
        os.replace(path + ".tmp", path)  # the guest never sees a half-written value

    async def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait for the device to satisfy ``predicate`` (re-checked at every event)."""
        self.step = what
        await self.server.wait_for(predicate)

    async def quiet(self, kind: str, period: float) -> None:
        """Wait until no ``kind`` event has come for ``period`` seconds."""
        self.step = f"{kind} quiet for {period} s"
        counts = self.server.counts
        while True:
            seen = counts.get(kind, 0)
            with trio.move_on_after(period):
                await self.server.wait_for(lambda seen=seen: counts.get(kind, 0) > seen)
                continue
            return

    def events_since(self, t: float, kind: str) -> list[ServeEvent]:
        return [e for e in self.server.events if e.kind == kind and e.time >= t]

    def resident(self, ranges: RangeSet | Sequence[tuple[int, int]]) -> int:
        """Bytes of ``ranges`` (RangeSet: (start, end); else (gpa, length)) that hold data in
        the guest's RAM file (holes excluded)."""
        memory = self.device.memory
        total = 0
        for a, b in ranges:
            length = b - a if isinstance(ranges, RangeSet) else b
            total += sum(e - s for s, e in memory.data_ranges(a, length))
        return total


class Scenario(Protocol):
    """One part of a boot: shell for the guest, a coroutine for the host."""

    name: str

    def guest(self) -> str: ...

    async def host(self, ctx: ScenarioContext) -> Any: ...


PATTERN_BYTE = 0x55
"""What the guest's filler memory holds, so a page reading zeros was discarded by the host."""


def mount_tmpfs(size: int) -> str:
    """Guest shell: a tmpfs of ``size`` (+16 MiB) at ``$RUN/tmpfs`` (mounted in the guest only)."""
    return (f'mkdir -p "$RUN/tmpfs" && mount -t tmpfs -o size={size // MIB + 16}M vballoon '
            '"$RUN/tmpfs" || exit 1\n')


def write_pattern(ctx: ScenarioContext, size: int) -> str:
    """A host file of ``size`` bytes of :data:`PATTERN_BYTE` the guest copies into its tmpfs
    (``cp`` through hostfs fills 64 MiB in ~0.1 s; ``dd | tr`` in the guest takes ~1 s)."""
    path = os.path.join(ctx.rundir, "pattern")
    chunk = bytes([PATTERN_BYTE]) * MIB
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)
    return path


# ---- a boot -----------------------------------------------------------------------------------

def _guest_script(rundir: str, scenarios: Sequence[Scenario]) -> str:
    prelude = (
        f'RUN="{rundir}"\n'
        "meminfo() { awk -v t=\"$1\" '/^(MemTotal|MemFree|MemAvailable):/ "
        '{ s = s " " substr($1, 1, length($1) - 1) "=" $2 } '
        f"END {{ print \"{MARK_PREFIX}meminfo \" t s }}' /proc/meminfo; }}\n"
        'waitgo() { n=0; while [ ! -e "$RUN/go-$1" ]; do n=$((n+1)); '
        '[ $n -gt 600 ] && { mark "waitgo-timeout $1"; return 1; }; sleep 0.05; done; }\n'
        'step() { meminfo "$1"; mark "$1"; waitgo "$1" || exit 1; }\n'
        "for f in /sys/bus/virtio/devices/*/features; do "
        '[ -e "$f" ] && mark "guest-features $(cat "$f")"; done\n'
        "mark vballoon-ready\n"
    )
    return prelude + "".join(s.guest() for s in scenarios)


def _negotiation(server: BalloonServer, uml: UmlResult, poisoning: bool) -> Negotiation:
    offered = server.device.offered_features()
    guest_view = None
    for m in uml.markers:
        if m.startswith("guest-features "):
            bits = m.split()[1]
            guest_view = sum(1 << i for i, c in enumerate(bits) if c == "1")
    poison = [e.fields["value"] for e in server.events if e.kind == "poison_val"]
    queues = [e.fields["queue"] for e in server.events if e.kind == "queue"]
    return Negotiation(offered=offered, rounds=tuple(server.negotiated),
                       expected=linux_accepts(offered, poisoning=poisoning),
                       guest_view=guest_view, poison_val=poison[-1] if poison else None,
                       reporting_enabled="Free page reporting enabled" in uml.console,
                       queues=tuple(q or "?" for q in queues))


async def run_boot(scenarios: Sequence[Scenario] = (), *, features: int = SERVE_FEATURES,
                   mem: str = "256M", cmdline: Sequence[str] = (),
                   kernel: UmlKernel | None = None, budget: float = BOOT_BUDGET) -> BootResult:
    """Boot UML against a fresh :class:`BalloonServer` and run ``scenarios`` in order.

    PeerError if UML is missing, a step does not finish within ``budget`` (the console's
    tail says where it stopped) or the guest does not power off cleanly.
    """
    kernel = kernel or find_kernel()
    rundir = tempfile.mkdtemp(prefix="vbu-", dir="/tmp")  # short: AF_UNIX path limit
    socket_path = os.path.join(rundir, "s")
    machine = UmlMachine(scenario=_guest_script(rundir, scenarios), socket=socket_path, mem=mem,
                         cmdline=tuple(cmdline), timeout=budget)
    results: dict[str, Any] = {}
    try:
        async with serving(socket_path, features=features) as server:
            async with boot(machine, kernel) as guest:
                ctx = ScenarioContext(server, guest, rundir)
                try:
                    with trio.fail_after(budget):
                        await ctx.reached("vballoon-ready")
                        for scenario in scenarios:
                            results[scenario.name] = await scenario.host(ctx)
                except trio.TooSlowError:
                    tail = "\n".join(guest.console.splitlines()[-20:])
                    raise PeerError(f"UML scenario stuck waiting for {ctx.step!r} "
                                    f"after {budget} s:\n{tail}") from None
                uml = await guest.wait()
            with trio.move_on_after(5):  # the session ends when UML's socket closes
                await server.wait_for(lambda: server.counts.get("disconnect", 0) >= 1)
            uml.check()
            # Debian's UML has no CONFIG_PAGE_POISONING: only init_on_free turns poisoning on.
            poisoning = "init_on_free=1" in cmdline
            return BootResult(
                uml=uml, negotiation=_negotiation(server, uml, poisoning), results=results,
                findings=tuple(server.findings),
                kernel_problems=tuple(line for line in uml.console.splitlines()
                                      if _KERNEL_PROBLEM_RE.search(line)),
                summary=server.summary(), events=tuple(server.events))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)

