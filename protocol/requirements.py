"""The requirement catalogue: every numbered spec requirement and peer check, and how we check it.

Two sources, one table:

* the normative statements of the virtio spec as research/spec.md numbers them (GEN-, SPL-,
  PKD-, BAL-, MMIO-, LEG-; ``-D-`` binds the driver, ``-V-`` the device), each with its level
  (MUST, MUST NOT, SHOULD, SHOULD NOT, MAY; the strongest word when a statement mixes them);
* the non-normative checks real devices make, which are the rule IDs of :mod:`protocol.rules`
  (CFG-, AV-, DC-, IN-, US-, BL-; research/peers.md §8). They are not copied: each
  :class:`~protocol.rules.Rule` is wrapped as a :class:`Requirement` of level ``CHECK``.

Each entry names the check that implements it as ``family[.topic][:ID]`` (e.g.
``ring.validate:DC-01``, ``monitor.features``, ``villain:IN-07``); the families are listed in
:data:`CHECK_FAMILIES`. An entry without a check says why in ``unobservable`` (a memory barrier
cannot be seen from the other end; a MAY permits and forbids nothing; the legacy interface is
out of scope). The conformance monitor and the device suite are built elsewhere and wire
themselves to these names; :func:`coverage` counts what has a check. Data only: this module
imports nothing but :mod:`protocol`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from protocol.rules import RULES

__all__ = [
    "CHECK_FAMILIES",
    "REQUIREMENTS",
    "Level",
    "Requirement",
    "check_family",
    "coverage",
    "requirement",
]


class Level(StrEnum):
    """How binding a requirement is: the RFC 2119 word, or CHECK for a peer's extra check."""

    MUST = "MUST"
    MUST_NOT = "MUST NOT"
    SHOULD = "SHOULD"
    SHOULD_NOT = "SHOULD NOT"
    MAY = "MAY"
    CHECK = "CHECK"


Side = Literal["driver", "device", "both"]

CHECK_FAMILIES: dict[str, str] = {
    "ring": "virtqueue's own validation: ring.validate:<rule> raised by the device end "
            "(DeviceQueue, a DriverViolation), ring.used:<rule> by the driver end (DriverQueue, "
            "a DeviceViolation)",
    "transport": "the device-side virtio-mmio register model rejecting a driver's register "
                 "access (transport.validate:<rule>)",
    "balloon": "the balloon device's payload checks on its queues (balloon.validate:<rule>)",
    "monitor": "the driver conformance monitor: runs a real driver against our device, watches "
               "its register accesses and ring contents, and may provoke it (spurious "
               "interrupts, delayed acks); monitor.<topic>",
    "suite": "the device conformance suite: drives a device (ours, QEMU's) through a scenario "
             "from the driver side and checks its answers; suite.<topic>",
    "villain": "hostile or unusual descriptor layouts (virtqueue.strategies) fed to a device's "
               "queue, graded by its reaction; villain:<rule or requirement ID>",
    "fuzz": "a property the fuzz harness (sim.fuzz) asserts of our device end on every input; "
            "fuzz.<property>",
}
"""The check families: the first dotted component of every ``check`` name."""


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement and how it is checked.

    Attributes:
        id: ``GEN-D-1`` ... for spec requirements, a :data:`protocol.rules.RULES` ID otherwise.
        section: the virtio spec section (spec.md's number) or the rule's section.
        level: MUST ... MAY, or CHECK for a non-normative peer check.
        summary: one line in our own words.
        side: whom it binds: ``driver``, ``device`` or ``both``.
        check: the name of the check that implements it (``family[.topic][:ID]``), or None.
        unobservable: why there is no automated check (required when ``check`` is None).
        also: further checks of the same requirement (e.g. the hostile-layout case).
    """

    id: str
    section: str
    level: Level
    summary: str
    side: Side
    check: str | None
    unobservable: str | None = None
    also: tuple[str, ...] = ()

    @property
    def normative(self) -> bool:
        """Whether this is a spec statement (not a peer's extra check)."""
        return self.level is not Level.CHECK

    @property
    def family(self) -> str | None:
        """The family of the primary check, None if unchecked."""
        return None if self.check is None else check_family(self.check)


def check_family(check: str) -> str:
    """The family of a check name: ``"ring.validate:DC-01"`` -> ``"ring"``."""
    return check.split(":", 1)[0].split(".", 1)[0]


# Reasons shared by many entries.
_MAY = "a permission (MAY): nothing is forbidden, so nothing to check"
_BARRIER = "memory barriers cannot be observed from the other end of shared memory"
_LEGACY = "legacy interface: vballoon drives and emulates only modern (VERSION_1) devices"
_PACKED = "packed ring: vballoon's rings are split only (RING_PACKED is never negotiated)"
_INSIDE = "concerns what the driver does with page contents inside the guest, which the " \
          "device side cannot see"

_L = Level
# (id, section, level, summary, check, unobservable-or-None, also, side-override-or-None)
_SPEC: tuple[tuple, ...] = (
    # ---- 2.1 device status
    ("GEN-D-1", "2.1.1", _L.MUST, "set each status bit as the matching init step completes",
     "monitor.status"),
    ("GEN-D-2", "2.1.1", _L.MUST_NOT, "never clear a status bit except by writing 0 (reset)",
     "monitor.status"),
    ("GEN-D-3", "2.1.1", _L.MUST, "reset the device after setting FAILED before initialising "
     "it again", "monitor.status"),
    ("GEN-D-4", "2.1.1", _L.SHOULD_NOT, "once DEVICE_NEEDS_RESET is set, do not rely on "
     "in-flight requests completing or not", None, "an expectation inside the driver: nothing "
     "it must do or avoid on the wire"),
    ("GEN-V-1", "2.1.2", _L.MUST_NOT, "consume no buffer and send no used notification before "
     "DRIVER_OK", "suite.status"),
    ("GEN-V-2", "2.1.2", _L.SHOULD, "set DEVICE_NEEDS_RESET on an error that needs a reset",
     "suite.needs_reset", None, ("villain:GEN-V-2",)),
    ("GEN-V-3", "2.1.2", _L.MUST, "after setting DEVICE_NEEDS_RESET with DRIVER_OK, send a "
     "configuration change notification", "suite.needs_reset"),
    # ---- 2.2 / 6 feature bits
    ("GEN-D-5", "2.2.1", _L.MUST_NOT, "accept only offered features, and only with their "
     "prerequisites", "monitor.features"),
    ("GEN-D-6", "2.2.1", _L.MUST, "validate the offer: never accept undefined, reserved or "
     "inapplicable bits", "monitor.features"),
    ("GEN-D-7", "2.2.1", _L.MUST, "without a feature it needs, fall back or set FAILED and stop",
     "monitor.features"),
    ("GEN-D-8", "2.2.1", _L.MUST_NOT, "do not fail just because an unknown feature is offered",
     "monitor.features"),
    ("GEN-V-4", "2.2.2", _L.MUST_NOT, "never offer a feature without the features it depends on",
     "suite.features"),
    ("GEN-V-5", "2.2.2", _L.MUST, "take any valid subset, or leave FEATURES_OK clear on read "
     "back", "suite.features"),
    ("GEN-V-6", "2.2.2", _L.MUST_NOT, "offer no bit it could not honour (undefined, reserved, "
     "inapplicable)", "suite.features"),
    ("GEN-V-7", "2.2.2", _L.SHOULD_NOT, "after a reset, accept again a feature set it accepted "
     "before", "suite.features"),
    ("GEN-D-9", "6.1", _L.MUST, "accept VERSION_1 whenever it is offered", "monitor.features"),
    ("GEN-D-10", "6.1", _L.MUST, "accept ACCESS_PLATFORM if offered (SHOULD) and then handle "
     "the IOMMU; without it pass physical addresses", "monitor.features"),
    ("GEN-D-11", "6.1", _L.MUST, "accept RING_PACKED/ORDER_PLATFORM/NOTIF_CONFIG_DATA if "
     "offered (SHOULD); use real barriers under ORDER_PLATFORM", "monitor.features"),
    ("GEN-V-8", "6.2", _L.MUST, "offer VERSION_1", "suite.features"),
    ("GEN-V-9", "6.2", _L.SHOULD, "offer ACCESS_PLATFORM when its memory access is translated "
     "or restricted", None, "depends on how the device reaches memory, which is not visible "
     "from the driver side"),
    ("GEN-V-10", "6.2", _L.MUST, "with IN_ORDER, use buffers in the order they became "
     "available", "suite.ring"),
    ("GEN-V-11", "6.2", _L.MAY, "may refuse or slow down when ORDER_PLATFORM is offered but "
     "declined", None, _MAY),
    ("LEG-1", "2.2.3", _L.MUST, "tell legacy from modern peers by whether VERSION_1 is "
     "offered/accepted", None, _LEGACY, (), "both"),
    ("LEG-2", "6.3", _L.MUST, "with NOTIFY_ON_EMPTY, notify when the ring runs dry despite "
     "suppression", None, _LEGACY, (), "device"),
    # ---- 2.4 reset, 2.5 config space, 2.6 queue reset
    ("GEN-V-12", "2.4.1", _L.MUST, "on reset, set status back to 0", "suite.reset"),
    ("GEN-V-13", "2.4.1", _L.MUST_NOT, "once status reads 0 after reset, neither notify nor "
     "touch a queue until re-initialised", "suite.reset"),
    ("GEN-D-12", "2.4.2", _L.SHOULD, "consider a reset done when status reads back 0",
     "monitor.status"),
    ("GEN-D-13", "2.5.1", _L.MUST_NOT, "do not assume multi-field or >32-bit config reads are "
     "atomic; retry around ConfigGeneration (SHOULD)", "monitor.config"),
    ("GEN-D-14", "2.5.1", _L.MUST, "check the gating feature is offered before touching an "
     "optional config field", "monitor.config"),
    ("GEN-D-15", "2.5.1", _L.MUST_NOT, "do not cap the config space size; only check it is "
     "large enough", None, "needs a device whose config space is larger than the driver "
     "knows; the balloon's is fixed by its features"),
    ("GEN-V-14", "2.5.2", _L.MUST, "let every device config field (of offered features) be "
     "read before FEATURES_OK", "suite.config"),
    ("LEG-3", "2.5.3", _L.MUST, "legacy config space is guest-endian except the balloon's, "
     "which is little-endian", None, _LEGACY, (), "both"),
    ("GEN-V-15", "2.6.1", _L.MUST, "after a queue reset, run no request of that queue and "
     "restore all its state to defaults", "suite.queue_reset"),
    ("GEN-D-16", "2.6.1", _L.MUST, "wait until a queue reset reads complete before freeing "
     "the queue's memory", "monitor.queue_reset"),
    ("GEN-V-16", "2.6.1", _L.MUST, "honour a re-enabled queue's new configuration after a "
     "queue reset", "suite.queue_reset"),
    ("GEN-D-17", "2.6.1", _L.MUST, "re-enable a reset queue by configuring it as for the "
     "first time", "monitor.queue_reset"),
    # ---- 3.1 init, 3.3 cleanup
    ("GEN-D-18", "3.1.1", _L.MUST, "initialise in order: reset, ACKNOWLEDGE, DRIVER, features, "
     "FEATURES_OK, re-read, setup, DRIVER_OK", "monitor.init"),
    ("GEN-D-19", "3.1.1", _L.MUST_NOT, "stop initialising after an unrecoverable step "
     "(setting FAILED: SHOULD)", "monitor.init"),
    ("GEN-D-20", "3.1.1", _L.MUST_NOT, "send no available-buffer notification before "
     "DRIVER_OK", "monitor.init"),
    ("LEG-4", "3.1.2", _L.MUST, "legacy drivers skip FEATURES_OK; transitional devices "
     "tolerate early config writes and use", None, _LEGACY, (), "both"),
    ("GEN-D-21", "3.3.1", _L.MUST_NOT, "never change ring entries of exposed buffers on a live "
     "queue; reset first to take them back", "monitor.ring"),
    # ---- 2.7 split ring
    ("SPL-D-1", "2.7.1", _L.MUST, "align the descriptor table, avail and used rings to 16, 2 "
     "and 4 bytes", "ring.validate:CFG-02", None,
     ("ring.validate:CFG-03", "ring.validate:CFG-04")),
    ("SPL-D-2", "2.7.4.2", _L.MUST, "put every device-writable descriptor after every "
     "device-readable one", "ring.validate:DC-06", None, ("villain:DC-06",)),
    ("SPL-D-3", "2.7.4.2", _L.SHOULD_NOT, "avoid using needlessly many descriptors for one "
     "buffer", None, "the spec gives no threshold for 'excessive'"),
    ("SPL-V-1", "2.7.4.1", _L.MUST_NOT, "make no assumption about how a buffer is split into "
     "descriptors", "villain:SPL-V-1"),
    ("SPL-V-2", "2.7.5.1", _L.MUST_NOT, "never write device-readable buffers or the descriptor "
     "table (reading writable ones: SHOULD NOT)", "fuzz.memory", None, ("suite.ring",)),
    ("SPL-D-4", "2.7.5.2", _L.MUST_NOT, "expose no chain longer than 2^32 bytes in total, so "
     "no loops", "ring.validate:DC-09", None, ("ring.validate:DC-02", "villain:DC-02")),
    ("SPL-D-5", "2.7.5.2", _L.MUST, "with IN_ORDER, link descriptor x to x+1 (wrapping to 0)",
     "monitor.ring"),
    ("SPL-D-6", "2.7.5.3.1", _L.MUST_NOT, "build no chain longer than the queue size",
     "ring.validate:DC-04", None, ("villain:DC-04",)),
    ("SPL-D-7", "2.7.5.3.1", _L.MUST_NOT, "set INDIRECT only when INDIRECT_DESC was negotiated",
     "ring.validate:IN-01", None, ("villain:IN-01",)),
    ("SPL-D-8", "2.7.5.3.1", _L.MUST_NOT, "put no INDIRECT descriptor inside an indirect table",
     "ring.validate:IN-06", None, ("villain:IN-06",)),
    ("SPL-D-9", "2.7.5.3.1", _L.MUST_NOT, "never set INDIRECT and NEXT on one descriptor",
     "ring.validate:IN-07", None, ("villain:IN-07",)),
    ("SPL-D-10", "2.7.5.3.1", _L.MUST, "with IN_ORDER, link indirect table entries "
     "sequentially", "monitor.ring"),
    ("SPL-V-3", "2.7.5.3.2", _L.MUST, "ignore WRITE on a descriptor that points to an "
     "indirect table", "villain:SPL-V-3"),
    ("SPL-V-4", "2.7.5.3.2", _L.MUST, "accept direct descriptors followed by one final "
     "INDIRECT descriptor", "villain:SPL-V-4"),
    ("SPL-D-11", "2.7.6.1", _L.MUST_NOT, "never move avail idx backwards", "ring.validate:AV-01",
     None, ("villain:AV-01",)),
    ("SPL-V-5", "2.7.8.2", _L.MUST, "store the used element's len before advancing used idx",
     None, "the order of two device stores is not visible to a peer that reads them after "
     "the notification"),
    ("SPL-V-6", "2.7.8.2", _L.MUST, "never report a used len above the bytes actually written "
     "from the first writable descriptor on", "ring.used:US-04"),
    ("SPL-D-12", "2.7.8.3", _L.MUST_NOT, "never rely on bytes past len in a writable buffer",
     None, _INSIDE),
    ("LEG-5", "2.7.8.1", _L.SHOULD, "legacy drivers should ignore used len where they can",
     None, _LEGACY, (), "driver"),
    ("SPL-D-13", "2.7.7", _L.MUST, "without EVENT_IDX, keep avail flags at 0 or 1 "
     "(NO_INTERRUPT)", "monitor.ring"),
    ("SPL-D-14", "2.7.7", _L.MUST, "with EVENT_IDX, keep avail flags at 0 (use used_event)",
     "monitor.ring"),
    ("SPL-D-15", "2.7.7", _L.MUST, "tolerate spurious used-buffer notifications",
     "monitor.notify"),
    ("SPL-V-7", "2.7.7", _L.MUST, "without EVENT_IDX, ignore used_event and interrupt unless "
     "NO_INTERRUPT is set", "suite.notify"),
    ("SPL-V-8", "2.7.7", _L.MUST, "with EVENT_IDX, ignore avail flags and interrupt when "
     "used_event is passed", "suite.notify"),
    ("SPL-D-16", "2.7.10", _L.MUST, "zero used flags when allocating the used ring",
     "monitor.ring"),
    ("SPL-D-17", "2.7.10", _L.MUST, "without EVENT_IDX, ignore avail_event and kick unless "
     "NO_NOTIFY is set", "monitor.notify"),
    ("SPL-D-18", "2.7.10", _L.MUST, "with EVENT_IDX, ignore used flags and kick when "
     "avail_event is passed", "monitor.notify"),
    ("SPL-V-9", "2.7.10", _L.MUST, "keep used flags at 0/1 without EVENT_IDX and at 0 with it",
     "suite.notify"),
    ("SPL-V-10", "2.7.10", _L.MUST, "tolerate spurious available-buffer notifications",
     "suite.notify"),
    ("SPL-D-19", "2.7.13.3.1", _L.MUST, "issue a write barrier before publishing avail idx",
     None, _BARRIER),
    ("SPL-D-20", "2.7.13.4.1", _L.MUST, "issue a barrier between publishing avail idx and "
     "reading the suppression fields", None, _BARRIER),
    # ---- 2.8 packed ring
    ("PKD-D-1", "2.8.11", _L.MUST, "align the packed ring's parts", None, _PACKED),
    ("PKD-V-1", "2.8.12", _L.MUST, "start buffers in ring order and used entries in "
     "completion order", None, _PACKED),
    ("PKD-V-2", "2.8.15", _L.MUST_NOT, "write no readable buffer; use a descriptor only after "
     "its AVAIL flip; keep it after USED", None, _PACKED),
    ("PKD-D-2", "2.8.16", _L.MUST_NOT, "leave descriptors alone between the AVAIL flip and the "
     "USED flip", None, _PACKED),
    ("PKD-D-3", "2.8.17", _L.MUST, "keep lists within limits, loop-free, readable first, "
     "first descriptor exposed last", None, _PACKED),
    ("PKD-V-3", "2.8.18", _L.MUST, "use chained descriptors in the order made available",
     None, _PACKED),
    ("PKD-D-4", "2.8.19", _L.MUST, "use INDIRECT only if negotiated and never inside a NEXT "
     "list", None, _PACKED),
    ("PKD-D-5", "2.8.21.1.1", _L.MUST, "barrier before writing a descriptor's flags", None,
     _PACKED),
    ("PKD-D-6", "2.8.21.3.1", _L.MUST, "barrier before reading the device event suppression "
     "area", None, _PACKED),
    # ---- 5.5 balloon: features, inflate and deflate
    ("BAL-D-1", "5.5.3.1", _L.SHOULD, "accept MUST_TELL_HOST when offered", "monitor.features"),
    ("BAL-D-2", "5.5.3.1", _L.SHOULD, "decline PAGE_POISON unless it will write poison_val "
     "into deflated pages", None, "a statement about the driver's intent; its effect is "
     "checked as BAL-D-34"),
    ("BAL-D-3", "5.5.3.1", _L.MUST_NOT, "a driver that needs free page contents kept must not "
     "take PAGE_REPORTING without PAGE_POISON", None, "conditional on whether the driver "
     "needs free page contents, which is internal to it"),
    ("BAL-D-4", "5.5.6.1", _L.SHOULD, "inflate while num_pages is above actual",
     "monitor.balloon"),
    ("BAL-D-5", "5.5.6.1", _L.MAY, "may deflate while num_pages is below actual", None, _MAY),
    ("BAL-D-6", "5.5.6.1", _L.MAY, "may inflate while num_pages is at least actual", None,
     _MAY),
    ("BAL-D-7", "5.5.6.1", _L.MUST_NOT, "without DEFLATE_ON_OOM, do not take pages back unless "
     "actual exceeds num_pages (erratum E2)", "monitor.balloon"),
    ("BAL-D-8", "5.5.6.1", _L.MAY, "with DEFLATE_ON_OOM, may take pages back under memory "
     "pressure", None, _MAY),
    ("BAL-D-9", "5.5.6.1", _L.MUST, "announce pages taken back from the balloon on the "
     "deflate queue", "monitor.balloon"),
    ("BAL-D-10", "5.5.6.1", _L.MUST_NOT, "with MUST_TELL_HOST, touch no deflated page before "
     "the deflate buffer is used", "monitor.balloon"),
    ("BAL-D-11", "5.5.6.1", _L.MAY, "without MUST_TELL_HOST, may reuse deflated pages before "
     "the ack", None, _MAY),
    ("BAL-D-12", "5.5.6.1", _L.MUST_NOT, "touch no page between putting it on the inflate "
     "queue and the ack", "monitor.balloon"),
    ("BAL-D-13", "5.5.6.1", _L.MUST_NOT, "deflate no page whose inflate is not yet "
     "acknowledged", "monitor.balloon", None, ("balloon.validate:BL-09",)),
    ("BAL-D-14", "5.5.6.1", _L.MUST, "write actual after the balloon size changed",
     "monitor.balloon"),
    ("BAL-D-15", "5.5.6.1", _L.MAY, "may update actual once after several operations", None,
     _MAY),
    ("BAL-V-1", "5.5.3.2", _L.MAY, "may refuse FEATURES_OK if MUST_TELL_HOST was offered and "
     "declined", None, _MAY),
    ("BAL-V-2", "5.5.6.2", _L.MAY, "may change an inflated page's contents before the ack",
     None, _MAY),
    ("BAL-V-3", "5.5.6.2", _L.MAY, "with MUST_TELL_HOST, may change contents until the "
     "deflate is acknowledged", None, _MAY),
    ("LEG-BAL-1", "5.5.3.2.0.1", _L.MUST, "transitional devices work without MUST_TELL_HOST",
     None, _LEGACY, (), "device"),
    ("LEG-BAL-2", "5.5.4.0.0.1", _L.MUST, "balloon config stays little-endian in legacy mode",
     None, _LEGACY, (), "both"),
    ("LEG-BAL-3", "5.5.6.2.1", _L.SHOULD, "legacy drivers ignore used len on inflate and "
     "deflate", None, _LEGACY, (), "driver"),
    ("LEG-BAL-4", "5.5.6.2.1", _L.MUST, "legacy drivers write actual in one 32-bit access",
     None, _LEGACY, (), "driver"),
    ("LEG-BAL-5", "5.5.6.2.1", _L.SHOULD_NOT, "legacy devices wait for actual's top byte "
     "before acting", None, _LEGACY, (), "device"),
    # ---- 5.5.6.3 memory statistics
    ("BAL-D-16", "5.5.6.3", _L.MUST, "keep at most one stats buffer available",
     "balloon.validate:BL-14", None, ("monitor.stats",)),
    ("BAL-D-17", "5.5.6.3", _L.MUST, "make a stats buffer available after initialisation",
     "monitor.stats"),
    ("BAL-D-18", "5.5.6.3", _L.MUST, "make a new stats buffer available each time the device "
     "uses one", "monitor.stats"),
    ("BAL-D-19", "5.5.6.3", _L.MUST, "fill the stats buffer, one entry per supported "
     "statistic, before exposing it", "monitor.stats"),
    ("BAL-D-20", "5.5.6.3", _L.MUST, "size the stats buffer as whole entries (spec: 6 bytes, "
     "erratum E1: 10)", "balloon.validate:BL-11"),
    ("BAL-D-21", "5.5.6.3", _L.MAY, "may order stats entries freely", None, _MAY),
    ("BAL-D-22", "5.5.6.3", _L.MAY, "may send a subset of the tags", None, _MAY),
    ("BAL-D-23", "5.5.6.3", _L.MUST, "send the same subset of tags every time",
     "monitor.stats"),
    ("BAL-V-4", "5.5.6.3", _L.MUST, "accept stats entries in any order", "suite.stats"),
    ("BAL-V-5", "5.5.6.3", _L.MUST, "ignore stats entries with unknown tags", "suite.stats",
     None, ("balloon.validate:BL-13",)),
    ("LEG-BAL-6", "5.5.6.3.3", _L.MUST, "legacy stats use guest-native byte order", None,
     _LEGACY, (), "both"),
    ("LEG-BAL-7", "5.5.6.3", _L.SHOULD, "legacy devices ignore the first stats buffer's "
     "values", None, _LEGACY, (), "device"),
    # ---- 5.5.6.5 free page hinting
    ("BAL-D-24", "5.5.6.5", _L.MUST, "make every free page hint out-buffer exactly 4 bytes",
     "balloon.validate:BL-16"),
    ("BAL-D-25", "5.5.6.5", _L.MUST, "open a hinting round with an out-buffer holding the "
     "command ID", "monitor.hint"),
    ("BAL-D-26", "5.5.6.5", _L.MUST_NOT, "send the current command ID at most once",
     "monitor.hint"),
    ("BAL-D-27", "5.5.6.5", _L.SHOULD, "hint free pages as in-buffers while the ID is 2 or "
     "more", "monitor.hint"),
    ("BAL-D-28", "5.5.6.5", _L.SHOULD, "stop hinting once the ID is STOP or DONE",
     "monitor.hint"),
    ("BAL-D-29", "5.5.6.5", _L.MUST, "close a round it cannot continue with a STOP "
     "out-buffer", "monitor.hint"),
    ("BAL-D-30", "5.5.6.5", _L.MAY, "may reuse hinted pages before their buffers are used",
     None, _MAY),
    ("BAL-D-31", "5.5.6.5", _L.MUST, "treat hinted pages' contents as uninitialised", None,
     _INSIDE),
    ("BAL-D-32", "5.5.6.5", _L.MUST, "initialise a hinted page it reuses before DONE", None,
     _INSIDE),
    ("BAL-D-33", "5.5.6.5", _L.SHOULD, "give all hinted pages back once the ID is DONE", None,
     "releasing pages is internal to the guest allocator"),
    ("BAL-V-6", "5.5.6.5", _L.SHOULD, "set the ID to STOP whenever it cannot use hints",
     "suite.hint"),
    ("BAL-V-7", "5.5.6.5", _L.MUST_NOT, "reuse no command ID before the driver's STOP arrived",
     "suite.hint"),
    ("BAL-V-8", "5.5.6.5", _L.MUST, "ignore hints sent under a stale command ID",
     "suite.hint", None, ("balloon.validate:BL-17",)),
    ("BAL-V-9", "5.5.6.5", _L.MAY, "may change a hinted page the guest has not written since "
     "the ID", None, _MAY),
    ("BAL-V-10", "5.5.6.5", _L.MUST_NOT, "change no hinted page after setting DONE",
     "suite.hint"),
    ("BAL-V-11", "5.5.6.5", _L.MUST, "set DONE once it no longer needs the hinted pages",
     "suite.hint"),
    ("LEG-BAL-8", "5.5.6.5.3", _L.MUST, "legacy command IDs use guest-native byte order",
     None, _LEGACY, (), "both"),
    # ---- 5.5.6.6 page poison, 5.5.6.7 free page reporting
    ("BAL-D-34", "5.5.6.6", _L.MUST, "fill deflated pages with poison_val when reusing them",
     "monitor.poison"),
    ("BAL-D-35", "5.5.6.6", _L.MUST, "write poison_val before DRIVER_OK", "monitor.config"),
    ("BAL-D-36", "5.5.6.6", _L.MUST_NOT, "leave poison_val alone while DRIVER_OK is set",
     "monitor.config"),
    ("BAL-V-12", "5.5.6.6", _L.MAY, "may take poison_val as a hint", None, _MAY),
    ("BAL-D-37", "5.5.6.7", _L.MUST, "without PAGE_POISON, treat reported pages as "
     "uninitialised", None, _INSIDE),
    ("BAL-D-38", "5.5.6.7", _L.MUST, "with PAGE_POISON, fill pages with poison_val before "
     "reporting them", "monitor.reporting"),
    ("BAL-D-39", "5.5.6.7", _L.MUST_NOT, "use no reported page until the device acknowledged "
     "it", "monitor.reporting"),
    ("BAL-D-40", "5.5.6.7", _L.MAY, "may report at any time after DRIVER_OK", None, _MAY),
    ("BAL-D-41", "5.5.6.7", _L.SHOULD, "prefer reporting large blocks", "monitor.reporting"),
    ("BAL-D-42", "5.5.6.7", _L.SHOULD, "avoid touching reported pages unless it must", None,
     "'unless it must' is the driver's judgement; touching after the ack is allowed"),
    ("BAL-V-13", "5.5.6.7", _L.MAY, "without PAGE_POISON, may discard reported pages before "
     "the ack", None, _MAY),
    ("BAL-V-14", "5.5.6.7", _L.MUST_NOT, "with PAGE_POISON, leave reported pages holding "
     "nothing but poison_val", "suite.reporting", None, ("balloon.validate:BL-20",)),
    # ---- 4.2 virtio-mmio
    ("MMIO-V-1", "4.2.2.1", _L.MUST, "read MagicValue as 0x74726976 and Version as 2",
     "suite.mmio"),
    ("MMIO-V-2", "4.2.2.1", _L.MUST, "keep each InterruptStatus bit set from its event until "
     "acknowledged, others 0", "suite.mmio"),
    ("MMIO-V-3", "4.2.2.1", _L.MUST, "clear InterruptStatus and every QueueReady on reset",
     "suite.reset"),
    ("MMIO-V-4", "4.2.2.1", _L.MUST, "change ConfigGeneration whenever the config could be "
     "read inconsistently", "suite.config"),
    ("MMIO-V-5", "4.2.2.1", _L.MUST_NOT, "touch no queue whose QueueReady is 0", "suite.mmio"),
    ("MMIO-V-6", "4.2.2.1", _L.MUST, "with RING_RESET, show QueueReset 1 while resetting and "
     "0 with QueueReady 0 after", "suite.queue_reset"),
    ("MMIO-D-1", "4.2.2.2", _L.MUST, "access only defined registers, in their direction",
     "monitor.mmio"),
    ("MMIO-D-2", "4.2.2.2", _L.MUST, "use aligned 32-bit accesses for control registers and "
     "field-sized ones for config", "monitor.mmio"),
    ("MMIO-D-3", "4.2.2.2", _L.MUST, "ignore devices with a wrong magic or version, and "
     "DeviceID 0", "monitor.mmio"),
    ("MMIO-D-4", "4.2.2.2", _L.MUST, "write the features select register before each features "
     "access", "monitor.mmio"),
    ("MMIO-D-5", "4.2.2.2", _L.MUST, "keep QueueSize <= QueueSizeMax and leave a ready "
     "queue's registers alone", "monitor.mmio", None, ("transport.validate:CFG-06",)),
    ("MMIO-D-6", "4.2.2.2", _L.MUST, "ignore undefined interrupt bits and acknowledge only "
     "handled ones", "monitor.mmio"),
    ("MMIO-D-7", "4.2.3.1.1", _L.MUST, "probe magic, version and DeviceID before anything, "
     "then follow the init sequence", "monitor.init"),
    ("MMIO-D-8", "4.2.3.4.1", _L.MUST, "on an interrupt read InterruptStatus, service every "
     "queue, then acknowledge", "monitor.mmio"),
    ("MMIO-D-9", "4.2.2.2", _L.MUST, "after writing QueueReset 1, wait until it reads 0",
     "monitor.queue_reset"),
)

# The peer checks of protocol.rules, and where vballoon implements each.
_RULE_CHECK = {"CFG": "ring.validate", "AV": "ring.validate", "DC": "ring.validate",
               "IN": "ring.validate", "US": "ring.used", "BL": "balloon.validate"}
_RULE_CHECK_OVERRIDE = {"CFG-06": "transport.validate"}
_VILLAIN = ("AV", "DC", "IN")


def _side(req_id: str, override: Side | None) -> Side:
    if override is not None:
        return override
    if "-D-" in req_id:
        return "driver"
    if "-V-" in req_id:
        return "device"
    raise ValueError(f"{req_id}: say which side a LEG- requirement binds")


def _build() -> dict[str, Requirement]:
    table: dict[str, Requirement] = {}
    for row in _SPEC:
        rid, section, level, summary, check, *rest = row
        why = rest[0] if len(rest) > 0 else None
        also = rest[1] if len(rest) > 1 else ()
        side = _side(rid, rest[2] if len(rest) > 2 else None)
        if rid in table:
            raise ValueError(f"duplicate requirement {rid}")
        table[rid] = Requirement(rid, section, level, summary, side, check, why, tuple(also))
    for r in RULES.values():
        prefix = r.id.split("-")[0]
        family = _RULE_CHECK_OVERRIDE.get(r.id, _RULE_CHECK.get(prefix))
        also = (f"villain:{r.id}",) if prefix in _VILLAIN else ()
        if family is None:  # a new rule family: visible as unchecked until wired here
            table[r.id] = Requirement(r.id, r.section, Level.CHECK, r.summary, r.side, None,
                                      f"no check is wired for {prefix}- rules yet", also)
        else:
            table[r.id] = Requirement(r.id, r.section, Level.CHECK, r.summary, r.side,
                                      f"{family}:{r.id}", None, also)
    for req in table.values():
        if (req.check is None) == (req.unobservable is None):
            raise ValueError(f"{req.id}: give either a check or the reason there is none")
        for name in (req.check, *req.also):
            if name is not None and check_family(name) not in CHECK_FAMILIES:
                raise ValueError(f"{req.id}: unknown check family in {name!r}")
    return table


REQUIREMENTS: dict[str, Requirement] = _build()
"""Every requirement by ID: the spec's (spec.md numbering) and the peer checks of RULES."""


def requirement(req_id: str) -> Requirement:
    """The requirement with ``req_id``; an unknown ID is a bug in the caller (KeyError)."""
    return REQUIREMENTS[req_id]


def coverage() -> dict:
    """How many requirements have an automated check, overall, per family and per side.

    Returns ``{"total", "checked", "unchecked", "by_family": {family: {side: n}},
    "by_side": {side: {"total", "checked"}}, "by_level": {level: {"total", "checked"}},
    "by_group": {group: {"total", "checked"}}}``; a group is an ID's prefix (``GEN``,
    ``SPL``, ``DC``, ...). Counts use the primary ``check`` only.
    """
    reqs = list(REQUIREMENTS.values())
    by_family: dict[str, Counter] = {f: Counter() for f in CHECK_FAMILIES}
    for r in reqs:
        if r.family is not None:
            by_family[r.family][r.side] += 1

    def tally(key) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in reqs:
            row = out.setdefault(key(r), {"total": 0, "checked": 0})
            row["total"] += 1
            row["checked"] += r.check is not None
        return out

    checked = sum(r.check is not None for r in reqs)
    return {
        "total": len(reqs),
        "checked": checked,
        "unchecked": len(reqs) - checked,
        "by_family": {f: dict(c) for f, c in by_family.items()},
        "by_side": tally(lambda r: r.side),
        "by_level": tally(lambda r: str(r.level)),
        "by_group": tally(lambda r: r.id.split("-")[0]),
    }
