"""The vhost-user wire format: message header, payload layouts, request codes, feature bits.

Follows QEMU's ``docs/interop/vhost-user.rst`` ("Message format", "Message types", "Protocol
features"). A message is a 12-byte header (``request``, ``flags``, ``size``) and ``size`` bytes
of payload on a Unix stream socket; file descriptors travel beside it as ``SCM_RIGHTS``
ancillary data, at most :data:`MAX_FDS` per message.

Byte order: vhost-user numbers are in the host's *native* byte order, not virtio's little
endian. vballoon runs on x86-64, which is little-endian, so the layouts below use the
little-endian ``construct`` types (``Int32ul``, ``Int64ul``); on a big-endian host they would be
wrong (the back-end refuses to start there).

Names follow the document without the ``VHOST_USER_`` prefix; the older "slave"/"master" names
are given in comments where Linux 6.1 (``arch/um/drivers/vhost_user.h``) still uses them.
Constants and layouts only: the rules about *when* a message is valid live in the back-end.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from construct import (
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    ByteSwapped,
    Construct,
    Flag,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    this,
)

__all__ = [
    "CONFIG_HEADER_SIZE",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MEMORY_REGION_SIZE",
    "MEMORY_TABLE_HEADER_SIZE",
    "REPLY_FLAGS",
    "REQUEST_PAYLOAD",
    "REPLY_PAYLOAD",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VHOST_VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "ConfigFlags",
    "ConfigHeader",
    "FrontendRequest",
    "Header",
    "HeaderFlags",
    "MemoryRegionDesc",
    "MemoryTable",
    "ProtocolFeature",
    "SingleMemoryRegion",
    "U64",
    "VhostUserConfig",
    "VringAddr",
    "VringFd",
    "VringState",
]

# ---- header ---------------------------------------------------------------------------------

HEADER_SIZE = 12
"""``u32 request; u32 flags; u32 size``."""
MAX_FDS = 8
"""At most this many fds ride on one message (QEMU ``VHOST_MEMORY_BASELINE_NREGIONS``)."""
VHOST_USER_VERSION = 1
"""The only protocol version; it sits in flags bits 0-1."""


class HeaderFlags(IntFlag):
    """Bits of the header's ``flags`` word."""

    VERSION_1 = 0x1
    """Bits 0-1 hold the version (mask :attr:`VERSION_MASK`); 1 is the only one."""
    VERSION_MASK = 0x3
    REPLY = 0x4
    """Set on every message that answers another (back-end replies, front-end acks)."""
    NEED_REPLY = 0x8
    """Sender wants a u64 status reply (meaningful once REPLY_ACK is negotiated)."""


REPLY_FLAGS = HeaderFlags.VERSION_1 | HeaderFlags.REPLY
"""0x5: the flags of every back-end reply. Linux's front-end rejects anything else (-EPROTO)."""

Header = Struct(
    "request" / Int32ul,
    "flags" / Int32ul,
    "size" / Int32ul,
)
"""The 12-byte message header; ``size`` counts payload bytes only."""

# ---- request codes ------------------------------------------------------------------------


class FrontendRequest(IntEnum):
    """Requests the front-end sends on the main socket (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # SET_SLAVE_REQ_FD in Linux 6.1
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Requests the back-end sends on the back-end request channel (``VHOST_USER_BACKEND_*``)."""

    BACKEND_IOTLB_MSG = 1
    BACKEND_CONFIG_CHANGE_MSG = 2  # SLAVE_CONFIG_CHANGE_MSG in Linux 6.1; no payload
    BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    BACKEND_VRING_CALL = 4
    BACKEND_VRING_ERR = 5
    BACKEND_SHARED_OBJECT_ADD = 6
    BACKEND_SHARED_OBJECT_REMOVE = 7
    BACKEND_SHARED_OBJECT_LOOKUP = 8


# ---- features -----------------------------------------------------------------------------

VHOST_USER_F_PROTOCOL_FEATURES = 30
"""Virtio feature bit the back-end sets in GET_FEATURES to say GET/SET_PROTOCOL_FEATURES work.

It is a vhost-user transport bit, not a device feature: it reuses virtio's unused bit 30.
"""


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers (``VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5  # SLAVE_REQ in Linux 6.1
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10  # SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# ---- payloads -----------------------------------------------------------------------------

U64 = Struct("u64" / Int64ul)
"""A single u64: features, protocol features, acks (0 = success), queue counts."""

VringState = Struct(
    "index" / Int32ul,
    "num" / Int32ul,
)
"""SET_VRING_NUM, SET/GET_VRING_BASE, SET_VRING_ENABLE. For a split ring's base, the low 16
bits of ``num`` are the next avail index the back-end will process."""

VHOST_VRING_F_LOG = 0
"""Bit number in VringAddr.flags: log writes to the used ring (dirty logging)."""

VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc" / Int64ul,
    "used" / Int64ul,
    "avail" / Int64ul,
    "log" / Int64ul,
)
"""SET_VRING_ADDR (40 bytes). desc/used/avail are *front-end virtual* addresses (translate them
through the memory table's ``userspace_addr``); note used comes before avail."""

MAX_MEM_REGIONS = 8
MEMORY_REGION_SIZE = 32
MEMORY_TABLE_HEADER_SIZE = 8

MemoryRegionDesc = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
"""One region of guest RAM: map ``memory_size`` bytes of its fd at ``mmap_offset``."""

MemoryTable = Struct(
    "nregions" / Int32ul,
    Padding(4),
    "regions" / Array(this.nregions, MemoryRegionDesc),
)
"""SET_MEM_TABLE: ``nregions`` (<= 8) regions, one fd each in the same order. Front-ends may send
the full 8-slot array whatever ``nregions`` is (Linux 6.1 UML always sends 72 bytes for up to 2
regions), so a payload may be longer than ``8 + 32 * nregions``; the extra bytes are unused."""

SingleMemoryRegion = Struct(
    Padding(8),
    "region" / MemoryRegionDesc,
)
"""ADD_MEM_REG / REM_MEM_REG (40 bytes)."""

CONFIG_HEADER_SIZE = 12
MAX_CONFIG_SIZE = 256
"""QEMU ``VHOST_USER_MAX_CONFIG_SIZE``: the largest config payload in one message."""


class ConfigFlags(IntEnum):
    """``flags`` of a config message."""

    WRITABLE = 0
    """A normal access: only writable fields may be set."""
    MIGRATION = 1
    """Live migration: the front-end restores the whole config space."""


ConfigHeader = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
)
"""The first 12 bytes of a config message, to check ``size`` before reading the payload."""

VhostUserConfig = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "payload" / Bytes(this.size),
)
"""GET_CONFIG / SET_CONFIG and the GET_CONFIG reply: header ``size`` must be 12 + ``size``."""

VRING_IDX_MASK = 0xFF
"""Bits 0-7 of a vring fd payload: the vring index."""
VRING_NOFD_MASK = 0x100
"""Bit 8 of a vring fd payload: no fd is passed; the back-end must poll (kick) / not signal."""

VringFd = ByteSwapped(BitStruct(
    "reserved" / BitsInteger(55),
    "nofd" / Flag,
    "index" / BitsInteger(8),
))
"""SET_VRING_KICK / CALL / ERR: a u64 whose bits 0-7 are the index and bit 8 the no-fd flag.

``ByteSwapped`` over a ``BitStruct`` reads the little-endian u64 from its most significant bit
down, so ``index`` is bits 0-7, ``nofd`` bit 8 and ``reserved`` bits 9-63 (which must be 0).
"""

# ---- which payload goes with which request ---------------------------------------------

REQUEST_PAYLOAD: dict[FrontendRequest, Construct | None] = {
    FrontendRequest.GET_FEATURES: None,
    FrontendRequest.SET_FEATURES: U64,
    FrontendRequest.SET_OWNER: None,
    FrontendRequest.RESET_OWNER: None,
    FrontendRequest.SET_MEM_TABLE: MemoryTable,
    FrontendRequest.SET_LOG_BASE: U64,
    FrontendRequest.SET_LOG_FD: None,
    FrontendRequest.SET_VRING_NUM: VringState,
    FrontendRequest.SET_VRING_ADDR: VringAddr,
    FrontendRequest.SET_VRING_BASE: VringState,
    FrontendRequest.GET_VRING_BASE: VringState,
    FrontendRequest.SET_VRING_KICK: VringFd,
    FrontendRequest.SET_VRING_CALL: VringFd,
    FrontendRequest.SET_VRING_ERR: VringFd,
    FrontendRequest.GET_PROTOCOL_FEATURES: None,
    FrontendRequest.SET_PROTOCOL_FEATURES: U64,
    FrontendRequest.GET_QUEUE_NUM: None,
    FrontendRequest.SET_VRING_ENABLE: VringState,
    FrontendRequest.SET_BACKEND_REQ_FD: None,
    FrontendRequest.GET_CONFIG: VhostUserConfig,
    FrontendRequest.SET_CONFIG: VhostUserConfig,
    FrontendRequest.RESET_DEVICE: None,
    FrontendRequest.VRING_KICK: VringState,
    FrontendRequest.GET_MAX_MEM_SLOTS: None,
    FrontendRequest.ADD_MEM_REG: SingleMemoryRegion,
    FrontendRequest.REM_MEM_REG: SingleMemoryRegion,
    FrontendRequest.SET_STATUS: U64,
    FrontendRequest.GET_STATUS: None,
}
"""Payload layout of the requests whose format the document fixes (None: no payload)."""

REPLY_PAYLOAD: dict[FrontendRequest, Construct] = {
    FrontendRequest.GET_FEATURES: U64,
    FrontendRequest.GET_PROTOCOL_FEATURES: U64,
    FrontendRequest.GET_VRING_BASE: VringState,
    FrontendRequest.GET_QUEUE_NUM: U64,
    FrontendRequest.GET_CONFIG: VhostUserConfig,
    FrontendRequest.GET_MAX_MEM_SLOTS: U64,
    FrontendRequest.GET_STATUS: U64,
    FrontendRequest.SET_LOG_BASE: U64,  # only with LOG_SHMFD
}
"""Requests that have a reply body of their own; every other request is answered only by a u64
ack, and only when it carries NEED_REPLY (with REPLY_ACK negotiated)."""
