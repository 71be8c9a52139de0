"""What the balloon driver allocates for itself: ring memory, its private page, queue adapters.

Linux keeps the PFN array, the stats array and the two hint command-ID words inside
``struct virtio_balloon`` (kmalloc'd) and the rings in pages from ``alloc_pages_exact``; here
both come from the guest's own allocator as *unmovable* pages, so they are real guest RAM the
device reads and writes, and the allocator's books show them.
"""

from __future__ import annotations

import errno
from typing import Any

from guest.mm.types import MigrateType
from guest.virtio_mmio import VirtQueue
from protocol.errors import VballoonError

__all__ = [
    "CMD_ACTIVE_OFFSET",
    "CMD_STOP_OFFSET",
    "PFNS_OFFSET",
    "STATS_OFFSET",
    "HintQueue",
    "ProbeError",
    "Rings",
]

PFNS_OFFSET = 0
"""``__virtio32 pfns[256]``: 1 KiB."""
STATS_OFFSET = 1024
"""``struct virtio_balloon_stat stats[VIRTIO_BALLOON_S_NR]``: up to 16 x 10 bytes."""
CMD_ACTIVE_OFFSET = 1536
"""``__virtio32 cmd_id_active``."""
CMD_STOP_OFFSET = 1540
"""``__virtio32 cmd_id_stop``."""
_PAGE_SHIFT = 12


class ProbeError(VballoonError):
    """Probe failed for a reason that is not a device violation (Linux ``-ENOSPC``,
    ``-ENOMEM``); ``errno`` says which."""

    def __init__(self, err: int, message: str) -> None:
        self.errno = err
        super().__init__(f"{message} ({errno.errorcode.get(err, err)})")


class Rings:
    """A :class:`~guest.virtio_mmio.RingAllocator` on the guest's allocator (unmovable,
    whole power-of-two blocks, as ``alloc_pages_exact`` rounds up)."""

    def __init__(self, mm: Any) -> None:
        self.mm = mm
        self.blocks: dict[int, int] = {}

    def alloc_ring(self, nbytes: int) -> int:
        pages = -(-nbytes >> _PAGE_SHIFT)
        order = max(0, (pages - 1).bit_length())
        pfn = self.mm.alloc_pages(order, MigrateType.UNMOVABLE)
        if pfn is None:
            raise ProbeError(errno.ENOMEM, f"no order-{order} block for a {nbytes}-byte ring")
        self.blocks[pfn] = order
        return pfn << _PAGE_SHIFT

    def free_ring(self, gpa: int, nbytes: int) -> None:
        pfn = gpa >> _PAGE_SHIFT
        self.mm.free_pages(pfn, self.blocks.pop(pfn))


class HintQueue:
    """The free page queue as :class:`~guest.hinting.HintChannel` (one-piece buffers)."""

    def __init__(self, vq: VirtQueue) -> None:
        self.ring = vq.ring

    @property
    def num_free(self) -> int:
        return self.ring.num_free

    def add_outbuf(self, gpa: int, length: int, token: object) -> None:
        self.ring.add([(gpa, length)], [], token)

    def add_inbuf(self, gpa: int, length: int, token: object) -> None:
        self.ring.add([], [(gpa, length)], token)

    def get_buf(self) -> tuple[Any, int] | None:
        return self.ring.get_buf()

    def kick(self) -> None:
        self.ring.kick()
