"""TEST DOUBLE of the balloon device core, for the vhost-user back-end tests only.

It implements :class:`device.transport.VirtioBackendDevice` just far enough to show what the
transport delivers: it records features, config accesses, attached rings, activation and kicks;
on a stats-queue kick it reads the avail ring and the stats buffer through the mapped guest
memory, then returns the buffer (used ring + call fd) so the real driver sends fresh stats; it
acknowledges inflate/deflate buffers so the real driver can complete a config-change round
trip. Ring placement is checked by the real :class:`virtqueue.device.DeviceQueue`, as every
device does. The real device (:class:`device.balloon.BalloonDevice`) is what production uses;
nothing outside tests/ may import this.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

import trio

from device.vhost_user.api import NotifyUsed, RingConfig
from protocol.balloon import BalloonQueue, queue_numbering
from protocol.errors import ConfigError
from protocol.features import BalloonFeature, TransportFeature, mask
from virtqueue.device import DeviceQueue
from virtqueue.memory import GuestMemory

ALL_BALLOON = mask(BalloonFeature.STATS_VQ, BalloonFeature.DEFLATE_ON_OOM,
                   BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_POISON,
                   BalloonFeature.REPORTING, TransportFeature.VERSION_1)
"""What the brief asks to offer: STATS_VQ, DEFLATE_ON_OOM, FREE_PAGE_HINT, PAGE_POISON,
REPORTING and VERSION_1 (the back-end adds vhost-user's bit 30)."""

_STAT = struct.Struct("<HQ")


@dataclass
class AttachedRing:
    ring: RingConfig
    memory: GuestMemory
    notify_used: NotifyUsed
    last_avail: int
    used_idx: int = 0


class RecordingBalloon:
    """Records what arrives through the vhost-user back-end (test double)."""

    device_id = 5

    def __init__(self, offered: int = ALL_BALLOON, max_size: int = 256,
                 return_stats: bool = True) -> None:
        self.offered = offered
        self.max_size = max_size
        self.return_stats = return_stats
        self.config = bytearray(16)
        self.features: list[int] = []
        self.config_reads: list[tuple[int, int]] = []
        self.config_writes: list[tuple[int, bytes]] = []
        self.rings: dict[int, AttachedRing] = {}
        self.attach_log: list[tuple[int, RingConfig]] = []
        self.detached: list[int] = []
        self.kicks: Counter[int] = Counter()
        self.stats_samples: list[list[tuple[int, int]]] = []
        self.avail_seen: list[tuple[int, int]] = []
        """(queue, avail idx) read at each kick."""
        self.inflated_pfns: list[int] = []
        self.activations = 0
        self.resets = 0
        self.on_config_change = lambda: None
        self.on_needs_reset: object = lambda violation: None
        self._changed = trio.Event()

    # ---- VirtioBackendDevice ---------------------------------------------------------------
    def offered_features(self) -> int:
        return self.offered

    def queue_max_size(self, index: int) -> int:
        return self.max_size

    def num_queues(self, features: int) -> int:
        return len(queue_numbering(features))

    def read_config(self, offset: int, size: int) -> bytes:
        self.config_reads.append((offset, size))
        if offset + size > len(self.config):
            raise ConfigError(f"config read [{offset}, +{size}) beyond 16 bytes")
        return bytes(self.config[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))
        if offset + len(data) > len(self.config) or offset < 4:
            raise ConfigError(f"config write at {offset} refused")
        self.config[offset:offset + len(data)] = data
        self._note()

    def set_features(self, mask: int) -> bool:
        self.features.append(mask)
        self._note()
        return True

    def attach_queue(self, index: int, ring: RingConfig, memory: GuestMemory,
                     notify_used: NotifyUsed) -> None:
        DeviceQueue(index=index, size=ring.size, desc=ring.desc, avail=ring.avail,
                    used=ring.used, memory=memory, max_size=self.max_size)  # CFG-01..07
        self.rings[index] = AttachedRing(ring, memory, notify_used, ring.next_avail,
                                         ring.next_used)
        self.attach_log.append((index, ring))
        self._note()

    def detach_queue(self, index: int) -> int:
        self.detached.append(index)
        attached = self.rings.pop(index)
        return attached.last_avail

    def activate(self) -> None:
        self.activations += 1

    def reset(self) -> None:
        self.resets += 1
        self.rings.clear()
        self._note()

    def kick(self, index: int) -> None:
        self.kicks[index] += 1
        att = self.rings[index]
        ring, mem = att.ring, att.memory
        avail_idx = mem.read_u16(ring.avail + 2)
        self.avail_seen.append((index, avail_idx))
        numbering = queue_numbering(self.features[-1])
        while att.last_avail != avail_idx:
            slot = att.last_avail % ring.size
            head = mem.read_u16(ring.avail + 4 + 2 * slot)
            addr, length, _flags, _next = struct.unpack(
                "<QIHH", mem.read(ring.desc + 16 * head, 16))
            att.last_avail = (att.last_avail + 1) & 0xFFFF
            if index == numbering.get(BalloonQueue.STATS):
                raw = mem.read(addr, length)
                self.stats_samples.append(
                    [_STAT.unpack_from(raw, off) for off in range(0, length - 9, 10)])
                if self.return_stats and len(self.stats_samples) < 2:
                    self._push_used(att, head)
            elif index in (numbering[BalloonQueue.INFLATE], numbering[BalloonQueue.DEFLATE]):
                pfns = struct.unpack(f"<{length // 4}I", mem.read(addr, length - length % 4))
                if index == numbering[BalloonQueue.INFLATE]:
                    self.inflated_pfns.extend(pfns)
                self._push_used(att, head)
        self._note()

    # ---- helpers ----------------------------------------------------------------------------
    def _push_used(self, att: AttachedRing, head: int) -> None:
        ring, mem = att.ring, att.memory
        slot = att.used_idx % ring.size
        mem.write(ring.used + 4 + 8 * slot, struct.pack("<II", head, 0))
        att.used_idx = (att.used_idx + 1) & 0xFFFF
        mem.write_u16(ring.used + 2, att.used_idx)
        att.notify_used()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate) -> None:
        """Wait until ``predicate(self)`` holds (re-checked after each recorded event)."""
        while not predicate(self):
            await self._changed.wait()
