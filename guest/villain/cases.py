"""The attack catalogue: every case the hostile driver throws at a device (research/peers.md §8).

Kinds of case:

- ``layout``: a valid descriptor layout with one mutation of
  :data:`virtqueue.cases.MUTATIONS`, built by the fuzz engineer's builders
  (:func:`virtqueue.strategies.build_near_valid`), placed on the inflate queue with PFNs as
  payload. The case ID is the rule the mutation breaks (DC-01 ... AV-04).
- ``valid``: valid layouts a device must handle exactly although they look odd: a buffer split
  over descriptors at odd lengths (SPL-V-1), WRITE on an INDIRECT descriptor (SPL-V-3), direct
  descriptors followed by an indirect table (SPL-V-4).
- ``payload``: a valid ring carrying a bad balloon payload (BL-xx).
- ``config``, ``feature``, ``status``: misbehaviour outside the rings (BL-23/24/25, GEN-V-5,
  GEN-V-1, reset).

Each case names the catalogue ID it exercises (:data:`protocol.requirements.REQUIREMENTS`) and,
for input the spec forbids, the driver requirement it breaks: a device that accepts such input
is not wrong (§2.1.2 lets it carry on), but the report says it did not check.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.features import BalloonFeature, bit
from virtqueue.cases import MUTATIONS

__all__ = ["CATALOGUE", "SUITE_CHECKS", "AttackCase", "catalogue", "graded_requirements"]


@dataclass(frozen=True, slots=True)
class AttackCase:
    """One attack.

    Attributes:
        id: the case ID (usually the rule it breaks).
        rule: the catalogue ID the verdict is about.
        kind: ``layout``, ``valid``, ``payload``, ``config``, ``feature``, ``status``.
        title: one line for reports.
        mutation: the :data:`~virtqueue.cases.MUTATIONS` kind (layout cases).
        breaks: the driver requirement the input breaks (None: the input is valid).
        needs: feature bits the device must offer for the case to run.
        queue_size: the inflate queue size the case uses.
        also: further requirements the case's verdict covers.
    """

    id: str
    rule: str
    kind: str
    title: str
    mutation: str | None = None
    breaks: str | None = None
    needs: int = 0
    queue_size: int = 16
    also: tuple[str, ...] = ()


_SPEC_OF = {"DC-06": "SPL-D-2", "DC-02": "SPL-D-4", "DC-09": "SPL-D-4", "DC-04": "SPL-D-6",
            "IN-01": "SPL-D-7", "IN-06": "SPL-D-8", "IN-07": "SPL-D-9", "AV-01": "SPL-D-11"}
_TITLES = {
    "next_out_of_range": "a descriptor's next is beyond the queue size",
    "loop": "a chain loops back on itself",
    "too_long": "a chain longer than the queue size (through an indirect table)",
    "zero_length": "a descriptor of length 0",
    "readable_after_writable": "a device-readable descriptor after a device-writable one",
    "outside_ram": "a buffer outside guest RAM",
    "addr_len_overflow": "a buffer whose addr + len wraps 64 bits",
    "chain_too_big": "a chain of more than 2^32 bytes",
    "indirect_without_feature": "INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated",
    "table_len_zero": "an empty indirect table",
    "table_len_unaligned": "an indirect table length not a multiple of 16",
    "table_too_big": "an indirect table of more than 65536 entries",
    "table_outside_ram": "an indirect table outside guest RAM",
    "nested_indirect": "an INDIRECT descriptor inside an indirect table",
    "indirect_with_next": "INDIRECT and NEXT on the same descriptor",
    "table_loop": "a loop inside an indirect table",
    "table_next_out_of_range": "next inside an indirect table beyond its entries",
    "avail_idx_jump": "avail.idx jumps more than the queue size ahead",
    "head_out_of_range": "an avail entry names a head beyond the queue size",
    "duplicate_head": "a head made available twice",
}

_HINT = bit(BalloonFeature.FREE_PAGE_HINT)
_REPORTING = bit(BalloonFeature.REPORTING)
_STATS = bit(BalloonFeature.STATS_VQ)


def _layout_cases() -> list[AttackCase]:
    out = []
    for kind, rule in MUTATIONS.items():
        size = 128 if kind == "chain_too_big" else 16
        out.append(AttackCase(rule, rule, "layout", _TITLES[kind], mutation=kind,
                              breaks=_SPEC_OF.get(rule, rule), queue_size=size))
    return out


CATALOGUE: tuple[AttackCase, ...] = (
    AttackCase("VALID", "SPL-V-1", "valid", "a valid inflate layout from the builders "
               "(direct, indirect and mixed chains)"),
    AttackCase("SPL-V-1", "SPL-V-1", "valid", "PFNs split over descriptors at odd lengths "
               "(a PFN straddles two descriptors)"),
    AttackCase("SPL-V-3", "SPL-V-3", "valid", "WRITE set on the descriptor that points to an "
               "indirect table (the device must ignore it)"),
    AttackCase("SPL-V-4", "SPL-V-4", "valid", "direct descriptors followed by one INDIRECT "
               "descriptor"),
    *_layout_cases(),
    AttackCase("BL-01", "BL-01", "payload", "an inflate buffer of 2 PFNs and 2 trailing bytes",
               breaks="BL-01"),
    AttackCase("BL-02", "BL-02", "payload", "1024 PFNs in one inflate buffer (Linux sends at "
               "most 256)", breaks="BL-02"),
    AttackCase("BL-03", "BL-03", "payload", "PFNs in a device-writable inflate buffer",
               breaks="BL-03"),
    AttackCase("BL-04", "BL-04", "payload", "PFNs outside guest RAM among valid ones",
               breaks="BL-04"),
    AttackCase("BL-09", "BL-09", "payload", "deflate of a page that was never inflated",
               breaks="BL-09"),
    AttackCase("BL-11", "BL-11", "payload", "a stats buffer of 15 bytes (not whole 10-byte "
               "entries)", breaks="BAL-D-20", needs=_STATS),
    AttackCase("BL-12", "BL-12", "payload", "an 8 KiB stats buffer", breaks="BL-12",
               needs=_STATS),
    AttackCase("BL-13", "BAL-V-5", "payload", "a stats buffer with unknown tags (the device "
               "must ignore them)", needs=_STATS),
    AttackCase("BL-14", "BL-14", "payload", "a second stats buffer while one is parked",
               breaks="BAL-D-16", needs=_STATS),
    AttackCase("BL-16", "BL-16", "payload", "a free page hint command-ID buffer of 2 bytes",
               breaks="BAL-D-24", needs=_HINT),
    AttackCase("BL-17", "BL-17", "payload", "hinted pages with no command ID sent",
               breaks="BAL-D-25", needs=_HINT),
    AttackCase("BL-19", "BL-19", "payload", "a reported range not 4 KiB aligned",
               breaks="BL-19", needs=_REPORTING),
    AttackCase("BL-21", "BL-21", "payload", "a device-readable reporting buffer",
               breaks="BL-21", needs=_REPORTING),
    AttackCase("BL-23", "BL-23", "config", "the driver writes num_pages", breaks="BL-23"),
    AttackCase("BL-24", "BL-24", "config", "actual written above num_pages and RAM",
               breaks="BL-24"),
    AttackCase("BL-25", "BL-25", "config", "poison_val written without PAGE_POISON "
               "negotiated", breaks="BL-25"),
    AttackCase("GEN-V-14", "GEN-V-14", "config", "config read before FEATURES_OK"),
    AttackCase("GEN-V-5", "GEN-V-5", "feature", "a feature bit the device did not offer "
               "written with FEATURES_OK", breaks="GEN-D-5"),
    AttackCase("GEN-V-8", "GEN-V-8", "feature", "VERSION_1 is offered"),
    AttackCase("GEN-V-1", "GEN-V-1", "status", "an inflate buffer notified before DRIVER_OK",
               breaks="GEN-D-20"),
    AttackCase("GEN-V-12", "GEN-V-12", "status", "reset: status, InterruptStatus and "
               "QueueReady read 0 (MMIO-V-3)", also=("MMIO-V-3",)),
    AttackCase("MMIO-V-1", "MMIO-V-1", "status", "MagicValue and Version"),
    AttackCase("GEN-V-4", "GEN-V-4", "feature", "no feature offered without its "
               "prerequisites"),
    AttackCase("GEN-V-6", "GEN-V-6", "feature", "no undefined or reserved feature bit "
               "offered"),
    AttackCase("GEN-V-7", "GEN-V-7", "feature", "the same feature set accepted again after a "
               "reset"),
    AttackCase("GEN-V-13", "GEN-V-13", "status", "an old ring notified after a reset, before "
               "initialisation"),
    AttackCase("MMIO-V-5", "MMIO-V-5", "status", "a queue configured but never made ready, "
               "notified"),
    AttackCase("SPL-V-7", "SPL-V-7", "behaviour", "used-buffer notifications with avail.flags "
               "0 and NO_INTERRUPT (no EVENT_IDX)"),
    AttackCase("SPL-V-8", "SPL-V-8", "behaviour", "with EVENT_IDX: a notification at "
               "used_event although avail.flags is 1"),
    AttackCase("SPL-V-10", "SPL-V-10", "behaviour", "spurious available-buffer notifications"),
    AttackCase("MMIO-V-2", "MMIO-V-2", "behaviour", "InterruptStatus stays set until "
               "InterruptACK"),
    AttackCase("MMIO-V-4", "MMIO-V-4", "behaviour", "ConfigGeneration changes with a new "
               "target"),
    AttackCase("BAL-V-4", "BAL-V-4", "payload", "stats entries in descending tag order",
               needs=_STATS),
    AttackCase("BAL-V-14", "BAL-V-14", "payload", "a page reported with PAGE_POISON keeps "
               "poison_val", needs=_REPORTING),
    AttackCase("BAL-V-7", "BAL-V-7", "behaviour", "no command ID reused before the driver's "
               "STOP", needs=_HINT),
    AttackCase("BAL-V-10", "BAL-V-10", "behaviour", "hinted pages left alone after DONE",
               needs=_HINT),
)
"""Every case, in report order."""


SUITE_CHECKS = ("GEN-V-2", "GEN-V-3", "SPL-V-2", "SPL-V-9", "SPL-V-6")
"""Requirements the suite grades over all cases (see :meth:`guest.villain.Suite.checks`)."""


def graded_requirements() -> frozenset[str]:
    """Every catalogue ID a run of the suite gives a verdict on (device or peer-check rules)."""
    from protocol.requirements import REQUIREMENTS

    ids = {c.rule for c in CATALOGUE} | {c.id for c in CATALOGUE} | set(SUITE_CHECKS)
    ids |= {r for c in CATALOGUE for r in c.also}
    return frozenset(i for i in ids if i in REQUIREMENTS)


def catalogue(ids: list[str] | None = None) -> list[AttackCase]:
    """The cases with the given IDs (all by default), in catalogue order; KeyError names an
    unknown ID."""
    if ids is None:
        return list(CATALOGUE)
    known = {c.id: c for c in CATALOGUE}
    missing = [i for i in ids if i not in known]
    if missing:
        raise KeyError(f"unknown case(s) {missing}; known: {sorted(known)}")
    return [c for c in CATALOGUE if c.id in set(ids)]
