"""QEMU's guest RAM seen through qtest, with the method names of ``virtqueue.memory.GuestMemory``.

The guest driver and its rings run unchanged on this object: every access is bounds-checked
against microvm's RAM map *before* anything is sent to QEMU, so an address outside RAM (the
BIOS hole, MMIO, beyond the end) raises :class:`GuestMemoryError` and QEMU never sees it.

microvm's RAM map (QEMU 7.2 ``hw/i386/microvm.c``, checked with ``info mtree -f``) for
``-m N``: ``0 .. 0xeffff`` and ``0x100000 .. min(N, 3 GiB) - 1``; the 64 KiB BIOS at
``0xf0000 .. 0xfffff`` shadows the RAM below 1 MiB; RAM above 3 GiB is mapped at 4 GiB.

What a guest cannot do is not offered: there is no shared mapping (``view``) and no way to
discard RAM from the guest side (only the device does that, on inflate or report), so both
raise :class:`UsageError`. ``allocated_bytes`` reads QEMU's ``RssAnon`` from ``/proc``: the
host memory QEMU holds, the quantity that inflate and free page reporting bring down.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol.errors import GuestMemoryError, PeerError, UsageError
from sim.qemu.qtest import QtestClient
from virtqueue.memory import MemoryRegion

__all__ = [
    "BIOS_HOLE",
    "HIGHMEM_START",
    "MAX_BELOW_4G",
    "QtestMemory",
    "microvm_ram_regions",
    "read_rss_anon",
]

BIOS_HOLE = (0xF0000, 0x100000)
"""``[start, end)`` of the 64 KiB ISA BIOS window that shadows guest RAM."""
MAX_BELOW_4G = 0xC0000000
"""microvm puts at most 3 GiB of RAM below 4 GiB; the rest starts at :data:`HIGHMEM_START`."""
HIGHMEM_START = 1 << 32
_SMALL_IO = 64
"""Byte strings up to this size go as one hex ``read``/``write`` (no base64 round trip)."""


def microvm_ram_regions(ram_size: int) -> tuple[MemoryRegion, ...]:
    """The RAM ranges of ``qemu-system-x86_64 -M microvm -m ram_size`` (bytes)."""
    if ram_size <= BIOS_HOLE[1]:
        raise UsageError(f"microvm RAM must be larger than 1 MiB, not {ram_size:#x}")
    below = min(ram_size, MAX_BELOW_4G)
    regions = [MemoryRegion(0, BIOS_HOLE[0]), MemoryRegion(BIOS_HOLE[1], below - BIOS_HOLE[1])]
    if ram_size > MAX_BELOW_4G:
        regions.append(MemoryRegion(HIGHMEM_START, ram_size - MAX_BELOW_4G))
    return tuple(regions)


def read_rss_anon(pid: int) -> int:
    """``RssAnon`` of process ``pid`` in bytes (``/proc/PID/status``)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as exc:
        raise PeerError(f"cannot read RssAnon of PID {pid}: {exc}") from exc
    raise PeerError(f"/proc/{pid}/status has no RssAnon line")


class QtestMemory:
    """Guest RAM of a QEMU under qtest, bounds-checked, with GuestMemory's method names.

    Args:
        qtest: the connected qtest client.
        regions: the RAM map (:func:`microvm_ram_regions`), sorted and disjoint.
        pid: QEMU's PID, for :meth:`allocated_bytes`.
    """

    def __init__(
        self, qtest: QtestClient, regions: tuple[MemoryRegion, ...], *, pid: int | None = None
    ) -> None:
        self._qtest = qtest
        self.regions = tuple(sorted(regions, key=lambda r: r.gpa))
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.end > b.gpa:
                raise UsageError(f"RAM regions overlap: {a} and {b}")
        self.pid = pid
        self._observers: list[Callable[[int, int], None]] = []

    @property
    def size(self) -> int:
        """Total bytes of RAM (the BIOS window excluded)."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        return self.regions[-1].end if self.regions else 0

    # ---- bounds -------------------------------------------------------------------------------

    def contains(self, gpa: int, n: int) -> bool:
        """Whether ``[gpa, gpa + n)`` lies inside one RAM region (``n == 0``: ``gpa`` in RAM)."""
        if not isinstance(gpa, int) or not isinstance(n, int) or gpa < 0 or n < 0:
            return False
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.end and (n > 0 or gpa < r.end):
                return True
        return False

    def check(self, gpa: int, n: int) -> None:
        """Raise :class:`GuestMemoryError` unless ``[gpa, gpa + n)`` is RAM."""
        if not isinstance(gpa, int) or not isinstance(n, int):
            raise UsageError(f"gpa and length must be ints, not {gpa!r}, {n!r}")
        if gpa < 0 or n < 0:
            raise GuestMemoryError(gpa, n, "has a negative address or length")
        if gpa + n > 1 << 64:
            raise GuestMemoryError(gpa, n, "overflows 64 bits")
        if not self.contains(gpa, n):
            start, end = BIOS_HOLE
            if gpa < end and gpa + max(n, 1) > start:
                raise GuestMemoryError(gpa, n, "touches the BIOS window 0xf0000-0xfffff")
            raise GuestMemoryError(gpa, n, "is outside guest RAM")

    # ---- access -------------------------------------------------------------------------------

    def read(self, gpa: int, n: int) -> bytes:
        self.check(gpa, n)
        if n == 0:
            return b""
        if n <= _SMALL_IO:
            return self._qtest.read(gpa, n)
        return self._qtest.b64read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.check(gpa, n)
        if n == 0:
            return
        if n <= _SMALL_IO:
            self._qtest.write(gpa, bytes(data))
        else:
            self._qtest.b64write(gpa, bytes(data))
        self._notify(gpa, n)

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        """Set ``n`` bytes at ``gpa`` to ``byte`` (qtest ``memset``)."""
        self.check(gpa, n)
        if not isinstance(byte, int) or not 0 <= byte <= 0xFF:
            raise UsageError(f"fill byte must be 0..255, not {byte!r}")
        if n:
            self._qtest.memset(gpa, n, byte)
            self._notify(gpa, n)

    def read_u8(self, gpa: int) -> int:
        self.check(gpa, 1)
        return self._qtest.readb(gpa)

    def read_u16(self, gpa: int) -> int:
        self.check(gpa, 2)
        return self._qtest.readw(gpa)

    def read_u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return self._qtest.readl(gpa)

    def read_u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return self._qtest.readq(gpa)

    def write_u8(self, gpa: int, value: int) -> None:
        self._write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._write_int(gpa, 8, value)

    def _write_int(self, gpa: int, width: int, value: int) -> None:
        self.check(gpa, width)
        self._qtest.write_int(gpa, width, value)
        self._notify(gpa, width)

    # ---- what a guest cannot do ----------------------------------------------------------------

    def view(self, gpa: int, n: int) -> memoryview:
        raise UsageError(
            "QEMU's guest RAM is not mapped into this process; use read()/write() over qtest"
        )

    def discard(self, gpa: int, n: int) -> None:
        raise UsageError(
            "the guest cannot discard QEMU's RAM; inflate or report the pages to the device"
        )

    # ---- host side and observers -------------------------------------------------------------

    def allocated_bytes(self) -> int:
        """QEMU's ``RssAnon`` in bytes: guest RAM it backs plus its own anonymous memory.

        Compare before/after values: a reported or inflated page that QEMU discards lowers it.
        """
        if self.pid is None:
            raise UsageError("QtestMemory was built without QEMU's PID")
        return read_rss_anon(self.pid)

    def add_write_observer(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(gpa, n)`` after every write through this object (not QEMU's own)."""
        self._observers.append(callback)

    def remove_write_observer(self, callback: Callable[[int, int], None]) -> None:
        self._observers.remove(callback)

    def _notify(self, gpa: int, n: int) -> None:
        for callback in self._observers:
            callback(gpa, n)

    def close(self) -> None:
        """Nothing to release: QEMU owns the RAM."""
