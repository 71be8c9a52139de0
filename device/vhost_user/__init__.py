"""vhost-user back-end: lets a real front-end (Linux 6.1 UML's ``virtio_uml``, QEMU) drive a
vballoon device over a Unix socket, with guest RAM shared through the fds it sends.

Read in this order: :mod:`~device.vhost_user.api` (the seam with the device model),
:mod:`~device.vhost_user.errors` (the rules a front-end can break),
:mod:`~device.vhost_user.wire` (strict message framing), :mod:`~device.vhost_user.mem_table`
(the region table, checked then mapped), :mod:`~device.vhost_user.vring`
(ring state, kick and call fds), :mod:`~device.vhost_user.backend_channel` (back-end initiated
requests), :mod:`~device.vhost_user.session` (one connection's dispatcher) and
:mod:`~device.vhost_user.server` (the listening socket).
"""

from device.vhost_user.api import NotifyUsed, RingConfig, VirtioBackendDevice
from device.vhost_user.errors import VHOST_USER_RULES, FrontendViolation
from device.vhost_user.server import VhostUserBackend
from device.vhost_user.session import DEFAULT_PROTOCOL_FEATURES, Session, SessionResult

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "VHOST_USER_RULES",
    "FrontendViolation",
    "NotifyUsed",
    "RingConfig",
    "Session",
    "SessionResult",
    "VhostUserBackend",
    "VirtioBackendDevice",
]
