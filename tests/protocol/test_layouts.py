"""Round trips of every construct layout in protocol/, and the balloon's size and numbering rules.

Each layout is parsed from and built back to a hand-written hex sample (the values written out
by hand from the spec's field order, so a swapped field or a wrong width fails), then checked
with hypothesis: any byte string of the right size survives ``build(parse(b)) == b`` (padding
excepted: construct's ``Padding`` builds zeros, so those bytes are zero in the generated input).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import construct
import pytest
from construct import Construct, Container, ListContainer, SizeofError
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import vhost_user
from protocol.balloon import (
    BalloonConfig,
    BalloonQueue,
    ConfigOffset,
    StatRecord,
    StatTag,
    config_size,
    queue_numbering,
)
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from protocol.packed_ring import EventFlags, PackedDesc, PackedDescFlags, PackedEventSuppress
from protocol.split_ring import (
    DescFlags,
    VirtqDesc,
    VirtqUsedElem,
    avail_ring,
    avail_size,
    used_ring,
    used_size,
)
from protocol.status import DeviceStatus, StatusByte


def plain(obj: Any) -> Any:
    """A parsed construct value as plain dicts and lists, without construct's ``_io`` keys."""
    if isinstance(obj, Container):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, ListContainer | list):
        return [plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Sample:
    """A layout, a hand-written wire image and the values it holds."""

    name: str
    layout: Construct
    hex: str
    value: Any
    padding: tuple[tuple[int, int], ...] = ()
    """Byte ranges construct drops on parse and builds as zeros."""

    @property
    def data(self) -> bytes:
        return bytes.fromhex(self.hex)


SAMPLES: tuple[Sample, ...] = (
    # ---- split ring (§2.7) ----
    Sample("split_ring.VirtqDesc", VirtqDesc,
           "0060452301000000" "00100000" "0300" "0700",
           {"addr": 0x1_2345_6000, "len": 0x1000, "flags": DescFlags.NEXT | DescFlags.WRITE,
            "next": 7}),
    Sample("split_ring.VirtqUsedElem", VirtqUsedElem, "05000000" "00020000",
           {"id": 5, "len": 0x200}),
    Sample("split_ring.avail_ring(4)", avail_ring(4),
           "0100" "3412" "0000" "0100" "0200" "0300" "0900",
           {"flags": 1, "idx": 0x1234, "ring": [0, 1, 2, 3], "used_event": 9}),
    Sample("split_ring.used_ring(2)", used_ring(2),
           "0100" "0200" "00000000" "10000000" "01000000" "00000000" "ffff",
           {"flags": 1, "idx": 2, "ring": [{"id": 0, "len": 16}, {"id": 1, "len": 0}],
            "avail_event": 0xFFFF}),
    # ---- packed ring (§2.8) ----
    Sample("packed_ring.PackedDesc", PackedDesc,
           "0010000000000000" "10000000" "0300" "8100",
           {"addr": 0x1000, "len": 0x10, "id": 3,
            "flags": PackedDescFlags.AVAIL | PackedDescFlags.NEXT}),
    Sample("packed_ring.PackedEventSuppress", PackedEventSuppress, "0580" "0200",
           {"off_wrap": 0x8005, "flags": EventFlags.DESC}),
    # ---- balloon (§5.5) ----
    Sample("balloon.BalloonConfig", BalloonConfig,
           "00010000" "80000000" "00000080" "aaaaaaaa",
           {"num_pages": 0x100, "actual": 0x80, "free_page_hint_cmd_id": 0x8000_0000,
            "poison_val": 0xAAAA_AAAA}),
    Sample("balloon.StatRecord", StatRecord, "0400" "0000000001000000",
           {"tag": StatTag.MEMFREE, "val": 1 << 32}),
    # ---- status (§2.1) ----
    Sample("status.StatusByte", StatusByte, "0f",
           DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK
           | DeviceStatus.FEATURES_OK),
    # ---- vhost-user (QEMU docs/interop/vhost-user.rst) ----
    Sample("vhost_user.Header", vhost_user.Header, "05000000" "01000000" "48000000",
           {"request": vhost_user.FrontendRequest.SET_MEM_TABLE, "flags": 1, "size": 72}),
    Sample("vhost_user.U64", vhost_user.U64, "0000004001000000", {"u64": 0x1_4000_0000}),
    Sample("vhost_user.VringState", vhost_user.VringState, "01000000" "00010000",
           {"index": 1, "num": 256}),
    Sample("vhost_user.VringAddr", vhost_user.VringAddr,
           "00000000" "01000000" "00100000007f0000" "00200000007f0000" "00180000007f0000"
           "0030000000000000",
           {"index": 0, "flags": 1, "desc": 0x7F00_0000_1000, "used": 0x7F00_0000_2000,
            "avail": 0x7F00_0000_1800, "log": 0x3000}),
    Sample("vhost_user.MemoryRegionDesc", vhost_user.MemoryRegionDesc,
           "0000000000000000" "0000000800000000" "00000000127f0000" "0010000000000000",
           {"guest_phys_addr": 0, "memory_size": 0x800_0000,
            "userspace_addr": 0x7F12_0000_0000, "mmap_offset": 0x1000}),
    Sample("vhost_user.MemoryTable", vhost_user.MemoryTable,
           "02000000" "00000000"
           "0000000000000000" "0000000800000000" "00000000127f0000" "0000000000000000"
           "0000000001000000" "0000100000000000" "00000000137f0000" "0000000800000000",
           {"nregions": 2, "regions": [
               {"guest_phys_addr": 0, "memory_size": 0x800_0000,
                "userspace_addr": 0x7F12_0000_0000, "mmap_offset": 0},
               {"guest_phys_addr": 1 << 32, "memory_size": 0x10_0000,
                "userspace_addr": 0x7F13_0000_0000, "mmap_offset": 0x800_0000}]},
           padding=((4, 8),)),
    Sample("vhost_user.SingleMemoryRegion", vhost_user.SingleMemoryRegion,
           "0000000000000000"
           "0000000001000000" "0000100000000000" "00000000137f0000" "0000000000000000",
           {"region": {"guest_phys_addr": 1 << 32, "memory_size": 0x10_0000,
                       "userspace_addr": 0x7F13_0000_0000, "mmap_offset": 0}},
           padding=((0, 8),)),
    Sample("vhost_user.VhostUserConfig", vhost_user.VhostUserConfig,
           "00000000" "08000000" "00000000" "0001000080000000",
           {"offset": 0, "size": 8, "flags": vhost_user.ConfigFlags.WRITABLE,
            "payload": bytes.fromhex("0001000080000000")}),
    Sample("vhost_user.ConfigHeader", vhost_user.ConfigHeader,
           "04000000" "04000000" "01000000", {"offset": 4, "size": 4, "flags": 1}),
    Sample("vhost_user.VringFd", vhost_user.VringFd, "0101000000000000",
           {"reserved": 0, "nofd": True, "index": 1}),
)


def _fixed_size(layout: Construct) -> int | None:
    try:
        return layout.sizeof()
    except SizeofError:
        return None


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_hex_sample_round_trip(sample: Sample) -> None:
    """parse(hex) gives the hand-written values, build(values) gives the hex back."""
    parsed = sample.layout.parse(sample.data)
    assert plain(parsed) == sample.value
    assert sample.layout.build(sample.value) == sample.data
    assert sample.layout.build(parsed) == sample.data
    size = _fixed_size(sample.layout)
    if size is not None:
        assert size == len(sample.data)


def _discover_layouts() -> dict[str, Construct]:
    """Every module-level construct layout of every protocol/ module, as ``module.Name``."""
    found = {}
    for info in pkgutil.iter_modules(protocol.__path__):
        module = importlib.import_module(f"protocol.{info.name}")
        for attr, value in vars(module).items():
            if attr.startswith("_") or not isinstance(value, Construct):
                continue
            if getattr(construct, attr, None) is value:
                continue  # a construct primitive imported by name (Int32ul ...), not our layout
            found[f"{info.name}.{attr}"] = value
    return found


def test_every_layout_has_a_sample() -> None:
    """A layout added to protocol/ without a hand-written sample here fails, naming it."""
    covered = {id(s.layout) for s in SAMPLES}
    missing = sorted(name for name, layout in _discover_layouts().items()
                     if id(layout) not in covered)
    assert not missing, f"add hex samples to {__file__} for: {missing}"


def _zero(data: bytes, ranges: tuple[tuple[int, int], ...]) -> bytes:
    out = bytearray(data)
    for start, end in ranges:
        out[start:end] = bytes(end - start)
    return bytes(out)


_FIXED = [s for s in SAMPLES if _fixed_size(s.layout) is not None]


@pytest.mark.parametrize("sample", _FIXED, ids=[s.name for s in _FIXED])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_arbitrary_bytes_round_trip(sample: Sample, data: st.DataObject) -> None:
    size = sample.layout.sizeof()
    raw = _zero(data.draw(st.binary(min_size=size, max_size=size)), sample.padding)
    assert sample.layout.build(sample.layout.parse(raw)) == raw


@settings(max_examples=50, deadline=None)
@given(n=st.sampled_from([1, 2, 3, 16, 256]), data=st.data())
def test_ring_layouts_round_trip_any_size(n: int, data: st.DataObject) -> None:
    avail, used = avail_ring(n), used_ring(n)
    assert avail.sizeof() == avail_size(n) and used.sizeof() == used_size(n)
    for layout in (avail, used):
        raw = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof()))
        parsed = layout.parse(raw)
        assert len(parsed.ring) == n
        assert layout.build(parsed) == raw


@settings(max_examples=50, deadline=None)
@given(regions=st.lists(st.binary(min_size=32, max_size=32), max_size=vhost_user.MAX_MEM_REGIONS))
def test_memory_table_round_trip(regions: list[bytes]) -> None:
    raw = len(regions).to_bytes(4, "little") + bytes(4) + b"".join(regions)
    parsed = vhost_user.MemoryTable.parse(raw)
    assert parsed.nregions == len(regions) == len(parsed.regions)
    assert vhost_user.MemoryTable.build(parsed) == raw


@settings(max_examples=50, deadline=None)
@given(head=st.binary(min_size=4, max_size=4), flags=st.binary(min_size=4, max_size=4),
       payload=st.binary(max_size=vhost_user.MAX_CONFIG_SIZE))
def test_vhost_user_config_round_trip(head: bytes, flags: bytes, payload: bytes) -> None:
    raw = head + len(payload).to_bytes(4, "little") + flags + payload
    parsed = vhost_user.VhostUserConfig.parse(raw)
    assert parsed.payload == payload
    assert vhost_user.VhostUserConfig.build(parsed) == raw


def test_padding_is_ignored_and_built_as_zeros() -> None:
    """Padding never reaches the parsed value, so a nonzero pad cannot leak into a reply."""
    raw = bytes.fromhex("01000000" "deadbeef") + bytes(32)
    assert vhost_user.MemoryTable.build(vhost_user.MemoryTable.parse(raw)) == raw[:4] + bytes(36)


def test_status_byte_keeps_undefined_bits() -> None:
    """A driver writing an undefined status bit (0x20) must be visible to a checker."""
    parsed = StatusByte.parse(b"\x23")
    assert int(parsed) == 0x23 and DeviceStatus.DRIVER in parsed
    assert StatusByte.build(parsed) == b"\x23"


# ---- config space size (QEMU virtio_balloon_config_size) ---------------------------------

@pytest.mark.parametrize(("offered", "size"), [
    (0, 8),
    (mask(BalloonFeature.STATS_VQ, BalloonFeature.DEFLATE_ON_OOM, BalloonFeature.REPORTING), 8),
    (bit(BalloonFeature.FREE_PAGE_HINT), 12),
    (bit(BalloonFeature.PAGE_POISON), 16),
    (mask(BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_POISON), 16),
    (mask(BalloonFeature.FREE_PAGE_HINT, TransportFeature.VERSION_1), 12),
])
def test_config_size(offered: int, size: int) -> None:
    assert config_size(offered) == size


def test_config_sizes_end_at_field_boundaries() -> None:
    """8, 12 and 16 are exactly the ends of actual, free_page_hint_cmd_id and poison_val."""
    assert ConfigOffset.ACTUAL + 4 == 8
    assert ConfigOffset.FREE_PAGE_HINT_CMD_ID + 4 == 12
    assert ConfigOffset.POISON_VAL + 4 == 16 == BalloonConfig.sizeof()


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_config_size_depends_only_on_hint_and_poison(offered: int) -> None:
    relevant = offered & mask(BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_POISON)
    assert config_size(offered) == config_size(relevant)


# ---- queue numbering (Linux virtballoon init_vqs, QEMU virtio_balloon_device_realize) -----

Q = BalloonQueue
_NUMBERING = [
    ((), {Q.INFLATE: 0, Q.DEFLATE: 1}),
    (("STATS_VQ",), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2}),
    (("FREE_PAGE_HINT",), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.FREE_PAGE: 2}),
    (("REPORTING",), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.REPORTING: 2}),
    (("STATS_VQ", "FREE_PAGE_HINT"), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2, Q.FREE_PAGE: 3}),
    (("STATS_VQ", "REPORTING"), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2, Q.REPORTING: 3}),
    (("FREE_PAGE_HINT", "REPORTING"),
     {Q.INFLATE: 0, Q.DEFLATE: 1, Q.FREE_PAGE: 2, Q.REPORTING: 3}),
    (("STATS_VQ", "FREE_PAGE_HINT", "REPORTING"),
     {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2, Q.FREE_PAGE: 3, Q.REPORTING: 4}),
]


@pytest.mark.parametrize(("features", "expected"), _NUMBERING,
                         ids=["+".join(f) or "none" for f, _ in _NUMBERING])
@pytest.mark.parametrize("others", [0, mask(BalloonFeature.MUST_TELL_HOST,
                                            BalloonFeature.DEFLATE_ON_OOM,
                                            BalloonFeature.PAGE_POISON,
                                            TransportFeature.VERSION_1)],
                         ids=["alone", "with-other-bits"])
def test_queue_numbering_is_dense(features: tuple[str, ...], expected: dict, others: int) -> None:
    got = queue_numbering(mask(*(BalloonFeature[f] for f in features)) | others)
    assert got == expected
    assert list(got) == sorted(got), "queues are listed in spec order"
