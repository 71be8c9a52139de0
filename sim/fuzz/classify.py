"""Why our device end and QEMU disagree on a layout: classification of differential results.

Three verdicts are compared (:class:`Verdict`): ours, QEMU's as observed, and the QEMU model's
(:mod:`sim.fuzz.qemu_model`). The classification of a disagreement between ours and QEMU's:

``qemu-gap``
    QEMU does not check a rule we check, or breaks a device requirement; the model reproduces
    QEMU exactly and names the deviation (``known`` when research/peers.md lists it).
``spec-ambiguity``
    QEMU and we both do something the spec allows; the model names the deviation.
``our-bug``
    The model reproduces QEMU, and at the first avail entry where we differ QEMU took no
    deviation at all: QEMU behaved as the spec says and we did not.
``unexplained``
    QEMU did something its model does not predict: the model (or our reading of QEMU) is wrong
    and the case needs a person.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.fuzz.qemu_model import DEVIATIONS, ModelChain

__all__ = ["CATEGORIES", "Classification", "Verdict", "classify"]

CATEGORIES = ("qemu-gap", "spec-ambiguity", "our-bug", "unexplained")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one device did with a layout."""

    used_idx: int
    slots: tuple[int, ...]
    """Heads in the used ring, slot 0 on (``min(used_idx, size)`` of them)."""
    stopped: bool
    """Stopped on a violation (our DriverViolation, QEMU's DEVICE_NEEDS_RESET)."""
    discarded: frozenset[int]
    """Pool PFNs discarded."""
    rule: str | None = None
    """Our rule ID when we stopped (QEMU gives none)."""
    chains: tuple[ModelChain, ...] = field(default=(), compare=False)
    """Per avail entry, in order (ours and the model's; empty for QEMU's)."""

    def same(self, other: Verdict) -> bool:
        return (self.used_idx, self.slots, self.stopped, self.discarded) == (
            other.used_idx, other.slots, other.stopped, other.discarded)


@dataclass(frozen=True, slots=True)
class Classification:
    """One disagreement's class, the rule or requirement at stake, and why."""

    category: str
    rule: str | None
    difference: str
    """What differed: ``verdict`` (one stopped, one did not), ``used`` or ``pages``."""
    reason: str
    deviation: str | None = None
    known: bool | None = None
    entry: int | None = None
    """The avail entry where we and QEMU part ways."""


def _difference(a: Verdict, b: Verdict) -> str:
    if a.stopped != b.stopped:
        return "verdict"
    if (a.used_idx, a.slots) != (b.used_idx, b.slots):
        return "used"
    return "pages"


def classify(ours: Verdict, qemu: Verdict, model: Verdict) -> Classification | None:
    """None when ours and QEMU's agree; otherwise the :class:`Classification`."""
    if ours.same(qemu):
        return None
    diff = _difference(ours, qemu)
    if not model.same(qemu):
        return Classification("unexplained", ours.rule, diff,
                              f"the QEMU model predicted used_idx={model.used_idx} "
                              f"stopped={model.stopped} pages={len(model.discarded)}, QEMU did "
                              f"used_idx={qemu.used_idx} stopped={qemu.stopped} "
                              f"pages={len(qemu.discarded)}")
    entry = 0
    for mine, theirs in zip(ours.chains, model.chains, strict=False):
        if (mine.accepted, mine.pfns) != (theirs.accepted, theirs.pfns):
            break
        entry += 1
    devs = model.chains[entry].deviations if entry < len(model.chains) else ()
    if not devs:
        return Classification("our-bug", ours.rule, diff,
                               f"at avail entry {entry} QEMU followed the spec and we did not",
                               entry=entry)
    dev = DEVIATIONS[devs[0]]
    where = "research/peers.md lists it" if dev.known else "not in research/peers.md"
    rule = ours.rule if ours.rule is not None and entry == len(ours.chains) - 1 else dev.rule
    return Classification(dev.category, rule, diff, f"{dev.text} ({where})", dev.id, dev.known,
                          entry)
