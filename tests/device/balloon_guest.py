"""A hand-built guest driver for the device tests: virtio-mmio registers plus DriverQueues.

It does what Linux's virtio_mmio + virtio_balloon probe do, step by step and nothing more, so a
test can stop anywhere in the sequence or break a rule on purpose. Guest RAM is small (16 MiB):
rings live at RING_BASE (one 64 KiB slot per queue), buffers the tests build at BUF_BASE, and
pages to inflate or report above PAGE_BASE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import trio.testing

from device.balloon import DEFAULT_FEATURES, BalloonDevice
from device.mmio import MmioDevice
from protocol.balloon import BalloonQueue, queue_numbering
from protocol.mmio import MmioReg
from protocol.status import DeviceStatus
from virtqueue.driver import DriverQueue
from virtqueue.layout import split_layout
from virtqueue.memory import GuestMemory

MiB = 1 << 20
RAM_SIZE = 16 * MiB
RING_BASE = 1 * MiB
RING_SLOT = 64 * 1024
BUF_BASE = 2 * MiB
INDIRECT_BASE = 6 * MiB
INDIRECT_SLOT = 64 * 1024
PAGE_BASE = 8 * MiB

S = DeviceStatus


class Guest:
    """Guest RAM, a BalloonDevice behind an MmioDevice, and the driver's side of both."""

    def __init__(self, *, features: int = DEFAULT_FEATURES, ram_size: int = RAM_SIZE,
                 holes: Iterable[tuple[int, int]] = (), **device_kw) -> None:
        self.mem = GuestMemory.create(ram_size, holes=tuple(holes))
        self.device = BalloonDevice(self.mem, features=features, **device_kw)
        self.irqs = 0
        self.mmio = MmioDevice(self.device, self.mem, irq=self._irq)
        self.queues: dict[BalloonQueue, DriverQueue] = {}
        self.features = 0
        self._buf = BUF_BASE

    def _irq(self) -> None:
        self.irqs += 1

    # ---- registers ----------------------------------------------------------------------
    def r(self, reg: MmioReg) -> int:
        return self.mmio.read32(int(reg))

    def w(self, reg: MmioReg, value: int) -> None:
        self.mmio.write32(int(reg), value)

    @property
    def status(self) -> DeviceStatus:
        return DeviceStatus(self.r(MmioReg.STATUS))

    def set_status(self, bits: int) -> None:
        self.w(MmioReg.STATUS, self.r(MmioReg.STATUS) | bits)

    def device_features(self) -> int:
        out = 0
        for sel in (0, 1):
            self.w(MmioReg.DEVICE_FEATURES_SEL, sel)
            out |= self.r(MmioReg.DEVICE_FEATURES) << (32 * sel)
        return out

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.w(MmioReg.DRIVER_FEATURES_SEL, sel)
            self.w(MmioReg.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFF_FFFF)

    def ack_interrupts(self) -> int:
        status = self.r(MmioReg.INTERRUPT_STATUS)
        self.w(MmioReg.INTERRUPT_ACK, status)
        return status

    # ---- the init sequence (virtio §3.1.1, §4.2.3) -------------------------------------------
    def negotiate(self, accept: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; True if the device kept it."""
        self.w(MmioReg.STATUS, 0)
        assert self.r(MmioReg.MAGIC_VALUE) == 0x74726976 and self.r(MmioReg.VERSION) == 2
        self.set_status(S.ACKNOWLEDGE)
        self.set_status(S.DRIVER)
        offered = self.device_features()
        self.features = offered if accept is None else accept
        self.write_features(self.features)
        self.set_status(S.FEATURES_OK)
        return bool(self.status & S.FEATURES_OK)

    def setup_queue(self, kind: BalloonQueue, size: int | None = None) -> DriverQueue:
        index = queue_numbering(self.device.offered_features())[kind]
        self.w(MmioReg.QUEUE_SEL, index)
        assert self.r(MmioReg.QUEUE_READY) == 0
        max_size = self.r(MmioReg.QUEUE_NUM_MAX)
        size = size or max_size
        desc, avail, used, _ = split_layout(RING_BASE + index * RING_SLOT, size)
        event_idx = bool(self.features >> 29 & 1)
        indirect = bool(self.features >> 28 & 1)
        area = (INDIRECT_BASE + index * INDIRECT_SLOT, INDIRECT_SLOT) if indirect else None
        q = DriverQueue(index=index, size=size, desc=desc, avail=avail, used=used,
                        memory=self.mem, event_idx=event_idx, indirect=indirect,
                        indirect_area=area, notify=self.notify)
        self.w(MmioReg.QUEUE_NUM, size)
        for low, addr in ((MmioReg.QUEUE_DESC_LOW, desc), (MmioReg.QUEUE_AVAIL_LOW, avail),
                          (MmioReg.QUEUE_USED_LOW, used)):
            self.w(low, addr & 0xFFFF_FFFF)
            self.w(MmioReg(low + 4), addr >> 32)
        self.w(MmioReg.QUEUE_READY, 1)
        self.queues[kind] = q
        return q

    def init(self, accept: int | None = None, *, driver_ok: bool = True) -> None:
        """The whole probe: negotiate, set up every queue the device has, DRIVER_OK."""
        assert self.negotiate(accept)
        for kind in queue_numbering(self.device.offered_features()):
            self.setup_queue(kind)
        if driver_ok:
            self.set_status(S.DRIVER_OK)

    def notify(self, index: int) -> None:
        self.w(MmioReg.QUEUE_NOTIFY, index)

    # ---- buffers ------------------------------------------------------------------------------
    def alloc(self, data: bytes | int) -> tuple[int, int]:
        """Place ``data`` (or that many zero bytes) in the buffer area: (gpa, len)."""
        raw = bytes(data) if isinstance(data, int) else data
        gpa = self._buf
        self._buf += (len(raw) + 15) & ~15
        self.mem.write(gpa, raw)
        return gpa, len(raw)

    def send(self, kind: BalloonQueue, readable=(), writable=(), token: object = None, *,
             use_indirect: bool = False) -> int:
        """Add one chain and kick (if the device wants kicks); returns the head.

        The token get_buf returns is ``token``, or the chain's readable and writable lists.
        """
        q = self.queues[kind]
        readable, writable = list(readable), list(writable)
        head = q.add(readable, writable, token if token is not None else (readable, writable),
                     use_indirect=use_indirect)
        q.kick()
        return head

    def pfns(self, kind: BalloonQueue, pfns: Iterable[int]) -> int:
        data = b"".join(struct.pack("<I", p) for p in pfns)
        return self.send(kind, [self.alloc(data)])

    def used(self, kind: BalloonQueue) -> list[tuple[object, int]]:
        q = self.queues[kind]
        out = []
        while (item := q.get_buf()) is not None:
            out.append(item)
        return out


async def settle() -> None:
    """Let the device's tasks run until every one of them waits."""
    await trio.testing.wait_all_tasks_blocked()
