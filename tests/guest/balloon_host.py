"""A scripted virtio-mmio balloon *host* for the driver's tests (not the product device).

It answers register accesses the way virtio-mmio §4.2.2 says, logs every access (so tests can
assert the driver's exact register sequence), builds a :class:`~virtqueue.device.DeviceQueue`
per queue the driver makes ready, and serves queues by a per-queue policy:

- ``"auto"``: on QueueNotify pop every chain, record it, push it used (length 0) and raise a
  used-buffer interrupt (QEMU's inflate/deflate/reporting queues are synchronous like this);
- ``"hold"``: on QueueNotify pop and keep the chains (the stats queue: the device keeps the
  buffer until it wants fresh stats; :meth:`BalloonHost.request_stats` gives it back);
- ``"manual"``: do nothing; the test pops and pushes with :meth:`BalloonHost.consume`.

Config space: num_pages, actual, free_page_hint_cmd_id, poison_val (16 bytes). The driver may
write only ``actual`` and ``poison_val``. :meth:`BalloonHost.set_target` and
:meth:`BalloonHost.set_cmd_id` change the device fields and raise a config interrupt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from guest.irq import EventInterruptLine
from protocol.balloon import ConfigOffset, queue_numbering
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from protocol.mmio import CONFIG_OFFSET, MAGIC_VALUE, InterruptBit, MmioReg
from protocol.status import DeviceStatus
from virtqueue.chain import DescriptorChain
from virtqueue.device import DeviceQueue

QEMU_LIKE_FEATURES = mask(
    BalloonFeature.STATS_VQ, BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_POISON,
    BalloonFeature.REPORTING, BalloonFeature.DEFLATE_ON_OOM, BalloonFeature.MUST_TELL_HOST,
    TransportFeature.RING_INDIRECT_DESC, TransportFeature.RING_EVENT_IDX,
    TransportFeature.VERSION_1,
)
_NAMES = {0: "inflate", 1: "deflate", 2: "stats", 3: "free_page", 4: "reporting"}


@dataclass
class HostQueue:
    num_max: int
    num: int = 0
    ready: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    dq: DeviceQueue | None = None
    held: list[DescriptorChain] = field(default_factory=list)
    kicks: int = 0


class BalloonHost:
    """The scripted device; ``read32``/``write32`` make it an ``MmioBus``."""

    def __init__(self, memory: Any, *, features: int = QEMU_LIKE_FEATURES,
                 queue_num_max: int = 64, refuse_features: bool = False,
                 policies: dict[str, str] | None = None, irq: EventInterruptLine | None = None,
                 num_pages: int = 0) -> None:
        self.memory = memory
        self.features = features
        self.queue_num_max = queue_num_max
        self.refuse_features = refuse_features
        self.policies = {"inflate": "auto", "deflate": "auto", "stats": "hold",
                         "free_page": "auto", "reporting": "auto"} | (policies or {})
        self.irq = irq or EventInterruptLine()
        self.log: list[tuple[str, int, int]] = []
        self.config = bytearray(16)
        self.set_config(ConfigOffset.NUM_PAGES, num_pages)
        self.generation = 0
        self.isr = 0
        self.inflated: list[int] = []
        self.deflated: list[int] = []
        self.balloon: set[int] = set()
        self.stats: list[dict[int, int]] = []
        self.reported: list[list[tuple[int, int]]] = []
        self.reported_indirect: list[bool] = []
        self.reported_readable: list[int] = []
        self.hint_buffers: list[tuple[str, Any]] = []
        self.reset()

    # ---- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.status = 0
        self.dev_sel = self.drv_sel = self.queue_sel = 0
        self.driver_features = 0
        self.isr = 0
        self.queues: dict[int, HostQueue] = {}

    def queue_names(self) -> dict[int, str]:
        """Queue index -> name, numbered densely by the driver's features (as Linux)."""
        return {i: _NAMES[q] for q, i in queue_numbering(self.driver_features or
                                                        self.features).items()}

    def queue(self, name: str) -> HostQueue:
        for index, qname in self.queue_names().items():
            if qname == name:
                return self.queues[index]
        raise KeyError(name)

    def get_config(self, offset: int) -> int:
        return struct.unpack_from("<I", self.config, offset)[0]

    def set_config(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.config, offset, value)

    def interrupt(self, bit_: int) -> None:
        self.isr |= bit_
        self.irq.raise_()

    # ---- the script's levers --------------------------------------------------------------
    def set_target(self, num_pages: int) -> None:
        self.set_config(ConfigOffset.NUM_PAGES, num_pages)
        self.generation += 1
        self.interrupt(InterruptBit.CONFIG)

    def set_cmd_id(self, cmd_id: int, *, interrupt: bool = True) -> None:
        self.set_config(ConfigOffset.FREE_PAGE_HINT_CMD_ID, cmd_id)
        self.generation += 1
        if interrupt:
            self.interrupt(InterruptBit.CONFIG)

    def request_stats(self) -> bool:
        """Give the held stats buffer back (ask for fresh stats); False if none is held."""
        q = self.queue("stats")
        if not q.held:
            return False
        chain = q.held.pop(0)
        q.dq.push(chain.head, 0)
        if q.dq.needs_interrupt():
            self.interrupt(InterruptBit.VRING)
        return True

    def consume(self, name: str, limit: int | None = None) -> int:
        """Pop, record and push up to ``limit`` chains of a queue (manual policy)."""
        q = self.queue(name)
        n = 0
        while limit is None or n < limit:
            chain = q.dq.pop()
            if chain is None and q.dq.enable_notification():
                chain = q.dq.pop()  # published while we were not looking
            if chain is None:
                break
            self._record(name, chain)
            q.dq.push(chain.head, 0)
            n += 1
        if n and q.dq.needs_interrupt():
            self.interrupt(InterruptBit.VRING)
        return n

    def pending(self, name: str) -> int:
        """Chains the driver made available that the host has not popped."""
        q = self.queue(name)
        return (q.dq.avail_idx() - q.dq.next_avail) & 0xFFFF

    # ---- serving -------------------------------------------------------------------------
    def _record(self, name: str, chain: DescriptorChain) -> None:
        if name in ("inflate", "deflate"):
            data = chain.read(self.memory)
            pfns = list(struct.unpack(f"<{len(data) // 4}I", data))
            if name == "inflate":
                self.inflated += pfns
                self.balloon.update(pfns)
            else:
                self.deflated += pfns
                self.balloon.difference_update(pfns)
        elif name == "stats":
            data = chain.read(self.memory)
            self.stats.append({tag: val for tag, val in struct.iter_unpack("<HQ", data)})
        elif name == "reporting":
            self.reported.append([(s.addr, s.len) for s in chain.writable])
            self.reported_indirect.append(chain.indirect)
            self.reported_readable.append(chain.readable_len)
        elif name == "free_page":
            if chain.readable:
                self.hint_buffers.append(
                    ("id", struct.unpack("<I", chain.read(self.memory))[0]))
            else:
                self.hint_buffers.append(("block", tuple(chain.writable)))

    def _notify(self, index: int) -> None:
        name = self.queue_names()[index]
        q = self.queues[index]
        q.kicks += 1
        policy = self.policies[name]
        if policy == "auto":
            self.consume(name)
        elif policy == "hold":
            while True:
                chain = q.dq.pop()
                if chain is None and q.dq.enable_notification():
                    chain = q.dq.pop()
                if chain is None:
                    break
                self._record(name, chain)
                q.held.append(chain)

    # ---- registers -----------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        value = self._read(offset)
        self.log.append(("r", offset, value))
        return value

    def write32(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))
        self._write(offset, value)

    def _read(self, off: int) -> int:
        q = self.queues.setdefault(self.queue_sel, HostQueue(self._num_max(self.queue_sel)))
        match off:
            case MmioReg.MAGIC_VALUE:
                return MAGIC_VALUE
            case MmioReg.VERSION:
                return 2
            case MmioReg.DEVICE_ID:
                return 5
            case MmioReg.VENDOR_ID:
                return 0x554D4551
            case MmioReg.DEVICE_FEATURES:
                return self.features >> (32 * self.dev_sel) & 0xFFFFFFFF if self.dev_sel < 2 else 0
            case MmioReg.QUEUE_NUM_MAX:
                return q.num_max
            case MmioReg.QUEUE_READY:
                return q.ready
            case MmioReg.INTERRUPT_STATUS:
                return self.isr
            case MmioReg.STATUS:
                return self.status
            case MmioReg.CONFIG_GENERATION:
                return self.generation
        if CONFIG_OFFSET <= off < CONFIG_OFFSET + 16:
            return self.get_config(off - CONFIG_OFFSET)
        raise AssertionError(f"driver read a write-only or unknown register {off:#x}")

    def _num_max(self, index: int) -> int:
        names = self.queue_names()
        return self.queue_num_max if index in names else 0

    def _write(self, off: int, value: int) -> None:
        q = self.queues.setdefault(self.queue_sel, HostQueue(self._num_max(self.queue_sel)))
        match off:
            case MmioReg.DEVICE_FEATURES_SEL:
                self.dev_sel = value
            case MmioReg.DRIVER_FEATURES_SEL:
                self.drv_sel = value
            case MmioReg.DRIVER_FEATURES:
                shift = 32 * self.drv_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)
                                        | value << shift)
            case MmioReg.QUEUE_SEL:
                self.queue_sel = value
            case MmioReg.QUEUE_NUM:
                q.num = value
            case MmioReg.QUEUE_DESC_LOW | MmioReg.QUEUE_DESC_HIGH:
                q.desc = _set_half(q.desc, off - MmioReg.QUEUE_DESC_LOW, value)
            case MmioReg.QUEUE_AVAIL_LOW | MmioReg.QUEUE_AVAIL_HIGH:
                q.avail = _set_half(q.avail, off - MmioReg.QUEUE_AVAIL_LOW, value)
            case MmioReg.QUEUE_USED_LOW | MmioReg.QUEUE_USED_HIGH:
                q.used = _set_half(q.used, off - MmioReg.QUEUE_USED_LOW, value)
            case MmioReg.QUEUE_READY:
                q.ready = value
                if value:
                    f = self.driver_features
                    q.dq = DeviceQueue(index=self.queue_sel, size=q.num, desc=q.desc,
                                       avail=q.avail, used=q.used, memory=self.memory,
                                       event_idx=bool(f & bit(TransportFeature.RING_EVENT_IDX)),
                                       indirect=bool(f & bit(TransportFeature.RING_INDIRECT_DESC)),
                                       max_size=q.num_max)
            case MmioReg.QUEUE_NOTIFY:
                assert self.status & DeviceStatus.DRIVER_OK or self.allow_early_notify(value), \
                    "kick before DRIVER_OK"
                self._notify(value)
            case MmioReg.INTERRUPT_ACK:
                self.isr &= ~value
            case MmioReg.STATUS:
                if value == 0:
                    self.reset()
                    return
                if value & DeviceStatus.FEATURES_OK and not self.status & DeviceStatus.FEATURES_OK:
                    if self.refuse_features or self.driver_features & ~self.features:
                        value &= ~DeviceStatus.FEATURES_OK
                self.status = value
            case _ if CONFIG_OFFSET <= off < CONFIG_OFFSET + 16:
                field_ = off - CONFIG_OFFSET
                assert field_ in (ConfigOffset.ACTUAL, ConfigOffset.POISON_VAL), \
                    f"driver wrote read-only config field {field_}"
                self.set_config(field_, value)
            case _:
                raise AssertionError(f"driver wrote a read-only or unknown register {off:#x}")

    def allow_early_notify(self, index: int) -> bool:
        """Linux kicks the stats queue before DRIVER_OK; the host tolerates exactly that."""
        return self.queue_names().get(index) == "stats"

    # ---- helpers for assertions -----------------------------------------------------------
    def writes(self, reg: int) -> list[int]:
        return [v for op, off, v in self.log if op == "w" and off == reg]


def _set_half(addr: int, which: int, value: int) -> int:
    if which == 0:
        return addr & ~0xFFFFFFFF | value
    return addr & 0xFFFFFFFF | value << 32


@dataclass
class Machine:
    """A guest (RAM, allocator, driver) wired to a scripted host."""

    memory: Any
    mm: Any
    host: BalloonHost
    transport: Any
    balloon: Any

    def close(self) -> None:
        self.memory.close()


def make_machine(size: int = 256 << 20, *, options: Any = None, vm_events: Any = None,
                 **host_kw: Any) -> Machine:
    """Build the guest and the host; nothing probed yet."""
    from guest.balloon import BalloonOptions, VirtioBalloon
    from guest.mm import PageAllocator
    from guest.virtio_mmio import VirtioMmioTransport
    from virtqueue.memory import GuestMemory

    memory = GuestMemory.create(size)
    mm = PageAllocator.for_size(size)
    host = BalloonHost(memory, **host_kw)
    transport = VirtioMmioTransport(host, host.irq, memory)
    balloon = VirtioBalloon(transport, mm, memory,
                            options=options or BalloonOptions(max_queue_size=64),
                            vm_events=vm_events)
    return Machine(memory, mm, host, transport, balloon)
