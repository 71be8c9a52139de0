"""The guest's view of QEMU's virtio-mmio transports on microvm, over qtest.

:class:`QtestMmioBus` is the ``MmioBus`` the guest driver (``guest.virtio_mmio``) runs on:
``read32(offset)`` / ``write32(offset, value)`` relative to one transport's base, exactly the
accesses a kernel makes with ``readl``/``writel`` (virtio spec §4.2.2). Discovery scans the
transports the way a kernel walks its device tree: MagicValue, then DeviceID (0 = empty slot).

microvm with ``ioapic2`` (the default) has 24 transports at ``0xfeb00000 + i * 0x200``; QEMU
plugs the first ``-device`` into the *last* one (``0xfeb02e00``), so always scan. Transport
``i`` drives pin ``i`` of the second IOAPIC. Interrupts can be polled (InterruptStatus, which
needs nothing else: :class:`MmioInterrupts` is a ``guest.irq.InterruptStatusSource``) or
intercepted at that IOAPIC (:func:`intercept_virtio_irqs`), which makes QEMU send
``IRQ raise|lower <pin>`` lines on the qtest socket; :class:`QtestIrqLine` waits on those.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio

from protocol.balloon import VIRTIO_ID_BALLOON
from protocol.errors import PeerError, UsageError
from protocol.mmio import MAGIC_VALUE, InterruptBit, MmioReg
from sim.qemu.qmp import QmpClient
from sim.qemu.qtest import QtestClient

__all__ = [
    "MICROVM_VIRTIO_MMIO_BASE",
    "MICROVM_VIRTIO_MMIO_COUNT",
    "MMIO_SLOT_SIZE",
    "MmioInterrupts",
    "MmioSlot",
    "QtestIrqLine",
    "QtestMmioBus",
    "find_balloon",
    "find_virtio_ioapic",
    "intercept_virtio_irqs",
    "scan_virtio_mmio",
]

log = structlog.get_logger("vballoon.sim")

MICROVM_VIRTIO_MMIO_BASE = 0xFEB00000
MMIO_SLOT_SIZE = 0x200
MICROVM_VIRTIO_MMIO_COUNT = 24
"""Transports with ``ioapic2=on`` (the default); 8 with ``ioapic2=off``."""


class QtestMmioBus:
    """32-bit (and narrower, for config space) register access to one transport over qtest.

    Offsets are relative to ``base`` and must stay inside the transport's 0x200-byte window
    and be aligned to the access width; values must fit the width. Violations are caller bugs
    (:class:`UsageError`) and never reach QEMU.
    """

    def __init__(self, qtest: QtestClient, base: int, *, size: int = MMIO_SLOT_SIZE) -> None:
        if base < 0 or base % 4 or size <= 0:
            raise UsageError(f"bad virtio-mmio window base={base:#x} size={size:#x}")
        self.qtest = qtest
        self.base = base
        self.size = size

    def _addr(self, offset: int, width: int) -> int:
        if not isinstance(offset, int) or offset < 0 or offset + width > self.size:
            raise UsageError(f"offset {offset!r} is outside the {self.size:#x}-byte mmio window")
        if offset % width:
            raise UsageError(f"offset {offset:#x} is not aligned to the {width}-byte access")
        return self.base + offset

    def read32(self, offset: int) -> int:
        addr = self._addr(offset, 4)
        return self.qtest.readl(addr)

    def write32(self, offset: int, value: int) -> None:
        addr = self._addr(offset, 4)
        self.qtest.writel(addr, value)

    def read16(self, offset: int) -> int:
        addr = self._addr(offset, 2)
        return self.qtest.readw(addr)

    def write16(self, offset: int, value: int) -> None:
        addr = self._addr(offset, 2)
        self.qtest.writew(addr, value)

    def read8(self, offset: int) -> int:
        addr = self._addr(offset, 1)
        return self.qtest.readb(addr)

    def write8(self, offset: int, value: int) -> None:
        addr = self._addr(offset, 1)
        self.qtest.writeb(addr, value)

    def __repr__(self) -> str:
        return f"QtestMmioBus(base={self.base:#x})"


@dataclass(frozen=True, slots=True)
class MmioSlot:
    """A populated virtio-mmio transport found by :func:`scan_virtio_mmio`."""

    index: int
    base: int
    version: int
    """1 = legacy register layout, 2 = modern."""
    device_id: int
    vendor_id: int

    @property
    def irq_pin(self) -> int:
        """The pin of the second IOAPIC this transport drives (``ioapic2=on``)."""
        return self.index


def scan_virtio_mmio(
    qtest: QtestClient,
    *,
    base: int = MICROVM_VIRTIO_MMIO_BASE,
    count: int = MICROVM_VIRTIO_MMIO_COUNT,
) -> list[MmioSlot]:
    """Every transport with the virtio magic and a non-zero DeviceID, in slot order."""
    found = []
    for index in range(count):
        bus = QtestMmioBus(qtest, base + index * MMIO_SLOT_SIZE)
        if bus.read32(MmioReg.MAGIC_VALUE) != MAGIC_VALUE:
            continue
        device_id = bus.read32(MmioReg.DEVICE_ID)
        if device_id == 0:
            continue
        found.append(
            MmioSlot(
                index=index,
                base=bus.base,
                version=bus.read32(MmioReg.VERSION),
                device_id=device_id,
                vendor_id=bus.read32(MmioReg.VENDOR_ID),
            )
        )
    return found


def find_balloon(qtest: QtestClient) -> tuple[MmioSlot, QtestMmioBus]:
    """The first virtio-balloon transport (DeviceID 5) and a bus on it, or :class:`PeerError`."""
    for slot in scan_virtio_mmio(qtest):
        if slot.device_id == VIRTIO_ID_BALLOON:
            log.debug("qemu.balloon_found", index=slot.index, base=slot.base, version=slot.version)
            return slot, QtestMmioBus(qtest, slot.base)
    raise PeerError("no virtio-balloon device (DeviceID 5) on any microvm virtio-mmio transport")


class MmioInterrupts:
    """Polled interrupts of one transport: read InterruptStatus, acknowledge what was seen.

    This is what Linux's ``vm_interrupt`` does in its handler, minus the wait for the line.
    """

    def __init__(self, bus: QtestMmioBus) -> None:
        self.bus = bus

    def status(self) -> InterruptBit:
        """InterruptStatus, without acknowledging."""
        return InterruptBit(self.bus.read32(MmioReg.INTERRUPT_STATUS) & 0x3)

    def read_interrupt_status(self) -> int:
        """``guest.irq.InterruptStatusSource``: what ``PollingInterruptLine`` polls."""
        return int(self.status())

    def ack(self, bits: int) -> None:
        """Write ``bits`` to InterruptACK (clears them; QEMU lowers the line when none remain)."""
        self.bus.write32(MmioReg.INTERRUPT_ACK, int(bits) & 0x3)

    def take(self) -> InterruptBit:
        """Read InterruptStatus and acknowledge whatever is set; return it (0 if nothing)."""
        bits = self.status()
        if bits:
            self.ack(bits)
        return bits


class QtestIrqLine:
    """A ``guest.irq.InterruptLine`` on an intercepted IOAPIC pin (:func:`intercept_virtio_irqs`).

    virtio-mmio's line is level-triggered: high while InterruptStatus is non-zero, lowered by
    QEMU inside the InterruptACK write that clears the last bit. :meth:`wait` returns while the
    last level seen for ``pin`` is high; otherwise it sleeps until QEMU writes to the qtest
    socket (an ``IRQ`` line) and looks again. Lines consumed by another task's qtest request
    update the level too; ``recheck`` bounds how long such a change can go unnoticed.
    """

    def __init__(self, qtest: QtestClient, pin: int, *, recheck: float = 0.05) -> None:
        if not recheck > 0:
            raise UsageError(f"recheck period must be positive, not {recheck!r}")
        self.qtest = qtest
        self.pin = pin
        self.recheck = recheck

    @property
    def level(self) -> bool:
        """The last level QEMU reported for the pin (False before any IRQ line)."""
        return self.qtest.irq_levels.get(self.pin, False)

    async def wait(self) -> None:
        while True:
            self.qtest.poll_irqs()
            if self.level:
                await trio.lowlevel.checkpoint()
                return
            with trio.move_on_after(self.recheck):
                await trio.lowlevel.wait_readable(self.qtest.fileno())


async def find_virtio_ioapic(qmp: QmpClient) -> str:
    """The QOM path of the IOAPIC that microvm's virtio-mmio transports are wired to.

    With ``ioapic2`` that is the second IOAPIC, which has no name of its own: it is the one
    ``child<ioapic>`` under ``/machine/unattached`` (the first is ``/machine/ioapic``).
    """
    candidates = [
        f"/machine/unattached/{child['name']}"
        for child in await qmp.qom_list("/machine/unattached")
        if child.get("type") == "child<ioapic>"
    ]
    if len(candidates) != 1:
        raise PeerError(
            f"expected one unnamed IOAPIC under /machine/unattached, found {candidates}"
        )
    return candidates[0]


async def intercept_virtio_irqs(qtest: QtestClient, qmp: QmpClient) -> str:
    """Intercept the virtio IOAPIC's inputs; ``IRQ raise/lower <slot.irq_pin>`` then arrive.

    qtest allows one intercepted device per QEMU. The path is checked to be an IOAPIC first:
    qtest casts it to a device without checking and QEMU aborts on a non-device path.
    """
    path = await find_virtio_ioapic(qmp)
    qtest.irq_intercept_in(path)
    return path
