"""SET_MEM_TABLE: turn the front-end's region table and fds into mapped guest RAM, safely.

The table comes from the front-end, so it is checked before anything is mapped (vhost-user
"SET_MEM_TABLE", rule VU-08): 1..8 regions, none empty or wrapping 64 bits, disjoint both in
guest-physical and in front-end (``userspace_addr``) space, each fd a regular file at least
``mmap_offset + memory_size`` long. The last check matters most: a mapping past the end of its
file maps fine but kills the back-end with SIGBUS on first touch. Linux's UML front-end sends
its RAM file (an unlinked file in its ``$TMPDIR``, /dev/shm by default), with
``guest_phys_addr == userspace_addr == mmap_offset``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from device.vhost_user.errors import violation
from protocol.errors import GuestMemoryError
from protocol.vhost_user import MAX_MEM_REGIONS
from virtqueue.memory import GuestMemory, MemoryRegion

__all__ = ["check_regions", "map_regions", "memory_regions"]

_U64_END = 1 << 64


def memory_regions(table) -> list[MemoryRegion]:
    """The regions of a parsed :data:`protocol.vhost_user.MemoryTable`."""
    if not 1 <= table.nregions <= MAX_MEM_REGIONS:
        raise violation("VU-08", "memory table region count out of range",
                        nregions=table.nregions)
    return [MemoryRegion(r.guest_phys_addr, r.memory_size, fd_offset=r.mmap_offset,
                         user_addr=r.userspace_addr) for r in table.regions]


def check_regions(regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
    """Reject tables GuestMemory must never see (see the module docstring)."""
    for region in regions:
        assert region.user_addr is not None
        if region.size <= 0 or region.gpa + region.size > _U64_END or \
                region.user_addr + region.size > _U64_END:
            raise violation("VU-08", "memory region is empty or wraps 64 bits",
                            gpa=region.gpa, size=region.size)
    for kind, key in (("guest", lambda r: r.gpa), ("front-end", lambda r: r.user_addr)):
        spans = sorted((key(r), key(r) + r.size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise violation("VU-08", f"memory regions overlap in {kind} address",
                                at=start)
    for region, fd in zip(regions, fds, strict=True):
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise violation("VU-08", f"memory fd cannot be inspected ({exc.strerror})") \
                from None
        if not stat.S_ISREG(st.st_mode) or region.fd_offset + region.size > st.st_size:
            raise violation("VU-08", "memory region is not inside its file",
                            gpa=region.gpa, size=region.size, mmap_offset=region.fd_offset,
                            file_size=st.st_size)


def map_regions(fds: Sequence[int], regions: Sequence[MemoryRegion]) -> GuestMemory:
    """Map checked regions; takes the fds (closed on failure too)."""
    try:
        return GuestMemory.from_fds(list(zip(fds, regions, strict=True)))
    except GuestMemoryError as exc:
        raise violation("VU-08", f"memory region cannot be mapped: {exc.reason}") from None
