"""What every real peer we start (QEMU, User-Mode Linux) needs: to die with its parent."""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
    _prctl = None


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that forked it exits.

    PR_SET_PDEATHSIG follows the forking *thread*, so peers are started from the trio thread,
    never from a worker thread (trio's workers exit when idle and would take the peer along).
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
