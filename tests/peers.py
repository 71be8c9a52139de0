"""Real-peer gating for tests: skip with a reason when a peer is missing, fail when required.

Tests that need a real peer (QEMU, User-Mode Linux) carry ``@pytest.mark.peer`` and get the
peer through a fixture built on :func:`require_peer`. On a developer machine without the peer
they are skipped with a reason naming what is missing and how to install it; in CI, where
``VBALLOON_REQUIRE_PEERS=1`` is set, a missing peer is a failure, never a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["REQUIRE_PEERS_ENV", "peers_required", "require_peer"]

REQUIRE_PEERS_ENV = "VBALLOON_REQUIRE_PEERS"

T = TypeVar("T")


def peers_required() -> bool:
    """Whether missing peers must fail the run (``VBALLOON_REQUIRE_PEERS=1``)."""
    return os.environ.get(REQUIRE_PEERS_ENV, "") == "1"


def require_peer(name: str, check: Callable[[], T]) -> T:
    """Return ``check()``; if it raises or returns None, skip (or fail when required).

    ``check`` finds the peer and returns what the test needs (a binary path, a kernel image);
    it signals absence by raising an exception whose message says what is missing and how to
    install it, or by returning None.
    """
    try:
        found = check()
    except Exception as exc:  # noqa: BLE001 - any failure to find the peer means "missing"
        reason = f"{name} is not available: {exc}"
    else:
        if found is not None:
            return found
        reason = f"{name} is not available"
    if peers_required():
        pytest.fail(f"{reason} ({REQUIRE_PEERS_ENV}=1 requires every peer)", pytrace=False)
    pytest.skip(reason)
