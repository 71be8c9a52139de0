"""The vhost-user back-end's listening socket: one front-end at a time, one device.

The front-end (Linux's UML ``virtio_uml``, QEMU) is always the client: the back-end listens on
a Unix socket path and serves one connection at a time; later ones wait in the backlog. The
back-end is the device's transport: it installs the device's ``on_config_change`` (sent as
BACKEND_CONFIG_CHANGE_MSG) and ``on_needs_reset`` (the session is closed: vhost-user has no
status channel). Each connection ends, whatever happened, with every ring detached, the device
reset, every fd closed and the socket ready to accept again. The caller runs the device itself
(e.g. ``BalloonDevice.run`` in the same nursery).
"""

from __future__ import annotations

import os
import socket
import stat
import sys

import structlog
import trio

from device.vhost_user.api import VirtioBackendDevice
from device.vhost_user.session import DEFAULT_PROTOCOL_FEATURES, Session, SessionResult
from protocol.errors import ConfigError, ProtocolViolation, UsageError

__all__ = ["VhostUserBackend"]

log = structlog.get_logger("vballoon.device")

_SUN_PATH_MAX = 108
"""sizeof(sockaddr_un.sun_path), including the terminating NUL."""


class VhostUserBackend:
    """A vhost-user back-end serving ``device`` on Unix socket ``path`` (see module doc).

    ``sessions`` lists how each finished connection ended; ``session`` is the live one.
    """

    def __init__(self, path: str | os.PathLike[str], device: VirtioBackendDevice, *,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 message_timeout: float = 5.0) -> None:
        if sys.byteorder != "little":  # protocol.vhost_user layouts are little-endian
            raise ConfigError("vhost-user uses native byte order; only little-endian hosts "
                              "are supported")
        self.path = os.fspath(path)
        if len(os.fsencode(self.path)) >= _SUN_PATH_MAX:
            raise ConfigError(f"vhost-user socket path is longer than {_SUN_PATH_MAX - 1} "
                              f"bytes (AF_UNIX limit): {self.path}")
        self.device = device
        device.on_config_change = self.config_changed
        device.on_needs_reset = self._needs_reset
        self.protocol_features = protocol_features
        self.message_timeout = message_timeout
        self.session: Session | None = None
        self.sessions: list[SessionResult] = []
        self._ended = trio.Event()

    def config_changed(self) -> bool:
        """Send BACKEND_CONFIG_CHANGE_MSG to the connected front-end; never waits for it.

        Installed as the device's ``on_config_change``. False if it could not be sent (no
        front-end, no back-end channel or CONFIG not negotiated, or the channel is full).
        """
        if self.session is None:
            return False
        return self.session.config_changed()

    def _needs_reset(self, violation: ProtocolViolation) -> None:
        """Installed as the device's ``on_needs_reset``: the only signal is closing the socket."""
        if self.session is not None:
            self.session.fail(violation)

    async def wait_sessions_ended(self, count: int) -> SessionResult:
        """Wait until ``count`` sessions have ended in total; return how the last of them did."""
        if count < 1:
            raise UsageError("count must be >= 1")
        while len(self.sessions) < count:
            await self._ended.wait()
        return self.sessions[count - 1]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``path`` and serve front-ends one after another, until cancelled.

        ``task_status.started()`` fires once the socket listens, so ``nursery.start(serve)``
        returns when a front-end can connect. A stale socket file at ``path`` is replaced;
        anything else there is a ConfigError.
        """
        _remove_stale_socket(self.path)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await listener.bind(self.path)
                listener.listen(1)
            except OSError as exc:
                raise ConfigError(f"cannot listen on vhost-user socket {self.path}: "
                                  f"{exc.strerror}") from None
            log.info("vhost_user.listen", path=self.path)
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                log.info("vhost_user.accept", path=self.path)
                await self._serve_one(conn)
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _serve_one(self, conn: trio.socket.SocketType) -> None:
        self.session = Session(conn, self.device, protocol_features=self.protocol_features,
                               message_timeout=self.message_timeout)
        try:
            result = await self.session.run()
        finally:
            self.session = None
        self.sessions.append(result)
        self._ended.set()
        self._ended = trio.Event()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"vhost-user socket path {path} exists and is not a socket")
    os.unlink(path)
