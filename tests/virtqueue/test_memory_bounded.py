"""GuestMemory.data_ranges_bounded: the same answer as data_ranges, at a bounded cost."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from virtqueue.memory import PAGE_SIZE, PROBE_PIECE, GuestMemory

PAGES = 64
LAYOUT = dict(base=PAGE_SIZE * 4, holes=[(PAGE_SIZE * 20, PAGE_SIZE * 8)])
RAM = PAGES * PAGE_SIZE


@settings(max_examples=150, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, PAGES - 1), st.booleans()), max_size=40),
       window=st.tuples(st.integers(0, RAM), st.integers(0, RAM)))
def test_same_ranges_as_seek_hole(writes, window):
    with GuestMemory.create(RAM, **LAYOUT) as mem:
        base = LAYOUT["base"]
        for page, discard in writes:
            gpa = base + page * PAGE_SIZE
            if not mem.contains(gpa, PAGE_SIZE):
                continue
            if discard:
                mem.discard(gpa, PAGE_SIZE)
            else:
                mem.write(gpa + 100, b"x")
        lo, n = base + min(window), abs(window[1] - window[0])
        pieces = list(mem.data_ranges_bounded(lo, n))
        assert all(0 < e - s <= PROBE_PIECE for s, e in pieces)
        assert _merged(pieces) == list(mem.data_ranges(lo, n))


def _merged(ranges):
    out = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def test_a_caller_that_stops_early_pays_for_one_piece():
    with GuestMemory.create(256 << 20) as mem:
        mem.fill(0, 256 << 20, 1)
        t = time.perf_counter()
        for _ in range(400):
            first = next(mem.data_ranges_bounded(0, 256 << 20))
            assert first == (0, PROBE_PIECE)
        assert time.perf_counter() - t < 0.5


def test_cost_is_bounded_by_the_window_not_the_file():
    with GuestMemory.create(256 << 20) as mem:
        mem.fill(0, 256 << 20, 1)  # fully written: SEEK_HOLE would scan the whole file
        t = time.perf_counter()
        for i in range(400):
            assert list(mem.data_ranges_bounded(i * PAGE_SIZE, 2 * PAGE_SIZE)) == [
                (i * PAGE_SIZE, (i + 2) * PAGE_SIZE)]
        assert time.perf_counter() - t < 0.5  # with SEEK_HOLE: 400 x ~7 ms
