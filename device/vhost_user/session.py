"""One vhost-user front-end connection: the message dispatcher and its state.

Follows QEMU's ``docs/interop/vhost-user.rst`` and what Linux 6.1's UML front-end
(``arch/um/drivers/virtio_uml.c``) sends: feature and protocol-feature negotiation, the memory
table, the vring messages, config access and the back-end request channel. Rings are handed to
the device (:class:`~device.vhost_user.api.VirtioBackendDevice`) once ready: memory mapped,
size, addresses and kick fd known, and enabled. Linux never sends SET_STATUS, so DRIVER_OK is
never seen and must not be waited for.

Linux 6.1 UML sends SET_FEATURES twice when the driver's ``validate()`` changes the features
(e.g. it drops PAGE_POISON on a kernel without page poisoning), and the second one lacks
``VHOST_USER_F_PROTOCOL_FEATURES`` (it re-derives bit 30 from features the virtio core already
cleared). Per the document rings are then enabled at once, and UML indeed never sends
SET_VRING_ENABLE: a back-end waiting for it would never serve the rings. The device is activated
on the first kick or SET_VRING_ENABLE(1), whichever comes first.

Replies carry flags 0x5 exactly. With NEED_REPLY set, a request without a reply body of its own
gets a u64 ack (0 = done); SET_PROTOCOL_FEATURES already carries NEED_REPLY when it negotiates
REPLY_ACK. Any rule broken by the front-end ends the session with one ``vhost_user.violation``
event and a closed socket; the device is detached from every ring first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import structlog
import trio

from device.vhost_user.api import VirtioBackendDevice
from device.vhost_user.backend_channel import BackendChannel
from device.vhost_user.errors import violation
from device.vhost_user.mem_table import check_regions, map_regions, memory_regions
from device.vhost_user.vring import Vring
from device.vhost_user.wire import (
    ConnectionLost,
    Message,
    ack_payload,
    close_fds,
    parse_payload,
    receive_message,
    send_reply,
)
from protocol.errors import ConfigError, DriverViolation, GuestMemoryError, VballoonError
from protocol.features import names
from protocol.rules import RULES
from protocol.vhost_user import (
    CONFIG_HEADER_SIZE,
    MAX_CONFIG_SIZE,
    REPLY_PAYLOAD,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    BackendRequest,
    ConfigFlags,
    FrontendRequest,
    ProtocolFeature,
    VringState,
)
from virtqueue.memory import GuestMemory

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "Session", "SessionResult"]

log = structlog.get_logger("vballoon.device")

R = FrontendRequest
PF = ProtocolFeature
_BIT30 = 1 << VHOST_USER_F_PROTOCOL_FEATURES
_CONFIG_HEADER = struct.Struct("<III")
"""Precompiled :data:`~protocol.vhost_user.ConfigHeader` (offset, size, flags). Config messages
are the hot path of ballooning (Linux reads num_pages and writes actual around every inflate
chain), and construct takes ~20 us per parse; tests prove the two layouts equal."""


class _ConfigMsg(NamedTuple):
    """A checked GET_CONFIG / SET_CONFIG payload (:data:`~protocol.vhost_user.VhostUserConfig`)."""

    offset: int
    size: int
    flags: int
    payload: bytes

DEFAULT_PROTOCOL_FEATURES = (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG)
"""REPLY_ACK, BACKEND_REQ and CONFIG. Linux 6.1 UML needs BACKEND_REQ (without it the call-fd
interrupt lands on IRQ 0 and the driver's probe fails with -EBUSY) and CONFIG (without it config
reads return nothing). INBAND_NOTIFICATIONS is not offered: kicks and calls use fds."""

_SUPPORTED_PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES


@dataclass(frozen=True, slots=True)
class SessionResult:
    """How a session ended: ``error`` is the violation (or device error) that closed it."""

    messages: int
    error: VballoonError | None
    reason: str
    features: int | None
    protocol_features: int


class Session:
    """Serves one connected front-end until it leaves or breaks a rule; see the module doc."""

    def __init__(self, sock: trio.socket.SocketType, device: VirtioBackendDevice, *,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 message_timeout: float = 5.0) -> None:
        if protocol_features & ~_SUPPORTED_PROTOCOL_FEATURES:
            raise ConfigError("this back-end implements only the REPLY_ACK, BACKEND_REQ and "
                              f"CONFIG protocol features, not {protocol_features:#x}")
        self.sock = sock
        self.device = device
        self.offered_protocol_features = protocol_features
        self.message_timeout = message_timeout
        self.features: int | None = None
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self.vrings: dict[int, Vring] = {}
        self.backend_channel: BackendChannel | None = None
        self.messages = 0
        self._nursery: trio.Nursery | None = None
        self._taken: set[int] = set()
        self._failure: VballoonError | None = None
        self.active = False
        """Whether the device was activated (first kick or SET_VRING_ENABLE: UML never sends
        its status, so DRIVER_OK is never seen)."""

    # ---- life cycle ----------------------------------------------------------------------
    async def run(self) -> SessionResult:
        """Serve until EOF or a violation; always detaches the device and closes every fd."""
        error: VballoonError | None = None
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._serve()
                except ConnectionLost as exc:
                    reason = f"front-end gone ({exc})"
                except VballoonError as exc:
                    self.fail(exc)
                nursery.cancel_scope.cancel()
            if self._failure is not None:
                error, reason = self._failure, "violation"
                log.error("vhost_user.violation", error=type(error).__name__,
                          rule_id=getattr(error, "rule_id", None), detail=str(error))
        finally:
            self._nursery = None
            self._teardown()
            self.sock.close()
        log.info("vhost_user.session.end", reason=reason, messages=self.messages)
        return SessionResult(self.messages, error, reason, self.features,
                             self.protocol_features)

    async def _serve(self) -> None:
        while True:
            msg = await receive_message(self.sock, timeout=self.message_timeout)
            self.messages += 1
            log.debug("vhost_user.request", request=msg.request.name, flags=msg.flags,
                      size=len(msg.payload), fds=len(msg.fds))
            self._taken = set()
            try:
                reply = self._handle(msg)
            finally:  # fds a handler did not take ownership of are closed, whatever happened
                close_fds([fd for fd in msg.fds if fd not in self._taken])
            if msg.request in REPLY_PAYLOAD:
                assert reply is not None
                await send_reply(self.sock, msg.request, reply, timeout=self.message_timeout)
            elif msg.need_reply:
                status = 0 if reply is None else U64.parse(reply).u64
                await send_reply(self.sock, msg.request, ack_payload(status),
                                 timeout=self.message_timeout)

    def fail(self, error: VballoonError) -> None:
        """End the session because of ``error`` (e.g. the device entered needs-reset: closing
        the socket is the only fatal-error signal vhost-user has)."""
        if self._failure is None:
            # Keep the error, not its traceback: the frames would keep views of the guest RAM
            # (and so the mmap and its fd) alive for as long as the result is kept.
            self._failure = error.with_traceback(None)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _teardown(self) -> None:
        """Detach every ring, reset the device, close every fd and unmap guest RAM."""
        for vring in self.vrings.values():
            self._detach(vring)
            vring.close()
        self.vrings.clear()
        try:
            self.device.reset()
        except VballoonError as exc:
            log.error("vhost_user.reset_error", detail=str(exc))
        self.active = False
        if self.backend_channel is not None:
            self.backend_channel.close()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # ---- back-end requests ---------------------------------------------------------------
    def config_changed(self) -> bool:
        """Tell the driver its config changed (BACKEND_CONFIG_CHANGE_MSG); never waits."""
        if self.backend_channel is None or not self._negotiated(PF.CONFIG):
            log.warning("vhost_user.backend_req.dropped",
                        request=BackendRequest.BACKEND_CONFIG_CHANGE_MSG.name,
                        reason="no back-end channel or CONFIG not negotiated")
            return False
        return self.backend_channel.send(BackendRequest.BACKEND_CONFIG_CHANGE_MSG)

    # ---- dispatch ------------------------------------------------------------------------
    def _handle(self, msg: Message) -> bytes | None:
        """Apply one message; returns a reply body, an ack status as u64 bytes, or None (0)."""
        handler = _HANDLERS.get(msg.request)
        if handler is None:
            raise violation("VU-06", "request not supported by this back-end",
                            request=msg.request.name)
        gate = _GATES.get(msg.request)
        if gate is not None and not self._negotiated(gate):
            raise violation("VU-06", f"request needs protocol feature {gate.name}",
                            request=msg.request.name)
        self._check_fds(msg)
        return handler(self, msg)

    def _take(self, msg: Message, i: int) -> int:
        """Take ownership of the message's i-th fd (it will not be closed with the message)."""
        fd = msg.fds[i]
        self._taken.add(fd)
        return fd

    def _negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def _check_fds(self, msg: Message) -> None:
        if msg.request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            want = 0 if parse_payload(msg).nofd else 1
        elif msg.request is R.SET_MEM_TABLE:
            want = parse_payload(msg).nregions
        elif msg.request is R.SET_BACKEND_REQ_FD:
            want = 1
        else:
            want = 0
        if len(msg.fds) < want:
            raise violation("VU-05", "missing fd", request=msg.request.name, want=want,
                            got=len(msg.fds))
        if len(msg.fds) > want:
            raise violation("VU-05", "unexpected fd", request=msg.request.name, want=want,
                            got=len(msg.fds))

    # ---- features ------------------------------------------------------------------------
    def _offered(self) -> int:
        return self.device.offered_features() | _BIT30

    def _get_features(self, msg: Message) -> bytes:
        return U64.build(dict(u64=self._offered()))

    def _set_features(self, msg: Message) -> bytes | None:
        value = parse_payload(msg).u64
        extra = value & ~self._offered()
        if extra:
            raise violation("VU-07", "SET_FEATURES asks for bits not offered",
                            features=value, not_offered=extra)
        mask = value & ~_BIT30
        if not self.device.set_features(mask):
            log.warning("vhost_user.features.refused", features=value, names=names(mask))
            return ack_payload(1)
        self.features = value
        log.info("vhost_user.features.set", features=value, names=names(mask))
        if not value & _BIT30:  # without protocol features, rings start enabled
            for vring in self.vrings.values():
                vring.enabled = True
            self._attach_ready()
        return None

    def _get_protocol_features(self, msg: Message) -> bytes:
        return U64.build(dict(u64=self.offered_protocol_features))

    def _set_protocol_features(self, msg: Message) -> None:
        value = parse_payload(msg).u64
        extra = value & ~self.offered_protocol_features
        if extra:
            raise violation("VU-07", "SET_PROTOCOL_FEATURES asks for bits not offered",
                            features=value, not_offered=extra)
        self.protocol_features = value
        log.info("vhost_user.protocol_features.set", features=value,
                 names=[f.name for f in PF if value >> f & 1])

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self._teardown()
        self.features = None

    def _set_backend_req_fd(self, msg: Message) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = None
        self.backend_channel = BackendChannel(self._take(msg, 0))
        assert self._nursery is not None
        self._nursery.start_soon(self.backend_channel.drain)

    # ---- memory --------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        regions = memory_regions(parse_payload(msg))
        check_regions(regions, msg.fds)
        memory = map_regions([self._take(msg, i) for i in range(len(regions))], regions)
        attached = [v for v in self.vrings.values() if v.attached]
        for vring in attached:
            self._detach(vring)
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        log.info("vhost_user.mem_table", regions=[
            dict(gpa=r.gpa, size=r.size, user_addr=r.user_addr, fd_offset=r.fd_offset)
            for r in regions])
        for vring in self.vrings.values():
            if vring.addr is not None:
                self._check_translatable(vring)
        self._attach_ready()

    # ---- vrings --------------------------------------------------------------------------
    def _vring(self, index: int, request: FrontendRequest) -> Vring:
        features = self.features if self.features is not None else self._offered()
        count = self.device.num_queues(features & ~_BIT30)
        if not 0 <= index < count:
            raise violation("VU-09", "vring index out of range", request=request.name,
                            index=index, queues=count)
        vring = self.vrings.get(index)
        if vring is None:
            vring = self.vrings[index] = Vring(index)
            if self.features is not None and not self.features & _BIT30:
                vring.enabled = True
        return vring

    def _reconfigure(self, vring: Vring) -> None:
        """A live ring is being changed: the device lets go of it first."""
        if vring.attached:
            self._detach(vring)

    def _set_vring_num(self, msg: Message) -> None:
        state = parse_payload(msg)
        vring = self._vring(state.index, msg.request)
        top = self.device.queue_max_size(state.index)
        n = state.num
        if not 1 <= n <= top or n & (n - 1):
            raise DriverViolation(rule_id="CFG-01", section=RULES["CFG-01"].section,
                                  message="queue size is not a power of two within the maximum",
                                  index=state.index, num=n, max=top)
        self._reconfigure(vring)
        vring.num = n
        self._attach_ready()

    def _set_vring_base(self, msg: Message) -> None:
        state = parse_payload(msg)
        vring = self._vring(state.index, msg.request)
        if state.num > 0xFFFF:
            raise violation("VU-10", "split ring base does not fit 16 bits",
                            index=state.index, num=state.num)
        self._reconfigure(vring)
        vring.base = state.num
        self._attach_ready()

    def _get_vring_base(self, msg: Message) -> bytes:
        state = parse_payload(msg)
        vring = self._vring(state.index, msg.request)
        self._detach(vring)  # GET_VRING_BASE stops the ring
        vring.stop_kick()
        return VringState.build(dict(index=state.index, num=vring.base))

    def _set_vring_addr(self, msg: Message) -> None:
        addr = parse_payload(msg)
        vring = self._vring(addr.index, msg.request)
        if addr.flags:
            rule = "log flag set (no dirty logging)" if addr.flags >> VHOST_VRING_F_LOG & 1 \
                else "unknown flags"
            raise violation("VU-10", f"vring address {rule}", index=addr.index,
                            flags=addr.flags)
        self._reconfigure(vring)
        vring.addr = (addr.desc, addr.avail, addr.used)
        if self.memory is not None:
            self._check_translatable(vring)
        self._attach_ready()

    def _check_translatable(self, vring: Vring) -> None:
        assert self.memory is not None and vring.addr is not None
        for name, user_addr in zip(("desc", "avail", "used"), vring.addr, strict=True):
            try:
                self.memory.user_to_gpa(user_addr)
            except GuestMemoryError:
                raise violation("VU-11", f"{name} ring address is not in the memory table",
                                index=vring.index, addr=user_addr) from None

    def _set_vring_kick(self, msg: Message) -> None:
        value = parse_payload(msg)
        vring = self._vring(value.index, msg.request)
        if value.reserved or value.nofd:
            what = "reserved bits set" if value.reserved else "no kick fd (polling unsupported)"
            raise violation("VU-10", f"SET_VRING_KICK: {what}", index=value.index)
        self._reconfigure(vring)
        assert self._nursery is not None
        vring.start_kick(self._take(msg, 0), self._nursery, self._on_kick)
        self._attach_ready()

    def _set_vring_call(self, msg: Message) -> None:
        value = parse_payload(msg)
        vring = self._vring(value.index, msg.request)
        if value.reserved:
            raise violation("VU-10", "SET_VRING_CALL: reserved bits set", index=value.index)
        vring.set_call_fd(None if value.nofd else self._take(msg, 0))

    def _set_vring_err(self, msg: Message) -> None:
        value = parse_payload(msg)
        vring = self._vring(value.index, msg.request)
        if value.reserved:
            raise violation("VU-10", "SET_VRING_ERR: reserved bits set", index=value.index)
        vring.set_err_fd(None if value.nofd else self._take(msg, 0))

    def _set_vring_enable(self, msg: Message) -> None:
        state = parse_payload(msg)
        if self.features is None or not self.features & _BIT30:
            raise violation("VU-06", "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES "
                            "negotiated", index=state.index)
        vring = self._vring(state.index, msg.request)
        if state.num not in (0, 1):
            raise violation("VU-10", "SET_VRING_ENABLE num is not 0 or 1", index=state.index,
                            num=state.num)
        vring.enabled = bool(state.num)
        log.info("vhost_user.vring.enable", index=state.index, enabled=vring.enabled)
        if vring.enabled:
            self._attach_ready()
            if vring.attached:
                self._activate()
            if vring.attached and vring.pending_kick:
                self._deliver_kick(vring)
        else:
            # Linux disables every ring at teardown and then frees and zeroes the ring memory:
            # the device must stop touching it now (a re-enable resumes from the saved base).
            self._detach(vring)

    # ---- attach / kick -------------------------------------------------------------------
    def _attach_ready(self) -> None:
        for vring in self.vrings.values():
            if vring.attached or not vring.ready(self.memory):
                continue
            assert self.memory is not None
            ring = vring.translate(self.memory)
            self.device.attach_queue(vring.index, ring, self.memory, vring.notify_used)
            vring.attached = True
            log.info("vhost_user.vring.attach", index=vring.index, size=ring.size,
                     desc=ring.desc, avail=ring.avail, used=ring.used,
                     next_avail=ring.next_avail, next_used=ring.next_used)
            if vring.pending_kick:
                self._deliver_kick(vring)

    def _detach(self, vring: Vring) -> None:
        if not vring.attached:
            return
        vring.attached = False
        try:
            vring.base = self.device.detach_queue(vring.index) & 0xFFFF
        except VballoonError as exc:
            log.error("vhost_user.vring.detach_error", index=vring.index, detail=str(exc))
        log.info("vhost_user.vring.detach", index=vring.index, base=vring.base)

    def _on_kick(self, vring: Vring) -> None:
        vring.kicks += 1
        if vring.attached and vring.enabled:
            self._deliver_kick(vring)
        else:
            vring.pending_kick = True

    def _activate(self) -> None:
        if not self.active:
            self.active = True
            log.info("vhost_user.activate")
            self.device.activate()

    def _deliver_kick(self, vring: Vring) -> None:
        vring.pending_kick = False
        try:
            self._activate()
            self.device.kick(vring.index)
        except VballoonError as exc:  # the device gave up on the ring: end the session
            self.fail(exc)

    # ---- config --------------------------------------------------------------------------
    def _config(self, msg: Message) -> _ConfigMsg:
        # the payload has >= 12 bytes (receive_message checked the request's bounds)
        offset, declared, flags = _CONFIG_HEADER.unpack_from(msg.payload)
        if len(msg.payload) != CONFIG_HEADER_SIZE + declared or declared > MAX_CONFIG_SIZE:
            raise violation("VU-12", "config size does not match the payload",
                            request=msg.request.name, size=declared, payload=len(msg.payload))
        if flags not in (ConfigFlags.WRITABLE, ConfigFlags.MIGRATION):
            raise violation("VU-12", "unknown config flags", request=msg.request.name,
                            flags=flags)
        return _ConfigMsg(offset, declared, flags, bytes(msg.payload[CONFIG_HEADER_SIZE:]))

    def _get_config(self, msg: Message) -> bytes:
        cfg = self._config(msg)
        try:
            data = bytes(self.device.read_config(cfg.offset, cfg.size))
            if len(data) != cfg.size:
                raise GuestMemoryError(cfg.offset, cfg.size, "config read returned "
                                       f"{len(data)} bytes")
        except VballoonError as exc:
            log.warning("vhost_user.config.read_error", offset=cfg.offset, size=cfg.size,
                        detail=str(exc))
            # A zero-length payload signals the error (vhost-user "GET_CONFIG").
            return _CONFIG_HEADER.pack(cfg.offset, 0, cfg.flags)
        log.debug("vhost_user.config.read", offset=cfg.offset, size=cfg.size)
        return _CONFIG_HEADER.pack(cfg.offset, cfg.size, cfg.flags) + data

    def _set_config(self, msg: Message) -> bytes | None:
        cfg = self._config(msg)
        if cfg.flags != ConfigFlags.WRITABLE:
            log.warning("vhost_user.config.write_refused", offset=cfg.offset, size=cfg.size,
                        reason="migration writes are not supported")
            return ack_payload(1)
        try:
            self.device.write_config(cfg.offset, bytes(cfg.payload))
        except VballoonError as exc:
            log.warning("vhost_user.config.write_refused", offset=cfg.offset, size=cfg.size,
                        reason=str(exc))
            return ack_payload(1)
        log.info("vhost_user.config.write", offset=cfg.offset, data=bytes(cfg.payload).hex())
        return None


_HANDLERS = {
    R.GET_FEATURES: Session._get_features,
    R.SET_FEATURES: Session._set_features,
    R.SET_OWNER: Session._set_owner,
    R.RESET_OWNER: Session._reset_owner,
    R.SET_MEM_TABLE: Session._set_mem_table,
    R.SET_VRING_NUM: Session._set_vring_num,
    R.SET_VRING_ADDR: Session._set_vring_addr,
    R.SET_VRING_BASE: Session._set_vring_base,
    R.GET_VRING_BASE: Session._get_vring_base,
    R.SET_VRING_KICK: Session._set_vring_kick,
    R.SET_VRING_CALL: Session._set_vring_call,
    R.SET_VRING_ERR: Session._set_vring_err,
    R.GET_PROTOCOL_FEATURES: Session._get_protocol_features,
    R.SET_PROTOCOL_FEATURES: Session._set_protocol_features,
    R.SET_VRING_ENABLE: Session._set_vring_enable,
    R.SET_BACKEND_REQ_FD: Session._set_backend_req_fd,
    R.GET_CONFIG: Session._get_config,
    R.SET_CONFIG: Session._set_config,
}
"""Requests this back-end implements; any other known request is a VU-06 violation."""

_GATES = {
    R.SET_BACKEND_REQ_FD: PF.BACKEND_REQ,
    R.GET_CONFIG: PF.CONFIG,
    R.SET_CONFIG: PF.CONFIG,
}
"""Requests valid only once a protocol feature is negotiated."""
