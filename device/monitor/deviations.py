"""Known deviations of the Linux driver from the spec: explanations attached to a FAIL.

A FAIL of the real Linux driver must be either a finding or a documented behaviour of
upstream Linux. Each :class:`Deviation` names the requirement, says which evidence it explains
(a predicate on the failure's values, so an unrelated failure of the same requirement is not
excused), and gives the explanation with its source. The guest model of :mod:`guest.balloon`
reproduces Linux 6.1 on purpose, so the same notes apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from device.monitor.grades import Grade, Verdict

__all__ = ["LINUX_DEVIATIONS", "Deviation", "explain"]


@dataclass(frozen=True, slots=True)
class Deviation:
    """An explained, upstream-true deviation of the Linux driver."""

    req_id: str
    applies: Callable[[Mapping[str, Any]], bool]
    note: str


LINUX_DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        "GEN-D-20",
        lambda v: v.get("queue_name") == "stats",
        "True of upstream Linux (6.1 and later): virtballoon_probe() -> init_vqs() adds the "
        "first stats buffer and calls virtqueue_kick() on the stats queue before "
        "virtio_device_ready() sets DRIVER_OK (drivers/virtio/virtio_balloon.c); the spec "
        "(§3.1.1) forbids the early kick. QEMU 7.2 takes the buffer at once (the device "
        "suite's GEN-V-1 case); vballoon's device waits for DRIVER_OK. "
        "vballoon's guest model reproduces it (BalloonOptions.stats_kick_before_driver_ok)."),
    Deviation(
        "BAL-D-7",
        lambda v: bool(v.get("then_reset")),
        "True of upstream Linux: virtballoon_remove() -> remove_common() deflates every page "
        "(leak_balloon until num_pages is 0) before it resets the device, whatever the "
        "target and without DEFLATE_ON_OOM (drivers/virtio/virtio_balloon.c). The pages go "
        "back to the guest on reset anyway."),
)
"""Deviations of Linux 6.1 (``drivers/virtio/virtio_balloon.c``, ``virtio_mmio.c``) that are
true of upstream Linux; shared/research/spec.md §4.12 lists the stats kick."""


def explain(grade: Grade, deviations: tuple[Deviation, ...] = LINUX_DEVIATIONS) -> Grade:
    """``grade`` with the note of the first deviation that explains its failure, if any."""
    if grade.verdict is not Verdict.FAIL:
        return grade
    for d in deviations:
        if d.req_id == grade.id and d.applies(grade.values):
            return Grade(grade.id, grade.verdict, grade.evidence, grade.values, d.note,
                         grade.checks, grade.failures)
    return grade
