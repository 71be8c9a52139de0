"""One virtqueue of QEMU's real virtio-balloon, driven by raw virtio-mmio register accesses.

For differential fuzzing the guest driver is in the way: it validates what it writes. This
module sets up the inflate queue (index 0) the way a driver would (virtio spec §3.1.1, §4.2.3.2:
reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue registers, QueueReady, DRIVER_OK) but
leaves the ring contents to the caller, who writes any layout into QEMU's RAM, then notifies and
reads back what QEMU did: ``used.idx``, the used elements and the DEVICE_NEEDS_RESET bit.

QEMU must run in paused mode (sim.qemu ``QemuMode.PAUSED``): virtio-mmio handles QueueNotify
synchronously inside the MMIO write, so when :meth:`InflateQueue.notify` returns, QEMU has
popped, processed and pushed everything it was going to. A violation (``virtio_error``) sets
DEVICE_NEEDS_RESET and breaks the device until the next reset (research/peers.md §1.8).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.balloon import BalloonQueue
from protocol.errors import PeerError
from protocol.features import TransportFeature
from protocol.mmio import MmioReg
from protocol.split_ring import USED_IDX, USED_RING
from protocol.status import DeviceStatus
from sim.qemu.mmio import QtestMmioBus

__all__ = ["InflateQueue", "QemuRun"]

_S = DeviceStatus
_INDIRECT_BIT = 1 << int(TransportFeature.RING_INDIRECT_DESC)
_VERSION_1_HIGH = 1 << (int(TransportFeature.VERSION_1) - 32)


@dataclass(frozen=True, slots=True)
class QemuRun:
    """What QEMU did with one layout: used idx, the used ring's (id, len) slot by slot (at most
    the queue size), and DEVICE_NEEDS_RESET."""

    used_idx: int
    used: tuple[tuple[int, int], ...]
    needs_reset: bool


class InflateQueue:
    """The inflate queue of the balloon behind ``bus`` (a :class:`QtestMmioBus`)."""

    def __init__(self, bus: QtestMmioBus) -> None:
        self.bus = bus
        self.qtest = bus.qtest
        self.index = int(BalloonQueue.INFLATE)
        bus.write32(MmioReg.QUEUE_SEL, self.index)
        self.max_size = bus.read32(MmioReg.QUEUE_NUM_MAX)
        if self.max_size == 0:
            raise PeerError("QEMU's balloon has no inflate queue (QueueNumMax 0)")

    def setup(self, *, size: int, desc: int, avail: int, used: int, indirect: bool) -> None:
        """Reset the device and bring it up with one queue at these addresses (DRIVER_OK)."""
        w = self.bus.write32
        w(MmioReg.STATUS, 0)
        w(MmioReg.STATUS, _S.ACKNOWLEDGE)
        w(MmioReg.STATUS, _S.ACKNOWLEDGE | _S.DRIVER)
        w(MmioReg.DRIVER_FEATURES_SEL, 0)
        w(MmioReg.DRIVER_FEATURES, _INDIRECT_BIT if indirect else 0)
        w(MmioReg.DRIVER_FEATURES_SEL, 1)
        w(MmioReg.DRIVER_FEATURES, _VERSION_1_HIGH)
        w(MmioReg.STATUS, _S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK)
        w(MmioReg.QUEUE_SEL, self.index)
        w(MmioReg.QUEUE_NUM, size)
        for low, addr in ((MmioReg.QUEUE_DESC_LOW, desc), (MmioReg.QUEUE_AVAIL_LOW, avail),
                          (MmioReg.QUEUE_USED_LOW, used)):
            w(low, addr & 0xFFFFFFFF)
            w(low + 4, addr >> 32)
        w(MmioReg.QUEUE_READY, 1)
        w(MmioReg.STATUS, _S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK | _S.DRIVER_OK)

    def check_features_ok(self) -> None:
        """Raise PeerError unless FEATURES_OK reads back set (call once after a setup)."""
        status = self.bus.read32(MmioReg.STATUS)
        if not status & _S.FEATURES_OK or not status & _S.DRIVER_OK:
            raise PeerError(f"QEMU refused the queue setup: status {status:#x}")

    def notify(self) -> None:
        """QueueNotify: QEMU runs its inflate handler before this returns (paused mode)."""
        self.bus.write32(MmioReg.QUEUE_NOTIFY, self.index)

    def result(self, used: int, size: int) -> QemuRun:
        """Read used.idx, the used ring's elements and NEEDS_RESET (the queue started at 0)."""
        needs_reset = bool(self.bus.read32(MmioReg.STATUS) & _S.DEVICE_NEEDS_RESET)
        idx = self.qtest.readw(used + USED_IDX)
        count = min(idx, size)
        elems: tuple[tuple[int, int], ...] = ()
        if count:
            raw = self.qtest.read(used + USED_RING, 8 * count)
            elems = tuple(struct.unpack_from("<II", raw, 8 * k) for k in range(count))
        return QemuRun(idx, elems, needs_reset)
