"""device.vhost_user against a scripted front-end: the protocol, and a hostile front-end.

The front-end here is a Python client on the real Unix socket, passing real fds (a memfd for RAM,
an eventfd to kick, a socketpair end for calls, another for the back-end channel), so the
back-end's framing, fd handling and memory mapping run exactly as with Linux's UML. Every bad
message must end the session with one logged violation and a closed socket, leak no fd, and
leave the back-end ready for the next front-end.
"""

from __future__ import annotations

import array
import mmap
import os
import shutil
import socket
import struct
import tempfile

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from device.vhost_user import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from protocol.errors import ConfigError, DriverViolation
from protocol.vhost_user import (
    REPLY_FLAGS,
    U64,
    BackendRequest,
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

try:
    from vhost_user_double import ALL_BALLOON, RecordingBalloon
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.vhost_user_double import ALL_BALLOON, RecordingBalloon

R = FrontendRequest
BIT30 = 1 << 30
NEED = HeaderFlags.VERSION_1 | HeaderFlags.NEED_REPLY
RAM_GPA = 0x100000
RAM_USER = 0x7F0000000000
RAM_SIZE = 1 << 20
RING = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # offsets of the rings inside the RAM


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class Frontend:
    """A scripted vhost-user front-end on the real socket (test client)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, path: str) -> Frontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([data], anc)

    async def send(self, request: int, payload: bytes = b"", *, flags: int = 1,
                   fds: tuple[int, ...] = (), size: int | None = None) -> None:
        size = len(payload) if size is None else size
        await self.send_raw(Header.build(dict(request=request, flags=flags, size=size))
                            + payload, fds)

    async def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            assert chunk, "back-end closed the connection"
            buf += chunk
        return buf

    async def reply(self, request: int) -> bytes:
        header = Header.parse(await self._exact(12))
        assert header.request == request
        assert header.flags == REPLY_FLAGS  # exactly 0x5, never NEED_REPLY echoed
        return await self._exact(header.size)

    async def call(self, request: int, payload: bytes = b"", *, fds: tuple[int, ...] = ()
                   ) -> bytes:
        """Send with NEED_REPLY and return the reply (the u64 ack for non-GET requests)."""
        await self.send(request, payload, flags=NEED, fds=fds)
        return await self.reply(request)

    async def ack(self, request: int, payload: bytes = b"", *, fds: tuple[int, ...] = ()
                  ) -> int:
        return U64.parse(await self.call(request, payload, fds=fds)).u64

    async def closed_by_backend(self) -> bool:
        """EOF, or ECONNRESET when the back-end closed with our unread bytes in its buffer."""
        with trio.fail_after(5):
            try:
                return await self.sock.recv(4096) == b""
            except ConnectionResetError:
                return True

    async def negotiate(self, features: int = ALL_BALLOON | BIT30,
                        protocol: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        await self.send(R.SET_OWNER)
        await self.send(R.GET_FEATURES)
        assert U64.parse(await self.reply(R.GET_FEATURES)).u64 == ALL_BALLOON | BIT30
        await self.send(R.GET_PROTOCOL_FEATURES)
        assert U64.parse(await self.reply(R.GET_PROTOCOL_FEATURES)).u64 == \
            DEFAULT_PROTOCOL_FEATURES
        assert await self.ack(R.SET_PROTOCOL_FEATURES, _u64(protocol)) == 0
        assert await self.ack(R.SET_FEATURES, _u64(features)) == 0

    def close(self) -> None:
        self.sock.close()


def _u64(value: int) -> bytes:
    return U64.build(dict(u64=value))


def _state(index: int, num: int) -> bytes:
    return VringState.build(dict(index=index, num=num))


def _vfd(index: int, nofd: bool = False, reserved: int = 0) -> bytes:
    return VringFd.build(dict(reserved=reserved, nofd=nofd, index=index))


def _table(*regions: tuple[int, int, int, int]) -> bytes:
    return MemoryTable.build(dict(nregions=len(regions), regions=[
        dict(guest_phys_addr=g, memory_size=s, userspace_addr=u, mmap_offset=o)
        for g, s, u, o in regions]))


def _addr(index: int, base: int = RAM_USER, flags: int = 0) -> bytes:
    return VringAddr.build(dict(index=index, flags=flags, desc=base + DESC, used=base + USED,
                                avail=base + AVAIL, log=2**64 - 1))


class Ram:
    """The front-end's guest RAM: a memfd it maps too, so it can play the driver."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        self.fd = os.memfd_create("frontend-ram")
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def put16(self, offset: int, value: int) -> None:
        self.map[offset:offset + 2] = struct.pack("<H", value)

    def get16(self, offset: int) -> int:
        return struct.unpack_from("<H", self.map, offset)[0]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="vu-", dir="/tmp")  # AF_UNIX paths must stay short
    yield os.path.join(d, "s")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def served(nursery, sock_path):
    """(backend, device): a back-end serving a RecordingBalloon test double."""
    device = RecordingBalloon()
    backend = VhostUserBackend(sock_path, device, message_timeout=1.0)
    await nursery.start(backend.serve)
    return backend, device


async def _ring_setup(fe: Frontend, ram: Ram, index: int = 0, *, enable: bool = True
                      ) -> tuple[int, socket.socket]:
    """Memory table + one ring; returns (kick eventfd, front-end end of the call socketpair)."""
    assert await fe.ack(R.SET_MEM_TABLE, _table((RAM_GPA, RAM_SIZE, RAM_USER, 0)),
                        fds=(ram.fd,)) == 0
    call_mine, call_theirs = socket.socketpair()
    kick = os.eventfd(0)
    assert await fe.ack(R.SET_VRING_CALL, _vfd(index), fds=(call_theirs.fileno(),)) == 0
    call_theirs.close()
    assert await fe.ack(R.SET_VRING_NUM, _state(index, RING)) == 0
    assert await fe.ack(R.SET_VRING_BASE, _state(index, 0)) == 0
    assert await fe.ack(R.SET_VRING_ADDR, _addr(index)) == 0
    assert await fe.ack(R.SET_VRING_KICK, _vfd(index), fds=(kick,)) == 0
    if enable:
        assert await fe.ack(R.SET_VRING_ENABLE, _state(index, 1)) == 0
    return kick, call_mine


# ---- a well-behaved front-end ------------------------------------------------------------------


async def test_negotiation_replies_and_acks(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    assert device.features == [ALL_BALLOON]  # bit 30 is the transport's, not the device's
    fe.close()
    result = await backend.wait_sessions_ended(1)
    assert result.error is None
    assert result.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert result.features == ALL_BALLOON | BIT30


async def test_requests_without_need_reply_get_no_ack(served):
    backend, _ = served
    fe = await Frontend.connect(backend.path)
    await fe.send(R.SET_OWNER)  # no NEED_REPLY: nothing comes back
    await fe.send(R.GET_FEATURES)  # so the next bytes are GET_FEATURES' reply
    assert U64.parse(await fe.reply(R.GET_FEATURES)).u64 == ALL_BALLOON | BIT30
    fe.close()


async def test_ring_is_attached_translated_and_kicks_and_calls_flow(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    kick, call = await _ring_setup(fe, ram)
    index, ring = device.attach_log[0]
    assert index == 0
    assert (ring.size, ring.desc, ring.avail, ring.used, ring.next_avail, ring.next_used) == \
        (RING, RAM_GPA + DESC, RAM_GPA + AVAIL, RAM_GPA + USED, 0, 0)

    # The driver publishes one chain and kicks; the device reads it through the shared memfd.
    buf = 0x8000
    ram.map[DESC:DESC + 16] = struct.pack("<QIHH", RAM_GPA + buf, 4096, 0, 0)
    ram.put16(AVAIL + 4, 0)
    ram.put16(AVAIL + 2, 1)
    os.eventfd_write(kick, 1)
    with trio.fail_after(5):
        await device.wait_until(lambda d: d.kicks[0] == 1)
    assert device.avail_seen == [(0, 1)]

    # The double returned the inflate buffer: used ring updated in the shared RAM, then one
    # interrupt, 8 bytes on the front-end's end of the call socketpair.
    assert ram.get16(USED + 2) == 1
    assert struct.unpack_from("<II", ram.map, USED + 4) == (0, 0)
    call.setblocking(False)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(call)
    assert len(call.recv(64)) == 8
    fe.close()
    await backend.wait_sessions_ended(1)
    assert device.detached == [0]  # the device let go of the ring before memory was unmapped
    assert device.resets == 1
    ram.close()
    os.close(kick)
    call.close()


async def test_without_bit_30_rings_start_enabled(served):
    # Linux 6.1 UML re-sends SET_FEATURES without bit 30 when the driver's validate() changed
    # the features, and then never sends SET_VRING_ENABLE: rings must run anyway.
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate(features=ALL_BALLOON)
    kick, call = await _ring_setup(fe, ram, enable=False)
    assert [i for i, _ in device.attach_log] == [0]
    assert device.activations == 0  # no status from UML: the first kick activates
    os.eventfd_write(kick, 1)
    with trio.fail_after(5):
        await device.wait_until(lambda d: d.kicks[0] == 1)
    assert device.activations == 1
    fe.close()
    await backend.wait_sessions_ended(1)
    ram.close()
    os.close(kick)
    call.close()


async def test_kick_before_the_ring_is_enabled_is_delivered_on_enable(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    kick, call = await _ring_setup(fe, ram, enable=False)
    os.eventfd_write(kick, 1)
    await fe.send(R.GET_FEATURES)  # a round trip: the back-end has seen the kick by now...
    await fe.reply(R.GET_FEATURES)
    await trio.testing.wait_all_tasks_blocked()
    assert device.kicks[0] == 0  # ...but the ring is not enabled yet
    assert device.activations == 0
    assert await fe.ack(R.SET_VRING_ENABLE, _state(0, 1)) == 0
    assert device.kicks[0] == 1
    assert device.activations == 1
    fe.close()
    await backend.wait_sessions_ended(1)
    ram.close()
    os.close(kick)
    call.close()


async def test_a_new_kick_fd_replaces_the_old_one(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    old_kick, call = await _ring_setup(fe, ram)
    new_kick = os.eventfd(0)
    assert await fe.ack(R.SET_VRING_KICK, _vfd(0), fds=(new_kick,)) == 0
    # A live ring being reconfigured is detached, then attached again once ready.
    assert device.detached == [0] and [i for i, _ in device.attach_log] == [0, 0]
    os.eventfd_write(old_kick, 1)  # the back-end closed its copy: nobody listens any more
    os.eventfd_write(new_kick, 1)
    with trio.fail_after(5):
        await device.wait_until(lambda d: d.kicks[0] >= 1)
    await fe.send(R.GET_FEATURES)
    await fe.reply(R.GET_FEATURES)
    await trio.testing.wait_all_tasks_blocked()
    assert device.kicks[0] == 1
    fe.close()
    await backend.wait_sessions_ended(1)
    ram.close()
    os.close(old_kick)
    os.close(new_kick)
    call.close()


async def test_a_kick_fd_that_cannot_be_polled_is_logged_not_fatal(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    with capture_logs() as logs:
        assert await fe.ack(R.SET_VRING_KICK, _vfd(0), fds=(ram.fd,)) == 0  # a regular file
        await trio.testing.wait_all_tasks_blocked()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["vhost_user.kick.lost"]
    await fe.send(R.GET_FEATURES)  # the session goes on
    assert U64.parse(await fe.reply(R.GET_FEATURES)).u64 == ALL_BALLOON | BIT30
    fe.close()
    assert (await backend.wait_sessions_ended(1)).error is None
    ram.close()


async def test_get_vring_base_stops_the_ring_and_returns_the_device_index(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    kick, call = await _ring_setup(fe, ram)
    device.rings[0].last_avail = 5
    state = VringState.parse(await fe.call(R.GET_VRING_BASE, _state(0, 0)))
    assert (state.index, state.num) == (0, 5)
    assert device.detached == [0]
    fe.close()
    await backend.wait_sessions_ended(1)
    ram.close()
    os.close(kick)
    call.close()


async def test_config_read_write_and_refusal(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    device.config[0:4] = (256).to_bytes(4, "little")
    await fe.send(R.GET_CONFIG, VhostUserConfig.build(dict(offset=0, size=4, flags=0,
                                                           payload=bytes(4))))
    reply = VhostUserConfig.parse(await fe.reply(R.GET_CONFIG))
    assert (reply.offset, reply.size, reply.payload) == (0, 4, (256).to_bytes(4, "little"))
    # Beyond the config space: the device refuses, the reply has an empty payload (an error).
    await fe.send(R.GET_CONFIG, VhostUserConfig.build(dict(offset=0, size=32, flags=0,
                                                           payload=bytes(32))))
    assert VhostUserConfig.parse(await fe.reply(R.GET_CONFIG)).size == 0
    write = VhostUserConfig.build(dict(offset=4, size=4, flags=0, payload=b"\x10\0\0\0"))
    assert await fe.ack(R.SET_CONFIG, write) == 0
    assert device.config[4:8] == b"\x10\0\0\0"
    refused = VhostUserConfig.build(dict(offset=0, size=4, flags=0, payload=b"\1\0\0\0"))
    assert await fe.ack(R.SET_CONFIG, refused) != 0  # num_pages is the device's
    fe.close()
    assert (await backend.wait_sessions_ended(1)).error is None


async def test_config_change_goes_on_the_backend_channel_and_never_blocks(served):
    backend, _ = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    mine, theirs = socket.socketpair()
    assert await fe.ack(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
    theirs.close()
    assert backend.config_changed()
    header = Header.parse(mine.recv(12))
    assert (header.request, header.flags, header.size) == \
        (BackendRequest.BACKEND_CONFIG_CHANGE_MSG, 1, 0)  # version 1, no NEED_REPLY
    # A front-end that never reads the channel (UML waiting on the main socket with IRQs off)
    # must not block the back-end: once the socket is full, messages are dropped, not waited on.
    with trio.fail_after(5):
        while backend.config_changed():
            pass
    await fe.send(R.GET_FEATURES)  # the main socket still works
    assert U64.parse(await fe.reply(R.GET_FEATURES)).u64 == ALL_BALLOON | BIT30
    fe.close()
    mine.close()
    assert (await backend.wait_sessions_ended(1)).error is None


async def test_a_second_backend_channel_replaces_the_first(served):
    backend, _ = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    first, theirs = socket.socketpair()
    assert await fe.ack(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
    theirs.close()
    await trio.testing.wait_all_tasks_blocked()  # the first channel's reader is waiting
    second, theirs = socket.socketpair()
    assert await fe.ack(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
    theirs.close()
    assert first.recv(16) == b""  # the back-end closed its end of the first channel
    assert backend.config_changed()
    assert Header.parse(second.recv(12)).request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG
    fe.close()
    assert (await backend.wait_sessions_ended(1)).error is None
    first.close()
    second.close()


async def test_config_change_without_a_channel_is_refused(served):
    backend, _ = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    assert not backend.config_changed()
    fe.close()


# ---- a hostile front-end ---------------------------------------------------------------------


async def _truncated_header(fe: Frontend, ram: Ram) -> None:
    await fe.send_raw(b"\x01\x00\x00\x00\x01")
    fe.sock.shutdown(socket.SHUT_WR)


async def _truncated_payload(fe: Frontend, ram: Ram) -> None:
    await fe.send_raw(Header.build(dict(request=R.SET_FEATURES, flags=1, size=8)) + b"\0" * 4)
    fe.sock.shutdown(socket.SHUT_WR)


async def _unknown_request(fe: Frontend, ram: Ram) -> None:
    await fe.send(999)


async def _reply_flag_on_a_request(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.GET_FEATURES, flags=REPLY_FLAGS)


async def _wrong_version(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.GET_FEATURES, flags=2)


async def _short_set_features(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_FEATURES, b"\0" * 4)


async def _huge_size(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, size=0x7FFFFFFF)


async def _mem_table_without_fd(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, _table((RAM_GPA, RAM_SIZE, RAM_USER, 0)), flags=NEED)


async def _fd_on_get_features(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.GET_FEATURES, fds=(ram.fd,))


async def _nine_fds(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, _table(*[(RAM_GPA, 4096, RAM_USER, 0)] * 8),
                  fds=(ram.fd,) * 9)


async def _region_past_end_of_file(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, _table((RAM_GPA, 2 * RAM_SIZE, RAM_USER, 0)), fds=(ram.fd,))


async def _overlapping_regions(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, _table((RAM_GPA, 0x2000, RAM_USER, 0),
                                          (RAM_GPA + 0x1000, 0x1000, RAM_USER + 0x8000, 0)),
                  fds=(ram.fd, ram.fd))


async def _zero_regions(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_MEM_TABLE, struct.pack("<II", 0, 0) + bytes(32))


async def _ring_outside_the_table(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    assert await fe.ack(R.SET_MEM_TABLE, _table((RAM_GPA, RAM_SIZE, RAM_USER, 0)),
                        fds=(ram.fd,)) == 0
    assert await fe.ack(R.SET_VRING_NUM, _state(0, RING)) == 0
    await fe.send(R.SET_VRING_ADDR, _addr(0, base=RAM_USER + RAM_SIZE), flags=NEED)


async def _ring_running_off_the_region(fe: Frontend, ram: Ram) -> None:
    # Addresses inside the table, but a 256-entry descriptor table (4 KiB) would end past it.
    await fe.negotiate(features=ALL_BALLOON)  # rings enabled at once
    assert await fe.ack(R.SET_MEM_TABLE, _table((RAM_GPA, 0x3000, RAM_USER, 0)),
                        fds=(ram.fd,)) == 0
    assert await fe.ack(R.SET_VRING_NUM, _state(0, 256)) == 0
    await fe.send(R.SET_VRING_ADDR, VringAddr.build(dict(
        index=0, flags=0, desc=RAM_USER + 0x2800, used=RAM_USER, avail=RAM_USER + 0x1000,
        log=0)), flags=NEED)
    kick = os.eventfd(0)
    assert U64.parse(await fe.reply(R.SET_VRING_ADDR)).u64 == 0
    await fe.send(R.SET_VRING_KICK, _vfd(0), fds=(kick,), flags=NEED)
    os.close(kick)


async def _misaligned_used_ring(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate(features=ALL_BALLOON)  # rings enabled at once
    assert await fe.ack(R.SET_MEM_TABLE, _table((RAM_GPA, RAM_SIZE, RAM_USER, 0)),
                        fds=(ram.fd,)) == 0
    assert await fe.ack(R.SET_VRING_NUM, _state(0, RING)) == 0
    await fe.send(R.SET_VRING_ADDR, VringAddr.build(dict(
        index=0, flags=0, desc=RAM_USER, used=RAM_USER + USED + 2, avail=RAM_USER + AVAIL,
        log=0)))
    kick = os.eventfd(0)
    await fe.send(R.SET_VRING_KICK, _vfd(0), fds=(kick,))
    os.close(kick)


async def _queue_size_not_power_of_two(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.SET_VRING_NUM, _state(0, 100))


async def _vring_index_out_of_range(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.SET_VRING_NUM, _state(5, 8))  # 5 queues: 0..4


async def _kick_with_nofd(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.SET_VRING_KICK, _vfd(0, nofd=True))


async def _features_not_offered(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_FEATURES, _u64(ALL_BALLOON | 1 << 34))  # RING_PACKED


async def _protocol_features_not_offered(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_PROTOCOL_FEATURES, _u64(1 << ProtocolFeature.INBAND_NOTIFICATIONS))


async def _config_without_config_feature(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.GET_CONFIG, VhostUserConfig.build(dict(offset=0, size=4, flags=0,
                                                           payload=bytes(4))))


async def _config_size_shorter_than_declared(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(4))


async def _config_size_longer_than_declared(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(8))


async def _config_too_large(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.GET_CONFIG, struct.pack("<III", 0, 257, 0) + bytes(257))


async def _unsupported_request(fe: Frontend, ram: Ram) -> None:
    await fe.send(R.SET_LOG_BASE, _u64(0))


async def _backend_fd_not_a_socket(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate()
    await fe.send(R.SET_BACKEND_REQ_FD, fds=(ram.fd,), flags=NEED)


async def _enable_without_bit_30(fe: Frontend, ram: Ram) -> None:
    await fe.negotiate(features=ALL_BALLOON)
    await fe.send(R.SET_VRING_ENABLE, _state(0, 1))


HOSTILE = [
    (_truncated_header, "VU-01"),
    (_truncated_payload, "VU-01"),
    (_unknown_request, "VU-02"),
    (_reply_flag_on_a_request, "VU-03"),
    (_wrong_version, "VU-03"),
    (_short_set_features, "VU-04"),
    (_huge_size, "VU-04"),
    (_zero_regions, "VU-08"),
    (_mem_table_without_fd, "VU-05"),
    (_fd_on_get_features, "VU-05"),
    (_nine_fds, "VU-05"),
    (_unsupported_request, "VU-06"),
    (_config_without_config_feature, "VU-06"),
    (_enable_without_bit_30, "VU-06"),
    (_features_not_offered, "VU-07"),
    (_protocol_features_not_offered, "VU-07"),
    (_region_past_end_of_file, "VU-08"),
    (_overlapping_regions, "VU-08"),
    (_vring_index_out_of_range, "VU-09"),
    (_kick_with_nofd, "VU-10"),
    (_ring_outside_the_table, "VU-11"),
    (_config_size_shorter_than_declared, "VU-12"),
    (_config_size_longer_than_declared, "VU-12"),
    (_config_too_large, "VU-04"),
    (_backend_fd_not_a_socket, "VU-13"),
    (_queue_size_not_power_of_two, "CFG-01"),
    (_misaligned_used_ring, "CFG-04"),
    (_ring_running_off_the_region, "CFG-05"),
]


@pytest.mark.parametrize("script,rule_id", HOSTILE, ids=[s.__name__[1:] for s, _ in HOSTILE])
async def test_hostile_front_end_is_logged_and_closed_cleanly(served, script, rule_id):
    backend, device = served
    ram = Ram()
    fds_before = _open_fds()
    fe = await Frontend.connect(backend.path)
    with capture_logs() as logs, trio.fail_after(10):
        await script(fe, ram)
        result = await backend.wait_sessions_ended(1)
        assert await fe.closed_by_backend()
    fe.close()
    assert result.error is not None and result.error.rule_id == rule_id, result.error
    violations = [e for e in logs if e["event"] == "vhost_user.violation"]
    assert len(violations) == 1 and violations[0]["rule_id"] == rule_id
    assert violations[0]["log_level"] == "error"
    ram.close()
    assert _open_fds() <= fds_before  # every fd the back-end received was closed
    # The back-end serves the next front-end as if nothing happened.
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    fe.close()
    assert (await backend.wait_sessions_ended(2)).error is None
    assert device.resets == 2  # each session ends with a device reset
    assert sorted(device.detached) == sorted(i for i, _ in device.attach_log)


async def test_a_stalled_message_times_out(nursery, sock_path, autojump_clock):
    backend = VhostUserBackend(sock_path, RecordingBalloon(), message_timeout=5.0)
    await nursery.start(backend.serve)
    fe = await Frontend.connect(sock_path)
    await fe.send_raw(Header.build(dict(request=R.SET_FEATURES, flags=1, size=8)))
    result = await backend.wait_sessions_ended(1)  # the mock clock jumps the 5 s
    assert result.error is not None and result.error.rule_id == "VU-01"
    assert "timeout" in str(result.error)
    fe.close()


async def test_front_end_vanishing_mid_session_is_not_an_error(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    ram = Ram()
    await fe.negotiate()
    kick, call = await _ring_setup(fe, ram)
    with capture_logs() as logs:
        fe.close()
        result = await backend.wait_sessions_ended(1)
    assert result.error is None and "gone" in result.reason
    assert not [e for e in logs if e["log_level"] == "error"]
    assert device.detached == [0]
    ram.close()
    os.close(kick)
    call.close()


async def test_device_needs_reset_closes_the_session(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    violation = DriverViolation(rule_id="DC-01", section="2.7.5", message="bad next", next=9)
    with capture_logs() as logs:
        device.on_needs_reset(violation)  # what BalloonDevice does on a ring violation
        result = await backend.wait_sessions_ended(1)
        assert await fe.closed_by_backend()
    assert result.error is violation
    assert [e["rule_id"] for e in logs if e["event"] == "vhost_user.violation"] == ["DC-01"]
    fe.close()


async def test_device_config_change_reaches_the_front_end(served):
    backend, device = served
    fe = await Frontend.connect(backend.path)
    await fe.negotiate()
    mine, theirs = socket.socketpair()
    assert await fe.ack(R.SET_BACKEND_REQ_FD, fds=(theirs.fileno(),)) == 0
    theirs.close()
    device.on_config_change()  # installed by the back-end
    assert Header.parse(mine.recv(12)).request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG
    fe.close()
    mine.close()


async def test_refused_features_are_nacked(served):
    backend, device = served
    device.set_features = lambda mask: False
    fe = await Frontend.connect(backend.path)
    await fe.send(R.GET_FEATURES)
    await fe.reply(R.GET_FEATURES)
    assert await fe.ack(R.SET_FEATURES, _u64(ALL_BALLOON)) == 1
    fe.close()
    result = await backend.wait_sessions_ended(1)
    assert result.error is None and result.features is None


def test_socket_path_too_long_is_a_config_error():
    with pytest.raises(ConfigError, match="AF_UNIX"):
        VhostUserBackend("/tmp/" + "x" * 120, RecordingBalloon())


async def test_a_non_socket_at_the_path_is_a_config_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    backend = VhostUserBackend(str(path), RecordingBalloon())
    with pytest.raises(ConfigError, match="not a socket"):
        await backend.serve()

