"""The migration benchmarks and their synthetic guest, at test size."""

from __future__ import annotations

import pytest
import trio

from benchmarks import migration as bench
from benchmarks import scale
from benchmarks.synthetic import BLOCK, SyntheticGuest
from device.migration import MigrationParams
from device.vcpu import VcpuGate
from protocol.errors import UsageError
from virtqueue.memory import GuestMemory

MIB = 1 << 20


def test_synthetic_guest_layout_and_hinting_verbs():
    with GuestMemory.create(64 * MIB) as mem:
        guest = SyntheticGuest(mem, VcpuGate(), seed=3, runs=4, run_bytes=BLOCK, stale=True)
        assert guest.relied().total == 4 * BLOCK
        assert len(guest.free_blocks) == 16 - 4
        assert all(not guest.used.overlap(b, b + BLOCK) for b in guest.free_blocks)
        assert mem.allocated_bytes() == 64 * MIB  # stale data everywhere
        first = guest.hint_start()
        assert first == 0x80000001 and guest.state == "start"
        assert guest.hint_start() == first + 1
        guest.hint_done()
        assert guest.state == "done" and not guest.held
        with pytest.raises(UsageError):
            SyntheticGuest(mem, VcpuGate(), seed=3, runs=1, run_bytes=3 * MIB, stale=False)


@pytest.mark.parametrize("churn", [0.0, 2 * MIB])
def test_hints_cut_the_bytes_and_lose_nothing(churn):
    with GuestMemory.create(128 * MIB) as mem:
        params = MigrationParams(bandwidth=16 * MIB, downtime_limit=0.3)
        reports = {}
        for hinting in (False, True):
            guest = SyntheticGuest(mem, VcpuGate(), seed=5, runs=3, run_bytes=BLOCK,
                                   stale=not reports, churn_bytes_per_s=churn)
            reports[hinting] = bench.migrate_synthetic(guest, hinting=hinting, copy=True,
                                                       params=params)
            assert reports[hinting].pages_lost == 0
        with_hints, without = reports[True], reports[False]
        assert without.normal_pages >= 32 * 256  # every stale page went
        assert with_hints.hints == 32 - 3 and with_hints.cmd_ids[0] == 0x80000001
        assert with_hints.total_bytes < 0.2 * without.total_bytes


def test_migration_benchmark_rows():
    rows = bench.run(ram=128 * MIB)
    by_name = {r["name"]: r for r in rows}
    for tag in ("idle", "churn"):
        assert by_name[f"{tag}_pages_lost"]["value"] == 0
        ratio = by_name[f"{tag}_hint_bytes_ratio"]
        assert 0 < ratio["value"] < 0.25 and ratio["target"] == "<= 0.1"
        assert (by_name[f"{tag}_bytes_with_hints"]["value"]
                < by_name[f"{tag}_bytes_without_hints"]["value"])
    assert all(set(r) <= {"name", "value", "unit", "target", "met"} for r in rows)


def test_scale_measure_in_process_and_in_a_child():
    small = scale.measure("hint", ram=1 << 30)
    assert small["outcome"] == "completed" and small["pages_lost"] == 0
    assert small["hints"] == 256 - 16 and small["peak_rss"] > 0
    rows = scale.run(ram=16 << 30)  # two fresh interpreters
    names = {r["name"]: r for r in rows}
    assert names["16gib_hint_pages_lost"]["value"] == 0
    assert names["16gib_nohint_pages_lost"]["value"] == 0
    # free holes are cheap zero pages, but hinted ones are not even that
    assert names["16gib_nohint_bytes"]["value"] > names["16gib_hint_bytes"]["value"]
    assert names["16gib_hint_wall_time"]["target"] == "<= 10"


async def test_synthetic_guest_respects_the_pause(autojump_clock):
    with GuestMemory.create(64 * MIB) as mem:
        gate = VcpuGate()
        guest = SyntheticGuest(mem, gate, seed=1, runs=4, run_bytes=BLOCK, stale=False,
                               churn_bytes_per_s=64 * MIB)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.run)
            await trio.sleep(0.1)
            await gate.pause()
            before = mem.read(0, 64 * MIB)
            await trio.sleep(1)
            assert mem.read(0, 64 * MIB) == before
            nursery.cancel_scope.cancel()
