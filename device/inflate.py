"""Inflate and deflate, device side: PFN arrays in, pages discarded or given back.

virtio §5.5.6 and QEMU ``virtio_balloon_handle_output``. Each chain on inflateq / deflateq is
read as a stream of le32 balloon PFNs (guest-physical address >> 12) over its whole
device-readable part, not only the head descriptor (BL-08). QEMU's behaviour, kept here:

- trailing bytes that do not make a whole PFN are ignored (BL-01); device-writable parts are
  not looked at (BL-03);
- a PFN that names no RAM is skipped, never fatal (BL-04): it is recorded as rejected;
- inflate discards each 4 KiB page at once (the host page size here is 4 KiB, so QEMU's
  partially-ballooned-page bitmap never comes into play) and a failed discard is not fatal;
- deflate has nothing to do to memory (QEMU's MADV_WILLNEED is only a hint): the range is
  taken out of the balloon record; deflating a page never inflated is allowed (BL-09).

Work per chain is bounded (``max_pfns``, BL-02): a chain may claim up to 4 GiB of PFNs.
Consecutive PFNs, ascending or descending (Linux sends descending runs), are handled as
one run (one range check, one hole punch).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.events import emit, warn
from device.records import BalloonRecords
from device.transport import HostMemory
from protocol.balloon import BALLOON_PAGE_SIZE, PFN_SHIFT, PFN_SIZE
from protocol.errors import GuestMemoryError

if TYPE_CHECKING:
    from virtqueue.device import DescriptorChain

__all__ = ["MAX_PFNS_PER_CHAIN", "PFN", "PfnResult", "deflate", "inflate", "pfn_extents",
           "pfn_runs"]

PFN = struct.Struct("<I")
"""One le32 PFN (``protocol.balloon.PFN_SIZE`` bytes)."""

MAX_PFNS_PER_CHAIN = 1 << 16
"""PFNs taken from one chain (256 MiB of guest memory); the rest is ignored (BL-02)."""

_REJECT_LOG = 8


@dataclass(frozen=True, slots=True)
class PfnResult:
    """What one inflate or deflate chain did (counts of 4 KiB pages)."""

    pfns: int
    """PFNs read from the chain (after the cap)."""
    applied: int
    """PFNs that named RAM and were inflated / deflated."""
    rejected: int
    """PFNs that named no RAM (BL-04)."""
    trailing: int = 0
    """Bytes after the last whole PFN (BL-01)."""
    over_cap: int = 0
    """PFNs beyond ``max_pfns`` that were ignored (BL-02)."""
    unknown: int = 0
    """Deflate only: PFNs that were not in the balloon (BL-09)."""


def pfn_runs(data: bytes | memoryview) -> Iterator[tuple[int, int]]:
    """Yield ``(first_pfn, count)`` runs of consecutive PFNs, in buffer order."""
    start = count = 0
    for (pfn,) in PFN.iter_unpack(data):
        if count and pfn == start + count:
            count += 1
            continue
        if count:
            yield start, count
        start, count = pfn, 1
    if count:
        yield start, count


def pfn_extents(data: bytes | memoryview) -> Iterator[tuple[int, int, int]]:
    """Yield ``(first_pfn, count, step)`` runs of consecutive PFNs, in buffer order.

    Like :func:`pfn_runs`, but a run may also go *down* (``step`` -1: ``first_pfn`` is the
    run's first PFN in the buffer, its highest). Linux sends descending runs: it pops its new
    balloon pages off a list in reverse allocation order, so an ascending-only walk would see
    256 runs of one page per chain (one hole punch each) where there is one run.
    """
    n = len(data) // PFN.size
    if n > 1:  # fast path: the whole buffer is one run (compared in C, not PFN by PFN)
        head, tail = PFN.unpack_from(data, 0)[0], PFN.unpack_from(data, (n - 1) * PFN.size)[0]
        step = 1 if tail > head else -1
        if abs(tail - head) == n - 1 and bytes(data[:n * PFN.size]) == struct.pack(
                f"<{n}I", *range(head, tail + step, step)):
            yield head, n, step
            return
    first = count = step = 0
    for (pfn,) in PFN.iter_unpack(data):
        if count == 1 and (pfn == first + 1 or pfn == first - 1):
            step, count = pfn - first, 2
            continue
        if count > 1 and pfn == first + count * step:
            count += 1
            continue
        if count:
            yield first, count, step
        first, count, step = pfn, 1, 1
    if count:
        yield first, count, step


def inflate(chain: DescriptorChain, memory: HostMemory, records: BalloonRecords, *,
            queue: int, max_pfns: int = MAX_PFNS_PER_CHAIN) -> PfnResult:
    """Put the chain's PFNs in the balloon: discard each page and record it as ballooned."""
    return _walk(chain, memory, records, queue=queue, max_pfns=max_pfns, inflating=True)


def deflate(chain: DescriptorChain, memory: HostMemory, records: BalloonRecords, *,
            queue: int, max_pfns: int = MAX_PFNS_PER_CHAIN) -> PfnResult:
    """Take the chain's PFNs out of the balloon record (nothing to do to memory)."""
    return _walk(chain, memory, records, queue=queue, max_pfns=max_pfns, inflating=False)


def _walk(chain: DescriptorChain, memory: HostMemory, records: BalloonRecords, *, queue: int,
          max_pfns: int, inflating: bool) -> PfnResult:
    kind = "inflate" if inflating else "deflate"
    total_pfns, trailing = divmod(chain.readable_len, PFN_SIZE)
    pfns = min(total_pfns, max_pfns)
    data = chain.read(memory, pfns * PFN_SIZE) if pfns else b""
    applied = unknown = 0
    bad: list[int] = []
    for first, count, step in pfn_extents(data):
        low = first if step > 0 else first - count + 1
        gpa, length = low << PFN_SHIFT, count * BALLOON_PAGE_SIZE
        if memory.contains(gpa, length):
            pieces = [(gpa, length)]
        else:  # split the run: some pages may still be RAM
            pieces = []
            for pfn in range(first, first + count * step, step):
                page = pfn << PFN_SHIFT
                if memory.contains(page, BALLOON_PAGE_SIZE):
                    pieces.append((page, BALLOON_PAGE_SIZE))
                else:
                    bad.append(pfn)
                    records.reject(pfn)
        for start, n in pieces:
            applied += n // BALLOON_PAGE_SIZE
            if inflating:
                _discard(memory, records, start, n, queue=queue)
                records.ballooned.add(start, start + n)
            else:
                unknown += (n - records.ballooned.remove(start, start + n)) // BALLOON_PAGE_SIZE
    result = PfnResult(pfns=pfns, applied=applied, rejected=len(bad), trailing=trailing,
                       over_cap=total_pfns - pfns, unknown=unknown)
    records.count(f"{kind}_chains")
    records.count(f"pfns_{kind}d", applied)
    if unknown:
        records.count("pfns_deflated_unknown", unknown)
    _log(kind, chain, result, bad, queue=queue)
    return result


def _discard(memory: HostMemory, records: BalloonRecords, gpa: int, length: int, *,
             queue: int) -> None:
    try:
        memory.discard(gpa, length)
    except GuestMemoryError as exc:  # QEMU: a failed discard is reported, never fatal
        records.count("discard_failures")
        warn("balloon.inflate", queue=queue, gpa=gpa, length=length, error=str(exc))
        return
    records.count("discarded_bytes", length)


def _log(kind: str, chain: DescriptorChain, r: PfnResult, bad: list[int], *, queue: int) -> None:
    emit(f"balloon.{kind}", queue=queue, head=chain.head, pfns=r.pfns, applied=r.applied,
         rejected=r.rejected, unknown=r.unknown)
    if bad:
        warn("balloon.reject", queue=queue, head=chain.head, rule="BL-04", count=len(bad),
             pfns=[hex(p) for p in bad[:_REJECT_LOG]])
    if r.over_cap:
        warn("balloon.reject", queue=queue, head=chain.head, rule="BL-02", ignored=r.over_cap)
    if r.trailing:
        warn(f"balloon.{kind}", queue=queue, head=chain.head, rule="BL-01",
             trailing_bytes=r.trailing)
    if chain.writable:
        warn(f"balloon.{kind}", queue=queue, head=chain.head, rule="BL-03",
             ignored_writable_bytes=chain.writable_len)
