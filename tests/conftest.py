"""Shared test configuration: hypothesis profiles and real-peer fixtures (see tests/peers.py).

Real-peer tests skip with a clear reason when the peer is missing; with
``VBALLOON_REQUIRE_PEERS=1`` (set by ``.ci/run``) a missing peer fails them instead.
"""

from __future__ import annotations

import os

import pytest
import structlog
from hypothesis import HealthCheck, settings

try:  # tests/ as a plain directory (pytest puts it on sys.path) or as a package
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - depends on the layout
    from tests.peers import require_peer

settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("VBALLOON_HYPOTHESIS_PROFILE", "default"))


def _drop(logger: object, name: str, event: dict) -> dict:
    raise structlog.DropEvent


def _quiet_structlog() -> None:
    """Drop library events unless a test captures them (structlog.testing.capture_logs swaps
    the processors), so the suite does not pay for rendering thousands of trace lines."""
    structlog.reset_defaults()
    structlog.configure(processors=[_drop], cache_logger_on_first_use=False)


_quiet_structlog()


@pytest.fixture(autouse=True)
def _restore_structlog():
    """A test that runs the CLI in-process configures structlog for a stream pytest then
    closes, and switches event emission off; put both back after every test."""
    from device import events as device_events
    from virtqueue import events as vq_events

    saved = vq_events.ENABLED, device_events.ENABLED, device_events.DEBUG
    yield
    _quiet_structlog()
    vq_events.set_enabled(saved[0])
    device_events.ENABLED, device_events.DEBUG = saved[1], saved[2]


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (Debian package qemu-system-x86), or skip/fail."""
    from sim.qemu.process import find_qemu_binary

    return require_peer("QEMU", find_qemu_binary)
