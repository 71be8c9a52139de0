"""One vring as the front-end configures it, and its two notification fds.

Holds what SET_VRING_NUM / ADDR / BASE / KICK / CALL / ERR / ENABLE said, decides when the ring
is ready for the device, and moves the notifications:

* **kick**: the driver's notification. Linux's UML front-end passes a real eventfd; other
  front-ends may pass a pipe or socket. The back-end waits with ``trio.lowlevel.wait_readable``
  and reads up to 4096 bytes (one eventfd read returns the 8-byte counter and resets it; one
  socket read drains several coalesced 8-byte writes). A kick that comes before the ring is
  attached, or while it is disabled, is remembered and delivered when it is.
* **call**: the device's interrupt. UML passes one end of a socketpair (eventfds cannot raise
  SIGIO in UML), QEMU an eventfd; an 8-byte ``write`` works for both. The fd is made
  non-blocking: if the front-end is not draining it the write fails with EAGAIN, which is
  harmless because an interrupt is then already pending.

Both fds are set O_NONBLOCK so a front-end that plays tricks (drains the kick fd itself,
stops reading the call fd) can never block the back-end's thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from device.vhost_user.api import RingConfig
from device.vhost_user.errors import violation
from protocol.errors import GuestMemoryError
from protocol.split_ring import USED_IDX
from virtqueue.memory import GuestMemory

__all__ = ["Vring", "close_fd"]

log = structlog.get_logger("vballoon.device")

_CALL_VALUE = (1).to_bytes(8, "little")


def close_fd(fd: int | None) -> None:
    """Close an fd that a trio task may be waiting on (tell trio first)."""
    if fd is None:
        return
    try:
        trio.lowlevel.notify_closing(fd)
    except (RuntimeError, OSError, ValueError):
        pass
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass(slots=True)
class Vring:
    """The back-end's view of one vring: configuration, fds and state flags."""

    index: int
    num: int | None = None
    base: int = 0
    addr: tuple[int, int, int] | None = None
    """(desc, avail, used) front-end user addresses from SET_VRING_ADDR."""
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    attached: bool = False
    pending_kick: bool = False
    kicks: int = 0
    calls: int = 0
    kick_scope: trio.CancelScope | None = field(default=None, repr=False)

    # ---- fds -----------------------------------------------------------------------------
    def set_call_fd(self, fd: int | None) -> None:
        close_fd(self.call_fd)
        if fd is not None:
            os.set_blocking(fd, False)
        self.call_fd = fd

    def set_err_fd(self, fd: int | None) -> None:
        close_fd(self.err_fd)
        self.err_fd = fd

    def stop_kick(self) -> None:
        """Stop watching the kick fd and close it."""
        if self.kick_scope is not None:
            self.kick_scope.cancel()
            self.kick_scope = None
        close_fd(self.kick_fd)
        self.kick_fd = None

    def close(self) -> None:
        self.stop_kick()
        self.set_call_fd(None)
        self.set_err_fd(None)

    def notify_used(self) -> None:
        """Interrupt the driver: one 8-byte write to the call fd (never blocks)."""
        fd = self.call_fd
        if fd is None:
            return
        try:
            os.write(fd, _CALL_VALUE)
        except BlockingIOError:
            pass  # the front-end has not read earlier calls yet: one is already pending
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                log.warning("vhost_user.call.lost", index=self.index, error=exc.strerror)
                self.call_fd = None
                try:
                    os.close(fd)
                except OSError:
                    pass
                return
            raise
        self.calls += 1

    def start_kick(self, fd: int, nursery: trio.Nursery, on_kick: Callable[[Vring], None]
                   ) -> None:
        """Own ``fd`` as the kick fd and watch it in ``nursery`` (any previous one is closed)."""
        self.stop_kick()
        os.set_blocking(fd, False)
        self.kick_fd = fd
        self.kick_scope = scope = trio.CancelScope()
        nursery.start_soon(self._watch_kick, fd, scope, on_kick)

    async def _watch_kick(self, fd: int, scope: trio.CancelScope,
                          on_kick: Callable[[Vring], None]) -> None:
        """Call ``on_kick(self)`` per wake-up of ``fd`` until cancelled, closed or EOF."""
        with scope:
            while not scope.cancel_called:  # stop_kick cancels *then* closes the fd
                try:
                    await trio.lowlevel.wait_readable(fd)
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    log.warning("vhost_user.kick.lost", index=self.index, error=exc.strerror)
                    return
                if not data:
                    log.info("vhost_user.kick.closed", index=self.index)
                    return
                on_kick(self)

    # ---- readiness -----------------------------------------------------------------------
    def ready(self, memory: GuestMemory | None) -> bool:
        """Addresses, size and kick fd known, memory mapped and the ring enabled."""
        return (memory is not None and self.num is not None and self.addr is not None
                and self.kick_fd is not None and self.enabled)

    def translate(self, memory: GuestMemory) -> RingConfig:
        """The ring in guest-physical addresses, as the device's queue needs it.

        Ring addresses are front-end virtual addresses, translated through the regions'
        ``userspace_addr`` (VU-11 if one is outside every region). Alignment and placement in
        RAM are the device queue's checks (CFG-01..07, :class:`virtqueue.device.DeviceQueue`),
        the same for every transport. ``next_used`` is read from the used ring itself, as
        libvhost-user does: SET_VRING_BASE carries only the avail side.
        """
        assert self.num is not None and self.addr is not None
        gpas = []
        for name, user_addr in zip(("desc", "avail", "used"), self.addr, strict=True):
            try:
                gpas.append(memory.user_to_gpa(user_addr))
            except GuestMemoryError:
                raise violation("VU-11", f"{name} ring address is not in the memory table",
                                index=self.index, addr=user_addr) from None
        desc, avail, used = gpas
        try:
            next_used = memory.read_u16(used + USED_IDX)
        except GuestMemoryError:
            next_used = 0  # the device queue rejects this ring (CFG-05)
        return RingConfig(size=self.num, desc=desc, avail=avail, used=used,
                          next_avail=self.base, next_used=next_used)
