"""The fuzz input format: how a byte string becomes a case, and how a layout becomes bytes.

Every byte string decodes to a :class:`Case` (missing bytes read as zero, extra bytes are
ignored), so libFuzzer's mutations always produce something runnable. Byte 0 selects the mode,
byte 1 the error policy (unless the run fixes one):

``raw`` (0)
    A serialised :class:`~virtqueue.cases.Layout`: geometry class, queue size, ring addresses,
    avail fields, the descriptor table bytes and up to 255 memory writes (indirect tables,
    buffer bytes). Corpus seeds are valid and near-valid layouts encoded this way, so byte-level
    mutations start from meaningful rings. The expected outcome comes from the reference model.
``structured`` (1)
    The rest of the input is a stream of decisions (:class:`BytesChoices`) for the layout
    builders of :mod:`virtqueue.strategies`: a valid layout, one of the near-valid mutations (with
    its rule label) or an arbitrary one.
``driver`` (2)
    Decisions for a program of the driver end (:class:`~virtqueue.driver.DriverQueue`): chains
    added, popped, completed out of order; every byte and token must come back exactly.

Layout of a ``raw`` input after the two header bytes (little-endian)::

    u8 log2(size) (mod 9: sizes 1..256)  u8 geometry  u8 features
    u32 desc  u32 avail  u32 used
    u16 start  u16 avail_idx  u16 avail_flags  u16 count  u16 entries[count]
    u8 table[16 * size]  u8 nwrites  { u32 gpa  u16 len  u8 data[len] } * nwrites
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from protocol.errors import UsageError
from virtqueue.cases import MUTATIONS, Geometry, Layout
from virtqueue.policy import ErrorPolicy

__all__ = [
    "GEOMETRIES",
    "MODES",
    "POLICIES",
    "BytesChoices",
    "Case",
    "decode",
    "encode_driver",
    "encode_layout",
    "encode_structured",
    "geometry_code",
]

MODES = ("raw", "structured", "driver")
POLICIES = (ErrorPolicy.NEEDS_RESET, ErrorPolicy.TRUNCATE, ErrorPolicy.SKIP)
_MAX_LOG2_SIZE = 8
_KB = 1024


def _geometry(code: int) -> Geometry:
    """Geometry class ``code``: RAM of 64 KiB .. 4 MiB, optionally at 1 MiB, optionally with a
    64 KiB hole in the middle (two regions: the device's non-exact RAM path)."""
    size = (64 * _KB, 256 * _KB, 1024 * _KB, 4096 * _KB)[code & 3]
    base = (1 << 20) if code & 4 else 0
    if code & 8 and size >= 256 * _KB:
        half = size // 2
        return Geometry(ram=((base, half), (base + half + 64 * _KB, half - 64 * _KB)))
    return Geometry(ram=((base, size),))


GEOMETRIES: tuple[Geometry, ...] = tuple(_geometry(c) for c in range(16))
"""The RAM layouts a fuzz input can name (index = geometry byte & 15)."""


def geometry_code(geometry: Geometry) -> int:
    """The code of ``geometry`` in :data:`GEOMETRIES` (its RAM regions; UsageError if none)."""
    for code, g in enumerate(GEOMETRIES):
        if g.ram == geometry.ram:
            return code
    raise UsageError(f"RAM regions {geometry.ram} have no fuzz geometry code")


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")


class BytesChoices:
    """:class:`~virtqueue.cases.Choices` read from fuzzer bytes (zeros once they run out).

    An integer in [lo, hi] takes as many bytes as the span needs, modulo the span; zeros give
    ``lo``, the simplest choice, as Hypothesis's shrinking does.
    """

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._r = _Reader(data, pos)

    def integer(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        return lo + self._r.uint((span.bit_length() + 7) // 8) % (span + 1)

    def boolean(self) -> bool:
        return bool(self._r.uint(1) & 1)

    def data(self, n: int) -> bytes:
        return self._r.take(n)


@dataclass(frozen=True, slots=True)
class Case:
    """A decoded input: its mode, policy, and the layout (raw/structured) or the program bytes."""

    mode: str
    policy: ErrorPolicy
    layout: Layout | None = None
    kind: str | None = None
    """Structured mode: ``valid``, a mutation kind or ``arbitrary``."""
    program: bytes = b""
    """Driver mode: the decision bytes of the driver program."""


def _decode_raw(r: _Reader) -> Layout:
    size = 1 << (r.uint(1) % (_MAX_LOG2_SIZE + 1))
    geometry = GEOMETRIES[r.uint(1) & 15]
    indirect = bool(r.uint(1) & 1)
    desc, avail, used = r.uint(4), r.uint(4), r.uint(4)
    start, idx, flags = r.uint(2), r.uint(2), r.uint(2)
    count = min(r.uint(2), size)
    entries = struct.unpack(f"<{count}H", r.take(2 * count))
    table = r.take(16 * size)
    writes = []
    for _ in range(r.uint(1)):
        gpa, n = r.uint(4), r.uint(2)
        data = r.take(n)
        if n and geometry.inside(gpa, n):
            writes.append((gpa, data))
    return Layout(size=size, geometry=geometry, desc=desc, avail=avail, used=used,
                  table=table, start=start, entries=entries, avail_idx=idx, avail_flags=flags,
                  writes=tuple(writes), indirect=indirect, expected=None, rule=None,
                  label="raw")


_KINDS = ("valid", *MUTATIONS, "arbitrary")


def decode(data: bytes, policy: ErrorPolicy | str | None = None) -> Case:
    """The case ``data`` describes; ``policy`` (if given) overrides byte 1."""
    r = _Reader(data)
    mode = MODES[r.uint(1) % len(MODES)]
    chosen = POLICIES[r.uint(1) % len(POLICIES)]
    chosen = ErrorPolicy(policy) if policy is not None else chosen
    if mode == "raw":
        return Case(mode, chosen, layout=_decode_raw(r))
    if mode == "structured":
        return Case(mode, chosen, kind=_KINDS[r.uint(1) % len(_KINDS)], program=data[r.pos:])
    return Case(mode, chosen, program=data[r.pos:])


def _header(mode: str, policy: ErrorPolicy | str) -> bytes:
    return bytes([MODES.index(mode), POLICIES.index(ErrorPolicy(policy))])


def encode_layout(layout: Layout, policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET) -> bytes:
    """A ``raw`` input that decodes to ``layout``'s memory contents (a corpus seed)."""
    log2 = layout.size.bit_length() - 1
    if layout.size != 1 << log2 or log2 > _MAX_LOG2_SIZE:
        raise UsageError(f"queue size {layout.size} cannot be encoded")
    for name in ("desc", "avail", "used"):
        if not 0 <= getattr(layout, name) < 1 << 32:
            raise UsageError(f"{name} address does not fit the raw encoding")
    out = bytearray(_header("raw", policy))
    out += bytes([log2, geometry_code(layout.geometry), int(layout.indirect)])
    out += struct.pack("<III", layout.desc, layout.avail, layout.used)
    out += struct.pack("<HHHH", layout.start, layout.avail_idx, layout.avail_flags,
                       len(layout.entries))
    out += b"".join(struct.pack("<H", e) for e in layout.entries)
    out += layout.table
    pieces = []
    for gpa, blob in layout.writes:  # split long writes into 64 KiB pieces
        for off in range(0, len(blob), 0xFFFF):
            pieces.append((gpa + off, blob[off:off + 0xFFFF]))
    if len(pieces) > 255:
        raise UsageError(f"{len(pieces)} memory writes do not fit the raw encoding")
    out.append(len(pieces))
    for gpa, blob in pieces:
        out += struct.pack("<IH", gpa, len(blob)) + blob
    return bytes(out)


def encode_structured(kind: str, decisions: bytes,
                      policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET) -> bytes:
    """A ``structured`` input: layout ``kind`` built from ``decisions``."""
    return _header("structured", policy) + bytes([_KINDS.index(kind)]) + decisions


def encode_driver(decisions: bytes, policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET) -> bytes:
    """A ``driver`` input: a driver-end program made of ``decisions``."""
    return _header("driver", policy) + decisions


def describe(case: Case) -> dict[str, Any]:
    """A JSON-able summary of a case (for findings)."""
    out: dict[str, Any] = {"mode": case.mode, "policy": str(case.policy)}
    if case.kind is not None:
        out["kind"] = case.kind
    if case.layout is not None:
        out["layout"] = case.layout.describe()
    return out
