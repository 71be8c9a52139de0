"""A hostile vhost-user front-end: the suite's port to a device behind a vhost-user back-end.

It is what Linux's ``virtio_uml`` is to a back-end, minus every check: it connects to the
back-end's Unix socket, negotiates (REPLY_ACK and CONFIG; every request carries NEED_REPLY, so
each one is acknowledged before the next), shares its guest RAM (a memfd of its own, mapped
here too) with SET_MEM_TABLE, and sets rings up with the addresses it is told; kicks are
eventfd writes. vhost-user has no status channel and no DRIVER_OK: the rings go live when
enabled. A back-end signals a fatal error (what virtio-mmio shows as DEVICE_NEEDS_RESET) by
closing the connection, so :meth:`VhostUserPort.needs_reset` is "the back-end hung up", and a
reset is a new connection (the back-end resets the device when a front-end leaves).
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from guest.villain.port import HostControl, PortLayout
from protocol.errors import PeerError
from protocol.vhost_user import (
    HEADER_SIZE,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigFlags,
    FrontendRequest,
    Header,
    HeaderFlags,
    MemoryTable,
    ProtocolFeature,
    VhostUserConfig,
    VringAddr,
    VringFd,
    VringState,
)
from virtqueue.memory import GuestMemory, MemoryRegion

__all__ = ["USER_BASE", "VhostUserPort"]

R = FrontendRequest
USER_BASE = 0x7F00_0000_0000
"""The front-end's (pretend) virtual address of guest-physical 0."""
_BIT30 = 1 << VHOST_USER_F_PROTOCOL_FEATURES
_PROTOCOL = (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
_NEED = int(HeaderFlags.VERSION_1 | HeaderFlags.NEED_REPLY)
_REPLY_TIMEOUT = 5.0


class _Closed(Exception):
    """The back-end closed the connection."""


class VhostUserPort:
    """A :class:`~guest.villain.port.DevicePort` over vhost-user (see the module docstring).

    Args:
        path: the back-end's socket.
        ram: bytes of guest RAM (a memfd at guest-physical 0).
        layout: where the suite may put things (its geometry must match ``ram``).
        name: for reports.
        wait: how long :meth:`settle` waits for a condition (real seconds).
        idle: for a back-end in this process: returns once every other task is blocked
            (``trio.testing.wait_all_tasks_blocked``), so a device that never blocks is seen
            as :attr:`stuck`.
        busy_bound: how long (real seconds) ``idle`` may take before the device is stuck.
    """

    status_visible = False
    reset_signal = "the back-end closed the connection (vhost-user's DEVICE_NEEDS_RESET)"

    def __init__(self, path: str, ram: int, layout: PortLayout, *, name: str,
                 wait: float = 0.2,
                 idle: Callable[[], Awaitable[None]] | None = None,
                 busy_bound: float = 2.0, host: HostControl | None = None) -> None:
        self.path = path
        self.busy_bound = busy_bound
        self._idle = idle
        self.stuck = False
        self.ram = ram
        self.layout = layout
        self.name = name
        self.wait = wait
        self._fd = os.memfd_create("vballoon-villain-ram", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, ram)
        self.memory = GuestMemory.from_fds([(os.dup(self._fd), MemoryRegion(0, ram))])
        self._sock: trio.socket.SocketType | None = None
        self._offered = 0
        self._closed = False
        self._dead = False
        self._fds: list[int] = []
        self._kicks: dict[int, int] = {}
        self._calls: list[socket.socket] = []
        self._call_socks: dict[int, socket.socket] = {}
        self.host = host

    # ---- connection ------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and negotiate; PeerError if the back-end is not there."""
        self._drop()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self._dead = True
            raise PeerError(f"cannot connect to vhost-user back-end {self.path}: "
                            f"{exc.strerror}") from None
        self._sock, self._closed = sock, False
        await self._send(R.SET_OWNER, flags=1)
        self._offered = U64.parse(await self._call(R.GET_FEATURES)).u64
        await self._call(R.GET_PROTOCOL_FEATURES)
        await self._ack(R.SET_PROTOCOL_FEATURES, U64.build(dict(u64=_PROTOCOL)))

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for s in self._calls:
            s.close()
        self._fds, self._kicks, self._calls, self._call_socks = [], {}, [], {}

    def close(self) -> None:
        """Hang up and release the RAM."""
        self._drop()
        self.memory.close()
        os.close(self._fd)

    async def _send(self, request: int, payload: bytes = b"", *, flags: int = _NEED,
                    fds: tuple[int, ...] = ()) -> None:
        if self._sock is None or self._closed:
            raise _Closed
        data = Header.build(dict(request=request, flags=flags, size=len(payload))) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            await self._sock.sendmsg([data], anc)
        except OSError:
            self._closed = True
            raise _Closed from None

    async def _exact(self, n: int) -> bytes:
        buf = b""
        with trio.move_on_after(_REPLY_TIMEOUT):
            while len(buf) < n:
                try:
                    chunk = await self._sock.recv(n - len(buf))
                except OSError:
                    chunk = b""
                if not chunk:
                    self._closed = True
                    raise _Closed
                buf += chunk
            return buf
        raise PeerError(f"the vhost-user back-end did not answer within {_REPLY_TIMEOUT} s")

    async def _call(self, request: int, payload: bytes = b"", *,
                    fds: tuple[int, ...] = ()) -> bytes:
        await self._send(request, payload, fds=fds)
        header = Header.parse(await self._exact(HEADER_SIZE))
        return await self._exact(header.size) if header.size else b""

    async def _ack(self, request: int, payload: bytes = b"", *,
                   fds: tuple[int, ...] = ()) -> bool:
        try:
            return U64.parse(await self._call(request, payload, fds=fds)).u64 == 0
        except _Closed:
            return False

    # ---- DevicePort ------------------------------------------------------------------------
    def offered_features(self) -> int:
        return self._offered & ~_BIT30

    async def begin(self, features: int) -> bool:
        await self.reset()
        if not await self._ack(R.SET_FEATURES, U64.build(dict(u64=features | _BIT30))):
            return False
        table = MemoryTable.build(dict(nregions=1, regions=[dict(
            guest_phys_addr=0, memory_size=self.ram, userspace_addr=USER_BASE,
            mmap_offset=0)]))
        return await self._ack(R.SET_MEM_TABLE, table, fds=(self._fd,))

    async def setup_queue(self, index: int, size: int, desc: int, avail: int,
                          used: int, *, ready: bool = True) -> bool:
        mine, theirs = socket.socketpair()
        self._calls.append(mine)
        self._call_socks[index] = mine
        mine.setblocking(False)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(kick)
        self._kicks[index] = kick
        vfd = VringFd.build(dict(reserved=0, nofd=False, index=index))
        steps = [(R.SET_VRING_CALL, vfd, (theirs.fileno(),)),
                 (R.SET_VRING_NUM, VringState.build(dict(index=index, num=size)), ()),
                 (R.SET_VRING_BASE, VringState.build(dict(index=index, num=0)), ()),
                 (R.SET_VRING_ADDR, VringAddr.build(dict(
                     index=index, flags=0, desc=USER_BASE + desc, used=USER_BASE + used,
                     avail=USER_BASE + avail, log=0)), ()),
                 (R.SET_VRING_KICK, vfd, (kick,)),
                 (R.SET_VRING_ENABLE, VringState.build(dict(index=index, num=1)), ())]
        if not ready:
            steps.pop()
        try:
            for request, payload, fds in steps:
                if not await self._ack(request, payload, fds=fds):
                    return False
        finally:
            theirs.close()
        return True

    async def driver_ok(self) -> None:
        """vhost-user has no DRIVER_OK: rings are live once enabled."""

    async def notify(self, index: int) -> None:
        fd = self._kicks.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    async def settle(self, until: Callable[[], Awaitable[bool]] | None = None) -> None:
        await trio.sleep(0.002)
        with trio.move_on_after(self.wait):
            while until is not None and not await until():
                await trio.sleep(0.005)
        self.stuck = False
        if self._idle is not None:
            with trio.move_on_after(self.busy_bound) as scope:
                await self._idle()
            self.stuck = scope.cancelled_caught

    def alive(self) -> bool:
        return not self._dead

    async def needs_reset(self) -> bool:
        """Whether the back-end closed the connection (its only way to signal an error)."""
        if self._closed or self._sock is None:
            return True
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=self._sock.fileno())
        try:
            data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        finally:
            raw.detach()
        self._closed = not data
        return self._closed

    async def config_interrupt(self) -> bool | None:
        return None

    async def reset(self) -> None:
        """A new connection: the back-end detaches and resets the device when one ends."""
        await self.connect()
        await trio.sleep(0.005)  # let the back-end finish the old session first

    async def status(self) -> int | None:
        return None

    async def interrupt_status(self) -> int | None:
        return None

    async def read_config(self, offset: int) -> int | None:
        msg = VhostUserConfig.build(dict(offset=offset, size=4, flags=ConfigFlags.WRITABLE,
                                         payload=bytes(4)))
        try:
            reply = VhostUserConfig.parse(await self._call(R.GET_CONFIG, msg))
        except _Closed:
            return None
        return int.from_bytes(reply.payload, "little") if reply.size == 4 else None

    async def write_config(self, offset: int, value: int) -> None:
        msg = VhostUserConfig.build(dict(offset=offset, size=4, flags=ConfigFlags.WRITABLE,
                                         payload=(value & 0xFFFF_FFFF).to_bytes(4, "little")))
        await self._ack(R.SET_CONFIG, msg)

    async def queue_ready(self, index: int) -> int | None:
        return None

    async def identity(self) -> dict[str, int] | None:
        return None

    async def config_generation(self) -> int | None:
        return None

    async def take_used_interrupt(self, index: int) -> bool | None:
        """Whether the back-end wrote the call fd of queue ``index`` (drained here)."""
        sock = self._call_socks.get(index)
        if sock is None:
            return None
        got = False
        while True:
            try:
                data = sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got
            if not data:
                return got
            got = True

