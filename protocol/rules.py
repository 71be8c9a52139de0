"""Stable IDs for the rules a virtqueue peer can break, with the spec section each comes from.

IDs follow the case catalogue of research/peers.md §8 (CFG-, AV-, DC-, IN-, US-, BL-), which is
also the vocabulary of QEMU's, rust-vmm's and virtio-villain's checks, so a rejection here can be
compared with what those peers do. ``side`` says who the rule binds: ``driver`` or ``device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RULES", "Rule", "rule"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One checkable rule: its ID, the spec section, a one-line paraphrase, whom it binds."""

    id: str
    section: str
    summary: str
    side: Literal["driver", "device"]


_TABLE: tuple[Rule, ...] = (
    # Queue configuration (§2.7.1 alignment and size, §4.2.3.2 MMIO queue setup)
    Rule("CFG-01", "2.7", "queue size is a power of two between 1 and 32768 (and <= QueueSizeMax)",
         "driver"),
    Rule("CFG-02", "2.7.1", "descriptor table is 16-byte aligned", "driver"),
    Rule("CFG-03", "2.7.1", "available ring is 2-byte aligned", "driver"),
    Rule("CFG-04", "2.7.1", "used ring is 4-byte aligned", "driver"),
    Rule("CFG-05", "2.7.1", "every ring area lies inside guest RAM", "driver"),
    Rule("CFG-06", "4.2.2.1", "a queue is used only while it is ready (MMIO-V-5)", "driver"),
    Rule("CFG-07", "2.7.1", "ring address arithmetic does not overflow 64 bits", "driver"),
    # Available ring (§2.7.6, §2.7.13)
    Rule("AV-01", "2.7.6", "avail idx moves ahead by at most the queue size (never backwards)",
         "driver"),
    Rule("AV-03", "2.7.6", "every head in the available ring is below the queue size", "driver"),
    Rule("AV-04", "2.7.13", "a head is not made available again while still in flight", "driver"),
    # Descriptor chains (§2.7.4-2.7.5)
    Rule("DC-01", "2.7.5", "next is below the queue size", "driver"),
    Rule("DC-02", "2.7.5.2", "a chain has no loop", "driver"),
    Rule("DC-04", "2.7.5.3.1", "a chain is no longer than the queue size", "driver"),
    Rule("DC-05", "2.7.5", "a descriptor has a non-zero length (QEMU: zero sized buffers)",
         "driver"),
    Rule("DC-06", "2.7.4.2", "device-writable descriptors come after all device-readable ones",
         "driver"),
    Rule("DC-07", "2.7.5", "a buffer lies inside guest RAM", "driver"),
    Rule("DC-08", "2.7.5", "addr + len does not overflow 64 bits", "driver"),
    Rule("DC-09", "2.7.5.2", "the total length of a chain is at most 2^32 bytes", "driver"),
    # Indirect descriptors (§2.7.5.3)
    Rule("IN-01", "2.7.5.3.1", "INDIRECT is used only when VIRTIO_F_INDIRECT_DESC is negotiated",
         "driver"),
    Rule("IN-02", "2.7.5.3", "an indirect table is not empty", "driver"),
    Rule("IN-03", "2.7.5.3", "an indirect table's length is a multiple of 16", "driver"),
    Rule("IN-04", "2.7.5.3", "an indirect table has at most 65536 entries", "driver"),
    Rule("IN-05", "2.7.5.3", "an indirect table lies inside guest RAM", "driver"),
    Rule("IN-06", "2.7.5.3.1", "no INDIRECT descriptor inside an indirect table", "driver"),
    Rule("IN-07", "2.7.5.3.1", "INDIRECT and NEXT are not set on the same descriptor", "driver"),
    Rule("IN-08", "2.7.5.3", "a chain inside an indirect table has no loop and fits the table",
         "driver"),
    Rule("IN-09", "2.7.5.3", "next inside an indirect table is below its entry count", "driver"),
    # Used ring (§2.7.8)
    Rule("US-01", "2.7.8", "only a head that is in flight is returned used", "device"),
    Rule("US-02", "2.7.8", "a used element's id is below the queue size", "device"),
    Rule("US-03", "2.7.8", "a used element's id is the head of a buffer in flight", "device"),
    Rule("US-04", "2.7.8.2", "a used element's len is at most the buffer's device-writable length",
         "device"),
    Rule("US-05", "2.7.8", "used idx moves ahead by at most the number of buffers in flight",
         "device"),
    # Balloon payloads (§5.5.6; research/peers.md §8.6; what QEMU does in parentheses)
    Rule("BL-01", "5.5.6", "an inflate/deflate buffer is a whole number of le32 PFNs "
         "(QEMU ignores trailing bytes)", "driver"),
    Rule("BL-02", "5.5.6", "an inflate/deflate buffer carries a bounded number of PFNs "
         "(Linux sends at most 256)", "driver"),
    Rule("BL-03", "5.5.6", "inflate/deflate buffers are device-readable (QEMU ignores writable "
         "parts)", "driver"),
    Rule("BL-04", "5.5.6", "an inflated/deflated PFN names guest RAM (QEMU skips others)",
         "driver"),
    Rule("BL-09", "5.5.6.1", "a deflated PFN was inflated before", "driver"),
    Rule("BL-11", "5.5.6.3", "a stats buffer is a whole number of 10-byte entries (QEMU ignores "
         "a trailing partial entry)", "driver"),
    Rule("BL-12", "5.5.6.3", "a stats buffer has a bounded size", "driver"),
    Rule("BL-13", "5.5.6.3", "unknown stats tags are ignored by the device", "device"),
    Rule("BL-14", "5.5.6.3", "at most one stats buffer is available at a time (QEMU returns the "
         "parked one)", "driver"),
    Rule("BL-16", "5.5.6.5", "a free page hint command-ID out-buffer is exactly 4 bytes (QEMU: "
         "at least 4, else virtio_error)", "driver"),
    Rule("BL-17", "5.5.6.5", "hints count only under the current command ID (QEMU: only in "
         "START)", "driver"),
    Rule("BL-19", "5.5.6.7", "a reported range is aligned to the host page size (QEMU ignores "
         "others)", "driver"),
    Rule("BL-20", "5.5.6.7", "reported pages are not discarded while poison_val is non-zero",
         "device"),
    Rule("BL-21", "5.5.6.7", "reporting buffers are device-writable (QEMU ignores readable "
         "parts)", "driver"),
    Rule("BL-23", "5.5.4", "the driver writes only actual and poison_val, inside the config "
         "size (QEMU drops other writes; reads past the end give 0xff)", "driver"),
    Rule("BL-24", "5.5.4", "actual is not above num_pages or RAM (QEMU stores it anyway)",
         "driver"),
    Rule("BL-25", "5.5.4", "poison_val is written only with PAGE_POISON negotiated (QEMU forces "
         "0)", "driver"),
    Rule("BL-27", "5.5.4", "a balloon target is between 1 byte and RAM size (QEMU ignores 0 and "
         "clamps)", "device"),
)

RULES: dict[str, Rule] = {r.id: r for r in _TABLE}


def rule(rule_id: str) -> Rule:
    """Return the rule with ``rule_id``; an unknown ID is a bug in the caller (KeyError)."""
    return RULES[rule_id]
