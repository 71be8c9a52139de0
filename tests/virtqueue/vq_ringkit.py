"""A hand-built split ring for device-end tests: write descriptors and avail entries directly.

The driver end (DriverQueue) only builds valid chains; the tests of the device's validation need
bad ones, so this writes raw ``struct virtq_desc`` bytes, tables and avail entries into a real
GuestMemory (vm-virtio's MockSplitQueue plays the same role).
"""

from __future__ import annotations

from typing import Any

from protocol.split_ring import DescFlags
from virtqueue.device import DeviceQueue
from virtqueue.layout import DESC, U16, USED_ELEM, split_layout
from virtqueue.memory import GuestMemory

NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)


class RawRing:
    """A split ring of ``size`` entries at ``base`` in ``memory``, written byte by byte."""

    def __init__(self, memory: GuestMemory, size: int, base: int = 0) -> None:
        self.memory = memory
        self.size = size
        self.desc, self.avail, self.used, total = split_layout(base, size)
        memory.write(base, bytes(total))
        self.avail_idx = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.memory.write(self.desc + 16 * i, DESC.pack(addr, length, flags, next))

    def chain(self, first: int, bufs: list[tuple[int, int, int]]) -> int:
        """Descriptors first, first+1, ... linked by NEXT: ``bufs`` are (addr, len, flags)."""
        for j, (addr, length, flags) in enumerate(bufs):
            more = j + 1 < len(bufs)
            self.set_desc(first + j, addr, length, flags | (NEXT if more else 0),
                          first + j + 1 if more else 0)
        return first

    def table(self, gpa: int, entries: list[tuple[int, int, int, int]]) -> int:
        """Write an indirect table of (addr, len, flags, next) entries; returns its byte length."""
        data = b"".join(DESC.pack(*e) for e in entries)
        self.memory.write(gpa, data)
        return len(data)

    def publish(self, *heads: int) -> None:
        for head in heads:
            slot = self.avail_idx % self.size
            self.memory.write(self.avail + 4 + 2 * slot, U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.memory.write(self.avail + 2, U16.pack(value))

    def used_idx(self) -> int:
        return U16.unpack(self.memory.read(self.used + 2, 2))[0]

    def used_elems(self, start: int = 0) -> list[tuple[int, int]]:
        """The used elements from index ``start`` up to used.idx."""
        out = []
        i = start
        while i != self.used_idx():
            slot = i % self.size
            out.append(USED_ELEM.unpack(self.memory.read(self.used + 4 + 8 * slot, 8)))
            i = (i + 1) & 0xFFFF
        return out

    def device(self, **kw: Any) -> DeviceQueue:
        return DeviceQueue(index=0, size=self.size, desc=self.desc, avail=self.avail,
                           used=self.used, memory=self.memory, **kw)
