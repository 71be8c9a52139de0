"""The sans-I/O payload handlers: PFN runs, stats parsing and the stats collector, and a
property test of inflate/deflate records against a page-set model."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.inflate import pfn_runs
from device.stats import STAT_RECORD, STAT_UNSET, StatsCollector, parse_stats
from protocol.balloon import BalloonQueue as Q
from protocol.balloon import StatRecord, StatTag
from protocol.errors import ConfigError

try:
    from balloon_guest import PAGE_BASE, RAM_SIZE, Guest
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.balloon_guest import PAGE_BASE, RAM_SIZE, Guest


def test_stat_record_struct_equals_protocol():
    assert STAT_RECORD.size == StatRecord.sizeof() == 10
    assert STAT_RECORD.pack(7, 2**64 - 2) == StatRecord.build(dict(tag=7, val=2**64 - 2))


def test_parse_stats_unknown_tags_and_trailing_bytes():
    data = STAT_RECORD.pack(4, 10) + STAT_RECORD.pack(16, 1) + STAT_RECORD.pack(4, 11) + b"xyz"
    p = parse_stats(data)
    assert p.values == {StatTag.MEMFREE: 11}  # a later record of a tag wins
    assert p.unknown_tags == (16,) and p.trailing == 3


def test_stats_collector_timer_protocol():
    c = StatsCollector(interval=5)
    assert c.next_deadline() is None
    assert c.receive(3, parse_stats(STAT_RECORD.pack(0, 1)), now=10.0) is None
    assert c.next_deadline() == 15.0 and c.values[StatTag.SWAP_IN] == 1
    assert c.values[StatTag.MEMTOT] == STAT_UNSET
    assert c.receive(4, parse_stats(b""), now=11.0) == 3  # BL-14: the old head comes back
    assert c.handle_timer(16.0) == 4 and c.next_deadline() is None
    assert c.handle_timer(17.0) is None and c.next_deadline() == 22.0  # nothing parked
    c.set_interval(0, now=18.0)
    assert c.next_deadline() is None
    c.set_interval(2, now=19.0)
    assert c.next_deadline() == 19.0  # enabling fires at once (QEMU)
    c.set_interval(3, now=20.0)
    assert c.next_deadline() == 23.0


@pytest.mark.parametrize("bad", [-0.5, 2**32, float("nan"), "5"])
def test_stats_interval_validation(bad):
    with pytest.raises(ConfigError):
        StatsCollector(bad)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_pfn_runs_cover_the_buffer_in_order(pfns):
    runs = list(pfn_runs(struct.pack(f"<{len(pfns)}I", *pfns)))
    assert [s + i for s, n in runs for i in range(n)] == pfns
    assert all(b[0] != a[0] + a[1] for a, b in zip(runs, runs[1:], strict=False))


PFN0 = PAGE_BASE >> 12
RAM_PFNS = RAM_SIZE >> 12
pfn_lists = st.lists(
    st.one_of(st.integers(PFN0, PFN0 + 63), st.integers(RAM_PFNS, RAM_PFNS + 8),
              st.just(0xFFFFFFFF)),
    min_size=1, max_size=24)


@settings(max_examples=40)
@given(st.lists(st.tuples(st.sampled_from([Q.INFLATE, Q.DEFLATE]), pfn_lists), max_size=8))
def test_inflate_deflate_records_match_a_page_model(ops):
    g = Guest()
    try:
        g.init()
        g.mem.fill(PAGE_BASE, 64 * 4096, 0x77)
        inside: set[int] = set()
        rejected: list[int] = []
        for kind, pfns in ops:
            g.pfns(kind, pfns)
            g.device.poll_queue(kind)
            assert [n for _, n in g.used(kind)] == [0]
            for p in pfns:
                if p >= RAM_PFNS:
                    rejected.append(p)
                elif kind is Q.INFLATE:
                    inside.add(p)
                else:
                    inside.discard(p)
        assert {a >> 12 for s, e in g.device.ballooned for a in range(s, e, 4096)} == inside
        assert g.device.rejected == rejected
        for p in inside:  # every page ever inflated reads zeros (discarded)
            assert g.mem.read(p << 12, 8) == bytes(8)
    finally:
        g.mem.close()
