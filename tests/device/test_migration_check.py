"""The final migration check: relied-on bytes compared in bulk, holes never read."""

from __future__ import annotations

import pytest

from device.memcheck import SLICE, compare_memory, relied_ranges
from device.ranges import RangeSet
from protocol.errors import GuestMemoryError, UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

MIB = 1 << 20


@pytest.fixture
def pair():
    with GuestMemory.create(8 * MIB) as a, GuestMemory.create(8 * MIB) as b:
        yield a, b


def test_identical_memory_loses_nothing(pair):
    a, b = pair
    for m in (a, b):
        m.fill(MIB, 2 * MIB, 0x5A)
        m.write(5 * MIB + 3, b"stamp")
    check = compare_memory(a, b, [(0, 8 * MIB)])
    assert check.ok and check.pages_lost == 0 and check.lost_sample == ()
    assert check.relied_bytes == 8 * MIB
    assert check.compared_bytes == 2 * MIB + PAGE_SIZE  # holes on both sides: not compared


def test_one_differing_byte_is_one_lost_page(pair):
    a, b = pair
    a.fill(0, 4 * MIB, 1)
    b.fill(0, 4 * MIB, 1)
    b.write(3 * MIB + 5 * PAGE_SIZE + 17, b"\x02")
    check = compare_memory(a, b, [(0, 4 * MIB)])
    assert check.pages_lost == 1 and not check.ok
    assert check.lost_sample == (3 * MIB + 5 * PAGE_SIZE,)


def test_only_relied_bytes_count(pair):
    a, b = pair
    a.write(10 * PAGE_SIZE, b"new")
    b.write(10 * PAGE_SIZE, b"old")
    a.write(20 * PAGE_SIZE + 100, b"x")  # differs at byte 100 of page 20 only
    assert compare_memory(a, b, [(0, 10 * PAGE_SIZE)]).pages_lost == 0
    assert compare_memory(a, b, RangeSet([(10 * PAGE_SIZE, 11 * PAGE_SIZE)])).pages_lost == 1
    assert compare_memory(a, b, [(20 * PAGE_SIZE, 100)]).pages_lost == 0
    assert compare_memory(a, b, [(20 * PAGE_SIZE + 100, 1)]).pages_lost == 1


def test_data_against_a_hole_compares_with_zeros_without_reading_the_hole(pair):
    a, b = pair
    a.fill(2 * MIB, MIB, 0)  # written zeros: equal to the hole on the other side
    a.write(4 * MIB, b"\x01")  # non-zero data against a hole: lost
    b.write(6 * MIB + PAGE_SIZE, b"\x01")  # the other way round: lost too
    check = compare_memory(a, b, [(0, 8 * MIB)])
    assert check.pages_lost == 2
    assert check.lost_sample == (4 * MIB, 6 * MIB + PAGE_SIZE)
    assert list(b.data_ranges(2 * MIB, MIB)) == []  # the hole was not faulted in
    assert list(a.data_ranges(6 * MIB, MIB)) == []


def test_slices_that_straddle_a_lost_run(pair):
    a, b = pair
    a.fill(0, 4 * MIB, 7)
    b.fill(0, 4 * MIB, 7)
    b.fill(SLICE - 2 * PAGE_SIZE, 4 * PAGE_SIZE, 8)  # across a slice boundary
    check = compare_memory(a, b, [(PAGE_SIZE // 2, 4 * MIB - PAGE_SIZE)])
    assert check.pages_lost == 4


def test_relied_forms_and_bad_ranges(pair):
    a, b = pair
    assert list(relied_ranges([(0, 10), (10, 5), (100, 0)])) == [(0, 15)]
    rs = RangeSet([(0, 10)])
    assert relied_ranges(rs) is rs
    with pytest.raises(UsageError):
        relied_ranges([(-1, 4)])
    with pytest.raises(GuestMemoryError):
        compare_memory(a, b, [(8 * MIB - 1, 2)])


def test_to_dict_is_plain(pair):
    a, b = pair
    b.write(0, b"z")
    d = compare_memory(a, b, [(0, PAGE_SIZE)]).to_dict()
    assert d == {"relied_bytes": PAGE_SIZE, "compared_bytes": PAGE_SIZE, "pages_lost": 1,
                 "lost_sample": [0], "ok": False}
