"""Why each step happens: one line per event kind, citing the virtio spec section and the
Linux / QEMU function that does it.

Sections are virtio 1.2/1.4 numbers (the split-ring text is identical in both); function names
are Linux 6.1 (``drivers/virtio/virtio_ring.c``, ``drivers/virtio/virtio_balloon.c``,
``mm/page_reporting.c``) and QEMU (``hw/virtio/virtio.c``, ``hw/virtio/virtio-balloon.c``,
``migration/ram.c``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SHORT", "why"]

_WHY: dict[str, str] = {
    "boot": "§3.1.1: reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK, queue set-up "
            "(§4.2.3.2), DRIVER_OK. Linux virtballoon_probe() -> init_vqs(); each ring is one "
            "contiguous block (§2.7.2, vring_init with 4096 alignment).",
    "vq.add": "§2.7.13: the driver writes the descriptors, then avail.ring[idx % N] = head, "
              "then (after a write barrier, §2.7.13.3.1) avail.idx += 1. Linux "
              "virtqueue_add_split().",
    "vq.kick.event_idx": "§2.7.10 (EVENT_IDX): notify only if avail_event lies in [old, new), "
                         "i.e. vring_need_event(avail_event, new, old). Linux "
                         "virtqueue_kick_prepare_split().",
    "vq.kick.flags": "§2.7.10 (no EVENT_IDX): notify unless the device set "
                     "VRING_USED_F_NO_NOTIFY in used.flags. Linux "
                     "virtqueue_kick_prepare_split().",
    "vq.pop": "§2.7.13/§2.7.5: the device reads avail.idx, takes avail.ring[next_avail % N] and "
              "walks the chain, checking every descriptor rule (DC-, IN-). QEMU virtqueue_pop(), "
              "rust-vmm pop_descriptor_chain().",
    "vq.push": "§2.7.8: the device writes used.ring[idx % N] = {id: head, len: bytes written}, "
               "then advances used.idx (SPL-V-5: len first). QEMU virtqueue_push().",
    "vq.interrupt.event_idx": "§2.7.7 (EVENT_IDX): interrupt only if used_event lies in "
                              "[old, new): vring_need_event(used_event, new, old). QEMU "
                              "virtio_should_notify().",
    "vq.interrupt.flags": "§2.7.7 (no EVENT_IDX): interrupt unless the driver set "
                          "VRING_AVAIL_F_NO_INTERRUPT in avail.flags. QEMU "
                          "virtio_should_notify().",
    "vq.get_buf": "§2.7.14: the driver reads used.ring[last_used % N], puts the chain's "
                  "descriptors back on its free list and sets used_event. Linux "
                  "virtqueue_get_buf_ctx_split() -> detach_buf_split().",
    "vq.reject": "§2.7.5.1: the device trusts nothing in the ring. Under needs-reset (QEMU "
                 "virtio_error()) it sets DEVICE_NEEDS_RESET (§2.1.2) and stops the queue until "
                 "reset; truncate (rust-vmm) and skip (Cloud Hypervisor) go on.",
    "teach.tamper": "Only the driver writes the descriptor table and the avail ring (§2.7.5.1); "
                    "nothing stops a buggy or hostile one from writing anything there.",
    "balloon.report": "§5.5.6.7: reported pages are free in the guest; with poison_val 0 the "
                      "host may discard them. QEMU virtio_balloon_handle_report() -> "
                      "ram_block_discard_range() (here: fallocate PUNCH_HOLE on the memfd).",
    "balloon.hint": "§5.5.6.5: ranges count only between the current command ID and STOP. QEMU "
                    "get_free_page_hints() -> qemu_guest_free_page_hint() clears them from the "
                    "migration bitmap.",
    "balloon.hint.cmd": "§5.5.6.5: QEMU moves REQUESTED -> START on the current command ID and "
                        "START -> STOP on any other (the guest's STOP).",
    "balloon.inflate": "§5.5.6: inflated pages belong to the host. QEMU "
                       "virtio_balloon_handle_output() discards each page "
                       "(ram_block_discard_range).",
    "balloon.deflate": "§5.5.6.1: the driver tells the host before it reuses deflated pages "
                       "(MUST_TELL_HOST order); QEMU takes them out of the balloon.",
    "report.batch": "Linux page_reporting_drain(): __putback_isolated_page(FPI_TO_TAIL), then "
                    "SetPageReported. Allocations take the HEAD of a list, so reported "
                    "(discarded) memory is reused last, and the next pass skips Reported blocks.",
    "teach.walk.visit": "walk_free_blocks() (MST's 2018 review of walk_free_mem_block): every "
                        "free block >= min_order is offered to the callback, orders high to "
                        "low, each list head to tail.",
    "teach.walk.result": "Callback result: 0 = reported (moved to the tail when the walk "
                         "returns: rotation is batched), > 0 = skipped, < 0 = stop (the cursor "
                         "keeps this block to resume from).",
    "teach.walk.end": "MST: 'collect reported pages and then move them to tail when we exit'; "
                      "the result says COMPLETE, STOPPED (with the cursor) or BUDGET.",
    "teach.free_lists": "Linux zone->free_area[order].free_list[migratetype] "
                        "(/proc/pagetypeinfo). Page reporting looks at orders >= pageblock_order "
                        "(9, 2 MiB) only; R = PageReported.",
    "teach.records": "What the host keeps: merged guest-physical ranges per kind "
                     "(device/records.py), never per-page state.",
    "migration": "QEMU migration/ram.c: migration_bitmap_sync() opens a round; "
                 "virtio_balloon_free_page_hint_notify() stops hinting before a sync and starts "
                 "a new command ID after it; hinted pages leave the round's bitmap.",
    "host": "The host's verbs: QMP balloon (num_pages = (RAM - target) >> 12, then a config "
            "interrupt, §5.5.6) and the migration's hinting notifier (§5.5.6.5).",
    "outcome": "§2.1.2: a device that sets DEVICE_NEEDS_RESET raises a config interrupt; the "
               "driver must reset it before using it again.",
}

SHORT: dict[str, str] = {
    "vq.add": "§2.7.13 add",
    "vq.kick": "§2.7.10 kick",
    "vq.pop": "§2.7.5 pop",
    "vq.push": "§2.7.8 push",
    "vq.interrupt": "§2.7.7 interrupt",
    "vq.get_buf": "§2.7.14 get_buf",
    "vq.reject": "§2.7.5.1 reject",
    "balloon.report": "§5.5.6.7 report",
    "balloon.hint": "§5.5.6.5 hint",
    "balloon.inflate": "§5.5.6 inflate",
    "balloon.deflate": "§5.5.6.1 deflate",
    "report": "page_reporting_cycle()",
    "teach.walk": "walk_free_blocks()",
    "migration": "migration/ram.c",
    "driver": "virtio_balloon.c",
}
"""A few words per event family, for the why line of a grouped step."""


def why(key: str, record: dict[str, Any] | None = None) -> str:
    """The why line for ``key`` (an event name, or a variant such as ``vq.kick.event_idx``)."""
    if record is not None and key in ("vq.kick", "vq.interrupt"):
        key += ".event_idx" if record.get("event_idx") else ".flags"
    if key == "balloon.hint" and record is not None and record.get("step") == "guest_cmd_id":
        key = "balloon.hint.cmd"
    return _WHY.get(key) or _WHY.get(key.split(".")[0], "")
