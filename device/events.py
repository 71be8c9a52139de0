"""The device layer's structured events: one logger, stable dotted names, a hot-path switch.

Every event the host side emits goes through :func:`emit` (or :func:`warn` for a rule a peer
broke), so a conformance run or a fuzz campaign can turn them off with :data:`ENABLED` and a
reader can find the whole vocabulary here:

- ``balloon.inflate`` / ``balloon.deflate``: one per chain (PFNs taken, rejected).
- ``balloon.reject``: PFNs outside RAM (rule BL-04) or beyond the per-chain cap (BL-02).
- ``balloon.stats``: a stats buffer parsed, parked, given back (BL-13, BL-14).
- ``balloon.hint``: a hinting transition or hinted ranges (BL-16, BL-17).
- ``balloon.report``: a reporting chain (discarded or recorded only, BL-19, BL-20).
- ``balloon.config``: a driver config write (BL-23, BL-25) or ``actual`` changing
  (QEMU's BALLOON_CHANGE), ``balloon.target``: the host set a new target.
- ``balloon.features`` / ``balloon.attach`` / ``balloon.detach`` / ``balloon.activate`` /
  ``balloon.reset`` / ``balloon.kick``: the transport seam.
- ``balloon.needs_reset``: a violation stopped the device until reset.
- ``mmio.status``, ``mmio.features_refused``, ``mmio.queue_ready``, ``mmio.kick``,
  ``mmio.bad_access``, ``mmio.needs_reset``: the virtio-mmio register model.

Fields are key/value: ``queue=``, ``head=``, ``rule=`` (a :data:`protocol.rules.RULES` ID or a
research/spec.md requirement ID such as ``MMIO-D-1``), addresses and counts.
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["ENABLED", "emit", "log", "warn"]

log = structlog.get_logger("vballoon.device")

ENABLED = True
"""Set to False to silence every device event (fuzzing, benchmarks)."""

DEBUG = True
"""Set to False to drop the debug-level events (:func:`emit`) before they are built, keeping
the warnings; the CLI does so below ``--log-level debug``."""


def emit(event: str, **fields: Any) -> None:
    """Log a normal device event (debug level) when events are enabled."""
    if ENABLED and DEBUG:
        log.debug(event, **fields)


def warn(event: str, **fields: Any) -> None:
    """Log a peer's rule break or a dropped request (warning level) when events are enabled."""
    if ENABLED:
        log.warning(event, **fields)
