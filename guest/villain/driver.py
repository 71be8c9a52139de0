"""The hostile driver: our driver end with every check taken out, over a :class:`DevicePort`.

It does what a driver does (status steps, features, queue setup, descriptors, avail entries,
notifications) but writes exactly what it is told: raw descriptors, raw avail indices, any
layout (:class:`~virtqueue.cases.Layout`), any config value. Around that it keeps the tools a
conformance run needs:

- a *pool* of guest pages filled with a pattern; payloads carry their PFNs, and a page the
  device discarded reads back as zeros (:meth:`HostileDriver.discarded`);
- a *control ring* of its own at the port's control area, for payload cases and for the proof
  that a device is serviceable again: :meth:`HostileDriver.recover` resets the device,
  initialises it again and inflates one pool page, which must be used and discarded.

Queues are found with QEMU's numbering (dense over the *offered* features); every queue-bearing
feature the device offers is accepted, so a device that numbers by the negotiated features
(Linux's reading) agrees.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from guest.villain.port import DevicePort
from protocol.balloon import BalloonQueue, queue_numbering
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from protocol.split_ring import AVAIL_IDX, AVAIL_RING, USED_FLAGS, USED_IDX, USED_RING, DescFlags
from virtqueue.layout import DESC, USED_ELEM, split_layout

__all__ = ["PATTERN", "QUEUE_FEATURES", "ControlRing", "HostileDriver"]

PATTERN = 0xA5
"""The byte pool pages are filled with."""
QUEUE_FEATURES = mask(BalloonFeature.STATS_VQ, BalloonFeature.FREE_PAGE_HINT,
                      BalloonFeature.REPORTING)
_VERSION_1 = bit(TransportFeature.VERSION_1)
_PAGE = 4096
_NEXT = int(DescFlags.NEXT)


@dataclass(slots=True)
class ControlRing:
    """A ring of the driver's own: where it is and where the next chain goes."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    data: int
    """Next free byte for buffers (after the ring)."""
    next_desc: int = 0
    avail_idx: int = 0


class HostileDriver:
    """See the module docstring."""

    def __init__(self, port: DevicePort) -> None:
        self.port = port
        self.memory = port.memory
        self.offered = port.offered_features()
        self.pool_first, self.pool_pages = port.layout.pool

    # ---- features and queues ---------------------------------------------------------------
    def features(self, extra: int = 0) -> int:
        """VERSION_1, every offered queue-bearing feature, and ``extra``."""
        return _VERSION_1 | (self.offered & QUEUE_FEATURES) | extra

    def queue_index(self, kind: BalloonQueue) -> int | None:
        return queue_numbering(self.offered).get(kind)

    def offers(self, features: int) -> bool:
        return self.offered & features == features

    # ---- the pool -------------------------------------------------------------------------
    def fill_pool(self, pages: int | None = None) -> None:
        n = self.pool_pages if pages is None else pages
        self.memory.fill(self.pool_first << 12, n * _PAGE, PATTERN)

    def discarded(self, pages: int | None = None) -> set[int]:
        """Pool PFNs whose page no longer holds the pattern (the device discarded them)."""
        n = self.pool_pages if pages is None else pages
        out = set()
        step = 64
        for start in range(0, n, step):
            count = min(step, n - start)
            data = self.memory.read((self.pool_first + start) << 12, count * _PAGE)
            out.update(self.pool_first + start + k for k in range(count)
                       if data[k * _PAGE] != PATTERN)
        return out

    def fill_sentinel(self) -> None:
        first, pages = self.port.layout.sentinel
        self.memory.fill(first << 12, pages * _PAGE, PATTERN)

    def sentinel_discarded(self) -> list[int]:
        """Sentinel PFNs (named by no payload) the device discarded."""
        first, pages = self.port.layout.sentinel
        data = self.memory.read(first << 12, pages * _PAGE)
        return [first + k for k in range(pages) if data[k * _PAGE] != PATTERN]

    def pool_pfn(self, k: int) -> int:
        return self.pool_first + k

    @property
    def spare_pfn(self) -> int:
        """The last pool page, kept for :meth:`recover`."""
        return self.pool_first + self.pool_pages - 1

    # ---- the control ring ----------------------------------------------------------------
    async def control_ring(self, kind: BalloonQueue, size: int = 8) -> ControlRing | None:
        """Set up queue ``kind`` at the control area (zeroed); None if it does not exist."""
        index = self.queue_index(kind)
        if index is None:
            return None
        base = self.port.layout.control + 0x1000 * int(kind) * 4
        desc, avail, used, total = split_layout(base, size)
        self.memory.write(base, bytes(total))
        if not await self.port.setup_queue(index, size, desc, avail, used):
            return None
        return ControlRing(index, size, desc, avail, used, (base + total + 0xFF) & ~0xFF)

    def put(self, ring: ControlRing, data: bytes) -> int:
        gpa = ring.data
        self.memory.write(gpa, data)
        ring.data = (gpa + len(data) + 15) & ~15
        return gpa

    def publish(self, ring: ControlRing, buffers: list[tuple[int, int, int]]) -> int:
        """One chain of ``(addr, len, flags)`` buffers (NEXT is added); returns its head."""
        head = ring.next_desc
        for j, (addr, length, flags) in enumerate(buffers):
            i = (head + j) % ring.size
            more = j + 1 < len(buffers)
            raw = DESC.pack(addr, length, flags | (_NEXT if more else 0),
                            (i + 1) % ring.size if more else 0)
            self.memory.write(ring.desc + 16 * i, raw)
        ring.next_desc = (head + len(buffers)) % ring.size
        slot = ring.avail_idx % ring.size
        self.memory.write(ring.avail + AVAIL_RING + 2 * slot, struct.pack("<H", head))
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self.memory.write(ring.avail + AVAIL_IDX, struct.pack("<H", ring.avail_idx))
        return head

    def pfn_buffer(self, ring: ControlRing, pfns: list[int], tail: bytes = b"",
                   flags: int = 0) -> tuple[int, int, int]:
        data = struct.pack(f"<{len(pfns)}I", *pfns) + tail
        return self.put(ring, data), len(data), flags

    def used(self, used_addr: int, size: int) -> tuple[int, list[tuple[int, int]], int]:
        """``(used.idx, [(id, len)...], used.flags)`` of a ring that started at 0."""
        head = self.memory.read(used_addr, 4)
        flags, idx = struct.unpack("<HH", head)
        count = min(idx, size)
        raw = self.memory.read(used_addr + USED_RING, 8 * count) if count else b""
        elems = [USED_ELEM.unpack_from(raw, 8 * k) for k in range(count)]
        return idx, elems, flags

    # ---- the proof of health ------------------------------------------------------------------
    async def recover(self) -> tuple[bool, str]:
        """Reset, initialise again, inflate the spare pool page: used and discarded?"""
        port = self.port
        await port.reset()
        if not port.alive():
            return False, "the device is gone after the reset"
        if not await port.begin(self.features()):
            return False, "FEATURES_OK refused after the reset"
        ring = await self.control_ring(BalloonQueue.INFLATE)
        if ring is None:
            return False, "the inflate queue could not be set up after the reset"
        pfn = self.spare_pfn
        self.memory.fill(pfn << 12, _PAGE, PATTERN)
        await port.driver_ok()
        self.publish(ring, [self.pfn_buffer(ring, [pfn])])
        await port.notify(ring.index)

        async def used() -> bool:
            return self.used(ring.used, ring.size)[0] >= 1

        await port.settle(until=used)
        if not port.alive():
            return False, "the device is gone after the valid inflate"
        idx, _, _ = self.used(ring.used, ring.size)
        gone = self.memory.read(pfn << 12, 1)[0] != PATTERN
        if idx >= 1 and gone:
            return True, "a valid inflate after the reset was used and its page discarded"
        return False, (f"a valid inflate after the reset was {'used' if idx else 'not used'}"
                       f" and its page {'discarded' if gone else 'kept'}")

    async def ring_flags(self, used_addr: int) -> int:
        return struct.unpack("<H", self.memory.read(used_addr + USED_FLAGS, 2))[0]

    async def used_idx(self, used_addr: int) -> int:
        return struct.unpack("<H", self.memory.read(used_addr + USED_IDX, 2))[0]

