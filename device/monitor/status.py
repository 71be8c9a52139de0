"""The monitor's checks of the driver's status and feature steps (virtio §2.1, §2.2, §3.1, §6).

:class:`StatusChecks` follows the init sequence as the driver walks it. Status writes and
reads come from the register level (virtio-mmio only: vhost-user has no status channel and
Linux's UML front-end never sends SET_STATUS); the features the driver accepted come from
the device seam (both transports).

- GEN-D-1: each status bit only once the step before it is done (no bit before its
  predecessor); GEN-D-2: no bit cleared except by writing 0; GEN-D-3: after FAILED, a reset
  before the next initialisation; GEN-D-12: a reset is followed by a Status read.
- GEN-D-18 (§3.1.1): reset first; device features read before driver features are written;
  driver features written after DRIVER and before FEATURES_OK, never after; Status re-read
  after FEATURES_OK; queues set up after FEATURES_OK; no config write before FEATURES_OK;
  DRIVER_OK last. GEN-D-19: nothing goes on after FEATURES_OK was refused.
- GEN-D-20: no available-buffer notification before DRIVER_OK.
- Features: GEN-D-5 only offered bits, GEN-D-6 no undefined/reserved bit (the monitor may
  offer some to provoke it), GEN-D-8 an unknown offered bit does not make the driver fail,
  GEN-D-9 VERSION_1 accepted, GEN-D-10/11 (ACCESS_PLATFORM; RING_PACKED, ORDER_PLATFORM,
  NOTIF_CONFIG_DATA) accepted when offered, BAL-D-1 MUST_TELL_HOST accepted when offered.
"""

from __future__ import annotations

from device.monitor.grades import Ledger
from protocol.features import BalloonFeature, TransportFeature, bit, has, names
from protocol.status import DeviceStatus

__all__ = ["DEFINED_FEATURES", "StatusChecks"]

_S = DeviceStatus
DEFINED_FEATURES = 0
for _f in BalloonFeature:
    DEFINED_FEATURES |= bit(_f)
for _f in TransportFeature:
    if _f is not TransportFeature.UNUSED:
        DEFINED_FEATURES |= bit(_f)
"""Feature bits the spec defines for a balloon (device bits 0-5 and the transport bits)."""
_ORDER = (_S.ACKNOWLEDGE, _S.DRIVER, _S.FEATURES_OK, _S.DRIVER_OK)
_SHOULD_ACCEPT = {
    "GEN-D-10": (TransportFeature.ACCESS_PLATFORM,),
    "GEN-D-11": (TransportFeature.RING_PACKED, TransportFeature.ORDER_PLATFORM,
                 TransportFeature.NOTIF_CONFIG_DATA),
    "BAL-D-1": (BalloonFeature.MUST_TELL_HOST,),
}


class StatusChecks:
    """Status and feature grading (see the module docstring)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.status = 0
        self.writes: list[int] = []
        self.reset_seen = False
        self.failed_pending = False
        self.read_after_reset = True
        self.read_after_features_ok = False
        self.device_features_read = False
        self.driver_features_written = False
        self.refused = False
        self.injected = 0
        self.offered = 0
        self.features: int | None = None

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & _S.DRIVER_OK)

    @property
    def features_ok(self) -> bool:
        return bool(self.status & _S.FEATURES_OK)

    def _sequence(self) -> list[str]:
        return [hex(v) for v in self.writes[-8:]]

    # ---- status (register level) -------------------------------------------------------------
    def status_written(self, value: int) -> None:
        led, old = self.ledger, self.status
        self.writes.append(value)
        if value == 0:
            self.reset()
            self.read_after_reset = False
            return
        if not self.read_after_reset:
            led.fail("GEN-D-12", "status written again after a reset without reading it back",
                     writes=self._sequence())
            self.read_after_reset = True
        led.check("GEN-D-18", self.reset_seen, "the first status write was a reset (0)"
                  if self.reset_seen else "status set before the device was reset",
                  writes=self._sequence())
        cleared = old & ~value & ~_S.DEVICE_NEEDS_RESET
        led.check("GEN-D-2", not cleared, f"status {old:#x} -> {value:#x}"
                  + (f" clears {_S(cleared).name}" if cleared else ""), old=old, new=value)
        if self.failed_pending and value & ~_S.FAILED:
            led.fail("GEN-D-3", f"status {value:#x} written after FAILED without a reset",
                     writes=self._sequence())
        new_bits = value & ~old
        for i, b in enumerate(_ORDER):
            if new_bits & b:
                before = _ORDER[i - 1] if i else None
                ok = before is None or bool(old & before)
                led.check("GEN-D-1", ok, f"{b.name} set in status {value:#x} "
                          + ("after " + before.name if before and ok else
                             "with nothing before it" if before is None else
                             f"before {before.name} was set"), old=old, new=value)
        if new_bits & _S.FEATURES_OK:
            led.check("GEN-D-18", self.driver_features_written and bool(value & _S.DRIVER),
                      "FEATURES_OK set after DRIVER and the driver features"
                      if self.driver_features_written else
                      "FEATURES_OK set before the driver wrote its features",
                      writes=self._sequence())
        if new_bits & _S.DRIVER_OK:
            ok = self.read_after_features_ok and bool(value & _S.FEATURES_OK) and not self.refused
            led.check("GEN-D-18", ok, "DRIVER_OK set last, after FEATURES_OK was read back"
                      if ok else "DRIVER_OK set before FEATURES_OK was set and read back",
                      writes=self._sequence())
        if new_bits & _S.FAILED:
            self.failed_pending = True
        if self.refused and new_bits & ~_S.FAILED:
            led.fail("GEN-D-19", f"status {value:#x} set after the device refused "
                     "FEATURES_OK", writes=self._sequence())
        self.status = value

    def status_read(self, value: int) -> None:
        """A Status read returned ``value``."""
        led = self.ledger
        if not self.read_after_reset and self.writes and self.writes[-1] == 0:
            led.ok("GEN-D-12", f"Status read back ({value:#x}) after the reset before the next "
                   "status write", status=value)
        self.read_after_reset = True
        if self.status & _S.FEATURES_OK and not self.read_after_features_ok:
            self.read_after_features_ok = True
            if not value & _S.FEATURES_OK:
                self.refused = True
        self.status = (self.status & ~_S.DEVICE_NEEDS_RESET) | (value & _S.DEVICE_NEEDS_RESET)

    def reset(self) -> None:
        """Status 0 (or the transport's own reset)."""
        if self.failed_pending:
            self.ledger.ok("GEN-D-3", "the device was reset after FAILED")
        self.status = 0
        self.reset_seen = True
        self.failed_pending = False
        self.read_after_features_ok = False
        self.device_features_read = False
        self.driver_features_written = False
        self.refused = False

    # ---- other register-level steps ---------------------------------------------------------
    def device_features_read_(self) -> None:
        self.device_features_read = True

    def driver_features_written_(self) -> None:
        led = self.ledger
        if self.features_ok:
            led.fail("GEN-D-18", "driver features written after FEATURES_OK",
                     writes=self._sequence())
        else:
            led.check("GEN-D-18", bool(self.status & _S.DRIVER) and self.device_features_read,
                      "driver features written after DRIVER, once the device features were "
                      "read" if self.device_features_read else
                      "driver features written before the device features were read",
                      status=self.status)
        self.driver_features_written = True

    def queue_enabled(self, index: int) -> None:
        self.ledger.check("GEN-D-18", self.features_ok and self.read_after_features_ok,
                          f"queue {index} made ready after FEATURES_OK was read back"
                          if self.features_ok else
                          f"queue {index} made ready before FEATURES_OK", queue=index,
                          status=self.status)

    def config_written_(self, offset: int) -> None:
        self.ledger.check("GEN-D-18", self.features_ok, "config written after FEATURES_OK"
                          if self.features_ok else "config written before FEATURES_OK "
                          "(§3.1.1 step 4 allows reads only)", offset=offset,
                          status=self.status)

    def notified(self, index: int, *, queue_name: str) -> None:
        self.ledger.check("GEN-D-20", self.driver_ok, f"notification of queue {index} "
                          f"({queue_name}) {'after' if self.driver_ok else 'before'} DRIVER_OK "
                          f"(status {self.status:#x})", queue=index, queue_name=queue_name,
                          status=self.status)

    # ---- features (device seam, both transports) ----------------------------------------------
    def offered_(self, offered: int, injected: int) -> None:
        self.offered, self.injected = offered, injected

    def features_set(self, mask: int) -> None:
        """The driver's accepted features, as the transport handed them to the device."""
        led = self.ledger
        self.features = mask
        extra = mask & ~self.offered
        led.check("GEN-D-5", not extra, f"accepted {names(mask)}" + (
            f"; not offered: {names(extra)}" if extra else ""), accepted=names(mask),
            not_offered=names(extra))
        undefined = mask & ~DEFINED_FEATURES
        led.check("GEN-D-6", not undefined, f"accepted {len(names(mask))} bits"
                  + (f", undefined for a balloon: {names(undefined)}" if undefined else
                     ", all defined for a balloon"
                     + (f" (undefined bits offered: {names(self.injected)})" if self.injected
                        else "")),
                  undefined=names(undefined), injected=names(self.injected))
        version = bit(TransportFeature.VERSION_1)
        if self.offered & version:
            led.check("GEN-D-9", bool(mask & version), "VERSION_1 offered and "
                      + ("accepted" if mask & version else "not accepted"),
                      accepted=names(mask))
        for rule, features in _SHOULD_ACCEPT.items():
            offered = [f for f in features if has(self.offered, f)]
            if offered:
                taken = all(has(mask, f) for f in offered)
                led.check(rule, taken, f"{[f.name for f in offered]} offered, "
                          + ("accepted" if taken else "declined"), offered=[f.name for f in
                                                                           offered])

    def went_live(self, *, how: str) -> None:
        """The driver completed initialisation (DRIVER_OK, or vhost-user activation)."""
        if self.injected:
            self.ledger.ok("GEN-D-8", f"the driver {how} although undefined bits "
                           f"{names(self.injected)} were offered", injected=names(self.injected))

    def failed_(self) -> None:
        if self.injected:
            self.ledger.fail("GEN-D-8", f"the driver set FAILED with undefined bits "
                             f"{names(self.injected)} offered", injected=names(self.injected))
