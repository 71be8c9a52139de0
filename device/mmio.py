"""The virtio-mmio transport, device side: the register file a driver reads and writes (§4.2.2).

Version 2 (modern) only. :class:`MmioDevice` turns 8/16/32-bit register accesses (offsets from
the device base) into calls on a :class:`~device.transport.VirtioBackendDevice`, and the
device's notifications into the InterruptStatus latch plus an ``irq()`` call:

- identity: MagicValue, Version 2, DeviceID, VendorID (QEMU's ``"QEMU"`` by default);
- feature negotiation through the two 32-bit windows (DeviceFeaturesSel / DriverFeaturesSel);
  setting FEATURES_OK hands the 64-bit driver features to ``set_features``; a refusal (a bit
  not offered, GEN-V-5) leaves FEATURES_OK clear on read-back;
- queue setup: QueueSel, QueueNumMax (the device's size; 0 = no such queue), QueueNum (like
  QEMU, 0 or above the maximum is ignored and the size starts at the maximum), the three area
  addresses, QueueReady (1 attaches the ring, 0 detaches it); a ring the device refuses stays
  not ready, and under the needs-reset policy the device raises NEEDS_RESET;
- QueueNotify kicks the device (which takes nothing before DRIVER_OK, GEN-V-1);
- Status: 0 resets everything (MMIO-V-3); DRIVER_OK activates the device; DEVICE_NEEDS_RESET is
  device-owned and survives driver writes until reset;
- InterruptStatus bit 0 (used buffer) / bit 1 (config change) stay set until InterruptACK
  (MMIO-V-2); ConfigGeneration changes with every device config change (MMIO-V-4);
- config space at 0x100 with 8, 16 and 32-bit accesses.

Driver mistakes (reads of write-only registers, writes to read-only ones, unknown or legacy
offsets, misaligned or narrow control accesses, queue changes while ready) are harmless: reads
give 0, writes are ignored, and each is logged as ``mmio.bad_access`` with a research/spec.md
requirement ID (MMIO-D-1, -2, -5, -6) and counted in :attr:`MmioDevice.counters`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from device.events import emit, warn
from device.transport import HostMemory, RingConfig, VirtioBackendDevice
from protocol.errors import DriverViolation, ProtocolViolation, UsageError
from protocol.features import names
from protocol.mmio import CONFIG_OFFSET, MAGIC_VALUE, VERSION, InterruptBit, MmioReg
from protocol.status import DeviceStatus

__all__ = ["QEMU_VENDOR_ID", "MmioDevice"]

QEMU_VENDOR_ID = 0x554D4551
"""``"QEMU"`` little-endian: the VendorID QEMU's virtio-mmio devices report."""

_U32 = 0xFFFF_FFFF
_R = MmioReg
# plain ints: ~ on an IntFlag complements only its defined bits
_INT_VRING, _INT_CONFIG = int(InterruptBit.VRING), int(InterruptBit.CONFIG)
_FEATURES_OK, _DRIVER_OK = int(DeviceStatus.FEATURES_OK), int(DeviceStatus.DRIVER_OK)
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_WRITE_ONLY = frozenset({
    _R.DEVICE_FEATURES_SEL, _R.DRIVER_FEATURES, _R.DRIVER_FEATURES_SEL, _R.QUEUE_SEL,
    _R.QUEUE_NUM, _R.QUEUE_NOTIFY, _R.INTERRUPT_ACK, _R.QUEUE_DESC_LOW, _R.QUEUE_DESC_HIGH,
    _R.QUEUE_AVAIL_LOW, _R.QUEUE_AVAIL_HIGH, _R.QUEUE_USED_LOW, _R.QUEUE_USED_HIGH, _R.SHM_SEL,
})
_READ_ONLY = frozenset({
    _R.MAGIC_VALUE, _R.VERSION, _R.DEVICE_ID, _R.VENDOR_ID, _R.DEVICE_FEATURES,
    _R.QUEUE_NUM_MAX, _R.INTERRUPT_STATUS, _R.CONFIG_GENERATION, _R.SHM_LEN_LOW,
    _R.SHM_LEN_HIGH, _R.SHM_BASE_LOW, _R.SHM_BASE_HIGH,
})
_LEGACY = frozenset({_R.GUEST_PAGE_SIZE, _R.QUEUE_ALIGN, _R.QUEUE_PFN})
_ADDRESS = {
    _R.QUEUE_DESC_LOW: ("desc", 0), _R.QUEUE_DESC_HIGH: ("desc", 32),
    _R.QUEUE_AVAIL_LOW: ("driver", 0), _R.QUEUE_AVAIL_HIGH: ("driver", 32),
    _R.QUEUE_USED_LOW: ("device", 0), _R.QUEUE_USED_HIGH: ("device", 32),
}
_REGISTERS = {int(r): r for r in MmioReg if r is not MmioReg.CONFIG}


@dataclass(slots=True)
class _QueueRegs:
    """The per-queue registers behind QueueSel."""

    num: int
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


class MmioDevice:
    """A virtio-mmio (version 2) device in front of ``device`` (see the module docstring).

    Args:
        device: the device model; its ``on_config_change`` and ``on_needs_reset`` are
            installed by this transport.
        memory: guest RAM the rings live in.
        irq: raises the device's interrupt line; called whenever an InterruptStatus bit is set.
        vendor_id: the VendorID register.
    """

    def __init__(self, device: VirtioBackendDevice, memory: HostMemory, *,
                 irq: Callable[[], None], vendor_id: int = QEMU_VENDOR_ID) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.vendor_id = vendor_id
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = [0, 0]
        self.queue_sel = 0
        self.shm_sel = 0
        self._queues: dict[int, _QueueRegs] = {}
        self.counters: Counter[str] = Counter()
        """Driver mistakes by rule ID, and ``needs_reset`` / ``features_refused`` counts."""
        device.on_config_change = self._config_changed
        device.on_needs_reset = self._device_needs_reset

    # ---- 32-bit register accesses -------------------------------------------------------
    def read32(self, offset: int) -> int:
        """Read the 32-bit register (or config word) at ``offset``."""
        if offset >= CONFIG_OFFSET:
            return int.from_bytes(self._config_read(offset, 4), "little")
        reg = self._register(offset, "read")
        if reg is None:
            return 0
        if reg in _WRITE_ONLY or reg in _LEGACY:
            self._bad(offset, "read", "MMIO-D-1", "register is write-only" if reg in _WRITE_ONLY
                      else "legacy register")
            return 0
        return self._read_register(reg)

    def write32(self, offset: int, value: int) -> None:
        """Write the 32-bit register (or config word) at ``offset``."""
        value &= _U32
        if offset >= CONFIG_OFFSET:
            self._config_write(offset, value.to_bytes(4, "little"))
            return
        reg = self._register(offset, "write")
        if reg is None:
            return
        if reg in _READ_ONLY or reg in _LEGACY:
            self._bad(offset, "write", "MMIO-D-1", "register is read-only" if reg in _READ_ONLY
                      else "legacy register")
            return
        self._write_register(reg, value)

    # ---- narrow accesses: config space only (MMIO-D-2) -----------------------------------
    def read8(self, offset: int) -> int:
        return self._narrow_read(offset, 1)

    def read16(self, offset: int) -> int:
        return self._narrow_read(offset, 2)

    def write8(self, offset: int, value: int) -> None:
        self._narrow_write(offset, value & 0xFF, 1)

    def write16(self, offset: int, value: int) -> None:
        self._narrow_write(offset, value & 0xFFFF, 2)

    def _narrow_read(self, offset: int, width: int) -> int:
        if offset < CONFIG_OFFSET:
            self._bad(offset, "read", "MMIO-D-2", f"{8 * width}-bit access to a control register")
            return 0
        return int.from_bytes(self._config_read(offset, width), "little")

    def _narrow_write(self, offset: int, value: int, width: int) -> None:
        if offset < CONFIG_OFFSET:
            self._bad(offset, "write", "MMIO-D-2",
                      f"{8 * width}-bit access to a control register")
            return
        self._config_write(offset, value.to_bytes(width, "little"))

    def _config_read(self, offset: int, width: int) -> bytes:
        if offset % width:
            self._bad(offset, "read", "MMIO-D-2", "misaligned config access", performed=True)
        return self.device.read_config(offset - CONFIG_OFFSET, width)

    def _config_write(self, offset: int, data: bytes) -> None:
        if offset % len(data):
            self._bad(offset, "write", "MMIO-D-2", "misaligned config access", performed=True)
        self.device.write_config(offset - CONFIG_OFFSET, data)

    # ---- control registers ---------------------------------------------------------------
    def _register(self, offset: int, access: str) -> MmioReg | None:
        if offset % 4:
            self._bad(offset, access, "MMIO-D-2", "control register access not 32-bit aligned")
            return None
        reg = _REGISTERS.get(offset)
        if reg is None:
            self._bad(offset, access, "MMIO-D-1", "no register at this offset")
        return reg

    def _read_register(self, reg: MmioReg) -> int:
        if reg is _R.MAGIC_VALUE:
            return MAGIC_VALUE
        if reg is _R.VERSION:
            return VERSION
        if reg is _R.DEVICE_ID:
            return self.device.device_id
        if reg is _R.VENDOR_ID:
            return self.vendor_id
        if reg is _R.DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device.offered_features() >> (32 * self.device_features_sel) & _U32
        if reg is _R.QUEUE_NUM_MAX:
            return self.device.queue_max_size(self.queue_sel)
        if reg is _R.QUEUE_READY:
            regs = self._selected()
            return int(regs is not None and regs.ready)
        if reg is _R.INTERRUPT_STATUS:
            return self.interrupt_status
        if reg is _R.STATUS:
            return self.status
        if reg is _R.CONFIG_GENERATION:
            return self.config_generation
        if reg in (_R.SHM_LEN_LOW, _R.SHM_LEN_HIGH, _R.SHM_BASE_LOW, _R.SHM_BASE_HIGH):
            return _U32  # no shared memory region: length and base read as -1
        return 0  # QUEUE_RESET: VIRTIO_F_RING_RESET is not offered

    def _write_register(self, reg: MmioReg, value: int) -> None:
        if reg is _R.STATUS:
            self._write_status(value)
        elif reg is _R.QUEUE_NOTIFY:
            self._notify(value)
        elif reg is _R.INTERRUPT_ACK:
            if value & ~(_INT_VRING | _INT_CONFIG):
                self._bad(int(reg), "write", "MMIO-D-6", "acknowledged undefined bits",
                          value=value)
            self.interrupt_status &= ~value
        elif reg is _R.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif reg is _R.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif reg is _R.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif reg is _R.QUEUE_SEL:
            self.queue_sel = value
        elif reg is _R.SHM_SEL:
            self.shm_sel = value
        elif reg is _R.QUEUE_READY:
            self._write_queue_ready(value)
        elif reg is _R.QUEUE_NUM or reg in _ADDRESS:
            self._write_queue_field(reg, value)
        else:  # QUEUE_RESET
            self._bad(int(reg), "write", "MMIO-D-1", "VIRTIO_F_RING_RESET is not offered")

    def _write_driver_features(self, value: int) -> None:
        if self.status & _FEATURES_OK:
            self._bad(int(_R.DRIVER_FEATURES), "write", "GEN-D-18",
                      "features written after FEATURES_OK")
        elif self.driver_features_sel > 1:
            if value:
                self._bad(int(_R.DRIVER_FEATURES), "write", "GEN-D-5",
                          "feature bits above 63 accepted", select=self.driver_features_sel)
        else:
            self.driver_features[self.driver_features_sel] = value

    # ---- queues ---------------------------------------------------------------------------
    def _selected(self) -> _QueueRegs | None:
        """The registers of the selected queue (None if the device has no such queue)."""
        sel = self.queue_sel
        regs = self._queues.get(sel)
        if regs is None:
            max_size = self.device.queue_max_size(sel)
            if max_size == 0:
                return None
            regs = self._queues[sel] = _QueueRegs(num=max_size)
        return regs

    def _write_queue_field(self, reg: MmioReg, value: int) -> None:
        regs = self._selected()
        if regs is None:
            self._bad(int(reg), "write", "CFG-06", "queue does not exist", queue=self.queue_sel)
            return
        if regs.ready:
            self._bad(int(reg), "write", "MMIO-D-5", "queue changed while ready",
                      queue=self.queue_sel)
            return
        if reg is _R.QUEUE_NUM:
            if value == 0 or value > self.device.queue_max_size(self.queue_sel):
                self._bad(int(reg), "write", "CFG-01", "queue size 0 or above QueueNumMax "
                          "(ignored, as QEMU)", queue=self.queue_sel, size=value)
                return
            regs.num = value
            return
        field, shift = _ADDRESS[reg]
        old = getattr(regs, field)
        setattr(regs, field, (old & ~(_U32 << shift)) | value << shift)

    def _write_queue_ready(self, value: int) -> None:
        sel = self.queue_sel
        regs = self._selected()
        if regs is None:
            self._bad(int(_R.QUEUE_READY), "write", "CFG-06", "queue does not exist", queue=sel)
            return
        if not value:
            if regs.ready:
                regs.ready = False
                try:
                    self.device.detach_queue(sel)
                except UsageError:
                    pass
                emit("mmio.queue_ready", queue=sel, ready=False)
            return
        if regs.ready:
            return
        if not self.status & _FEATURES_OK:
            self._bad(int(_R.QUEUE_READY), "write", "GEN-D-18", "queue set up before "
                      "FEATURES_OK", queue=sel, performed=True)
        ring = RingConfig(size=regs.num, desc=regs.desc, avail=regs.driver, used=regs.device)
        try:
            self.device.attach_queue(sel, ring, self.memory, self._used_notifier(sel))
        except DriverViolation as v:
            warn("mmio.queue_ready", queue=sel, ready=False, rule=v.rule_id, refused=v.message)
            self.counters[v.rule_id] += 1
            return
        regs.ready = True
        emit("mmio.queue_ready", queue=sel, ready=True, size=ring.size, desc=ring.desc,
             driver=ring.avail, device=ring.used)

    def _notify(self, value: int) -> None:
        index = value & 0xFFFF  # VIRTIO_F_NOTIFICATION_DATA is never offered
        regs = self._queues.get(index)
        if regs is None or not regs.ready:
            self._bad(int(_R.QUEUE_NOTIFY), "write", "CFG-06", "notify of a queue not ready",
                      queue=index)
            return
        if not self.status & _DRIVER_OK:
            emit("mmio.kick", queue=index, rule="GEN-D-20", before_driver_ok=True)
        self.device.kick(index)

    def _used_notifier(self, index: int) -> Callable[[], None]:
        def notify_used() -> None:
            regs = self._queues.get(index)
            if regs is not None and regs.ready:
                self._raise(_INT_VRING)
        return notify_used

    # ---- status, reset, interrupts -----------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        old, new = self.status, value & 0xFF
        if old & ~new & ~_NEEDS_RESET:
            self._bad(int(_R.STATUS), "write", "GEN-D-2", "driver cleared a status bit",
                      old=old, new=new, performed=True)
        new |= old & _NEEDS_RESET  # device-owned until reset
        if new & ~old & _FEATURES_OK:
            features = self.driver_features[1] << 32 | self.driver_features[0]
            if not self.device.set_features(features):
                new &= ~_FEATURES_OK
                self.counters["features_refused"] += 1
                warn("mmio.features_refused", rule="GEN-V-5", features=names(features),
                     offered=names(self.device.offered_features()))
        activate = bool(new & ~old & _DRIVER_OK)
        if activate and not new & _FEATURES_OK:
            self._bad(int(_R.STATUS), "write", "GEN-D-18", "DRIVER_OK without FEATURES_OK "
                      "(not set)")
            new &= ~_DRIVER_OK
            activate = False
        self.status = new
        emit("mmio.status", old=old, new=new, status=DeviceStatus(new).name)
        if activate:
            self.device.activate()

    def _reset(self) -> None:
        """Status 0: reset the device and every transport register (MMIO-V-3)."""
        self.device.reset()
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = [0, 0]
        self.queue_sel = self.shm_sel = 0
        self._queues.clear()
        emit("mmio.status", old=None, new=0, reset=True)

    def _raise(self, bit: int) -> None:
        self.interrupt_status |= bit
        self.irq()

    def _config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & _U32
        if self.status & _DRIVER_OK:
            self._raise(_INT_CONFIG)

    def _device_needs_reset(self, violation: ProtocolViolation) -> None:
        """GEN-V-2/3: set DEVICE_NEEDS_RESET and, once DRIVER_OK, a config interrupt."""
        self.status |= _NEEDS_RESET
        self.counters["needs_reset"] += 1
        warn("mmio.needs_reset", rule=violation.rule_id, message=violation.message)
        self._config_changed()

    def _bad(self, offset: int, access: str, rule: str, reason: str, **fields: object) -> None:
        self.counters[rule] += 1
        warn("mmio.bad_access", offset=hex(offset), access=access, rule=rule, reason=reason,
             **fields)
