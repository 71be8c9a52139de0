"""``vballoon plot [memory-map|free-lists|migration|all] --out DIR``: pictures of a simulated guest.

- ``memory-map``: guest-physical memory over virtual time, one colour per kind (allocated,
  free, reported, hinted, ballooned), from the tour of :mod:`sim.teach.timeline`;
- ``free-lists``: free memory per order and migratetype (Reported hatched) at three moments of
  the same tour;
- ``migration``: bytes sent per round with and without free page hints, from the default
  scenario (:func:`sim.scenario.run_scenario`) on a small guest.

Files are ``DIR/<name>.<format>`` (PNG or SVG; matplotlib's Agg backend, no display needed).
Each run prints the paths it wrote, one per line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from sim.units import size_argument

parse_size = size_argument()

__all__ = ["PICTURES", "add_arguments", "main", "write_pictures"]

PICTURES = ("memory-map", "free-lists", "migration")
MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("picture", nargs="?", choices=(*PICTURES, "all"), default="all",
                   help="which picture (default all)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    p.add_argument("--format", choices=("png", "svg"), default="png",
                   help="file format (default png)")
    p.add_argument("--ram", type=parse_size, default=128 * MiB,
                   help="guest RAM of the memory-map / free-lists tour, 64M..1G (default 128M)")
    p.add_argument("--migration-ram", type=parse_size, default=256 * MiB,
                   help="guest RAM of the migration scenario (default 256M)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workloads")


def write_pictures(names: list[str], out: Path, fmt: str, *, ram: int = 128 * MiB,
                   migration_ram: int = 256 * MiB, seed: int = 0) -> list[Path]:
    """Render ``names`` (from :data:`PICTURES`) into ``out``; the paths written.

    Raises:
        ConfigError: a size the scenarios refuse.
    """
    from sim.teach import plots
    from sim.teach.timeline import TimelineConfig, record_timeline

    written = []
    if "memory-map" in names or "free-lists" in names:
        timeline = record_timeline(TimelineConfig(ram=ram, seed=seed))
        if "memory-map" in names:
            written.append(plots.plot_memory_map(timeline, out / f"memory-map.{fmt}").path)
        if "free-lists" in names:
            written.append(plots.plot_free_lists(timeline, out / f"free-lists.{fmt}").path)
    if "migration" in names:
        from sim.scenario import RunConfig, run_scenario_sync

        config = RunConfig(ram=migration_ram, seed=seed, balloon_bytes=migration_ram // 8,
                           bandwidth=float(256 * MiB))
        result = run_scenario_sync(config)
        note = (f"{migration_ram // MiB} MiB guest, {config.bandwidth / MiB:.0f} MiB/s link, "
                f"the default scenario (churn, reporting, balloon, burst)")
        written.append(plots.plot_migration(result.with_hints.migration,
                                            result.without_hints.migration,
                                            out / f"migration.{fmt}", note=note).path)
    return written


def main(args: argparse.Namespace) -> int:
    from protocol.errors import ConfigError

    names = list(PICTURES) if args.picture == "all" else [args.picture]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    # the runs behind the pictures are long; their events are not what the user asked for
    previous = structlog.get_config()
    structlog.configure(processors=[_drop], cache_logger_on_first_use=False)
    try:
        paths = write_pictures(names, out, args.format, ram=args.ram,
                               migration_ram=args.migration_ram, seed=args.seed)
    finally:
        structlog.configure(**previous)
    for path in paths:
        print(path)
    return 0


def _drop(logger: object, name: str, event: dict) -> dict:
    raise structlog.DropEvent
