"""protocol.vhost_user: layout sizes and bit positions from the vhost-user document, round trips."""

from __future__ import annotations

import pytest
from construct import Container
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.vhost_user import (
    HEADER_SIZE,
    MAX_MEM_REGIONS,
    REPLY_FLAGS,
    REPLY_PAYLOAD,
    REQUEST_PAYLOAD,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    Header,
    HeaderFlags,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VhostUserConfig,
    VringAddr,
    VringFd,
    VringState,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_fixed_sizes_match_the_document():
    assert Header.sizeof() == HEADER_SIZE == 12
    assert U64.sizeof() == 8
    assert VringState.sizeof() == 8
    assert VringAddr.sizeof() == 40
    assert MemoryRegionDesc.sizeof() == 32
    assert SingleMemoryRegion.sizeof() == 40
    assert VringFd.sizeof() == 8


def test_memory_table_is_8_plus_32_per_region():
    region = dict(guest_phys_addr=0, memory_size=1, userspace_addr=0, mmap_offset=0)
    for n in (1, 2, MAX_MEM_REGIONS):
        assert len(MemoryTable.build(dict(nregions=n, regions=[region] * n))) == 8 + 32 * n
    assert MAX_MEM_REGIONS == 8


def test_header_is_little_endian_request_flags_size():
    raw = Header.build(dict(request=FrontendRequest.SET_MEM_TABLE, flags=0x9, size=72))
    assert raw == bytes([5, 0, 0, 0, 9, 0, 0, 0, 72, 0, 0, 0])


def test_reply_flags_are_version_1_plus_reply():
    assert REPLY_FLAGS == 0x5
    assert HeaderFlags.NEED_REPLY == 0x8
    assert HeaderFlags.VERSION_1 & HeaderFlags.VERSION_MASK == 1


def test_vring_addr_field_order_puts_used_before_avail():
    raw = VringAddr.build(dict(index=1, flags=0, desc=0x10, used=0x20, avail=0x30, log=0x40))
    assert raw[8:16] == (0x10).to_bytes(8, "little")
    assert raw[16:24] == (0x20).to_bytes(8, "little")  # used
    assert raw[24:32] == (0x30).to_bytes(8, "little")  # avail


def test_vring_fd_bits():
    parsed = VringFd.parse((VRING_NOFD_MASK | 3).to_bytes(8, "little"))
    assert (parsed.index, parsed.nofd, parsed.reserved) == (3, True, 0)
    parsed = VringFd.parse((0x2FF).to_bytes(8, "little"))  # bit 9: reserved
    assert (parsed.index, parsed.nofd, parsed.reserved) == (VRING_IDX_MASK, False, 1)
    assert VringFd.build(dict(reserved=0, nofd=False, index=7)) == (7).to_bytes(8, "little")


def test_memory_table_tolerates_the_unused_tail_linux_sends():
    region = dict(guest_phys_addr=0x1000, memory_size=0x2000, userspace_addr=0x1000,
                  mmap_offset=0x1000)
    one = MemoryTable.build(dict(nregions=1, regions=[region]))
    parsed = MemoryTable.parse(one + bytes(32))  # Linux 6.1 UML: size 72 for one region
    assert parsed.nregions == 1
    assert parsed.regions[0].memory_size == 0x2000


def test_codes_and_bits_from_the_document():
    assert FrontendRequest.SET_BACKEND_REQ_FD == 21
    assert FrontendRequest.GET_CONFIG == 24
    assert FrontendRequest.VRING_KICK == 35
    assert FrontendRequest.CHECK_DEVICE_STATE == 43
    assert BackendRequest.BACKEND_CONFIG_CHANGE_MSG == 2
    assert BackendRequest.BACKEND_VRING_CALL == 4
    assert (ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG,
            ProtocolFeature.INBAND_NOTIFICATIONS) == (3, 5, 9, 14)
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert len(FrontendRequest) == 43 and len(ProtocolFeature) == 20


def test_every_reply_request_has_a_request_layout():
    assert set(REPLY_PAYLOAD) <= set(REQUEST_PAYLOAD)


@settings(max_examples=50)
@given(request=u32, flags=u32, size=u32)
def test_header_round_trip(request, flags, size):
    value = dict(request=request, flags=flags, size=size)
    assert Header.parse(Header.build(value)) == Container(value)


@settings(max_examples=50)
@given(index=u32, flags=u32, desc=u64, used=u64, avail=u64, log=u64)
def test_vring_addr_round_trip(index, flags, desc, used, avail, log):
    value = dict(index=index, flags=flags, desc=desc, used=used, avail=avail, log=log)
    assert VringAddr.parse(VringAddr.build(value)) == Container(value)


@settings(max_examples=50)
@given(raw=u64)
def test_vring_fd_round_trip_and_masks(raw):
    data = raw.to_bytes(8, "little")
    parsed = VringFd.parse(data)
    assert parsed.index == raw & VRING_IDX_MASK
    assert parsed.nofd == bool(raw & VRING_NOFD_MASK)
    assert parsed.reserved == raw >> 9
    assert VringFd.build(parsed) == data


@settings(max_examples=30)
@given(regions=st.lists(st.tuples(u64, u64, u64, u64), min_size=1, max_size=MAX_MEM_REGIONS))
def test_memory_table_round_trip(regions):
    value = dict(nregions=len(regions), regions=[
        dict(guest_phys_addr=a, memory_size=b, userspace_addr=c, mmap_offset=d)
        for a, b, c, d in regions])
    raw = MemoryTable.build(value)
    parsed = MemoryTable.parse(raw)
    assert parsed.nregions == len(regions)
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in parsed.regions] == regions
    assert MemoryTable.build(parsed) == raw


@settings(max_examples=30)
@given(offset=u32, flags=u32, payload=st.binary(max_size=256))
def test_config_round_trip(offset, flags, payload):
    value = dict(offset=offset, size=len(payload), flags=flags, payload=payload)
    raw = VhostUserConfig.build(value)
    assert len(raw) == 12 + len(payload)
    assert VhostUserConfig.parse(raw) == Container(value)


@pytest.mark.parametrize("layout", [U64, VringState, VringAddr, SingleMemoryRegion, VringFd])
def test_fixed_layouts_reject_short_input(layout):
    from construct import StreamError

    with pytest.raises(StreamError):
        layout.parse(bytes(layout.sizeof() - 1))
