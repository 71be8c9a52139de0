"""``vballoon plot``: the pictures show what the run recorded (pixels, SVG ids, bar heights)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import matplotlib.pyplot as plt
import pytest
import structlog

from sim.cli import main as cli_main
from sim.scenario import RunConfig, run_scenario_sync
from sim.teach.plots import COLORS, plot_free_lists, plot_memory_map, plot_migration
from sim.teach.timeline import KINDS, TimelineConfig, record_timeline
from virtqueue import events as vq_events

MiB = 1 << 20
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def _restore_logging():
    config = structlog.get_config()
    processors = list(config["processors"])
    enabled = vq_events.ENABLED
    yield
    structlog.configure(**{**config, "processors": processors})
    vq_events.set_enabled(enabled)


@pytest.fixture(scope="module")
def timeline():
    return record_timeline(TimelineConfig(ram=128 * MiB))


@pytest.fixture(scope="module")
def migrations():
    result = run_scenario_sync(RunConfig(ram=256 * MiB, balloon_bytes=32 * MiB,
                                         churn_seconds=1.0, settle_seconds=2.0,
                                         bandwidth=float(256 * MiB)))
    return result.with_hints.migration, result.without_hints.migration


def _steady_point(timeline, kind):
    """(t, gpa) in the middle of a range of ``kind`` that holds for 5 samples around t."""
    samples = timeline.samples
    best = None
    for i in range(2, len(samples) - 2):
        for s, e in samples[i].ranges[kind]:
            mid = (s + e) // 2
            if e - s < 2 * MiB:
                continue
            if all(samples[j].kind_at(mid) == kind for j in range(i - 2, i + 3)):
                score = e - s
                if best is None or score > best[0]:
                    best = (score, samples[i].t + timeline.interval / 2, mid)
    assert best is not None, f"the tour never held {kind} memory steadily"
    return best[1], best[2]


def _rgb(hex_colour):
    return tuple(int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5))


def test_memory_map_png_pixels_have_the_colour_of_the_recorded_kind(timeline, tmp_path):
    picture = plot_memory_map(timeline, tmp_path / "memory-map.png")
    image = plt.imread(picture.path)
    assert image.shape[:2] == (picture.height, picture.width)
    for kind in KINDS:
        t, gpa = _steady_point(timeline, kind)
        col, row = picture.pixel(t, gpa / MiB)
        got = tuple(float(c) for c in image[row, col, :3])
        assert got == pytest.approx(_rgb(COLORS[kind]), abs=2 / 255), (kind, t, hex(gpa))


def test_memory_map_svg_has_one_band_and_one_legend_entry_per_kind(timeline, tmp_path):
    picture = plot_memory_map(timeline, tmp_path / "memory-map.svg")
    root = ET.parse(picture.path).getroot()
    ids = {g.get("id") for g in root.iter(f"{SVG}g")}
    texts = [t.text.strip() for t in root.iter(f"{SVG}text") if t.text]
    for kind in KINDS:
        assert f"kind-{kind}" in ids
        assert texts.count(kind) == 1, kind
        band = next(g for g in root.iter(f"{SVG}g") if g.get("id") == f"kind-{kind}")
        fills = {m.lower() for m in re.findall(r"fill: (#[0-9a-fA-F]{6})",
                                                ET.tostring(band, encoding="unicode"))}
        assert fills == {COLORS[kind]}


def _bar_heights(root):
    out = {}
    for g in root.iter(f"{SVG}g"):
        gid = g.get("id") or ""
        if gid.startswith("bar-"):
            path = g.find(f"{SVG}path")
            ys = [float(y) for y in re.findall(r"[ML] [-\d.]+ ([-\d.]+)", path.get("d"))]
            out[gid] = max(ys) - min(ys)
    return out


def test_free_lists_bars_are_the_sampled_free_memory(timeline, tmp_path):
    picture = plot_free_lists(timeline, tmp_path / "free-lists.svg")
    root = ET.parse(picture.path).getroot()
    heights = _bar_heights(root)
    end = timeline.samples[-1]
    mib = {key: n * (4096 << key[0]) / MiB for key, n in end.free_blocks.items()}
    biggest = max(mib, key=mib.get)
    order, mt, reported = biggest
    ref = heights[f"bar-at_the_end-{mt}-o{order}{'-R' if reported else ''}"]
    for (o, m, r), value in mib.items():
        gid = f"bar-at_the_end-{m}-o{o}{'-R' if r else ''}"
        assert heights[gid] == pytest.approx(ref * value / mib[biggest], abs=0.05), gid
    texts = {t.text.strip() for t in root.iter(f"{SVG}text") if t.text}
    assert {"Movable", "Reported"} <= texts


def test_migration_bars_are_the_bytes_of_each_round(migrations, tmp_path):
    with_hints, without = migrations
    picture = plot_migration(with_hints, without, tmp_path / "migration.svg")
    root = ET.parse(picture.path).getroot()
    heights = _bar_heights(root)
    ref_round = max(without.rounds, key=lambda r: r.bytes)
    ref = heights[f"bar-without-{ref_round.index}"] / ref_round.bytes
    for name, report in (("with", with_hints), ("without", without)):
        for r in report.rounds:
            assert heights[f"bar-{name}-{r.index}"] == pytest.approx(r.bytes * ref, abs=0.05)
    texts = " ".join(t.text for t in root.iter(f"{SVG}text") if t.text)
    assert f"with hints: {with_hints.total_bytes / MiB:.1f} MiB" in texts
    assert f"without hints: {without.total_bytes / MiB:.1f} MiB" in texts


def test_plot_command_writes_the_picture(tmp_path, capsys):
    assert cli_main(["plot", "memory-map", "--out", str(tmp_path), "--format", "svg",
                     "--ram", "64M"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "memory-map.svg")]
    root = ET.parse(out[0]).getroot()
    assert "Guest memory over time (64 MiB guest)" in {t.text for t in root.iter(f"{SVG}text")}


@pytest.mark.parametrize("argv", [["--format", "gif"], ["--ram", "10M"], []])
def test_plot_bad_options_exit_2(tmp_path, argv, capsys):
    args = ["plot", "memory-map", *argv] + (["--out", str(tmp_path)] if argv else [])
    try:
        code = cli_main(args)
    except SystemExit as exc:  # argparse refuses it
        code = exc.code
    assert code == 2
    assert "error" in capsys.readouterr().err
