"""sim.qemu.qtest on a real QEMU: every request kind round-trips; bad input never reaches it."""

from __future__ import annotations

import os

import pytest

from protocol.errors import UsageError
from sim.qemu.process import QemuOptions, run_qemu
from sim.qemu.qtest import B64_CHUNK, QtestError

pytestmark = pytest.mark.peer

RAM = 0x100000  # first byte above the BIOS window


async def test_fixed_width_reads_see_fixed_width_writes_little_endian(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        qt = qemu.qtest
        assert qt.endianness() == "little"
        qt.writeq(RAM, 0x0123456789ABCDEF)
        assert qt.readq(RAM) == 0x0123456789ABCDEF
        assert qt.readl(RAM) == 0x89ABCDEF
        assert qt.readw(RAM + 4) == 0x4567
        assert qt.readb(RAM + 7) == 0x01
        qt.writeb(RAM + 1, 0xFF)
        qt.writew(RAM + 2, 0xBEEF)
        qt.writel(RAM + 4, 0xFFFFFFFF)
        assert qt.read(RAM, 8) == bytes.fromhex("efffefbeffffffff")


async def test_byte_strings_round_trip_across_chunk_boundaries(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        qt = qemu.qtest
        small = os.urandom(37)
        qt.write(RAM + 3, small)
        assert qt.read(RAM + 3, 37) == small
        big = os.urandom(2 * B64_CHUNK + 4097)  # three requests, the last one partial
        before = qt.requests
        qt.b64write(RAM + 0x10001, big)
        assert qt.requests - before == 3
        assert qt.b64read(RAM + 0x10001, len(big)) == big
        assert qt.read(RAM + 0x10001, 16) == big[:16]
        qt.memset(RAM + 0x10001, 4096, 0x5A)
        assert qt.b64read(RAM + 0x10000, 4098) == b"\0" + b"\x5a" * 4096 + big[4096:4097]


async def test_qemu_refusals_are_typed_errors_and_qemu_lives_on(qemu_binary):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        # Debian's QEMU has no qtest accelerator: clock_step is unknown under TCG.
        with pytest.raises(QtestError, match="Unknown command 'clock_step'"):
            qemu.qtest.command("clock_step")
        with pytest.raises(QtestError, match="Unknown device"):
            qemu.qtest.irq_intercept_in("/machine/no-such-device")
        assert qemu.qtest.readl(RAM) == 0
        assert qemu.is_alive()


@pytest.mark.parametrize(
    "call",
    [
        lambda qt: qt.read(RAM, 0),  # QEMU would g_assert(len)
        lambda qt: qt.b64read(RAM, 0),
        lambda qt: qt.write(RAM, b""),
        lambda qt: qt.b64write(RAM, b""),
        lambda qt: qt.readl(-4),
        lambda qt: qt.read_int(RAM, 3),
        lambda qt: qt.writeb(RAM, 0x100),
        lambda qt: qt.writel(RAM, -1),
        lambda qt: qt.readq((1 << 64) - 4),
        lambda qt: qt.memset(RAM, 16, 256),
        lambda qt: qt.command("readl  0x0"),  # two spaces: an empty word QEMU cannot parse
        lambda qt: qt.command("readl 0x0\nreadl"),
        lambda qt: qt.irq_intercept_in("/machine two words"),
    ],
)
async def test_input_that_would_abort_qemu_is_refused_before_sending(qemu_binary, call):
    async with run_qemu(QemuOptions(binary=qemu_binary)) as qemu:
        before = qemu.qtest.requests
        with pytest.raises(UsageError):
            call(qemu.qtest)
        assert qemu.qtest.requests == before
        assert qemu.qtest.readl(RAM) == 0 and qemu.is_alive()
