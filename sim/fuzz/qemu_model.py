"""A model of what QEMU 7.2's split-ring pop path and balloon inflate handler do with a layout.

Written from QEMU's behaviour (``hw/virtio/virtio.c`` ``virtqueue_split_pop``,
``virtqueue_map_desc``, ``softmmu/physmem.c`` ``address_space_map``;
``hw/virtio/virtio-balloon.c`` ``virtio_balloon_handle_output``; research/peers.md §1.8) and
checked against the real QEMU by the differential run: wherever the model and QEMU disagree the
disagreement is reported as unexplained. The model records, per chain, every place where QEMU
does something other than our device end; those are its :data:`DEVIATIONS`, and they are what a
differential disagreement is classified by.

What the model does, per notification: pop until ``last_avail_idx`` reaches ``avail.idx``
(without comparing their distance with the queue size), reading the head, following an INDIRECT
table only on the head descriptor, mapping each buffer (guest RAM directly; anything else
through the one bounce buffer of at most a page, which reads as zeros), failing on a readable
buffer after a writable one, a zero length, a second non-RAM buffer, more descriptors than the
table holds, or a ``next`` beyond it; then every readable le32 is a PFN to discard, and the chain
is returned used. Any failure stops the device (``virtio_error``: DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from protocol.split_ring import DescFlags
from virtqueue.cases import Layout

__all__ = ["DEVIATIONS", "Deviation", "ModelChain", "qemu_predict"]

_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_U64 = (1 << 64) - 1
_DESC = struct.Struct("<QIHH")
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class Deviation:
    """One way QEMU 7.2 differs from our device end, and how that difference is classified."""

    id: str
    rule: str
    category: str
    """``qemu-gap`` (QEMU does not check a rule) or ``spec-ambiguity`` (the spec is silent)."""
    known: bool
    """Listed in research/peers.md (§1.8 "What QEMU's split path does NOT check", or §8)."""
    text: str


DEVIATIONS: dict[str, Deviation] = {d.id: d for d in (
    Deviation("avail-idx-unchecked", "AV-01", "qemu-gap", False,
              "the pop path never compares avail idx with the queue size (QEMU 7.2 checks it "
              "only in virtqueue_num_heads, which the balloon's handler does not call): QEMU "
              "pops on around the ring until last_avail_idx reaches avail idx"),
    Deviation("indirect-not-at-head", "SPL-V-4", "qemu-gap", False,
              "INDIRECT is honoured only on a chain's head descriptor; after direct "
              "descriptors (valid, SPL-V-4: the device MUST accept it) the table is taken as a "
              "plain buffer: its bytes become PFNs, and without WRITE after a writable buffer "
              "the chain fails 'Incorrect order for descriptors'"),
    Deviation("indirect-without-feature", "IN-01", "qemu-gap", True,
              "INDIRECT is followed although VIRTIO_F_INDIRECT_DESC was not negotiated"),
    Deviation("indirect-with-next", "IN-07", "qemu-gap", True,
              "NEXT is ignored on an INDIRECT head descriptor"),
    Deviation("nested-indirect", "IN-06", "qemu-gap", True,
              "an INDIRECT descriptor inside a table is taken as a plain buffer"),
    Deviation("table-too-big", "IN-04", "qemu-gap", True,
              "no bound on the number of entries of an indirect table"),
    Deviation("table-chain-length", "DC-04", "qemu-gap", False,
              "a chain inside an indirect table is bounded by the table's entry count, not by "
              "the queue size (SPL-D-6)"),
    Deviation("bounce-buffer", "DC-07", "spec-ambiguity", False,
              "a buffer that is not guest RAM (beyond RAM, or wrapping past 2^64 to address 0) "
              "is mapped through QEMU's single bounce buffer (at most a page, one per chain) and "
              "reads as zeros; the spec never says a buffer must be RAM"),
)}


@dataclass(frozen=True, slots=True)
class ModelChain:
    """The model's verdict on the chain at one avail position."""

    head: int
    accepted: bool
    pfns: frozenset[int]
    deviations: tuple[str, ...]


class _Fail(Exception):
    pass


class _Walk:
    def __init__(self, memory: Any, ram: tuple[tuple[int, int], ...]) -> None:
        self.memory = memory
        self.ram = ram
        self.devs: list[str] = []

    def dev(self, name: str) -> None:
        if name not in self.devs:
            self.devs.append(name)

    def region_end(self, addr: int) -> int | None:
        for gpa, size in self.ram:
            if gpa <= addr < gpa + size:
                return gpa + size
        return None

    def gap_end(self, addr: int) -> int:
        return min([gpa for gpa, _ in self.ram if gpa > addr], default=1 << 64)

    def map(self, addr: int, n: int, state: dict) -> list[tuple[int, int, bool]]:
        """(addr, len, is_ram) pieces of a buffer, as address_space_map hands them out."""
        if n == 0:
            raise _Fail("zero sized buffers are not allowed")
        pieces = []
        while n:
            addr &= _U64
            end = self.region_end(addr)
            if end is not None:
                take = min(n, end - addr)
                pieces.append((addr, take, True))
            else:
                if state["bounce"]:
                    raise _Fail("bogus descriptor or out of resources")
                state["bounce"] = True
                self.dev("bounce-buffer")
                take = min(n, _PAGE, self.gap_end(addr) - addr)
                pieces.append((addr, take, False))
            addr += take
            n -= take
        return pieces

    def inside(self, addr: int, n: int) -> bool:
        end = self.region_end(addr)
        return end is not None and addr + n <= end


def _chain(w: _Walk, layout: Layout, table: bytes, head: int) -> list[tuple[int, int, bool]]:
    """The readable pieces of the chain at ``head``, or _Fail."""
    size = layout.size
    addr, length, flags, nxt = _DESC.unpack_from(table, 16 * head)
    limit, in_table = size, False
    if flags & _INDIRECT:
        if not layout.indirect:
            w.dev("indirect-without-feature")
        if flags & _NEXT:
            w.dev("indirect-with-next")
        if length == 0 or length % 16:
            raise _Fail("Invalid size for indirect buffer table")
        if not w.inside(addr, length):
            raise _Fail("Cannot map indirect buffer")
        if length // 16 > 65536:
            w.dev("table-too-big")
        table = w.memory.read(addr, length)
        limit, in_table = length // 16, True
        addr, length, flags, nxt = _DESC.unpack_from(table, 0)
    state = {"bounce": False}
    readable: list[tuple[int, int, bool]] = []
    writing = False
    entries = 0
    while True:
        if flags & _INDIRECT:
            w.dev("nested-indirect" if in_table else "indirect-not-at-head")
        if flags & _WRITE:
            w.map(addr, length, state)
            writing = True
        else:
            if writing:
                raise _Fail("Incorrect order for descriptors")
            readable += w.map(addr, length, state)
        entries += 1
        if entries > limit:
            raise _Fail("Looped descriptor")
        if in_table and entries > size:
            w.dev("table-chain-length")
        if not flags & _NEXT:
            return readable
        if nxt >= limit:
            raise _Fail(f"Desc next is {nxt}")
        addr, length, flags, nxt = _DESC.unpack_from(table, 16 * nxt)


def _pfns(memory: Any, pieces: list[tuple[int, int, bool]], pool: range) -> frozenset[int]:
    data = b"".join(memory.read(a, n) if ram else bytes(n) for a, n, ram in pieces)
    out = set()
    for k in range(0, len(data) - 3, 4):
        pfn = int.from_bytes(data[k:k + 4], "little")
        if pfn in pool:
            out.add(pfn)
    return frozenset(out)


def qemu_predict(memory: Any, layout: Layout, pool: range) -> tuple[list[ModelChain], int,
                                                                    tuple[int, ...]]:
    """The model's run: per-chain verdicts, the final used idx, and the used ring's heads.

    ``memory`` holds the layout (our mirror of QEMU's RAM); ``pool`` the PFNs that count.
    The used ring is returned slot by slot (``min(used idx, size)`` slots).
    """
    size = layout.size
    ram = layout.geometry.ram
    table = memory.read(layout.desc, 16 * size)
    avail = memory.read(layout.avail, 4 + 2 * size)
    idx = int.from_bytes(avail[2:4], "little")
    ring = struct.unpack_from(f"<{size}H", avail, 4)
    pending = idx  # QEMU starts at last_avail_idx 0
    chains: list[ModelChain] = []
    for k in range(min(pending, size)):  # after one whole cycle the ring repeats itself
        head = ring[k % size]
        w = _Walk(memory, ram)
        if k == 0 and pending > size:
            w.dev("avail-idx-unchecked")
        if head >= size:
            chains.append(ModelChain(head, False, frozenset(), tuple(w.devs)))
            break
        try:
            pieces = _chain(w, layout, table, head)
        except _Fail:
            chains.append(ModelChain(head, False, frozenset(), tuple(w.devs)))
            break
        chains.append(ModelChain(head, True, _pfns(memory, pieces, pool), tuple(w.devs)))
    accepted = [c for c in chains if c.accepted]
    if len(accepted) == size and pending > size:
        used_idx = pending  # every further cycle pops the same chains again
        slots = tuple(ring[s] for s in range(size))
    else:
        used_idx = len(accepted)
        slots = tuple(c.head for c in accepted)
    return chains, used_idx, slots
