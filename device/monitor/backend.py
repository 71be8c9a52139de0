"""The monitor on the transport seam: a VirtioBackendDevice that watches the one it wraps.

:class:`MonitoredDevice` sits between a transport (:class:`~device.mmio.MmioDevice`, the
vhost-user back-end) and the real device: every call goes through to the device unchanged,
and the monitor hears it first. It sees on both transports: the features the driver accepted,
config reads and writes, rings handed over (with the guest memory they live in), activation,
kicks, resets, and each used-buffer notification the device sends; it sweeps the rings before
each kick and each notification, while what the driver published is still intact.

It may also *provoke* the driver (``provoke=True``):

- it offers undefined feature bits on top of the device's (:data:`PROVOKE_FEATURES`), which the
  driver must neither accept (GEN-D-6) nor fail on (GEN-D-8); an accepted one is stripped
  before the device sees the features, so the run goes on;
- :meth:`MonitoredDevice.spurious_notification` sends a used-buffer notification with nothing
  used, which the driver must tolerate (SPL-D-15).

Anything else (host verbs such as ``balloon()``) is passed through to the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from device.monitor.monitor import DriverMonitor
from device.transport import HostMemory, NotifyUsed, RingConfig, VirtioBackendDevice
from protocol.balloon import BalloonQueue, queue_numbering
from protocol.errors import ProtocolViolation
from protocol.features import bit

__all__ = ["PROVOKE_FEATURES", "MonitoredDevice"]

PROVOKE_FEATURES = bit(6) | bit(50)
"""Bits no spec version defines for a balloon: device bit 6 and reserved bit 50."""


class MonitoredDevice:
    """``device`` with ``monitor`` listening on every call (see the module docstring)."""

    def __init__(self, device: VirtioBackendDevice, monitor: DriverMonitor, *,
                 provoke: bool = True) -> None:
        self.inner = device
        self.monitor = monitor
        self.injected = PROVOKE_FEATURES if provoke else 0
        self._on_config_change: Callable[[], None] = lambda: None
        self._on_needs_reset: Callable[[ProtocolViolation], None] = lambda v: None
        self._notifiers: dict[int, NotifyUsed] = {}
        device.on_config_change = self._device_config_change
        device.on_needs_reset = self._device_needs_reset

    # ---- callbacks the transport installs ----------------------------------------------------
    @property
    def device_id(self) -> int:
        return self.inner.device_id

    @property
    def on_config_change(self) -> Callable[[], None]:
        return self._on_config_change

    @on_config_change.setter
    def on_config_change(self, callback: Callable[[], None]) -> None:
        self._on_config_change = callback

    @property
    def on_needs_reset(self) -> Callable[[ProtocolViolation], None]:
        return self._on_needs_reset

    @on_needs_reset.setter
    def on_needs_reset(self, callback: Callable[[ProtocolViolation], None]) -> None:
        self._on_needs_reset = callback

    def _device_config_change(self) -> None:
        self.monitor.device_config_changed(self.inner.read_config(0, 16))
        self._on_config_change()

    def _device_needs_reset(self, violation: ProtocolViolation) -> None:
        self.monitor.device_needs_reset(violation)
        self._on_needs_reset(violation)

    # ---- VirtioBackendDevice ---------------------------------------------------------------
    def offered_features(self) -> int:
        offered = self.inner.offered_features() | self.injected
        self.monitor.offered(offered, self.injected)
        return offered

    def set_features(self, mask: int) -> bool:
        self.monitor.features_set(mask)
        return self.inner.set_features(mask & ~self.injected)

    def num_queues(self, features: int) -> int:
        return self.inner.num_queues(features & ~self.injected)

    def queue_max_size(self, index: int) -> int:
        return self.inner.queue_max_size(index)

    def read_config(self, offset: int, size: int) -> bytes:
        self.monitor.sweep()
        data = self.inner.read_config(offset, size)
        self.monitor.config_read(offset, bytes(data))
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        self.monitor.sweep()
        self.monitor.config_written(offset, bytes(data))
        self.inner.write_config(offset, data)

    def attach_queue(self, index: int, ring: RingConfig, memory: HostMemory,
                     notify_used: NotifyUsed) -> None:
        self.monitor.queue_attached(index, self.queue_kind(index), ring, memory,
                                    self.inner.queue_max_size(index))
        self._notifiers[index] = notify_used

        def notify() -> None:
            self.monitor.used_notification(index)
            notify_used()

        try:
            self.inner.attach_queue(index, ring, memory, notify)
        except BaseException:
            self._notifiers.pop(index, None)
            self.monitor.queue_detached(index)
            raise

    def detach_queue(self, index: int) -> int:
        self.monitor.sweep()
        self.monitor.queue_detached(index)
        self._notifiers.pop(index, None)
        return self.inner.detach_queue(index)

    def activate(self) -> None:
        self.monitor.activated()
        self.inner.activate()

    def kick(self, index: int) -> None:
        self.monitor.kicked(index)
        self.inner.kick(index)

    def reset(self) -> None:
        self.monitor.device_reset()
        self._notifiers.clear()
        self.inner.reset()

    # ---- provocation and helpers --------------------------------------------------------------
    def spurious_notification(self, index: int | None = None) -> bool:
        """Send a used-buffer notification with nothing new used (SPL-D-15); False if no
        queue is attached."""
        notifiers = self._notifiers
        if index is None:
            index = next(iter(sorted(notifiers)), None)
        if index is None or index not in notifiers:
            return False
        self.monitor.spurious_sent(index)
        notifiers[index]()
        return True

    def queue_kind(self, index: int) -> BalloonQueue | None:
        """Which balloon queue transport index ``index`` is, as the device numbers them."""
        find = getattr(self.inner, "queue_index", None)
        if callable(find):
            return next((k for k in BalloonQueue if find(k) == index), None)
        features = self.monitor.features or 0
        return {i: k for k, i in queue_numbering(features).items()}.get(index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
