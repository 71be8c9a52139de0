"""GuestMemory: bounds checks that touch nothing, sparse memfds, real holes, fds from a peer."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import GuestMemoryError, UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory, MemoryRegion

MIB = 1 << 20
BASE = 0x10_0000
HOLE = (BASE + 16 * PAGE_SIZE, 4 * PAGE_SIZE)  # pages 16..19 of the RAM are not RAM
RAM = 32 * PAGE_SIZE


@pytest.fixture
def mem():
    """128 KiB of RAM at 1 MiB with a 16 KiB hole: regions [1M, 1M+64K) and [1M+80K, 1M+128K)."""
    with GuestMemory.create(RAM, base=BASE, holes=[HOLE], name="test-ram") as m:
        yield m


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(f"/memfd:{name} " in line for line in f)


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---- geometry and bounds --------------------------------------------------------------------

def test_regions_exclude_the_hole(mem: GuestMemory) -> None:
    hole_start, hole_len = HOLE
    assert mem.regions == (
        MemoryRegion(BASE, hole_start - BASE, 0),
        MemoryRegion(hole_start + hole_len, BASE + RAM - hole_start - hole_len,
                     hole_start + hole_len - BASE),
    )
    assert mem.size == RAM - hole_len
    assert mem.end == BASE + RAM


@pytest.mark.parametrize(("gpa", "length", "reason"), [
    (BASE - 1, 2, "outside"),                     # starts below RAM
    (0, 1, "outside"),
    (BASE + RAM - 4, 8, "outside"),               # straddles the end
    (BASE + RAM, 1, "outside"),                   # just past the end
    (HOLE[0], 1, "outside"),                      # in the hole
    (HOLE[0] - 2, 4, "outside"),                  # straddles into the hole
    (HOLE[0] + HOLE[1] - 1, 2, "outside"),        # straddles out of the hole
    (-PAGE_SIZE, 8, "negative"),
    (BASE, -1, "negative"),
    ((1 << 64) - 4, 8, "overflows 64 bits"),
    ((1 << 64) + BASE, 4, "overflows 64 bits"),
])
def test_out_of_bounds_raises_and_touches_nothing(mem: GuestMemory, gpa: int, length: int,
                                                  reason: str) -> None:
    mem.write(BASE + RAM - 8, b"\x5a" * 8)
    mem.write(HOLE[0] - 8, b"\xa5" * 8)
    before = [mem.read(r.gpa, r.size) for r in mem.regions]
    calls: list[tuple[int, int]] = []
    mem.add_write_observer(lambda g, n: calls.append((g, n)))
    ops = [mem.read, mem.check, mem.view, lambda g, n: mem.fill(g, n, 0xEE)]
    if length >= 0:
        ops.append(lambda g, n: mem.write(g, b"\xee" * n))
    for op in ops:
        with pytest.raises(GuestMemoryError, match=reason) as info:
            op(gpa, length)
        assert (info.value.gpa, info.value.length) == (gpa, length)
    assert not mem.contains(gpa, length)
    assert [mem.read(r.gpa, r.size) for r in mem.regions] == before, "a failed access wrote"
    assert calls == [], "observers saw a write that did not happen"


def test_error_names_the_access(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError) as info:
        mem.write(BASE + RAM - 4, bytes(8))
    assert (info.value.gpa, info.value.length) == (BASE + RAM - 4, 8)
    assert f"{BASE + RAM - 4:#x}" in str(info.value)


def test_failed_write_straddling_the_end_loses_nothing(mem: GuestMemory) -> None:
    tail = BASE + RAM - PAGE_SIZE
    pattern = bytes(range(256)) * (PAGE_SIZE // 256)
    mem.write(tail, pattern)
    allocated = mem.allocated_bytes()
    with pytest.raises(GuestMemoryError):
        mem.write(tail + 100, b"\xff" * PAGE_SIZE)  # 100 bytes short of fitting
    assert mem.read(tail, PAGE_SIZE) == pattern
    assert mem.allocated_bytes() == allocated


def test_access_across_the_hole_boundary_within_ram(mem: GuestMemory) -> None:
    """Right up to the hole and right after it is RAM; zero-length at a RAM address is fine."""
    mem.write(HOLE[0] - 4, b"abcd")
    mem.write(HOLE[0] + HOLE[1], b"efgh")
    assert mem.read(HOLE[0] - 4, 4) == b"abcd"
    assert mem.read(HOLE[0] + HOLE[1], 4) == b"efgh"
    assert mem.read(BASE, 0) == b""
    assert mem.contains(BASE, RAM // 4) and not mem.contains(BASE, RAM)


def test_integers_are_little_endian(mem: GuestMemory) -> None:
    mem.write_u16(BASE, 0x1234)
    mem.write_u32(BASE + 2, 0x89AB_CDEF)
    mem.write_u64(BASE + 6, 0x0102_0304_0506_0708)
    assert mem.read(BASE, 14) == bytes.fromhex("3412" "efcdab89" "0807060504030201")
    assert (mem.read_u16(BASE), mem.read_u32(BASE + 2), mem.read_u64(BASE + 6)) == (
        0x1234, 0x89AB_CDEF, 0x0102_0304_0506_0708)
    with pytest.raises(GuestMemoryError):
        mem.read_u64(BASE + RAM - 4)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(HOLE[0] - 2, 0)


def test_fill(mem: GuestMemory) -> None:
    mem.fill(BASE + 10, 5000, 0xAA)
    assert mem.read(BASE + 9, 5002) == b"\x00" + b"\xaa" * 5000 + b"\x00"


@pytest.mark.parametrize(("size", "base", "holes"), [
    (0, 0, ()), (PAGE_SIZE + 1, 0, ()), (PAGE_SIZE, 1, ()),
    (4 * PAGE_SIZE, 0, [(1, PAGE_SIZE)]), (4 * PAGE_SIZE, 0, [(0, 5 * PAGE_SIZE)]),
    (4 * PAGE_SIZE, PAGE_SIZE, [(0, PAGE_SIZE)]),
])
def test_create_rejects_bad_geometry(size: int, base: int, holes: list) -> None:
    with pytest.raises(UsageError):
        GuestMemory.create(size, base=base, holes=holes)


# ---- sparse RAM and discard -------------------------------------------------------------------

def test_one_tib_guest_costs_nothing_until_written() -> None:
    rss = _rss()
    with GuestMemory.create(1 << 40, name="test-tib") as m:
        assert m.size == 1 << 40
        assert m.allocated_bytes() == 0
        m.write(0x80_0000_0000, b"\x01" * PAGE_SIZE)
        assert m.allocated_bytes() == PAGE_SIZE
        assert list(m.data_ranges()) == [(0x80_0000_0000, 0x80_0000_0000 + PAGE_SIZE)]
        assert _rss() - rss < 16 * MIB, "a 1 TiB guest must not be resident"
        # shmem has no zero page: a read of a hole returns zeros but allocates the page
        assert m.read((1 << 40) - PAGE_SIZE, 16) == bytes(16)
        assert m.allocated_bytes() == 2 * PAGE_SIZE


def test_discard_punches_a_real_hole() -> None:
    fd = os.memfd_create("test-discard", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE_SIZE)
    with GuestMemory.from_fds([(fd, MemoryRegion(0x4000_0000, 16 * PAGE_SIZE))]) as m:
        m.fill(0x4000_0000, 16 * PAGE_SIZE, 0x77)
        blocks = os.fstat(fd).st_blocks
        assert blocks * 512 == m.allocated_bytes() == 16 * PAGE_SIZE
        m.discard(0x4000_0000 + 5 * PAGE_SIZE, 3 * PAGE_SIZE)
        assert (blocks - os.fstat(fd).st_blocks) * 512 == 3 * PAGE_SIZE
        assert m.allocated_bytes() == 13 * PAGE_SIZE
        g = 0x4000_0000
        assert list(m.data_ranges()) == [(g, g + 5 * PAGE_SIZE),
                                         (g + 8 * PAGE_SIZE, g + 16 * PAGE_SIZE)]
        assert m.read(g + 4 * PAGE_SIZE, PAGE_SIZE) == b"\x77" * PAGE_SIZE
        assert m.read(g + 8 * PAGE_SIZE, PAGE_SIZE) == b"\x77" * PAGE_SIZE
        assert m.read(g + 5 * PAGE_SIZE, 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)  # re-allocates


@pytest.mark.parametrize(("offset", "length"), [
    (1, PAGE_SIZE), (0, PAGE_SIZE - 1), (PAGE_SIZE // 2, PAGE_SIZE), (0, 1),
])
def test_misaligned_discard_is_rejected(mem: GuestMemory, offset: int, length: int) -> None:
    mem.fill(BASE, PAGE_SIZE * 2, 0x33)
    with pytest.raises(GuestMemoryError, match="aligned"):
        mem.discard(BASE + offset, length)
    assert mem.read(BASE, PAGE_SIZE * 2) == b"\x33" * PAGE_SIZE * 2
    assert mem.allocated_bytes() == 2 * PAGE_SIZE


def test_discard_outside_ram_is_rejected_whole(mem: GuestMemory) -> None:
    mem.fill(HOLE[0] - PAGE_SIZE, PAGE_SIZE, 0x44)
    with pytest.raises(GuestMemoryError):
        mem.discard(HOLE[0] - PAGE_SIZE, 2 * PAGE_SIZE)  # second page is the hole
    assert mem.read(HOLE[0] - PAGE_SIZE, PAGE_SIZE) == b"\x44" * PAGE_SIZE


_RAM_PAGES = [p for p in range(RAM // PAGE_SIZE)
              if not HOLE[0] <= BASE + p * PAGE_SIZE < HOLE[0] + HOLE[1]]


def _run(first: int, count: int) -> list[int]:
    """Up to ``count`` consecutive RAM pages from ``first``, stopping at a hole or the end."""
    run = [first]
    while len(run) < count and run[-1] + 1 in _RAM_PAGES:
        run.append(run[-1] + 1)
    return run


def _pages(ranges) -> set[int]:
    out: set[int] = set()
    for start, end in ranges:
        assert start < end and start % PAGE_SIZE == 0 and end % PAGE_SIZE == 0
        out.update(range((start - BASE) // PAGE_SIZE, (end - BASE) // PAGE_SIZE))
    return out


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "discard"]), st.sampled_from(_RAM_PAGES),
                              st.integers(min_value=1, max_value=4)), max_size=25),
       window=st.tuples(st.sampled_from(_RAM_PAGES), st.integers(min_value=1, max_value=8)))
def test_data_ranges_match_a_model(ops: list[tuple[str, int, int]],
                                   window: tuple[int, int]) -> None:
    """Random page writes and discards: data_ranges() reports exactly the written pages."""
    model: set[int] = set()
    with GuestMemory.create(RAM, base=BASE, holes=[HOLE]) as m:
        for op, first, count in ops:
            run = _run(first, count)
            if op == "write":
                for page in run:  # one byte makes the whole page data
                    m.write(BASE + page * PAGE_SIZE + 7, b"\x01")
                model.update(run)
            else:
                m.discard(BASE + run[0] * PAGE_SIZE, len(run) * PAGE_SIZE)
                model.difference_update(run)
        ranges = list(m.data_ranges())
        assert ranges == sorted(ranges)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert _pages(ranges) == model
        assert m.allocated_bytes() == len(model) * PAGE_SIZE
        first, count = window
        lo, hi = BASE + first * PAGE_SIZE, BASE + (first + count) * PAGE_SIZE
        inside = {p for p in model if first <= p < first + count}
        assert _pages(m.data_ranges(lo, hi - lo)) == inside


# ---- fds from a peer (vhost-user SET_MEM_TABLE) ------------------------------------------------

UA = 0x7F00_0000_0000
GPA_HIGH = 0x1_0000_0000
HIGH_OFFSET = MIB + PAGE_SIZE + 0x10
"""File offset of the high region: not a multiple of the mmap granularity."""


def _peer_memfd(size: int = 3 * MIB) -> int:
    fd = os.memfd_create("test-peer", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _peer_regions(fd_a: int, fd_b: int) -> list[tuple[int, MemoryRegion]]:
    """Low RAM at gpa 0 = file [0, 2 MiB); high RAM at 4 GiB = 1 MiB of file at HIGH_OFFSET.

    The two overlap in the file (an alias, as when a front-end maps one memfd twice), and the
    high region's mmap_offset is not page aligned.
    """
    return [
        (fd_a, MemoryRegion(0, 2 * MIB, fd_offset=0, user_addr=UA)),
        (fd_b, MemoryRegion(GPA_HIGH, MIB, fd_offset=HIGH_OFFSET, user_addr=UA + 0x1000_0000)),
    ]


@pytest.mark.parametrize("same_fd", [False, True], ids=["dup-fds", "one-fd-twice"])
def test_from_fds_maps_a_peers_regions(same_fd: bool) -> None:
    fd = _peer_memfd()
    fd_b = fd if same_fd else os.dup(fd)
    m = GuestMemory.from_fds(_peer_regions(fd, fd_b))
    try:
        assert [r.gpa for r in m.regions] == [0, GPA_HIGH] and m.size == 3 * MIB
        # the file and both mappings see the same bytes
        m.write(HIGH_OFFSET + 8, b"via-low")  # low gpa == file offset
        assert m.read(GPA_HIGH + 8, 7) == b"via-low"
        assert os.pread(fd, 7, HIGH_OFFSET + 8) == b"via-low"
        m.write(GPA_HIGH + MIB - 4, b"end!")
        assert os.pread(fd, 4, HIGH_OFFSET + MIB - 4) == b"end!"
        os.pwrite(fd, b"via-file", 2 * MIB + 16)
        assert m.read(GPA_HIGH + 2 * MIB + 16 - HIGH_OFFSET, 8) == b"via-file"
        # front-end virtual addresses translate per region
        assert m.user_to_gpa(UA) == 0
        assert m.user_to_gpa(UA + 2 * MIB - 1) == 2 * MIB - 1
        assert m.user_to_gpa(UA + 0x1000_0000 + 0x123) == GPA_HIGH + 0x123
        for bad in (UA - 1, UA + 2 * MIB, UA + 0x1000_0000 + MIB):
            with pytest.raises(GuestMemoryError):
                m.user_to_gpa(bad)
        with pytest.raises(GuestMemoryError):
            m.read(2 * MIB, 1)
    finally:
        m.close()
    assert not _fd_is_open(fd) and not _fd_is_open(fd_b)


def test_reads_and_writes_span_adjacent_regions() -> None:
    fd = _peer_memfd(2 * MIB)
    regions = [(fd, MemoryRegion(0, MIB)), (os.dup(fd), MemoryRegion(MIB, MIB, fd_offset=MIB))]
    with GuestMemory.from_fds(regions) as m:
        m.write(MIB - 3, b"abcdef")
        assert m.read(MIB - 3, 6) == b"abcdef"
        with pytest.raises(GuestMemoryError, match="more than one region"):
            m.view(MIB - 3, 6)


@pytest.mark.parametrize("region", [
    MemoryRegion(0, 0),                                  # empty
    MemoryRegion(0, 4 * MIB),                            # longer than the file
    MemoryRegion(0, MIB, fd_offset=3 * MIB),             # past the end of the file
    MemoryRegion((1 << 64) - MIB, 2 * MIB),              # wraps 64 bits
], ids=["empty", "too-long", "offset-past-end", "wraps"])
def test_from_fds_rejects_bad_regions_and_closes_the_fd(region: MemoryRegion) -> None:
    fd = _peer_memfd()
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_fds([(fd, region)])
    assert not _fd_is_open(fd)


def test_from_fds_rejects_overlapping_regions() -> None:
    fd = _peer_memfd()
    fd_b = os.dup(fd)
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory.from_fds([(fd, MemoryRegion(0, MIB)), (fd_b, MemoryRegion(MIB // 2, MIB))])
    assert not _fd_is_open(fd) and not _fd_is_open(fd_b)


# ---- observers, views, lifetime -----------------------------------------------------------

def test_write_observers_see_write_fill_and_discard(mem: GuestMemory) -> None:
    calls: list[tuple[int, int]] = []

    def observer(gpa: int, length: int) -> None:
        calls.append((gpa, length))

    mem.add_write_observer(observer)
    mem.write(BASE + 1, b"xyz")
    mem.write_u32(BASE + 8, 7)
    mem.fill(BASE + PAGE_SIZE, 100, 1)
    mem.discard(BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE)
    with pytest.raises(GuestMemoryError):
        mem.discard(BASE + 1, PAGE_SIZE)
    mem.read(BASE, 16)
    assert calls == [(BASE + 1, 3), (BASE + 8, 4), (BASE + PAGE_SIZE, 100),
                     (BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE)]
    mem.remove_write_observer(observer)
    mem.write(BASE, b"q")
    assert len(calls) == 4


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    v = mem.view(BASE + 100, 8)
    try:
        assert isinstance(v, memoryview) and len(v) == 8 and not v.readonly
        v[:] = b"12345678"
        assert mem.read(BASE + 100, 8) == b"12345678"
        mem.write(BASE + 104, b"ABCD")
        assert bytes(v) == b"1234ABCD"
    finally:
        v.release()
    with pytest.raises(GuestMemoryError):
        mem.view(HOLE[0] - 4, 8)


def test_close_unmaps_and_closes() -> None:
    fd = _peer_memfd(MIB)
    m = GuestMemory.from_fds([(fd, MemoryRegion(0, MIB))])
    m2 = GuestMemory.create(MIB, name="test-close")
    assert _mapped("test-close")
    m.close()
    m2.close()
    m2.close()  # idempotent
    assert not _fd_is_open(fd)
    assert not _mapped("test-close")


def test_writes_through_a_view_are_reported_with_mark_written(mem: GuestMemory) -> None:
    calls: list[tuple[int, int]] = []
    assert not mem.write_observers
    mem.mark_written(BASE, 8)  # no observers: nothing to do
    mem.add_write_observer(lambda g, n: calls.append((g, n)))
    assert len(mem.write_observers) == 1
    v = mem.view(BASE + 64, 4)
    v[:] = b"used"
    v.release()
    assert calls == [], "a view write is invisible until marked"
    mem.mark_written(BASE + 64, 4)
    assert calls == [(BASE + 64, 4)]
