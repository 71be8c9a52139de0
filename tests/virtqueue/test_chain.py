"""DescriptorChain.read / write across segments, limits and offsets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import UsageError
from virtqueue.chain import DescriptorChain, Segment
from virtqueue.memory import GuestMemory

READABLE = (Segment(0x1000, 3), Segment(0x2000, 5), Segment(0x1800, 2))
WRITABLE = (Segment(0x3000, 4), Segment(0x4000, 1), Segment(0x5000, 6))
CHAIN = DescriptorChain(9, READABLE, WRITABLE, 10, 11, False)


@pytest.fixture(scope="module")
def memory():
    with GuestMemory.create(0x10000) as m:
        m.write(0x1000, b"abc")
        m.write(0x2000, b"defgh")
        m.write(0x1800, b"ij")
        yield m


def test_read_concatenates_in_chain_order(memory) -> None:
    assert CHAIN.read(memory) == b"abcdefghij"
    assert CHAIN.read(memory, limit=4) == b"abcd"
    assert CHAIN.read(memory, limit=0) == b""
    assert CHAIN.read(memory, limit=100) == b"abcdefghij"
    with pytest.raises(UsageError):
        CHAIN.read(memory, limit=-1)


@settings(max_examples=100)
@given(data=st.binary(max_size=16), offset=st.integers(0, 13))
def test_write_fills_writable_space_from_offset(memory, data: bytes, offset: int) -> None:
    for seg in WRITABLE:
        memory.fill(seg.addr, seg.len, 0)
    n = CHAIN.write(memory, data, offset)
    assert n == max(0, min(len(data), CHAIN.writable_len - offset))
    space = b"".join(memory.read(s.addr, s.len) for s in WRITABLE)
    expected = bytearray(CHAIN.writable_len)
    expected[offset:offset + n] = data[:n]
    assert space == bytes(expected)


def test_chain_is_an_immutable_value() -> None:
    with pytest.raises(AttributeError):
        CHAIN.head = 1  # type: ignore[misc]
    assert CHAIN.segments == READABLE + WRITABLE and CHAIN.violation is None
    assert Segment(4, 5).end == 9 and hash(CHAIN) == hash(CHAIN._replace())
    with pytest.raises(UsageError):
        CHAIN.write(None, b"x", -1)  # type: ignore[arg-type]
