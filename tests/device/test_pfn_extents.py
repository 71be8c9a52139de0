"""device.inflate.pfn_extents: consecutive PFN runs in both directions (Linux sends descending).

Found with the real driver (tests/sim/test_uml_scenarios.py, benchmarks/uml.py): Linux 6.1
pops its new balloon pages off a list in reverse allocation order, so a 256-PFN inflate chain
is one *descending* run; walked ascending-only it cost 256 hole punches per chain.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from device.inflate import pfn_extents, pfn_runs


def _pack(pfns: list[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


@given(st.lists(st.integers(0, 40), max_size=60))
def test_extents_cover_the_buffer_in_order(pfns):
    extents = list(pfn_extents(_pack(pfns)))
    assert [first + i * step for first, count, step in extents for i in range(count)] == pfns
    for _first, count, step in extents:
        assert count >= 1 and step in (1, -1) and (count > 1 or step == 1)
    # never more extents than ascending-only runs
    assert len(extents) <= len(list(pfn_runs(_pack(pfns))))


def test_a_descending_chain_is_one_extent():
    pfns = list(range(318106, 318106 - 256, -1))  # as Linux 6.1 sent them
    assert list(pfn_extents(_pack(pfns))) == [(318106, 256, -1)]
    assert len(list(pfn_runs(_pack(pfns)))) == 256
    assert list(pfn_extents(memoryview(_pack(pfns[::-1])))) == [(318106 - 255, 256, 1)]


def test_direction_changes_start_a_new_extent():
    assert list(pfn_extents(_pack([5, 4, 3, 4, 5, 9, 9]))) == [
        (5, 3, -1), (4, 2, 1), (9, 1, 1), (9, 1, 1)]
