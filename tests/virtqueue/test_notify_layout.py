"""vring_need_event and the suppression helpers; ring placement; compiled structs vs construct."""

from __future__ import annotations

import pytest
from construct import Int16ul
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import UsageError
from protocol.split_ring import (
    VirtqDesc,
    VirtqUsedElem,
    avail_ring,
    avail_size,
    desc_table_size,
    used_ring,
    used_size,
    vring_size,
    vring_used_offset,
)
from virtqueue.layout import DESC, U16, USED_ELEM, is_queue_size, legacy_layout, split_layout
from virtqueue.notify import interrupt_needed, kick_needed, vring_need_event

u16 = st.integers(0, 0xFFFF)
SIZES = [1 << k for k in range(16)]


def naive(event: int, new: int, old: int) -> bool:
    return any((old + k) & 0xFFFF == event for k in range((new - old) & 0xFFFF))


@pytest.mark.parametrize(("event", "new", "old", "expected"), [
    (0, 1, 0, True),  # the first entry written is the one asked for
    (1, 1, 0, False),  # event is the *next* entry: not yet
    (0, 0, 0, False),  # nothing moved
    (7, 7, 7, False),
    (5, 9, 5, True),  # event == old is included
    (9, 9, 5, False),  # event == new is not
    (4, 9, 5, False),  # event just before old
    (0xFFFF, 0, 0xFFFF, True),  # across the wrap
    (0, 1, 0xFFFF, True),
    (1, 1, 0xFFFF, False),
    (0xFFFE, 2, 0xFFFD, True),
    (0xFFFC, 2, 0xFFFD, False),
    (3, 2, 3, True),  # moved by 0xFFFF: every index but new itself
    (2, 2, 3, False),
])
def test_vring_need_event_boundaries(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected
    assert naive(event, new, old) is expected


def test_used_event_zero_notifies_after_the_first_and_the_65537th_buffer() -> None:
    """The spec's own example (§2.7.7.2, SPL-V-8), one used entry at a time."""
    hits = [n for n in range(1, 65538 + 1) if vring_need_event(0, n & 0xFFFF, (n - 1) & 0xFFFF)]
    assert hits == [1, 65537]


@settings(max_examples=400)
@given(event=u16, new=u16, step=st.integers(0, 64))
def test_vring_need_event_is_event_in_old_to_new(event: int, new: int, step: int) -> None:
    old = (new - step) & 0xFFFF
    assert vring_need_event(event, new, old) == naive(event, new, old)


def test_kick_and_interrupt_follow_flags_without_event_idx() -> None:
    assert kick_needed(event_idx=False, used_flags=0, avail_event=99, old=0, new=1)
    assert not kick_needed(event_idx=False, used_flags=1, avail_event=0, old=0, new=1)
    assert interrupt_needed(event_idx=False, avail_flags=0, used_event=99, old=0, new=1)
    assert not interrupt_needed(event_idx=False, avail_flags=1, used_event=0, old=0, new=1)
    assert not interrupt_needed(event_idx=False, avail_flags=0, used_event=0, old=4, new=4)


def test_kick_and_interrupt_ignore_flags_with_event_idx() -> None:
    assert kick_needed(event_idx=True, used_flags=1, avail_event=3, old=3, new=4)
    assert not kick_needed(event_idx=True, used_flags=0, avail_event=4, old=3, new=4)
    assert interrupt_needed(event_idx=True, avail_flags=1, used_event=3, old=2, new=5)
    assert not interrupt_needed(event_idx=True, avail_flags=0, used_event=5, old=2, new=5)


# ---- placement -------------------------------------------------------------------------------

@pytest.mark.parametrize("align", [4, 16, 4096, 65536])
@pytest.mark.parametrize("size", SIZES)
def test_legacy_layout_is_linux_vring_size(size: int, align: int) -> None:
    desc, avail, used, total = legacy_layout(0x100000, size, align)
    assert (desc, avail) == (0x100000, 0x100000 + 16 * size)
    assert used - desc == vring_used_offset(size, align) and used % align == 0
    assert total == vring_size(size, align)
    assert avail + avail_size(size) <= used  # the avail ring, used_event included, fits
    assert used + used_size(size) == desc + total


@pytest.mark.parametrize(("size", "used_offset", "total"), [
    (64, 4096, 4614), (128, 4096, 5126), (256, 8192, 10246), (1024, 20480, 28678)])
def test_legacy_layout_worked_sizes(size: int, used_offset: int, total: int) -> None:
    """research/spec.md §2.1's table for align = 4096."""
    desc, _, used, got_total = legacy_layout(0, size)
    assert (used - desc, got_total) == (used_offset, total)


@pytest.mark.parametrize("base", [0, 1, 15, 16, 0x1002])
@pytest.mark.parametrize("size", SIZES)
def test_split_layout_packs_with_minimum_alignment(size: int, base: int) -> None:
    desc, avail, used, total = split_layout(base, size)
    assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0
    assert base <= desc < base + 16
    assert avail == desc + desc_table_size(size)
    assert avail + avail_size(size) <= used < avail + avail_size(size) + 4
    assert base + total == used + used_size(size)


@pytest.mark.parametrize("call", [
    lambda: legacy_layout(0, 3), lambda: legacy_layout(0, 65536), lambda: legacy_layout(8, 16),
    lambda: legacy_layout(0, 16, 100), lambda: split_layout(-1, 16), lambda: split_layout(0, 0),
])
def test_layout_rejects_bad_arguments(call) -> None:
    with pytest.raises(UsageError):
        call()


def test_is_queue_size() -> None:
    assert [n for n in range(40000) if is_queue_size(n)] == SIZES
    assert not is_queue_size(4.0)


# ---- compiled structs == construct declarations ----------------------------------------------

@settings(max_examples=200)
@given(addr=st.integers(0, (1 << 64) - 1), length=st.integers(0, (1 << 32) - 1), flags=u16,
       nxt=u16)
def test_desc_struct_equals_construct(addr: int, length: int, flags: int, nxt: int) -> None:
    built = VirtqDesc.build({"addr": addr, "len": length, "flags": flags, "next": nxt})
    assert DESC.pack(addr, length, flags, nxt) == built
    assert DESC.unpack(built) == (addr, length, flags, nxt)
    assert DESC.size == VirtqDesc.sizeof() == 16


@settings(max_examples=200)
@given(head=st.integers(0, (1 << 32) - 1), length=st.integers(0, (1 << 32) - 1), value=u16)
def test_used_elem_and_u16_structs_equal_construct(head: int, length: int, value: int) -> None:
    assert USED_ELEM.pack(head, length) == VirtqUsedElem.build({"id": head, "len": length})
    assert USED_ELEM.size == VirtqUsedElem.sizeof() == 8
    assert U16.pack(value) == Int16ul.build(value) and U16.size == 2


@settings(max_examples=50)
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8]))
def test_ring_offsets_equal_construct(data, size: int) -> None:
    """The offsets the ends use (idx at 2, ring at 4, events after ring[N]) match construct."""
    flags, idx, event = data.draw(u16), data.draw(u16), data.draw(u16)
    ring = data.draw(st.lists(u16, min_size=size, max_size=size))
    avail = avail_ring(size).build({"flags": flags, "idx": idx, "ring": ring,
                                    "used_event": event})
    assert avail == U16.pack(flags) + U16.pack(idx) + b"".join(map(U16.pack, ring)) + \
        U16.pack(event)
    elems = data.draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                               min_size=size, max_size=size))
    used = used_ring(size).build({"flags": flags, "idx": idx,
                                  "ring": [{"id": i, "len": n} for i, n in elems],
                                  "avail_event": event})
    assert used == U16.pack(flags) + U16.pack(idx) + b"".join(
        USED_ELEM.pack(i, n) for i, n in elems) + U16.pack(event)
