"""Free page reporting, device side: reported ranges in, pages discarded (unless poisoned).

virtio §5.5.6.7 and QEMU ``virtio_balloon_handle_report``. Each chain on reporting_vq is a
scatter list of device-writable buffers, one per free block the guest reports (Linux: up to 32
blocks of at least pageblock order). QEMU's behaviour, kept here:

- only device-writable parts count; readable ones are not looked at (BL-21);
- a range not aligned to the host page size (4 KiB here), start or length, is silently
  ignored (BL-19);
- with ``poison_val`` non-zero the guest expects the pages to keep its poison pattern, so
  nothing is discarded (BL-20): QEMU then skips the element; vballoon still *records* the
  ranges as reported, so the report is visible, and counts them as not discarded;
- otherwise each range is discarded (it reads zeros afterwards); used length is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.events import emit, warn
from device.records import BalloonRecords
from device.transport import HostMemory
from protocol.errors import GuestMemoryError

if TYPE_CHECKING:
    from virtqueue.device import DescriptorChain

__all__ = ["HOST_PAGE_SIZE", "ReportResult", "report"]

HOST_PAGE_SIZE = 4096
"""The RAM block page size QEMU checks reported ranges against."""


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What one reporting chain did (bytes)."""

    ranges: int
    reported: int
    discarded: int
    unaligned: int = 0
    """Ranges ignored because they are not 4 KiB aligned (BL-19)."""


def report(chain: DescriptorChain, memory: HostMemory, records: BalloonRecords, *,
           poison_val: int, queue: int) -> ReportResult:
    """Record (and unless ``poison_val`` discard) every aligned writable range of ``chain``."""
    reported = discarded = unaligned = 0
    for seg in chain.writable:
        if (seg.addr | seg.len) % HOST_PAGE_SIZE:
            unaligned += 1
            continue
        records.reported.add(seg.addr, seg.addr + seg.len)
        reported += seg.len
        if poison_val:
            continue
        try:
            memory.discard(seg.addr, seg.len)
        except GuestMemoryError as exc:
            records.count("discard_failures")
            warn("balloon.report", queue=queue, head=chain.head, gpa=seg.addr, length=seg.len,
                 error=str(exc))
            continue
        discarded += seg.len
    result = ReportResult(len(chain.writable), reported, discarded, unaligned)
    records.count("report_chains")
    records.count("reported_bytes", reported)
    records.count("discarded_bytes", discarded)
    emit("balloon.report", queue=queue, head=chain.head, ranges=result.ranges,
         reported=reported, discarded=discarded)
    if unaligned:
        warn("balloon.report", queue=queue, head=chain.head, rule="BL-19", ignored=unaligned)
    if poison_val and reported:
        emit("balloon.report", queue=queue, head=chain.head, rule="BL-20",
             poison_val=hex(poison_val), kept_bytes=reported)
    if chain.readable:
        warn("balloon.report", queue=queue, head=chain.head, rule="BL-21",
             ignored_readable_bytes=chain.readable_len)
    return result
