"""Shared fixtures: real-peer gating (see tests/peers.py)."""

from __future__ import annotations

import pytest

try:  # tests/ as a plain directory (pytest puts it on sys.path) or as a package
    from peers import require_peer
except ModuleNotFoundError:  # pragma: no cover - depends on the layout
    from tests.peers import require_peer


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (Debian package qemu-system-x86), or skip/fail."""
    from sim.qemu.process import find_qemu_binary

    return require_peer("QEMU", find_qemu_binary)
