"""Where the hostile driver meets a device: a transport-neutral port, and the virtio-mmio one.

A :class:`DevicePort` is what the suite needs of a device, whatever carries it: raw status and
feature steps, queue setup at addresses the driver picks, notifications, config access, guest
RAM, and :meth:`DevicePort.settle` (let the device do what it is going to do, bounded). The
virtio-mmio port (:class:`MmioPort`) works over any ``MmioBus``: our
:class:`~device.mmio.MmioDevice` in process, QEMU's transport over qtest
(``sim.qemu.QtestMmioBus``). The vhost-user port is :mod:`guest.villain.vhost_user`.

Nothing here validates what it writes: that is the point of a hostile driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from protocol.mmio import CONFIG_OFFSET, MmioReg
from protocol.status import DeviceStatus
from virtqueue.cases import Geometry

__all__ = ["DevicePort", "HostControl", "MmioPort", "PortLayout"]

_R = MmioReg
_U32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class PortLayout:
    """Where things go in the device's guest RAM.

    Attributes:
        geometry: the RAM map (layouts are built inside ``geometry.arena``; bad addresses
            come from ``geometry.outside``).
        pool: ``(first_pfn, pages)``: pages filled with a pattern whose PFNs payloads carry; a
            page the device discarded reads back as zeros.
        control: guest address of 128 KiB for the suite's own valid rings and buffers.
        sentinel: ``(first_pfn, pages)`` filled with the pattern and named by no payload: a
            device that discards one of them took a PFN from bytes that are not a payload
            (e.g. an indirect table read as data). Small PFNs are the likely victims.
    """

    geometry: Geometry
    pool: tuple[int, int]
    control: int
    sentinel: tuple[int, int] = (0, 64)


class HostControl(Protocol):
    """The host's side of a device, where the suite can reach it (QMP for QEMU, the device
    object for ours): what a driver cannot do, but a case needs done."""

    async def set_target(self, target_bytes: int) -> None:
        """Ask the guest to shrink to ``target_bytes`` (QMP ``balloon``)."""
        ...

    def can_hint(self) -> bool:
        """Whether :meth:`hint_start` and friends work here (QEMU: only inside a migration)."""
        ...

    async def hint_start(self) -> None: ...
    async def hint_done(self) -> None: ...


class DevicePort(Protocol):
    """What the suite needs of a device (see the module docstring)."""

    name: str
    memory: Any
    layout: PortLayout
    status_visible: bool
    """Whether DEVICE_NEEDS_RESET and InterruptStatus can be read (not over vhost-user)."""
    stuck: bool
    """Whether the last :meth:`settle` found the device still busy at its bound."""
    reset_signal: str
    """How this transport shows an error that needs a reset, for evidence."""
    host: HostControl | None
    """The host's controls, if the suite can reach them."""

    def offered_features(self) -> int: ...
    async def begin(self, features: int) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write ``features``, FEATURES_OK; whether it held."""
        ...
    async def setup_queue(self, index: int, size: int, desc: int, avail: int,
                          used: int, *, ready: bool = True) -> bool:
        """Configure queue ``index``; with ``ready=False`` leave it not ready (MMIO
        QueueReady 0, vhost-user not enabled)."""
        ...
    async def driver_ok(self) -> None: ...
    async def notify(self, index: int) -> None: ...
    async def settle(self, until: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Let the device do what it is going to do; with ``until``, also wait (bounded)
        until it holds (devices that work asynchronously, e.g. QEMU's iothread)."""
        ...
    def alive(self) -> bool:
        """Whether the device is still there (a crashed peer is a FAIL)."""
        ...
    async def needs_reset(self) -> bool:
        """Whether the device signalled an error that needs a reset (MMIO: the status bit;
        vhost-user: the back-end closed the connection)."""
        ...
    async def config_interrupt(self) -> bool | None:
        """Whether a configuration change notification is pending (None: not observable)."""
        ...
    async def reset(self) -> None: ...
    async def status(self) -> int | None: ...
    async def interrupt_status(self) -> int | None: ...
    async def read_config(self, offset: int) -> int | None: ...
    async def write_config(self, offset: int, value: int) -> None: ...
    async def queue_ready(self, index: int) -> int | None: ...
    async def identity(self) -> dict[str, int] | None: ...
    async def config_generation(self) -> int | None: ...
    async def take_used_interrupt(self, index: int) -> bool | None:
        """Whether a used-buffer notification is pending for queue ``index``, and clear it
        (MMIO: InterruptStatus bit 0, then InterruptACK; None: not observable)."""
        ...


class MmioPort:
    """A device behind virtio-mmio registers (any object with ``read32``/``write32``).

    Args:
        bus: the registers, relative to the device's base.
        memory: guest RAM (``read``/``write``/``fill``/``contains``).
        layout: where the suite may put things.
        settle: awaited after each notification (our device: let its tasks run; QEMU in
            paused mode: nothing, notifications are handled inside the write).
        alive: whether the device is still there (QEMU's process, our device's task).
        name: for reports.
        wait: how long :meth:`settle` waits for an ``until`` condition (seconds of the
            trio clock: virtual for our device, real for QEMU).
    """

    status_visible = True
    reset_signal = "DEVICE_NEEDS_RESET set"

    def __init__(self, bus: Any, memory: Any, layout: PortLayout, *,
                 settle: Callable[[], Awaitable[None]], alive: Callable[[], bool],
                 name: str, wait: float = 0.5, host: HostControl | None = None) -> None:
        self.host = host
        self.bus = bus
        self.memory = memory
        self.layout = layout
        self._settle = settle
        self._alive = alive
        self.name = name
        self.wait = wait
        self.stuck = False
        """The last :meth:`settle` timed out while the device was still running (a busy
        loop): the device never became idle."""

    def _w(self, reg: int, value: int) -> None:
        self.bus.write32(int(reg), value & _U32)

    def _r(self, reg: int) -> int:
        return self.bus.read32(int(reg))

    def offered_features(self) -> int:
        self._w(_R.DEVICE_FEATURES_SEL, 1)
        high = self._r(_R.DEVICE_FEATURES)
        self._w(_R.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self._r(_R.DEVICE_FEATURES)

    async def begin(self, features: int) -> bool:
        s = DeviceStatus
        self._w(_R.STATUS, 0)
        self._w(_R.STATUS, s.ACKNOWLEDGE)
        self._w(_R.STATUS, s.ACKNOWLEDGE | s.DRIVER)
        for sel in (0, 1):
            self._w(_R.DRIVER_FEATURES_SEL, sel)
            self._w(_R.DRIVER_FEATURES, features >> (32 * sel))
        self._w(_R.STATUS, s.ACKNOWLEDGE | s.DRIVER | s.FEATURES_OK)
        return bool(self._r(_R.STATUS) & s.FEATURES_OK)

    async def setup_queue(self, index: int, size: int, desc: int, avail: int,
                          used: int, *, ready: bool = True) -> bool:
        self._w(_R.QUEUE_SEL, index)
        self._w(_R.QUEUE_NUM, size)
        for low, addr in ((_R.QUEUE_DESC_LOW, desc), (_R.QUEUE_AVAIL_LOW, avail),
                          (_R.QUEUE_USED_LOW, used)):
            self._w(low, addr)
            self._w(low + 4, addr >> 32)
        if not ready:
            return True
        self._w(_R.QUEUE_READY, 1)
        return bool(self._r(_R.QUEUE_READY))

    async def driver_ok(self) -> None:
        self._w(_R.STATUS, self._r(_R.STATUS) | DeviceStatus.DRIVER_OK)

    async def notify(self, index: int) -> None:
        self._w(_R.QUEUE_NOTIFY, index)

    async def settle(self, until: Callable[[], Awaitable[bool]] | None = None) -> None:
        busy = True
        with trio.move_on_after(self.wait):
            await self._settle()
            busy = False
            while until is not None and not await until():
                await trio.sleep(0.005)
                busy = True
                await self._settle()
                busy = False
        self.stuck = busy

    def alive(self) -> bool:
        return self._alive()

    async def needs_reset(self) -> bool:
        return bool(self._r(_R.STATUS) & DeviceStatus.DEVICE_NEEDS_RESET)

    async def config_interrupt(self) -> bool | None:
        return bool(self._r(_R.INTERRUPT_STATUS) & 2)

    async def reset(self) -> None:
        self._w(_R.STATUS, 0)

    async def status(self) -> int | None:
        return self._r(_R.STATUS)

    async def interrupt_status(self) -> int | None:
        return self._r(_R.INTERRUPT_STATUS)

    async def read_config(self, offset: int) -> int | None:
        return self._r(CONFIG_OFFSET + offset)

    async def write_config(self, offset: int, value: int) -> None:
        self._w(CONFIG_OFFSET + offset, value)

    async def queue_ready(self, index: int) -> int | None:
        self._w(_R.QUEUE_SEL, index)
        return self._r(_R.QUEUE_READY)

    async def identity(self) -> dict[str, int] | None:
        return {"magic": self._r(_R.MAGIC_VALUE), "version": self._r(_R.VERSION),
                "device_id": self._r(_R.DEVICE_ID)}

    async def config_generation(self) -> int | None:
        return self._r(_R.CONFIG_GENERATION)

    async def take_used_interrupt(self, index: int) -> bool | None:
        isr = self._r(_R.INTERRUPT_STATUS)
        if isr & 1:
            self._w(_R.INTERRUPT_ACK, 1)
        return bool(isr & 1)

    async def acknowledge(self) -> None:
        """Clear whatever InterruptStatus shows (a driver's InterruptACK)."""
        self._w(_R.INTERRUPT_ACK, self._r(_R.INTERRUPT_STATUS) & 3)
