"""Reading and writing vhost-user messages on a trio Unix socket, strictly.

A message is read as its header first (``recvmsg`` of exactly 12 bytes, so the next message's
bytes are never consumed), then exactly ``size`` payload bytes; fds that arrive as
``SCM_RIGHTS`` with either part are collected (received close-on-exec). The header is checked
(known request, version 1, flags, a size its layout allows) *before* the payload is read, so a
hostile size never makes the back-end read or allocate. Every failure is a
:class:`~device.vhost_user.errors.FrontendViolation`, and every fd received with a bad message is
closed before it is raised: nothing leaks, nothing hangs (a started message must finish within
``timeout`` seconds).
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

import trio
from construct import ConstructError

from device.vhost_user.errors import violation
from protocol.vhost_user import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MEMORY_REGION_SIZE,
    MEMORY_TABLE_HEADER_SIZE,
    REPLY_FLAGS,
    REQUEST_PAYLOAD,
    U64,
    VHOST_USER_VERSION,
    FrontendRequest,
    Header,
    HeaderFlags,
    MemoryTable,
    VhostUserConfig,
)

__all__ = [
    "ConnectionLost",
    "Message",
    "ack_payload",
    "close_fds",
    "parse_payload",
    "payload_size_bounds",
    "receive_message",
    "send_reply",
]

_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_ALLOWED_FLAGS = HeaderFlags.VERSION_MASK | HeaderFlags.NEED_REPLY


class ConnectionLost(Exception):
    """The front-end went away (EOF between messages, or a reset socket); not a violation."""


@dataclass(frozen=True, slots=True)
class Message:
    """One front-end message: its header fields, raw payload and the fds that came with it."""

    request: FrontendRequest
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    """Close received fds, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def payload_size_bounds(request: FrontendRequest) -> tuple[int, int]:
    """(smallest, largest) payload size the request's layout allows."""
    layout = REQUEST_PAYLOAD.get(request)
    if layout is None:
        return (0, 0)
    if layout is MemoryTable:
        return (MEMORY_TABLE_HEADER_SIZE + MEMORY_REGION_SIZE,
                MEMORY_TABLE_HEADER_SIZE + MAX_MEM_REGIONS * MEMORY_REGION_SIZE)
    if layout is VhostUserConfig:
        return (12, 12 + MAX_CONFIG_SIZE)
    n = layout.sizeof()
    return (n, n)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            whole = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:whole])
            fds.extend(arr)
    return fds


async def _recv_exact(sock: trio.socket.SocketType, n: int, fds: list[int]) -> bytes:
    """Up to ``n`` bytes (fewer only at EOF), adding any fds received to ``fds``."""
    buf = bytearray()
    while len(buf) < n:
        try:
            data, anc, msg_flags, _ = await sock.recvmsg(
                n - len(buf), _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:  # ECONNRESET when the front-end dies
            raise ConnectionLost(str(exc)) from None
        fds.extend(_fds_of(anc))
        if msg_flags & socket.MSG_CTRUNC:
            raise violation("VU-05", f"more than {MAX_FDS} fds on one message",
                            received=len(fds))
        if not data:
            break
        buf += data
    return bytes(buf)


async def receive_message(sock: trio.socket.SocketType, *, timeout: float) -> Message:
    """Read one whole message. Raises ConnectionLost at a clean EOF, FrontendViolation if bad."""
    fds: list[int] = []
    try:
        first = await _recv_exact(sock, 1, fds)
        if not first:
            raise ConnectionLost("end of stream")
        with trio.move_on_after(timeout):
            return await _receive_rest(sock, first, fds)
        raise violation("VU-01", "message not complete within the timeout", timeout=timeout)
    except BaseException:
        close_fds(fds)
        raise


async def _receive_rest(sock: trio.socket.SocketType, first: bytes, fds: list[int]) -> Message:
    raw = first + await _recv_exact(sock, HEADER_SIZE - 1, fds)
    if len(raw) < HEADER_SIZE:
        raise violation("VU-01", "stream ended inside a message header", got=len(raw))
    header = Header.parse(raw)
    try:
        request = FrontendRequest(header.request)
    except ValueError:
        raise violation("VU-02", "unknown request code", request=header.request) from None
    if header.flags & ~_ALLOWED_FLAGS or header.flags & HeaderFlags.VERSION_MASK != \
            VHOST_USER_VERSION:
        raise violation("VU-03", "bad header flags", request=request.name, flags=header.flags)
    low, high = payload_size_bounds(request)
    if not low <= header.size <= high:
        raise violation("VU-04", "payload size does not fit the request's layout",
                        request=request.name, size=header.size, min=low, max=high)
    payload = await _recv_exact(sock, header.size, fds)
    if len(payload) < header.size:
        raise violation("VU-01", "stream ended inside a message payload",
                        request=request.name, size=header.size, got=len(payload))
    return Message(request, header.flags, payload, tuple(fds))


def parse_payload(msg: Message):
    """The message's payload parsed with its request's layout (sizes were checked on receipt)."""
    layout = REQUEST_PAYLOAD[msg.request]
    try:
        return layout.parse(msg.payload)
    except ConstructError as exc:  # e.g. nregions larger than the bytes sent
        raise violation("VU-04", f"payload does not parse: {exc}",
                        request=msg.request.name, size=len(msg.payload)) from None


async def send_reply(sock: trio.socket.SocketType, request: FrontendRequest, payload: bytes,
                     *, timeout: float) -> None:
    """Send a reply: flags exactly 0x5 (version 1 | REPLY), never an echo of NEED_REPLY."""
    data = Header.build(dict(request=request, flags=REPLY_FLAGS, size=len(payload))) + payload
    with trio.move_on_after(timeout):
        try:
            view = memoryview(data)
            while view:
                sent = await sock.send(view)
                view = view[sent:]
        except OSError as exc:
            raise ConnectionLost(str(exc)) from None
        return
    raise violation("VU-01", "front-end does not read its replies", request=request.name,
                    timeout=timeout)


def ack_payload(status: int) -> bytes:
    """The u64 payload of a REPLY_ACK answer: 0 for success, non-zero for failure."""
    return U64.build(dict(u64=status))
