"""The VMM's dirty log: first writes per round, in page ranges, through GuestMemory observers."""

from __future__ import annotations

import time

import pytest

from device.dirty_log import DirtyLog, pages_of
from device.ranges import RangeSet
from protocol.errors import UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

MIB = 1 << 20


@pytest.fixture
def mem():
    with GuestMemory.create(4 * MIB) as m:
        yield m


def test_pages_of_covers_every_touched_page():
    assert pages_of(0, 1) == (0, 1)
    assert pages_of(4095, 2) == (0, 2)
    assert pages_of(4096, 4096) == (1, 2)
    assert pages_of(8191, 1) == (1, 2)
    assert pages_of(5000, 0) == (1, 1)


def test_off_until_started_and_after_stop(mem):
    log = DirtyLog(mem)
    mem.write(0, b"x")
    log.start()
    assert log.dirty_pages == 0 and not log.peek()
    mem.write(3 * PAGE_SIZE, b"y")
    assert list(log.peek()) == [(3, 4)]
    log.stop()
    mem.write(5 * PAGE_SIZE, b"z")
    assert not log.active and log.dirty_pages == 0
    log.stop()  # a second stop is harmless


def test_start_twice_is_a_usage_error(mem):
    log = DirtyLog(mem)
    log.start()
    with pytest.raises(UsageError):
        log.start()


def test_first_write_in_a_round_faults_later_ones_do_not(mem):
    log = DirtyLog(mem)
    log.start()
    mem.write(10 * PAGE_SIZE + 7, b"a")
    mem.write(10 * PAGE_SIZE + 9, b"b")
    mem.write_u32(10 * PAGE_SIZE, 5)
    assert log.faults == 1 and log.dirty_pages == 1
    dirty = log.sync()
    assert list(dirty) == [(10, 11)] and log.syncs == 1
    assert log.dirty_pages == 0 and not log.peek()
    mem.write(10 * PAGE_SIZE, b"c")  # protected again after the sync
    assert log.faults == 2 and list(log.sync()) == [(10, 11)]


def test_ranges_not_pages_for_large_and_unaligned_writes(mem):
    log = DirtyLog(mem)
    log.start()
    mem.write(PAGE_SIZE - 1, b"xy")  # straddles pages 0 and 1
    mem.fill(8 * PAGE_SIZE, 64 * PAGE_SIZE, 0xAA)
    mem.discard(100 * PAGE_SIZE, 4 * PAGE_SIZE)  # a discard changes contents too
    assert list(log.sync()) == [(0, 2), (8, 72), (100, 104)]


def test_device_side_writes_dirty_too(mem):
    """A used-ring update is a GuestMemory write like any other (QEMU logs it as well)."""
    log = DirtyLog(mem)
    log.start()
    used_idx_gpa = 2 * MIB + 2
    mem.write_u16(used_idx_gpa, 1)
    assert (used_idx_gpa >> 12) in log.peek()


def test_view_writes_bypass_the_log(mem):
    """A raw view is how tests model a write the log cannot see (the checker must catch it)."""
    log = DirtyLog(mem)
    log.start()
    mem.view(0, 16)[:4] = b"oops"
    assert log.dirty_pages == 0


def test_huge_guest_sparse_writes_stay_small():
    """32 Ki scattered writes into 1 TiB: one range each, logged in well under a second."""
    with GuestMemory.create(1 << 40) as big:
        log = DirtyLog(big)
        log.start()
        stride = (1 << 40) // (1 << 15)
        t = time.perf_counter()
        for i in range(1 << 15):
            big.write_u64(i * stride + 8, i)
        elapsed = time.perf_counter() - t
        dirty = log.sync()
        assert len(dirty) == 1 << 15 and dirty.total == 1 << 15
        assert isinstance(dirty, RangeSet)
        assert elapsed < 5, elapsed
