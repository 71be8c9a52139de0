"""Pictures of a simulated guest (matplotlib, Agg): its memory map over time, its free lists,
and what a live migration sent with and without free page hints.

- :func:`plot_memory_map`: time on the x axis, guest-physical address on the y axis, one colour
  per kind of memory (:data:`~sim.teach.timeline.KINDS`: allocated, free, reported, hinted,
  ballooned), from a :class:`~sim.teach.timeline.Timeline`.
- :func:`plot_free_lists`: free memory per order, stacked by migratetype, the Reported part
  hatched, at a few moments of the same timeline (Linux ``/proc/pagetypeinfo`` as bars).
- :func:`plot_migration`: bytes sent per round, with and without hints, from the two
  :class:`~device.migration_report.MigrationReport` objects of the default scenario
  (:func:`sim.scenario.run_scenario`).

Every figure has a fixed size and dpi and is saved without ``bbox_inches="tight"``, so
:meth:`Picture.pixel` can say which pixel of the PNG shows a given data point; artists carry
``gid`` attributes (``kind-ballooned``, ``bar-with-1`` ...) that the SVG keeps as element ids,
and text stays text (``svg.fonttype = none``), so tests can check content, not just existence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from sim.teach.timeline import KINDS, Timeline  # noqa: E402

__all__ = [
    "COLORS",
    "MIGRATETYPE_COLORS",
    "Picture",
    "plot_free_lists",
    "plot_memory_map",
    "plot_migration",
]

MiB = 1 << 20
COLORS = {
    "allocated": "#9e9e9e",
    "free": "#a5d6a7",
    "reported": "#1e88e5",
    "hinted": "#fb8c00",
    "ballooned": "#d81b60",
}
"""One colour per kind of memory (and per legend entry)."""
MIGRATETYPE_COLORS = {
    "UNMOVABLE": "#8d6e63",
    "MOVABLE": "#43a047",
    "RECLAIMABLE": "#fdd835",
    "HIGHATOMIC": "#8e24aa",
    "CMA": "#00acc1",
    "ISOLATE": "#e53935",
}
_SIZE = (8.0, 4.5)
_DPI = 100
_RC = {"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "vballoon"}


@dataclass(frozen=True, slots=True)
class Picture:
    """A saved figure: its path, size in pixels, and where its main axes' data lands.

    ``axes_px`` is the data area as ``(left, bottom, right, top)`` in pixels from the image's
    bottom-left corner; ``xlim`` / ``ylim`` are the data limits drawn there.
    """

    path: Path
    width: int
    height: int
    axes_px: tuple[float, float, float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """``(column, row)`` of the image pixel showing data point ``(x, y)`` (row 0 on top)."""
        left, bottom, right, top = self.axes_px
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        col = left + fx * (right - left)
        row_from_bottom = bottom + fy * (top - bottom)
        return int(col), int(self.height - row_from_bottom)


def _save(fig: Any, ax: Any, path: Path) -> Picture:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    bbox = ax.get_window_extent()
    width, height = (int(round(v)) for v in fig.canvas.get_width_height())
    fig.savefig(path, dpi=_DPI, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)
    return Picture(path, width, height, (bbox.x0, bbox.y0, bbox.x1, bbox.y1),
                   tuple(ax.get_xlim()), tuple(ax.get_ylim()))  # type: ignore[arg-type]


def _runs(timeline: Timeline, kind: str) -> list[tuple[float, float, int, int]]:
    """Rectangles ``(t0, t1, start, end)``: a range of ``kind`` held over consecutive samples."""
    out = []
    open_runs: dict[tuple[int, int], float] = {}
    samples = timeline.samples
    for i, s in enumerate(samples):
        t_next = samples[i + 1].t if i + 1 < len(samples) else s.t + timeline.interval
        now = set(s.ranges[kind])
        for rng in list(open_runs):
            if rng not in now:
                out.append((open_runs.pop(rng), s.t, *rng))
        for rng in now:
            open_runs.setdefault(rng, s.t)
        if i + 1 == len(samples):
            out.extend((t0, t_next, *rng) for rng, t0 in open_runs.items())
    return out


def plot_memory_map(timeline: Timeline, path: str | Path) -> Picture:
    """The guest's physical memory over time, one band colour per kind (see module doc)."""
    path = Path(path)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=_SIZE, dpi=_DPI)
        t_end = timeline.samples[-1].t + timeline.interval
        for kind in KINDS:
            rects = [Rectangle((t0, s / MiB), t1 - t0, (e - s) / MiB)
                     for t0, t1, s, e in _runs(timeline, kind)]
            coll = PatchCollection(rects, facecolor=COLORS[kind], edgecolor="none",
                                   linewidth=0, antialiased=False)
            coll.set_gid(f"kind-{kind}")
            ax.add_collection(coll)
        for t, label in timeline.phases:
            ax.axvline(t, color="black", linewidth=0.6, linestyle="--")
            ax.text(t, timeline.ram / MiB, f" {label}", rotation=90, va="top", ha="left",
                    fontsize=7)
        ax.set_xlim(0, t_end)
        ax.set_ylim(0, timeline.ram / MiB)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("guest-physical address (MiB)")
        ax.set_title(f"Guest memory over time ({timeline.ram // MiB} MiB guest)")
        handles = [Patch(facecolor=COLORS[k], label=k, gid=f"legend-{k}") for k in KINDS]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        fig.subplots_adjust(left=0.09, right=0.83, bottom=0.12, top=0.92)
        return _save(fig, ax, path)


def _moments(timeline: Timeline) -> list[tuple[str, float]]:
    names = dict((label, t) for t, label in timeline.phases)
    picks = [("before the burst", names.get("burst", 0.0) - 1e-9),
             ("before the migration", names.get("migration", 0.0) - 1e-9),
             ("at the end", timeline.samples[-1].t)]
    return picks


def plot_free_lists(timeline: Timeline, path: str | Path) -> Picture:
    """Free memory per order, stacked by migratetype, Reported part hatched, at 3 moments."""
    path = Path(path)
    moments = _moments(timeline)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, len(moments), figsize=_SIZE, dpi=_DPI, sharey=True)
        present = sorted({mt for s in timeline.samples for _, mt, _ in s.free_blocks},
                         key=list(MIGRATETYPE_COLORS).index)
        for ax, (label, t) in zip(axes, moments, strict=True):
            sample = timeline.at(t)
            bottom = [0.0] * 11
            for mt in present:
                for reported in (False, True):
                    heights = [sample.free_blocks.get((o, mt, reported), 0) * (4096 << o) / MiB
                               for o in range(11)]
                    bars = ax.bar(range(11), heights, bottom=bottom,
                                  color=MIGRATETYPE_COLORS[mt], edgecolor="black",
                                  linewidth=0.3, hatch="///" if reported else None)
                    for order, bar in enumerate(bars):
                        bar.set_gid(f"bar-{label.replace(' ', '_')}-{mt}-o{order}"
                                    f"{'-R' if reported else ''}")
                    bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
            ax.set_title(f"{label} (t={sample.t:.2f} s)", fontsize=8)
            ax.set_xlabel("order")
            ax.set_xticks(range(0, 11, 2))
        axes[0].set_ylabel("free memory (MiB)")
        handles = [Patch(facecolor=MIGRATETYPE_COLORS[mt], label=mt.title(), gid=f"legend-{mt}")
                   for mt in present]
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="Reported", gid="legend-reported"))
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
        fig.suptitle("Free lists: free_area[order].free_list[migratetype]", y=0.9, fontsize=9)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.8, wspace=0.08)
        return _save(fig, axes[0], path)


def plot_migration(with_hints: Any, without_hints: Any, path: str | Path, *,
                   note: str = "") -> Picture:
    """Bytes sent per round by two migrations of the same guest: with and without hints.

    ``with_hints`` / ``without_hints`` are :class:`~device.migration_report.MigrationReport`.
    """
    path = Path(path)
    runs: Sequence[tuple[str, Any, str]] = (("with", with_hints, "#1e88e5"),
                                            ("without", without_hints, "#9e9e9e"))
    rounds = max(len(with_hints.rounds), len(without_hints.rounds))
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=_SIZE, dpi=_DPI)
        width = 0.38
        for k, (name, report, color) in enumerate(runs):
            xs = [r.index + (k - 0.5) * width for r in report.rounds]
            heights = [r.bytes / MiB for r in report.rounds]
            total = report.total_bytes / MiB
            bars = ax.bar(xs, heights, width=width, color=color,
                          label=f"{name} hints: {total:.1f} MiB in {len(report.rounds)} rounds")
            for r, bar in zip(report.rounds, bars, strict=True):
                bar.set_gid(f"bar-{name}-{r.index}")
                if r.hinted_pages:
                    ax.annotate(f"{r.hinted_pages * 4096 / MiB:.0f} MiB hinted",
                                (bar.get_x() + width / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(1, rounds + 1))
        ax.set_xlabel("round (the last one runs with the VM stopped)")
        ax.set_ylabel("bytes sent (MiB)")
        ax.set_title("Live migration: bytes per round, with and without free page hints"
                     + (f"\n{note}" if note else ""))
        ax.legend(frameon=False)
        fig.subplots_adjust(left=0.09, right=0.97, bottom=0.12, top=0.86)
        return _save(fig, ax, path)
