"""sim.qemu.memory: QtestMemory matches QEMU's real RAM map and never sends an access outside it."""

from __future__ import annotations

import re

import pytest

from protocol.errors import GuestMemoryError, UsageError
from sim.qemu.memory import BIOS_HOLE, MAX_BELOW_4G, microvm_ram_regions, read_rss_anon
from sim.qemu.process import QemuMode, QemuOptions, run_qemu

MiB = 1 << 20


def test_microvm_ram_map_below_and_above_4g():
    assert [(r.gpa, r.size) for r in microvm_ram_regions(128 * MiB)] == [
        (0, 0xF0000),
        (0x100000, 127 * MiB),
    ]
    assert [(r.gpa, r.end) for r in microvm_ram_regions(4096 * MiB)] == [
        (0, 0xF0000),
        (0x100000, MAX_BELOW_4G),
        (1 << 32, (1 << 32) + 1024 * MiB),
    ]
    with pytest.raises(UsageError):
        microvm_ram_regions(MiB)


async def _qemu_ram_map(qmp) -> list[tuple[int, int]]:
    """RAM ranges ([start, end)) of QEMU's flattened system memory map, BIOS excluded."""
    text = await qmp.execute("human-monitor-command", {"command-line": "info mtree -f"})
    views = text.split("FlatView #")
    flat = next(v for v in views if ' AS "memory"' in v)  # the system address space
    out = []
    for m in re.finditer(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio \d+, ram\): (\S+)", flat, re.M):
        if m.group(3) == "microvm.ram":
            out.append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    return out


@pytest.mark.peer
@pytest.mark.parametrize(
    ("memory", "mode"),
    [(128 * MiB, QemuMode.PAUSED), (64 * MiB, QemuMode.RUNNING), (4096 * MiB, QemuMode.PAUSED)],
)
async def test_regions_are_exactly_qemus_ram(qemu_binary, memory, mode):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=memory, mode=mode)) as qemu:
        assert [(r.gpa, r.end) for r in qemu.memory.regions] == await _qemu_ram_map(qemu.qmp)
        assert qemu.memory.size == memory - (BIOS_HOLE[1] - BIOS_HOLE[0])


@pytest.mark.peer
async def test_guest_memory_methods_round_trip(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        mem = qemu.memory
        writes = []
        mem.add_write_observer(lambda gpa, n: writes.append((gpa, n)))
        mem.write_u16(0x1000, 0xBEEF)
        mem.write_u32(0x1002, 0xDEADC0DE)
        mem.write_u64(0x1006, 0x1122334455667788)
        assert mem.read(0x1000, 14) == bytes.fromhex("efbedec0adde8877665544332211")
        assert (mem.read_u16(0x1000), mem.read_u32(0x1002), mem.read_u64(0x1006)) == (
            0xBEEF,
            0xDEADC0DE,
            0x1122334455667788,
        )
        payload = bytes(range(256)) * 1000
        mem.write(0x200000 - 5, payload)
        assert mem.read(0x200000 - 5, len(payload)) == payload
        mem.fill(0x200000, 100, 0xAA)
        assert mem.read(0x1FFFFF, 102) == payload[4:5] + b"\xaa" * 100 + payload[105:106]
        assert mem.read(0x300000, 0) == b""
        assert writes == [
            (0x1000, 2), (0x1002, 4), (0x1006, 8), (0x1FFFFB, 256000), (0x200000, 100)
        ]
        # The highest and lowest bytes of RAM are reachable; one past is not.
        mem.write(mem.end - 4, b"last")
        assert mem.read(mem.end - 4, 4) == b"last"
        assert not mem.contains(mem.end - 3, 4)
        mem.write(0, b"\x01")
        assert mem.read_u8(0) == 1


@pytest.mark.peer
@pytest.mark.parametrize(
    ("gpa", "n", "reason"),
    [
        (0xF0000, 1, "BIOS window"),
        (0xEFFFF, 2, "BIOS window"),  # straddles the start of the hole
        (0xFFFFF, 4, "BIOS window"),  # straddles its end
        (0x4000000, 1, "outside guest RAM"),  # one past the end of 64 MiB
        (0x3FFFFFC, 8, "outside guest RAM"),  # runs off the end
        (0xFEB02E00, 4, "outside guest RAM"),  # MMIO is not RAM
        (-1, 1, "negative"),
        ((1 << 64) - 1, 2, "overflows"),
    ],
)
async def test_access_outside_ram_raises_without_reaching_qemu(qemu_binary, gpa, n, reason):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        mem, before = qemu.memory, qemu.qtest.requests
        assert not mem.contains(gpa, n)
        for access in (
            lambda: mem.read(gpa, n),
            lambda: mem.write(gpa, b"x" * n),
            lambda: mem.fill(gpa, n, 0xFF),
            lambda: mem.check(gpa, n),
        ):
            with pytest.raises(GuestMemoryError, match=reason) as info:
                access()
            assert (info.value.gpa, info.value.length) == (gpa, n)
        if n in (2, 4, 8):
            with pytest.raises(GuestMemoryError):
                getattr(mem, f"read_u{8 * n}")(gpa)
            with pytest.raises(GuestMemoryError):
                getattr(mem, f"write_u{8 * n}")(gpa, 0)
        assert qemu.qtest.requests == before


@pytest.mark.peer
async def test_what_a_guest_cannot_do_is_a_usage_error(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=16 * MiB)) as qemu:
        with pytest.raises(UsageError, match="inflate or report"):
            qemu.memory.discard(0x100000, 4096)
        with pytest.raises(UsageError, match="not mapped"):
            qemu.memory.view(0x100000, 4096)


@pytest.mark.peer
async def test_rss_anon_grows_when_guest_ram_is_touched(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary, memory=64 * MiB)) as qemu:
        before = qemu.memory.allocated_bytes()
        assert abs(before - read_rss_anon(qemu.pid)) < MiB
        qemu.memory.fill(0x100000, 32 * MiB, 0x5A)
        assert qemu.memory.allocated_bytes() - before >= 32 * MiB
