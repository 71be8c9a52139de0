"""The monitor on the virtio-mmio registers: every access the driver makes, checked (§4.2.2.2).

:class:`MonitoredMmio` is the bus the driver talks to on the simulated machine: it forwards
each access to the real :class:`~device.mmio.MmioDevice` and tells the monitor what the driver
did, in order. It grades the register rules (MMIO-D-1 defined registers in their direction,
MMIO-D-2 access widths, MMIO-D-4 the select registers, MMIO-D-5 queue registers, MMIO-D-6 and
MMIO-D-8 interrupt acknowledgement, MMIO-D-7 the probe order, CFG-06 notifications of ready
queues only) and feeds the status and feature steps to :class:`~device.monitor.status`.
"""

from __future__ import annotations

from typing import Any

from device.monitor.monitor import DriverMonitor
from protocol.mmio import CONFIG_OFFSET, InterruptBit, MmioReg

__all__ = ["MonitoredMmio"]

_R = MmioReg
_WRITE_ONLY = frozenset({
    _R.DEVICE_FEATURES_SEL, _R.DRIVER_FEATURES, _R.DRIVER_FEATURES_SEL, _R.QUEUE_SEL,
    _R.QUEUE_NUM, _R.QUEUE_NOTIFY, _R.INTERRUPT_ACK, _R.QUEUE_DESC_LOW, _R.QUEUE_DESC_HIGH,
    _R.QUEUE_AVAIL_LOW, _R.QUEUE_AVAIL_HIGH, _R.QUEUE_USED_LOW, _R.QUEUE_USED_HIGH, _R.SHM_SEL})
_READ_ONLY = frozenset({
    _R.MAGIC_VALUE, _R.VERSION, _R.DEVICE_ID, _R.VENDOR_ID, _R.DEVICE_FEATURES,
    _R.QUEUE_NUM_MAX, _R.INTERRUPT_STATUS, _R.CONFIG_GENERATION, _R.SHM_LEN_LOW,
    _R.SHM_LEN_HIGH, _R.SHM_BASE_LOW, _R.SHM_BASE_HIGH})
_LEGACY = frozenset({_R.GUEST_PAGE_SIZE, _R.QUEUE_ALIGN, _R.QUEUE_PFN})
_QUEUE_FIELDS = frozenset({_R.QUEUE_NUM, _R.QUEUE_DESC_LOW, _R.QUEUE_DESC_HIGH,
                           _R.QUEUE_AVAIL_LOW, _R.QUEUE_AVAIL_HIGH, _R.QUEUE_USED_LOW,
                           _R.QUEUE_USED_HIGH})
_PROBE = (_R.MAGIC_VALUE, _R.VERSION, _R.DEVICE_ID)
_REGISTERS = {int(r): r for r in MmioReg if r is not MmioReg.CONFIG}
_DEFINED_IRQ = int(InterruptBit.VRING | InterruptBit.CONFIG)


class MonitoredMmio:
    """An ``MmioBus`` (plus 8/16-bit config accesses) in front of ``mmio``, watched by
    ``monitor``."""

    def __init__(self, mmio: Any, monitor: DriverMonitor) -> None:
        self.mmio = mmio
        self.monitor = monitor
        self.ledger = monitor.ledger
        self._probe_reads: list[MmioReg] = []
        self._probe_done = False
        self._dev_sel_fresh = False
        self._drv_sel_fresh = False
        self._isr_seen: int | None = None
        self._ready_readback: int | None = None

    # ---- the bus ----------------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        reg = self._control(offset, 4, "read")
        value = self.mmio.read32(offset)
        if reg is not None:
            self._after_read(reg, value)
        return value

    def write32(self, offset: int, value: int) -> None:
        reg = self._control(offset, 4, "write")
        if reg is not None:
            self._before_write(reg, value)
        self.mmio.write32(offset, value)
        if reg is not None:
            self._after_write(reg, value)

    def read16(self, offset: int) -> int:
        self._control(offset, 2, "read")
        return self.mmio.read16(offset)

    def read8(self, offset: int) -> int:
        self._control(offset, 1, "read")
        return self.mmio.read8(offset)

    def write16(self, offset: int, value: int) -> None:
        self._control(offset, 2, "write")
        self.mmio.write16(offset, value)

    def write8(self, offset: int, value: int) -> None:
        self._control(offset, 1, "write")
        self.mmio.write8(offset, value)

    # ---- access rules ----------------------------------------------------------------------
    def _control(self, offset: int, width: int, access: str) -> MmioReg | None:
        """Grade MMIO-D-1/2/7 for an access; the register it names (None for config)."""
        led = self.ledger
        if offset >= CONFIG_OFFSET:
            self._probe_check(None, access)
            # every balloon config field is a le32: 32-bit aligned accesses only
            led.check("MMIO-D-2", width == 4 and offset % 4 == 0,
                      f"config {access} of {8 * width} bits at {offset:#x}", offset=offset,
                      width=width)
            if access == "write":
                self.monitor.status.config_written_(offset - CONFIG_OFFSET)
            return None
        aligned = width == 4 and offset % 4 == 0
        led.check("MMIO-D-2", aligned, f"control register {access} of {8 * width} bits at "
                  f"{offset:#x}", offset=offset, width=width)
        reg = _REGISTERS.get(offset) if aligned else None
        self._probe_check(reg, access)
        if reg is None:
            if aligned:
                led.fail("MMIO-D-1", f"{access} at {offset:#x}: no register there",
                         offset=offset, access=access)
            return None
        wrong = (reg in _WRITE_ONLY and access == "read") or (
            reg in _READ_ONLY and access == "write") or reg in _LEGACY
        led.check("MMIO-D-1", not wrong, f"{access} of {reg.name}" + (
            " (legacy register)" if reg in _LEGACY else " (wrong direction)" if wrong else ""),
            register=reg.name, access=access)
        return None if wrong else reg

    def _probe_check(self, reg: MmioReg | None, access: str) -> None:
        """MMIO-D-7: MagicValue, Version and DeviceID are read first, in that order."""
        if self._probe_done:
            return
        if access == "read" and reg in _PROBE and reg not in self._probe_reads:
            self._probe_reads.append(reg)
            if len(self._probe_reads) < len(_PROBE):
                return
        self._probe_done = True
        ok = tuple(self._probe_reads) == _PROBE
        self.ledger.check("MMIO-D-7", ok, "MagicValue, Version and DeviceID read first"
                          if ok else f"first accesses: {[r.name for r in self._probe_reads]} "
                          f"then {access} of {reg.name if reg else 'config space'}",
                          read=[r.name for r in self._probe_reads])

    # ---- what each access means -----------------------------------------------------------
    def _after_read(self, reg: MmioReg, value: int) -> None:
        mon, led = self.monitor, self.ledger
        if reg is _R.STATUS:
            mon.status.status_read(value)
        elif reg is _R.DEVICE_FEATURES:
            led.check("MMIO-D-4", self._dev_sel_fresh, "DeviceFeaturesSel written before "
                      "reading DeviceFeatures" if self._dev_sel_fresh else
                      "DeviceFeatures read twice without writing DeviceFeaturesSel between")
            self._dev_sel_fresh = False
            mon.status.device_features_read_()
        elif reg is _R.INTERRUPT_STATUS:
            mon.sweep()
            self._isr_seen = value
        elif reg is _R.QUEUE_READY and self._ready_readback is not None:
            led.ok("MMIO-D-5", f"QueueReady read back after stopping queue "
                   f"{self._ready_readback}", queue=self._ready_readback)
            self._ready_readback = None

    def _before_write(self, reg: MmioReg, value: int) -> None:
        mon, led = self.monitor, self.ledger
        sel = self.mmio.queue_sel
        if self._ready_readback is not None and reg in (_QUEUE_FIELDS | {_R.QUEUE_SEL,
                                                                          _R.QUEUE_READY}):
            led.fail("MMIO-D-5", f"queue {self._ready_readback} stopped (QueueReady 0) and "
                     f"not read back before {reg.name} was written",
                     queue=self._ready_readback)
            self._ready_readback = None
        if reg in _QUEUE_FIELDS:
            ready = bool(self.mmio.read32(int(_R.QUEUE_READY)))
            led.check("MMIO-D-5", not ready, f"{reg.name} = {value:#x} written to queue {sel} "
                      f"while {'ready' if ready else 'not ready'}", queue=sel,
                      register=reg.name)
            if reg is _R.QUEUE_NUM:
                top = self.mmio.device.queue_max_size(sel)
                led.check("MMIO-D-5", 0 < value <= top, f"QueueNum {value} for queue {sel} "
                          f"(QueueNumMax {top})", queue=sel, num=value, num_max=top)
        elif reg is _R.DRIVER_FEATURES:
            led.check("MMIO-D-4", self._drv_sel_fresh, "DriverFeaturesSel written before "
                      "DriverFeatures" if self._drv_sel_fresh else
                      "DriverFeatures written twice without writing DriverFeaturesSel between")
            self._drv_sel_fresh = False
            mon.status.driver_features_written_()
        elif reg is _R.INTERRUPT_ACK:
            seen = self._isr_seen
            led.check("MMIO-D-8", seen is not None, "InterruptACK written after reading "
                      "InterruptStatus" if seen is not None else
                      "InterruptACK written without reading InterruptStatus first", ack=value)
            handled = value & ~_DEFINED_IRQ == 0 and (seen is None or value & ~seen == 0)
            led.check("MMIO-D-6", handled, f"InterruptACK {value:#x} after InterruptStatus "
                      f"{seen!r}", ack=value, interrupt_status=seen)
            self._isr_seen = None
        elif reg is _R.QUEUE_NOTIFY:
            index = value & 0xFFFF
            ready = index in self.monitor.rings
            led.check("CFG-06", ready, f"notification of queue {index} "
                      f"({'ready' if ready else 'not ready'})", queue=index)
            mon.status.notified(index, queue_name=mon.queue_name(index))
        elif reg is _R.STATUS:
            mon.sweep()

    def _after_write(self, reg: MmioReg, value: int) -> None:
        mon = self.monitor
        if reg is _R.DEVICE_FEATURES_SEL:
            self._dev_sel_fresh = True
        elif reg is _R.DRIVER_FEATURES_SEL:
            self._drv_sel_fresh = True
        elif reg is _R.QUEUE_READY:
            sel = self.mmio.queue_sel
            if value:
                mon.status.queue_enabled(sel)
            else:
                self._ready_readback = sel
        elif reg is _R.STATUS:
            mon.status_written(value)
