"""The driver conformance monitor: one run of a driver, graded per requirement of the catalogue.

:class:`DriverMonitor` is the sans-I/O core. Adapters feed it what they see:
:class:`~device.monitor.backend.MonitoredDevice` on the transport seam (both transports),
:class:`~device.monitor.mmio.MonitoredMmio` on the virtio-mmio registers, and
:class:`~device.monitor.tap.GuestWriteTap` on the simulated guest's RAM writes. It keeps one
:class:`~device.monitor.rings.RingWatch` per attached queue and passes what they find to the
status and balloon checks, all of which record into one :class:`~device.monitor.grades.Ledger`.

:meth:`DriverMonitor.finish` grades every driver-side requirement of
:data:`protocol.requirements.REQUIREMENTS`: PASS or FAIL with evidence, or NOT-EXERCISED with
the reason (the catalogue says it cannot be observed; the transport hides it; the feature was
not negotiated; the run never got there). Known Linux deviations are explained
(:mod:`device.monitor.deviations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from device.monitor.balloon import BalloonChecks
from device.monitor.deviations import LINUX_DEVIATIONS, Deviation, explain
from device.monitor.grades import Capabilities, Grade, Ledger, Verdict
from device.monitor.rings import RingWatch
from device.monitor.status import StatusChecks
from device.transport import RingConfig
from protocol.balloon import BalloonQueue
from protocol.errors import ProtocolViolation
from protocol.features import BalloonFeature, TransportFeature, has
from protocol.requirements import REQUIREMENTS, Requirement
from protocol.status import DeviceStatus

__all__ = ["IMPLEMENTED", "DriverMonitor", "MonitorResult", "driver_requirements"]

log = structlog.get_logger("vballoon.device")

_NEEDS_STATUS = frozenset({"GEN-D-1", "GEN-D-2", "GEN-D-3", "GEN-D-12", "GEN-D-18",
                           "GEN-D-19", "GEN-D-20", "BAL-D-35", "BAL-D-36"})
_NEEDS_REGISTERS = frozenset({"GEN-D-13", "MMIO-D-1", "MMIO-D-2", "MMIO-D-3", "MMIO-D-4",
                              "MMIO-D-5", "MMIO-D-6", "MMIO-D-7", "MMIO-D-8", "MMIO-D-9"})
_NEEDS_WRITES = frozenset({"BAL-D-9", "BAL-D-10", "BAL-D-12", "BAL-D-34", "BAL-D-39"})
_NOT_IMPLEMENTED = {
    "GEN-D-7": "every feature the driver needs is offered; provoking a fallback would need a "
               "device that withholds one",
    "MMIO-D-3": "needs a device with a wrong magic, version or DeviceID 0",
    "GEN-D-16": "RING_RESET (queue reset) is not offered by the balloon",
    "GEN-D-17": "RING_RESET (queue reset) is not offered by the balloon",
    "MMIO-D-9": "RING_RESET (queue reset) is not offered by the balloon",
    "SPL-D-5": "IN_ORDER is not offered by the balloon",
    "SPL-D-10": "IN_ORDER is not offered by the balloon",
}
_GATES: dict[str, list[BalloonFeature]] = {}
for _ids, _feature in (
        (("BAL-D-16", "BAL-D-17", "BAL-D-18", "BAL-D-19", "BAL-D-20", "BAL-D-23", "BL-11",
          "BL-12", "BL-14"), BalloonFeature.STATS_VQ),
        (("BAL-D-24", "BAL-D-25", "BAL-D-26", "BAL-D-27", "BAL-D-28", "BAL-D-29", "BL-16",
          "BL-17"), BalloonFeature.FREE_PAGE_HINT),
        (("BAL-D-38", "BAL-D-39", "BAL-D-41", "BL-19", "BL-21"), BalloonFeature.REPORTING),
        (("BAL-D-34", "BAL-D-35", "BAL-D-36", "BAL-D-38", "BL-25"), BalloonFeature.PAGE_POISON),
        (("BAL-D-10",), BalloonFeature.MUST_TELL_HOST)):
    for _id in _ids:
        _GATES.setdefault(_id, []).append(_feature)
_OFFER_GATES = {"GEN-D-10": (TransportFeature.ACCESS_PLATFORM,),
                "GEN-D-11": (TransportFeature.RING_PACKED, TransportFeature.ORDER_PLATFORM,
                             TransportFeature.NOTIF_CONFIG_DATA),
                "BAL-D-1": (BalloonFeature.MUST_TELL_HOST,)}
_INDIRECT_ONLY = frozenset({"IN-02", "IN-03", "IN-04", "IN-05", "IN-06", "IN-07", "IN-08",
                            "IN-09", "SPL-D-8", "SPL-D-9"})

IMPLEMENTED = frozenset(
    r.id for r in REQUIREMENTS.values()
    if r.side in ("driver", "both") and r.check is not None and r.id not in _NOT_IMPLEMENTED
)
"""Driver-side requirements the monitor can grade (given the right transport and run)."""


def driver_requirements() -> list[Requirement]:
    """Every requirement that binds the driver, in catalogue order."""
    return [r for r in REQUIREMENTS.values() if r.side in ("driver", "both")]


@dataclass(frozen=True, slots=True)
class MonitorResult:
    """A graded run: one :class:`Grade` per driver requirement, and what was visible."""

    subject: str
    capabilities: Capabilities
    grades: tuple[Grade, ...]
    features: int | None

    def summary(self) -> dict[str, int]:
        out = {v.value: 0 for v in Verdict}
        for g in self.grades:
            out[g.verdict.value] += 1
        return out

    def grade(self, req_id: str) -> Grade:
        return next(g for g in self.grades if g.id == req_id)


class DriverMonitor:
    """The monitor core (see the module docstring)."""

    def __init__(self, capabilities: Capabilities, *,
                 deviations: tuple[Deviation, ...] = LINUX_DEVIATIONS) -> None:
        self.capabilities = capabilities
        self.deviations = deviations
        self.ledger = Ledger()
        self.status = StatusChecks(self.ledger)
        self.balloon = BalloonChecks(self.ledger, memory=lambda: self._memory,
                                     driver_ok=self._driver_ok,
                                     field_reads=capabilities.registers)
        self.rings: dict[int, RingWatch] = {}
        self.kinds: dict[int, BalloonQueue | None] = {}
        self._memory: Any = None
        self.offered_mask = 0
        self.features: int | None = None
        self.live = False
        self.violations: list[str] = []
        self.ring_enabled: Callable[[int], bool] | None = None
        """Set by a vhost-user harness: whether the front-end still has ring ``index``
        enabled. A disabled ring is no longer live (Linux disables every ring, then frees
        the ring memory, when the driver is removed), so the monitor stops watching it."""
        self.spurious = 0
        self._spurious_pending = False
        self._chains_after_spurious = 0

    def _driver_ok(self) -> bool | None:
        return self.status.driver_ok if self.capabilities.status else None

    def queue_name(self, index: int) -> str:
        kind = self.kinds.get(index)
        return kind.name.lower() if kind is not None else f"queue{index}"

    # ---- the device seam -----------------------------------------------------------------
    def offered(self, offered: int, injected: int) -> None:
        self.offered_mask = offered
        self.status.offered_(offered, injected)

    def features_set(self, mask: int) -> None:
        self.features = mask
        self.status.features_set(mask)
        self.balloon.negotiated(self.offered_mask, mask)

    def config_read(self, offset: int, data: bytes) -> None:
        self.balloon.config_read(offset, data)

    def config_written(self, offset: int, data: bytes) -> None:
        self.balloon.config_written(offset, data)

    def device_config_changed(self, image: bytes) -> None:
        self.sweep()
        self.balloon.device_changed(image)

    def device_needs_reset(self, violation: ProtocolViolation) -> None:
        self.violations.append(str(violation))

    def queue_attached(self, index: int, kind: BalloonQueue | None, ring: RingConfig,
                       memory: Any, max_size: int) -> None:
        self._memory = memory
        features = self.features or 0
        self.kinds[index] = kind
        self.rings[index] = RingWatch(
            index, ring, memory, event_idx=has(features, TransportFeature.RING_EVENT_IDX),
            indirect=has(features, TransportFeature.RING_INDIRECT_DESC), max_size=max_size,
            ledger=self.ledger, name=self.queue_name(index))

    def queue_detached(self, index: int) -> None:
        ring = self.rings.pop(index, None)
        if ring is not None:
            self._judge_kicks(ring)

    def _judge_kicks(self, ring: RingWatch) -> None:
        """SPL-D-17 / SPL-D-18 for a ring that is going away (or at the end)."""
        rule = "SPL-D-18" if ring.event_idx else "SPL-D-17"
        stranded = ring.stranded()
        if stranded is not None:
            self.ledger.fail(rule, f"queue {ring.index} ({ring.name}): chains published after "
                             "the last kick were never notified although the device asked "
                             "for a kick", **stranded)
        elif ring.kicks:
            self.ledger.ok(rule, f"queue {ring.index} ({ring.name}): {ring.kicks} kicks, no "
                           "chain left without a required kick", queue=ring.index)

    def activated(self) -> None:
        self.sweep()
        if not self.capabilities.status:
            self.live = True
            self.status.went_live(how="activated its queues")

    def kicked(self, index: int) -> None:
        self.sweep()
        ring = self.rings.get(index)
        if ring is None:
            self.ledger.fail("CFG-06", f"kick of queue {index}, which is not ready", queue=index)
            return
        self.ledger.ok("CFG-06", f"kick of ready queue {index}", queue=index)
        ring.kicked()

    def used_notification(self, index: int) -> None:
        self.sweep()

    def spurious_sent(self, index: int) -> None:
        self.sweep()
        self.spurious += 1
        self._spurious_pending = True
        self._chains_after_spurious = 0

    def device_reset(self) -> None:
        self.sweep()
        for ring in self.rings.values():
            self._judge_kicks(ring)
        self.rings.clear()
        self.balloon.device_reset()
        if not self.capabilities.status:
            self.status.reset()

    def guest_wrote(self, gpa: int, length: int, fill: int | None) -> None:
        self.balloon.guest_wrote(gpa, length, fill)

    # ---- the register level (virtio-mmio) ---------------------------------------------------
    def status_written(self, value: int) -> None:
        was_ok = self.status.driver_ok
        self.status.status_written(value)
        if self.status.driver_ok and not was_ok:
            self.live = True
            self.balloon.driver_ok_set()
            self.status.went_live(how="set DRIVER_OK")
        if value & DeviceStatus.FAILED:
            self.status.failed_()
            if self._spurious_pending:
                self.ledger.fail("SPL-D-15", "the driver set FAILED after a spurious "
                                 "used-buffer notification")

    # ---- sweeping ---------------------------------------------------------------------------
    def sweep(self) -> None:
        """Read every attached ring for what changed (see :mod:`device.monitor.rings`)."""
        for index, ring in list(self.rings.items()):
            if self.ring_enabled is not None and not self.ring_enabled(index):
                self.queue_detached(index)
                continue
            kind = self.kinds.get(index)
            for event, chain in ring.sweep().events:
                if event == "published" and self._spurious_pending:
                    self._chains_after_spurious += 1
                if kind is None:
                    continue
                if event == "published":
                    self.balloon.published(kind, chain)
                else:
                    self.balloon.used(kind, chain)

    # ---- the end -------------------------------------------------------------------------
    def finish(self, subject: str) -> MonitorResult:
        """Grade every driver requirement (call once the run has settled)."""
        self.sweep()
        caps = self.capabilities
        self.balloon.finish(guest_writes=caps.guest_writes, active=self.live)
        for ring in self.rings.values():
            self._judge_kicks(ring)
        if self.spurious and not self.ledger.failed("SPL-D-15"):
            self.ledger.check("SPL-D-15", self._chains_after_spurious > 0 or not self.live,
                              f"{self.spurious} spurious used-buffer notification(s); the "
                              f"driver went on ({self._chains_after_spurious} chains after)",
                              spurious=self.spurious, chains_after=self._chains_after_spurious)
        grades = tuple(explain(self._grade(r), self.deviations) for r in driver_requirements())
        result = MonitorResult(subject, caps, grades, self.features)
        log.info("monitor.finish", subject=subject, **result.summary())
        return result

    def _grade(self, req: Requirement) -> Grade:
        hidden = self._hidden(req.id)
        if hidden is not None:  # a check that held only because nothing could be seen
            return Grade(req.id, Verdict.NOT_EXERCISED, hidden)
        return self.ledger.grade(req.id, reason=self._reason(req))

    def _hidden(self, rid: str) -> str | None:
        """Why the transport hides what ``rid`` is about (None: it does not)."""
        caps = self.capabilities
        if rid in _NEEDS_STATUS and not caps.status:
            return (f"{caps.transport} carries no device status: Linux's UML front-end never "
                    "sends SET_STATUS, so DRIVER_OK, FAILED and the init steps are not seen")
        if rid == "GEN-D-13" and not caps.registers:
            return (f"{caps.transport} shows the front-end's config transfers, not the driver's "
                    "field reads (Linux 6.1 virtio_uml reads from offset 0 to the end of the "
                    "field it wants)")
        if rid in _NEEDS_REGISTERS and not caps.registers:
            return f"{caps.transport} has no virtio-mmio registers to watch"
        if rid in _NEEDS_WRITES and not caps.guest_writes:
            return (f"the guest writes its RAM directly over {caps.transport}: page use is "
                    "only visible on the simulated machine")
        return None

    def _reason(self, req: Requirement) -> str:
        """Why ``req`` was not exercised in this run."""
        rid = req.id
        if req.check is None:
            return f"not observable: {req.unobservable}"
        if rid in _NOT_IMPLEMENTED:
            return f"not exercised: {_NOT_IMPLEMENTED[rid]}"
        feats = self.features
        missing = [f.name for f in _GATES.get(rid, ()) if feats is None or not has(feats, f)]
        if missing:
            verb = "was" if len(missing) == 1 else "were"
            return f"{' and '.join(missing)} {verb} not negotiated"
        if rid in _OFFER_GATES:
            names_ = [f.name for f in _OFFER_GATES[rid]]
            if not any(has(self.offered_mask, f) for f in _OFFER_GATES[rid]):
                return f"{'/'.join(names_)} not offered by the device"
        if rid == "GEN-D-8" or rid == "GEN-D-6" and not self.status.injected:
            return "no undefined feature bit was offered (run with provocation on)"
        if rid in _INDIRECT_ONLY:
            return "no chain used an indirect table"
        if rid == "SPL-D-15":
            return "no spurious notification was sent"
        if rid in ("SPL-D-13", "SPL-D-14", "SPL-D-17", "SPL-D-18"):
            which = "with" if rid in ("SPL-D-14", "SPL-D-18") else "without"
            return f"the queues never ran {which} EVENT_IDX"
        if rid in ("GEN-D-3", "GEN-D-19"):
            return "the driver never set FAILED / the device never refused FEATURES_OK"
        return "the run never reached a situation where this applies"
