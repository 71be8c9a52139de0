"""How the ``vballoon`` command renders structlog events: level, console or JSON, to stderr.

Library code only emits events (stable dotted names, key/value fields); this module is the one
place that decides what a person or a machine sees. Trace events of the virtqueue hot path are
switched off entirely below ``debug`` so they cost nothing.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from device import events as device_events
from virtqueue import events as vq_events

__all__ = ["LEVELS", "configure"]

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "warning", *, json: bool = False, stream: TextIO | None = None
              ) -> None:
    """Show events at ``level`` and above, as console lines or JSON lines on ``stream``."""
    numeric = getattr(logging, level.upper())
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,  # tests run the CLI in-process; keep it resettable
    )
    debug = numeric <= logging.DEBUG
    vq_events.set_enabled(debug)
    device_events.ENABLED = numeric <= logging.WARNING  # device events are debug or warning
    device_events.DEBUG = debug
