"""The back-end request channel: messages the back-end starts (vhost-user "Back-end
communication"), on the socket the front-end passed with SET_BACKEND_REQ_FD.

Independent of the main socket on purpose. Linux's UML front-end waits for acks on the main
socket with interrupts off, and it handles back-end requests from an interrupt; a back-end that
waited for a reply here while the front-end waited for an ack there would deadlock both. So
:meth:`BackendChannel.send` never waits: it never sets NEED_REPLY and writes with MSG_DONTWAIT
(a full socket drops the message and logs it). A reader task drains whatever the front-end
writes back and notices when it closes its end.
"""

from __future__ import annotations

import socket

import structlog
import trio

from device.vhost_user.errors import violation
from protocol.vhost_user import HEADER_SIZE, VHOST_USER_VERSION, BackendRequest, Header

__all__ = ["BackendChannel"]

log = structlog.get_logger("vballoon.device")


class BackendChannel:
    """The back-end's end of the request channel; owns the fd it is given."""

    def __init__(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            _close(fd)
            raise violation("VU-13", f"back-end request fd is not a socket ({exc.strerror})",
                            fd=fd) from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            family, kind = int(sock.family), int(sock.type)
            sock.close()
            raise violation("VU-13", "back-end request fd is not a Unix stream socket",
                            family=family, type=kind)
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self.sent: list[BackendRequest] = []

    @property
    def open(self) -> bool:
        return self._sock is not None

    def send(self, request: BackendRequest, payload: bytes = b"") -> bool:
        """Send one request without waiting for anything; False if it could not be sent."""
        sock = self._sock
        if sock is None:
            log.warning("vhost_user.backend_req.dropped", request=request.name, reason="closed")
            return False
        data = Header.build(dict(request=request, flags=VHOST_USER_VERSION,
                                 size=len(payload))) + payload
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            log.warning("vhost_user.backend_req.dropped", request=request.name, reason="full")
            return False
        except OSError as exc:
            log.warning("vhost_user.backend_req.dropped", request=request.name,
                        reason=exc.strerror)
            self.close()
            return False
        if sent != len(data):  # a torn message would desynchronise the channel: give it up
            log.error("vhost_user.backend_req.torn", request=request.name, sent=sent)
            self.close()
            return False
        self.sent.append(request)
        log.info("vhost_user.backend_req.sent", request=request.name, size=len(payload))
        return True

    async def drain(self) -> None:
        """Read and log what the front-end writes back, until it closes its end."""
        while self._sock is not None:
            sock = self._sock
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:  # replaced by a new SET_BACKEND_REQ_FD
                return
            try:
                data = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.info("vhost_user.backend_req.closed", reason=exc.strerror)
                break
            if not data:
                log.info("vhost_user.backend_req.closed", reason="end of stream")
                break
            # We never set NEED_REPLY, so anything here is unasked for; log its header if any.
            fields = Header.parse(data[:HEADER_SIZE]) if len(data) >= HEADER_SIZE else None
            log.warning("vhost_user.backend_req.unexpected", size=len(data),
                        request=None if fields is None else fields.request)
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                trio.lowlevel.notify_closing(sock)
            except RuntimeError:
                pass
            sock.close()


def _close(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass
