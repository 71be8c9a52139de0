"""What every QEMU scenario needs: its options, QEMU's command line, guest data, bounded waits.

- :class:`ScenarioOptions`: which QEMU, how much RAM, how fast to poll (validated: bad values are
  :class:`~protocol.errors.ConfigError`, exit status 2 on the command line);
- :func:`qemu_options`: the :class:`~sim.qemu.process.QemuOptions` for one variant;
- :func:`fill_free_ram`: write a byte pattern over all RAM above the kernel's reserved area, as
  a guest that has run for a while has data in its free pages (discarding or skipping zero
  pages would prove nothing);
- :func:`wait_until`: poll a condition in real time (QEMU runs in real time) with a bound;
  it returns False on timeout so the scenario records a failed check instead of hanging;
- :func:`pages_equal`: read pages back over qtest and compare them with what they should hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from protocol.errors import ConfigError
from sim.qemu.guest import DEFAULT_POLL_PERIOD, KERNEL_RESERVED
from sim.qemu.memory import QtestMemory
from sim.qemu.process import BalloonProperties, QemuMode, QemuOptions

__all__ = [
    "FILL_CHUNK",
    "check_rss_drop",
    "MiB",
    "PAGE",
    "ScenarioOptions",
    "fill_free_ram",
    "pages_equal",
    "qemu_options",
    "sample",
    "wait_until",
]

MiB = 1 << 20
PAGE = 4096
_MIN_RAM = 64 * MiB
_MAX_RAM = 1024 * MiB


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioOptions:
    """Knobs shared by every scenario; the defaults make each one take a few seconds."""

    binary: str | os.PathLike[str] | None = None
    """qemu-system-x86_64 to run (None: search PATH)."""
    memory: int = 128 * MiB
    """Guest RAM, 64 MiB .. 1 GiB, a multiple of 4 MiB."""
    accel: str = "tcg"
    poll_period: float = DEFAULT_POLL_PERIOD
    """Seconds between the driver's InterruptStatus polls."""
    migration_bandwidth: int = 64 * MiB
    """``max-bandwidth`` of the hinting scenario's migrations (bytes/s); with the default RAM
    the migration without hints takes about 2 s."""

    def validate(self) -> None:
        m = self.memory
        if not isinstance(m, int) or not _MIN_RAM <= m <= _MAX_RAM or m % (4 * MiB):
            raise ConfigError(f"scenario RAM must be a multiple of 4 MiB from 64 MiB to 1 GiB, "
                              f"not {m!r}")
        if self.accel not in ("tcg", "kvm"):
            raise ConfigError(f"accel must be 'tcg' or 'kvm', not {self.accel!r}")
        p = self.poll_period
        if not isinstance(p, int | float) or not math.isfinite(p) or not 0 < p <= 0.1:
            raise ConfigError(f"poll period must be a number of seconds in (0, 0.1], not {p!r}")
        bw = self.migration_bandwidth
        if not isinstance(bw, int) or bw < MiB:
            raise ConfigError(f"migration bandwidth must be at least 1 MiB/s, not {bw!r}")


def qemu_options(options: ScenarioOptions, balloon: BalloonProperties, *,
                 mode: QemuMode = QemuMode.PAUSED, memory: int | None = None) -> QemuOptions:
    """The QEMU to start for one variant of a scenario."""
    return QemuOptions(memory=memory or options.memory, mode=mode, balloon=balloon,
                       accel=options.accel, binary=options.binary)


FILL_CHUNK = 128 * 1024
"""Bytes per qtest ``memset`` of :func:`fill_free_ram`. QEMU mallocs a buffer of the request's
size; glibc serves 16 MiB from the heap once its mmap threshold has grown, and that heap stays
resident until some later free trims it, moving RssAnon by 16 MiB in the middle of a
measurement. 128 KiB requests leave no such residue."""


def fill_free_ram(memory: QtestMemory, byte: int, *, reserved: int = KERNEL_RESERVED) -> int:
    """Write ``byte`` over every RAM byte at or above ``reserved`` (qtest ``memset``); the count.

    Call it before the driver probes: it would overwrite the driver's rings afterwards.
    """
    total = 0
    for region in memory.regions:
        start = max(region.gpa, reserved)
        for gpa in range(start, region.end, FILL_CHUNK):
            n = min(FILL_CHUNK, region.end - gpa)
            memory.fill(gpa, n, byte)
            total += n
    return total


async def wait_until(predicate: Callable[[], object], timeout: float,
                     period: float = 0.01) -> bool:
    """Poll ``predicate`` every ``period`` seconds for up to ``timeout``; whether it held."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(period)
        return True
    return bool(predicate())


def sample(items: list[int], limit: int) -> list[int]:
    """Up to ``limit`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= limit:
        return list(items)
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def pages_equal(memory: QtestMemory, gpas: Iterable[int],
                expected: Callable[[int, int], bytes]) -> tuple[int, list[int]]:
    """Read each 4 KiB page at ``gpas``; return (pages read, addresses that differed).

    ``expected(gpa, length)`` gives the bytes the page should hold.
    """
    bad, n = [], 0
    for gpa in gpas:
        n += 1
        if memory.read(gpa, PAGE) != expected(gpa, PAGE):
            bad.append(gpa)
    return n, bad


def check_rss_drop(r: Any, name: str, drop: int, expected: int) -> None:
    """QEMU's RssAnon must fall by ``expected`` bytes: at least that less 1 MiB + 2 %, and at
    most that plus 4 MiB + 10 %, since QEMU may return unrelated heap at the same moment (a
    larger drop was seen under load; a smaller one would mean pages were not discarded)."""
    low, high = expected - (MiB + expected // 50), expected + 4 * MiB + expected // 10
    r.check(name, low <= drop <= high,
            f"RssAnon fell {drop / MiB:.1f} MiB for {expected / MiB:.1f} MiB "
            f"(accepted {low / MiB:.1f}..{high / MiB:.1f} MiB)")
