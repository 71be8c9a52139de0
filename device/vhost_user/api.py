"""The seam between the vhost-user transport and a virtio device model.

The back-end owns the socket, the fds and the memory table; the device owns the queues and the
config space. The back-end asks the device what to offer, tells it what the front-end
negotiated, and hands it each ring once it is ready (memory mapped, addresses, size, kick fd and
enabled), already translated to guest-physical addresses. The device processes rings through the
:class:`~virtqueue.memory.GuestMemory` it is given and calls ``notify_used()`` to interrupt the
driver (the back-end writes the call fd).

The protocol itself is shared by every transport and lives in :mod:`device.transport`
(:class:`~device.transport.VirtioBackendDevice`, :class:`~device.transport.RingConfig`); this
module re-exports it under the names the back-end has always used.
"""

from __future__ import annotations

from device.transport import NotifyUsed, RingConfig, VirtioBackendDevice

__all__ = ["NotifyUsed", "RingConfig", "VirtioBackendDevice"]
