"""The seam between a virtio transport and a device: what every transport drives.

A transport (the simulated virtio-mmio register model in :mod:`device.mmio`, the vhost-user
back-end in :mod:`device.vhost_user`) turns its own wire events into calls on a
:class:`VirtioBackendDevice`: feature negotiation, config space accesses, ring setup
(:class:`RingConfig`), activation, kicks and reset. The device answers through two callbacks the
transport installs: ``on_config_change`` (a configuration change notification, virtio §2.3) and
``on_needs_reset`` (the device entered an error state, §2.1.2: DEVICE_NEEDS_RESET). Used-buffer
notifications go through the ``notify_used`` callable given per queue to ``attach_queue``.

Rules: no transport detail leaks in here (no MMIO offsets, no vhost-user messages), and the
device never reaches back into its transport except through those three callables. Ring
areas are checked by the device end of the queue (:class:`virtqueue.device.DeviceQueue`,
CFG-01..07), so every transport gets the same checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from protocol.errors import ProtocolViolation
from virtqueue.memory import Memory

__all__ = ["HostMemory", "NotifyUsed", "RingConfig", "VirtioBackendDevice"]

NotifyUsed = Callable[[], None]
"""Signal the driver that used buffers are there (MMIO: interrupt; vhost-user: call fd)."""


class HostMemory(Memory, Protocol):
    """Guest RAM as a device needs it: ring access plus the host's own operations.

    :class:`virtqueue.memory.GuestMemory` has all of it (simulated RAM, or the regions a
    vhost-user front-end shared). ``discard`` gives pages back to the host (they read zeros).
    """

    @property
    def size(self) -> int: ...
    def discard(self, gpa: int, length: int) -> None: ...
    def view(self, gpa: int, length: int) -> memoryview: ...


@dataclass(frozen=True, slots=True)
class RingConfig:
    """Where a split virtqueue lives (guest-physical addresses) and where to resume it.

    ``size`` is the queue size the driver chose; ``desc``, ``avail`` and ``used`` are the
    Descriptor, Driver and Device Areas (virtio §2.7). ``next_avail`` / ``next_used`` are the
    free-running indices to start from: 0 for a fresh ring, the saved values after a
    vhost-user SET_VRING_BASE or a migration.
    """

    size: int
    desc: int
    avail: int
    used: int
    next_avail: int = 0
    next_used: int = 0


@runtime_checkable
class VirtioBackendDevice(Protocol):
    """A virtio device as a transport sees it (the device side of virtio §2-§3).

    Call order a transport follows: ``offered_features`` -> ``set_features`` (may repeat until
    activation; False refuses the set) -> ``attach_queue`` per queue -> ``activate`` (MMIO:
    DRIVER_OK; vhost-user: first kick or SET_VRING_ENABLE, since UML never sends its status)
    -> ``kick`` ... -> ``reset``. Config reads and writes may come at any time.
    Everything is called from the trio thread that runs the device.
    """

    device_id: int
    """Virtio device ID (5 for the balloon)."""
    on_config_change: Callable[[], None]
    """Installed by the transport: the device changed its config space (notify the driver)."""
    on_needs_reset: Callable[[ProtocolViolation], None]
    """Installed by the transport: the device hit ``violation`` and stopped (NEEDS_RESET)."""

    def offered_features(self) -> int:
        """The 64-bit feature mask the device offers (device and transport bits)."""
        ...

    def set_features(self, mask: int) -> bool:
        """Take the driver's accepted features; False refuses them (a bit was not offered)."""
        ...

    def num_queues(self, features: int) -> int:
        """How many virtqueues the device exposes with ``features`` negotiated."""
        ...

    def queue_max_size(self, index: int) -> int:
        """Largest size of queue ``index`` (0: the queue does not exist)."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset`` (all 0xff past the config size)."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space (dropped past the config size)."""
        ...

    def attach_queue(self, index: int, ring: RingConfig, memory: HostMemory,
                     notify_used: NotifyUsed) -> None:
        """Queue ``index`` is ready at ``ring`` in ``memory``; ``notify_used`` interrupts.

        Raises DriverViolation (CFG-xx) when the ring is unusable; the queue then stays
        detached (and under the needs-reset policy the device has called on_needs_reset).
        """
        ...

    def detach_queue(self, index: int) -> int:
        """Stop queue ``index`` (MMIO QueueReady=0, vhost-user GET_VRING_BASE, front-end gone).

        After this the device does not touch the ring. Returns the next avail index to resume
        from (a parked buffer, e.g. stats, is given back by rewinding: QEMU's unpop). Raises
        UsageError if the queue is not attached.
        """
        ...

    def activate(self) -> None:
        """The driver is ready (DRIVER_OK): start consuming buffers (virtio §2.1.2 GEN-V-1)."""
        ...

    def kick(self, index: int) -> None:
        """An available-buffer notification for queue ``index``; never blocks."""
        ...

    def reset(self) -> None:
        """Device reset (virtio §2.4): forget queues and negotiation, leave needs-reset."""
        ...
