"""The driver side of virtio-mmio (virtio spec §4.2; Linux 6.1 ``drivers/virtio/virtio_mmio.c``).

:class:`VirtioMmioTransport` makes exactly the register accesses Linux's ``vm_*`` functions and
the virtio core (``drivers/virtio/virtio.c``) make, over an :class:`MmioBus`: 32-bit reads and
writes at offsets from the device base. The simulated device model (``device/``) and QEMU over
qtest (``sim.qemu.mmio.QtestMmioBus``) both provide one, so the same driver runs on either.

What a device does wrong is raised as :class:`~protocol.errors.DeviceViolation` naming the rule
of the research catalogue (``MMIO-V-1``, ``GEN-V-5``...); an empty slot or another device type is
:class:`NoDevice`. The transport keeps no clock and never sleeps: the only waiting a driver does
is for interrupts (:mod:`guest.irq`).

Deliberate differences from Linux 6.1 (each a spec rule Linux does not follow to the letter):

- InterruptACK is written with the defined bits only (``MMIO-D-6``); Linux writes back
  whatever InterruptStatus read, undefined bits included.
- Reset waits for Status to read 0 (``GEN-D-12``); ``vm_reset`` in 6.1 writes 0 and moves on.
- Config fields are read inside a ConfigGeneration loop (``GEN-D-13``) unless
  ``config_generation=False``: Linux 6.1 reads a 32-bit field with a single ``readl``.
- Legacy (Version 1) devices are refused (``MMIO-D-3``); Linux still drives them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from protocol.errors import DeviceViolation, UsageError, VballoonError
from protocol.features import TransportFeature, bit, has, names
from protocol.mmio import CONFIG_OFFSET, MAGIC_VALUE, VERSION, InterruptBit, MmioReg
from protocol.split_ring import MAX_QUEUE_SIZE
from protocol.status import DeviceStatus
from virtqueue.driver import DriverQueue
from virtqueue.layout import legacy_layout
from virtqueue.memory import Memory

__all__ = [
    "LINUX_TRANSPORT_FEATURES",
    "VIRTIO_MMIO_VRING_ALIGN",
    "MmioBus",
    "NoDevice",
    "RingAllocator",
    "VirtQueue",
    "VirtioMmioTransport",
]

log = structlog.get_logger("vballoon.guest")

VIRTIO_MMIO_VRING_ALIGN = 4096
"""Linux ``VIRTIO_MMIO_VRING_ALIGN`` (= PAGE_SIZE): rings use the contiguous legacy layout."""

LINUX_TRANSPORT_FEATURES = (
    bit(TransportFeature.RING_INDIRECT_DESC)
    | bit(TransportFeature.RING_EVENT_IDX)
    | bit(TransportFeature.VERSION_1)
    | bit(TransportFeature.ACCESS_PLATFORM)
    | bit(TransportFeature.ORDER_PLATFORM)
)
"""Transport bits (28..40) this driver keeps when offered: Linux 6.1 ``vring_transport_features``
keeps these plus RING_PACKED, which we drop because our rings are split only."""

_TRANSPORT_RANGE = range(28, 41)
"""Linux ``VIRTIO_TRANSPORT_F_START`` .. ``VIRTIO_TRANSPORT_F_END`` (exclusive) in 6.1."""
_RESET_POLLS = 1000
_GENERATION_TRIES = 1000


class MmioBus(Protocol):
    """32-bit little-endian register access relative to one virtio-mmio device's base."""

    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...


class RingAllocator(Protocol):
    """Where rings live: the driver's own guest RAM (Linux ``dma_alloc_coherent``)."""

    def alloc_ring(self, nbytes: int) -> int:
        """Return the guest-physical address of ``nbytes`` of page-aligned RAM, or raise."""
        ...

    def free_ring(self, gpa: int, nbytes: int) -> None: ...


class NoDevice(VballoonError):
    """The slot holds no virtio device we drive (DeviceID 0, or another device type)."""


@dataclass(slots=True)
class VirtQueue:
    """One set-up queue: its ring (the sans-I/O :class:`DriverQueue`), where it lives, its name.

    ``callback`` is the Linux vq callback (``balloon_ack``, ``stats_request``), or None for a
    queue reaped by polling (``free_page_vq``); the interrupt dispatcher calls it on a used-buffer
    interrupt.
    """

    name: str
    index: int
    size: int
    ring: DriverQueue
    ring_gpa: int
    ring_bytes: int
    callback: Callable[[VirtQueue], None] | None
    indirect_area: tuple[int, int] | None = None


class VirtioMmioTransport:
    """A virtio-mmio device as the Linux driver core sees it: status, features, queues, config.

    Args:
        bus: register access to the device.
        irq: the interrupt line (:mod:`guest.irq`); may be set later (``transport.irq = ...``)
            because a polling line needs the transport itself.
        memory: guest RAM, where the rings are zeroed and built.
        config_generation: read config inside a ConfigGeneration loop (spec); False reads each
            32-bit field once, exactly as Linux 6.1 does.
    """

    def __init__(self, bus: MmioBus, irq: object | None, memory: Memory, *,
                 config_generation: bool = True) -> None:
        self.bus = bus
        self.irq = irq
        self.memory = memory
        self.config_generation = config_generation
        self.version = 0
        self.device_id = 0
        self.vendor_id = 0
        self.device_features = 0
        """What the device offers (read by :meth:`negotiate`)."""
        self.features = 0
        """The negotiated features (Linux ``vdev->features``), valid after FEATURES_OK."""
        self.queues: dict[int, VirtQueue] = {}

    # ---- probe (vm_probe) -------------------------------------------------------------
    def probe(self, *, device_id: int | None = None) -> int:
        """Check MagicValue, Version and DeviceID (``MMIO-D-3``, ``MMIO-D-7``); return the ID.

        Raises DeviceViolation for a wrong magic or version, NoDevice for DeviceID 0 (nothing
        else is touched then) or a DeviceID other than ``device_id``.
        """
        magic = self._r(MmioReg.MAGIC_VALUE)
        if magic != MAGIC_VALUE:
            raise DeviceViolation(rule_id="MMIO-V-1", section="4.2.2.1",
                                  message="MagicValue is not 0x74726976 ('virt')", magic=magic)
        version = self._r(MmioReg.VERSION)
        if version != VERSION:
            raise DeviceViolation(rule_id="MMIO-V-1", section="4.2.2.1",
                                  message="Version is not 2 (legacy devices are not driven)",
                                  version=version)
        ident = self._r(MmioReg.DEVICE_ID)
        if ident == 0:
            raise NoDevice("DeviceID is 0: a placeholder slot with no device (MMIO-D-3)")
        if device_id is not None and ident != device_id:
            raise NoDevice(f"DeviceID is {ident}, not {device_id}")
        self.version, self.device_id = version, ident
        self.vendor_id = self._r(MmioReg.VENDOR_ID)
        log.debug("virtio_mmio.probe", device_id=ident, vendor_id=self.vendor_id)
        return ident

    def begin(self, *, device_id: int | None = None) -> None:
        """Probe, reset, ACKNOWLEDGE, DRIVER: ``register_virtio_device`` + ``virtio_dev_probe``."""
        self.probe(device_id=device_id)
        self.reset()
        self.add_status(DeviceStatus.ACKNOWLEDGE)
        self.add_status(DeviceStatus.DRIVER)

    def negotiate(self, driver_features: int,
                  validate: Callable[[int], int] | None = None) -> int:
        """Feature negotiation as the Linux 6.1 virtio core does it; returns the features.

        Accepted = wanted & offered (GEN-D-5), plus every offered transport bit; write them
        (``finalize_features`` drops the ring bits we do not support); let the driver's
        ``validate(features) -> features`` clear bits and, if it did, write them again (so a
        device may see DriverFeatures written twice, as from Linux); then FEATURES_OK.
        """
        self.device_features = offered = self.get_features()
        features = driver_features & offered
        for n in _TRANSPORT_RANGE:
            if has(offered, n):
                features |= bit(n)
        features = self.finalize_features(features)
        if validate is not None:
            validated = validate(features)
            if validated & ~features:
                raise UsageError("validate() may only clear feature bits")
            if validated != features:
                features = self.finalize_features(validated)
        self.features_ok()
        log.debug("virtio_mmio.features", offered=offered, accepted=features)
        return features

    # ---- status (vm_get_status / vm_set_status / vm_reset, virtio_add_status) ------------
    def get_status(self) -> DeviceStatus:
        return DeviceStatus(self._r(MmioReg.STATUS) & 0xFF)

    def set_status(self, status: int) -> None:
        """Write Status. Writing 0 is a reset: use :meth:`reset`."""
        if status == 0:
            raise UsageError("writing status 0 is a reset: call reset()")
        self._w(MmioReg.STATUS, int(status) & 0xFF)
        log.debug("virtio_mmio.status", status=int(status))

    def add_status(self, bits: int) -> None:
        """Linux ``virtio_add_status``: read Status, OR in ``bits``, write it back (GEN-D-2)."""
        self.set_status(self.get_status() | bits)

    def reset(self) -> None:
        """Write 0 to Status and wait until it reads 0 (GEN-D-12; GEN-V-12 binds the device)."""
        self._w(MmioReg.STATUS, 0)
        for _ in range(_RESET_POLLS):
            status = self._r(MmioReg.STATUS)
            if status == 0:
                log.debug("virtio_mmio.reset")
                return
        raise DeviceViolation(rule_id="GEN-V-12", section="2.4.1",
                              message="Status does not read 0 after a reset", status=status)

    def fail(self) -> None:
        """Set FAILED (GEN-D-19), ignoring a device that already broke down."""
        try:
            self.add_status(DeviceStatus.FAILED)
        except VballoonError:
            pass

    def device_ready(self) -> None:
        """Linux ``virtio_device_ready``: set DRIVER_OK (must not be set yet)."""
        status = self.get_status()
        if status & DeviceStatus.DRIVER_OK:
            raise UsageError("DRIVER_OK is already set")
        self.set_status(status | DeviceStatus.DRIVER_OK)

    # ---- features (vm_get_features / vm_finalize_features / virtio_features_ok) --------------
    def get_features(self) -> int:
        """The 64 device feature bits: selector 1 (high word) first, as Linux reads them."""
        self._w(MmioReg.DEVICE_FEATURES_SEL, 1)
        high = self._r(MmioReg.DEVICE_FEATURES)
        self._w(MmioReg.DEVICE_FEATURES_SEL, 0)
        low = self._r(MmioReg.DEVICE_FEATURES)
        return high << 32 | low

    def finalize_features(self, features: int) -> int:
        """Linux ``vm_finalize_features``: keep the ring bits we support, write both words.

        Returns the features written (``vring_transport_features`` may have cleared bits).
        Raises DeviceViolation if VERSION_1 is missing (a version 2 device must offer it).
        """
        for n in _TRANSPORT_RANGE:
            if has(features, n) and not bit(n) & LINUX_TRANSPORT_FEATURES:
                features &= ~bit(n)
        if not has(features, TransportFeature.VERSION_1):
            raise DeviceViolation(rule_id="GEN-V-8", section="6.2",
                                  message="a version 2 virtio-mmio device must offer VERSION_1",
                                  features=features)
        self._w(MmioReg.DRIVER_FEATURES_SEL, 1)
        self._w(MmioReg.DRIVER_FEATURES, features >> 32 & 0xFFFFFFFF)
        self._w(MmioReg.DRIVER_FEATURES_SEL, 0)
        self._w(MmioReg.DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.features = features
        return features

    def features_ok(self) -> None:
        """Set FEATURES_OK and read it back (§3.1.1 steps 5-6); refused -> DeviceViolation."""
        self.add_status(DeviceStatus.FEATURES_OK)
        status = self.get_status()
        if not status & DeviceStatus.FEATURES_OK:
            raise DeviceViolation(rule_id="GEN-V-5", section="2.2.2",
                                  message="the device refused the accepted feature subset",
                                  features=self.features, accepted=names(self.features),
                                  status=int(status))

    # ---- queues (vm_setup_vq / vm_del_vq) -----------------------------------------------
    def setup_vq(self, index: int, name: str, callback: Callable[[VirtQueue], None] | None,
                 rings: RingAllocator, *, max_size: int | None = None,
                 indirect_entries: int = 0) -> VirtQueue:
        """Set up queue ``index`` as §4.2.3.2 (and Linux ``vm_setup_vq``) say.

        QueueSel; QueueReady must read 0; QueueNumMax (0: the queue does not exist); the queue
        size is the largest power of two <= QueueNumMax (and <= ``max_size``); the ring memory
        (contiguous legacy layout, page aligned) is taken from ``rings`` and zeroed; QueueNum,
        the three address pairs, QueueReady = 1. With ``indirect_entries`` (and INDIRECT_DESC
        negotiated) room for one indirect table of that many entries per head is taken too
        (Linux allocates each table when it adds the chain).
        """
        self._w(MmioReg.QUEUE_SEL, index)
        if self._r(MmioReg.QUEUE_READY):
            raise DeviceViolation(rule_id="MMIO-V-3", section="4.2.3.2",
                                  message="QueueReady is not 0 before queue setup", queue=index)
        num_max = self._r(MmioReg.QUEUE_NUM_MAX)
        if num_max == 0:
            raise NoDevice(f"queue {index} ({name}) does not exist: QueueNumMax is 0")
        size = min(num_max, MAX_QUEUE_SIZE, max_size or MAX_QUEUE_SIZE)
        size = 1 << (size.bit_length() - 1)
        nbytes = legacy_layout(0, size, VIRTIO_MMIO_VRING_ALIGN)[3]
        gpa = rings.alloc_ring(nbytes)
        desc, avail, used, _ = legacy_layout(gpa, size, VIRTIO_MMIO_VRING_ALIGN)
        indirect = has(self.features, TransportFeature.RING_INDIRECT_DESC)
        area = None
        if indirect and indirect_entries > 1:
            area = (rings.alloc_ring(size * indirect_entries * 16), size * indirect_entries * 16)
        try:
            ring = DriverQueue(
                index=index, size=size, desc=desc, avail=avail, used=used, memory=self.memory,
                event_idx=has(self.features, TransportFeature.RING_EVENT_IDX),
                indirect=indirect, indirect_area=area, notify=self.notify,
            )
        except BaseException:
            rings.free_ring(gpa, nbytes)
            if area is not None:
                rings.free_ring(*area)
            raise
        vq = VirtQueue(name, index, size, ring, gpa, nbytes, callback, area)
        self.queues[index] = vq
        self._w(MmioReg.QUEUE_NUM, size)
        for reg, addr in ((MmioReg.QUEUE_DESC_LOW, desc), (MmioReg.QUEUE_AVAIL_LOW, avail),
                          (MmioReg.QUEUE_USED_LOW, used)):
            self._w(reg, addr & 0xFFFFFFFF)
            self._w(reg + 4, addr >> 32)
        self._w(MmioReg.QUEUE_READY, 1)
        log.debug("virtio_mmio.vq_setup", queue=index, name=name, size=size, num_max=num_max,
                  desc=desc, avail=avail, used=used, indirect_area=area)
        return vq

    def del_vqs(self, rings: RingAllocator) -> None:
        """Linux ``vm_del_vqs``: QueueReady = 0 for each queue, then free its ring memory."""
        for index, vq in sorted(self.queues.items()):
            self._w(MmioReg.QUEUE_SEL, index)
            self._w(MmioReg.QUEUE_READY, 0)
            if self._r(MmioReg.QUEUE_READY):
                log.warning("virtio_mmio.vq_still_ready", queue=index)
            rings.free_ring(vq.ring_gpa, vq.ring_bytes)
            if vq.indirect_area is not None:
                rings.free_ring(*vq.indirect_area)
        self.queues.clear()

    def notify(self, index: int) -> None:
        """Linux ``vm_notify``: write the queue index to QueueNotify."""
        self._w(MmioReg.QUEUE_NOTIFY, index)

    # ---- interrupts (vm_interrupt) ----------------------------------------------------
    def read_interrupt_status(self) -> InterruptBit:
        """InterruptStatus, undefined bits dropped (MMIO-D-6), without acknowledging."""
        return InterruptBit(self._r(MmioReg.INTERRUPT_STATUS) & 0x3)

    def take_interrupt(self) -> InterruptBit:
        """Read InterruptStatus and acknowledge the bits seen, as ``vm_interrupt`` does."""
        status = self.read_interrupt_status()
        self._w(MmioReg.INTERRUPT_ACK, int(status))
        return status

    # ---- config space (vm_get / vm_set, virtio_cread with the generation loop) ------------
    def generation(self) -> int:
        return self._r(MmioReg.CONFIG_GENERATION)

    def read_config32(self, offset: int) -> int:
        """A le32 config field at ``offset`` (bytes from the start of config space)."""
        if offset % 4 or offset < 0:
            raise UsageError(f"config offset {offset} is not a 4-byte aligned field")
        if not self.config_generation:
            return self._r(CONFIG_OFFSET + offset)
        for _ in range(_GENERATION_TRIES):
            before = self.generation()
            value = self._r(CONFIG_OFFSET + offset)
            if self.generation() == before:
                return value
        raise DeviceViolation(rule_id="MMIO-V-4", section="4.2.2.1",
                              message="ConfigGeneration never settles", offset=offset)

    def write_config32(self, offset: int, value: int) -> None:
        """Write a le32 config field in one 32-bit access (LEG-BAL-4 holds by construction)."""
        if offset % 4 or offset < 0:
            raise UsageError(f"config offset {offset} is not a 4-byte aligned field")
        self._w(CONFIG_OFFSET + offset, value & 0xFFFFFFFF)

    # ---- raw access ---------------------------------------------------------------------
    def _r(self, reg: int) -> int:
        return self.bus.read32(int(reg))

    def _w(self, reg: int, value: int) -> None:
        self.bus.write32(int(reg), int(value))
