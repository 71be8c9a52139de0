"""Inflate and deflate: ``fill_balloon``, ``leak_balloon``, ``tell_host`` of Linux 6.1.

The balloon takes order-0 movable pages from the guest's allocator (``balloon_page_alloc``:
no reclaim, no reserves, no warning), keeps them on a LIFO list (``balloon_dev_info.pages``)
and tells the host their 4 KiB PFNs, at most 256 per message (``VIRTIO_BALLOON_ARRAY_PFNS_MAX``)
as one device-readable buffer of le32 values (virtio spec §5.5.6). ``tell_host`` waits until
the device has used the buffer. Deflating always tells the host *before* the pages are freed
(Linux honours MUST_TELL_HOST whether or not it was negotiated; BAL-D-10).

Page contents when pages go back to the allocator: a guest with ``init_on_free`` or page
poisoning fills freed pages (Linux does it in ``free_pages``); the model's allocator does not,
so :func:`release_pages` fills them here for the pages the balloon frees (BAL-D-34: deflated
pages are initialised with ``poison_val`` before reuse).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import structlog
import trio

from guest.balloon.work import WaitQueue
from guest.mm.types import Gfp, MigrateType
from protocol.balloon import ARRAY_PFNS_MAX, PFN_SHIFT
from protocol.errors import UsageError

__all__ = ["BALLOON_PAGE_GFP", "OUT_OF_PUFF_DELAY", "Balloon", "release_pages"]

log = structlog.get_logger("vballoon.guest")

BALLOON_PAGE_GFP = Gfp.NORETRY | Gfp.NOMEMALLOC | Gfp.NOWARN
"""``balloon_page_alloc``: ``GFP_HIGHUSER_MOVABLE | __GFP_NOMEMALLOC | __GFP_NORETRY |
__GFP_NOWARN`` (the zone and migratetype are passed separately in the model)."""
OUT_OF_PUFF_DELAY = 0.2
"""``msleep(200)`` after a failed balloon page allocation ("Out of puff!")."""
_PAGE_SIZE = 1 << PFN_SHIFT


def release_pages(mm: Any, memory: Any, pfns: list[int], order: int,
                  fill_byte: int | None) -> None:
    """Free blocks to the allocator as a poisoning / init_on_free guest would (see above)."""
    for pfn in pfns:
        if fill_byte is not None:
            memory.fill(pfn << PFN_SHIFT, _PAGE_SIZE << order, fill_byte)
        mm.free_pages(pfn, order)


class Balloon:
    """The inflated pages and the two queues that move them (Linux ``vb->vb_dev_info`` etc.).

    Args:
        mm: the page allocator.
        memory: guest RAM (the PFN array is written there).
        pfns_gpa: guest address of the driver's 1 KiB PFN array (``vb->pfns``).
        acked: the wait queue the used-buffer callback wakes (``vb->acked``).
        inflate_vq, deflate_vq: the queues (``VirtQueue`` from :mod:`guest.virtio_mmio`).
        deflate_on_oom: DEFLATE_ON_OOM negotiated: inflated pages stay in totalram.
        fill_byte: what freed pages are filled with (None: left as they were).
    """

    def __init__(self, *, mm: Any, memory: Any, pfns_gpa: int, acked: WaitQueue,
                 inflate_vq: Any, deflate_vq: Any, deflate_on_oom: bool,
                 fill_byte: int | None) -> None:
        self.mm = mm
        self.memory = memory
        self.pfns_gpa = pfns_gpa
        self.acked = acked
        self.inflate_vq = inflate_vq
        self.deflate_vq = deflate_vq
        self.deflate_on_oom = deflate_on_oom
        self.fill_byte = fill_byte
        self.pages: list[int] = []  # balloon_dev_info.pages, newest last
        self.num_pages = 0
        self.lock = trio.Lock()  # vb->balloon_lock
        self.inflated_total = 0
        self.deflated_total = 0
        self.alloc_failures = 0

    async def tell_host(self, vq: Any, pfns: list[int]) -> None:
        """``tell_host``: one out-buffer of le32 PFNs, kick, wait until it is used."""
        data = struct.pack(f"<{len(pfns)}I", *pfns)
        self.memory.write(self.pfns_gpa, data)
        ring = vq.ring
        # "We should always be able to add one buffer to an empty queue."
        ring.add([(self.pfns_gpa, len(data))], [], self)
        ring.kick()
        await self.acked.wait_event(ring.get_buf)

    async def fill(self, num: int, *, sleep: Callable[[float], Any] = trio.sleep) -> int:
        """``fill_balloon``: inflate by up to ``min(num, 256)`` pages; how many it took."""
        num = min(num, ARRAY_PFNS_MAX)
        got: list[int] = []
        while len(got) < num:
            pfn = self.mm.alloc_pages(0, MigrateType.MOVABLE, gfp=BALLOON_PAGE_GFP)
            if pfn is None:
                self.alloc_failures += 1
                log.info("driver.out_of_puff", wanted=num, got=len(got))
                await sleep(OUT_OF_PUFF_DELAY)
                break
            got.append(pfn)
        async with self.lock:
            pfns = []
            while got:  # balloon_page_pop from the local list: LIFO
                pfn = got.pop()
                self.pages.append(pfn)  # balloon_page_enqueue
                pfns.append(pfn)
                self.num_pages += 1
                if not self.deflate_on_oom:
                    self.mm.adjust_managed_page_count(pfn, -1)
            if pfns:
                await self.tell_host(self.inflate_vq, pfns)
                self.inflated_total += len(pfns)
                log.info("driver.inflate", pages=len(pfns), num_pages=self.num_pages,
                         first_pfn=pfns[0], last_pfn=pfns[-1])
        return len(pfns)

    async def leak(self, num: int) -> int:
        """``leak_balloon``: deflate by up to ``min(num, 256)`` pages; how many it gave back."""
        num = min(num, ARRAY_PFNS_MAX)
        async with self.lock:
            num = min(num, self.num_pages)  # we can't release more pages than taken
            pfns = []
            while len(pfns) < num and self.pages:
                pfns.append(self.pages.pop())  # balloon_page_dequeue: the newest first
                self.num_pages -= 1
            if pfns:
                # with MUST_TELL_HOST this order is required; Linux keeps it always
                await self.tell_host(self.deflate_vq, pfns)
                if not self.deflate_on_oom:
                    for pfn in pfns:
                        self.mm.adjust_managed_page_count(pfn, 1)
                release_pages(self.mm, self.memory, pfns, 0, self.fill_byte)
                self.deflated_total += len(pfns)
                log.info("driver.deflate", pages=len(pfns), num_pages=self.num_pages,
                         first_pfn=pfns[0], last_pfn=pfns[-1])
        return len(pfns)

    def check(self) -> None:
        """Internal consistency: the page list and the count agree."""
        if len(self.pages) != self.num_pages:
            raise UsageError(f"balloon holds {len(self.pages)} pages but counts "
                             f"{self.num_pages}")
