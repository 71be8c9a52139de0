"""The fuzz harness's instruments: a memory proxy that checks every access, and a step counter.

:class:`CheckingMemory` stands between the device end and guest RAM. Every range the device asks
for (``view``, ``read``, ``write``, ``fill``) is recorded and, once the queue is built, must lie
inside RAM: the device is expected to check a guest address before it touches it, so a request
outside RAM is a bug even though the memory would refuse it. (While the queue is being built,
asking is how the configuration check CFG-05 works, so requests may fail then.) Bytes read
through the views the device took are bounded by those views.

:class:`StepCounter` bounds the work of one ``pop``: it counts descriptor and ring-entry reads
(calls of the precompiled ``unpack_from`` parsers, seen through ``sys.setprofile``) and raises
:class:`FuzzFailure` as soon as the bound is passed, so a loop in the device shows up as a
failure at once instead of a hang.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from virtqueue.layout import DESC, U16

__all__ = ["CheckingMemory", "FastReader", "FuzzFailure", "StepCounter", "pop_step_bound"]


class FuzzFailure(AssertionError):
    """A property of the device end did not hold for this input (deliberately not a
    VballoonError: it must never be mistaken for the device's own, allowed, errors)."""

    def __init__(self, check: str, message: str) -> None:
        self.check = check
        super().__init__(f"[{check}] {message}")


class CheckingMemory:
    """A :class:`~virtqueue.memory.GuestMemory` proxy that records and bounds every access."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._bounds = [(r.gpa, r.gpa + r.size) for r in inner.regions]
        self.strict = False
        self.accesses: list[tuple[str, int, int]] = []

    @property
    def regions(self) -> Any:
        return self._inner.regions

    @property
    def write_observers(self) -> Sequence[Any]:
        return self._inner.write_observers

    def _record(self, op: str, gpa: int, n: int) -> None:
        self.accesses.append((op, gpa, n))
        if self.strict and not self.contains(gpa, n):
            raise FuzzFailure("fuzz.memory", f"{op} of [{gpa!r}, +{n!r}) is outside guest RAM")

    def view(self, gpa: int, n: int) -> memoryview:
        self._record("view", gpa, n)
        return self._inner.view(gpa, n)

    def read(self, gpa: int, n: int) -> bytes:
        self._record("read", gpa, n)
        return self._inner.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._record("write", gpa, len(data))
        self._inner.write(gpa, data)

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self._record("fill", gpa, n)
        self._inner.fill(gpa, n, byte)

    def contains(self, gpa: int, n: int) -> bool:
        if type(gpa) is int and type(n) is int and gpa >= 0 and n >= 0:
            for lo, hi in self._bounds:
                if lo <= gpa and gpa + n <= hi:
                    return True
        return self._inner.contains(gpa, n)  # across adjacent regions, or not RAM at all

    def check(self, gpa: int, n: int) -> None:
        self._inner.check(gpa, n)

    def mark_written(self, gpa: int, n: int) -> None:
        self._record("mark_written", gpa, n)
        self._inner.mark_written(gpa, n)


class FastReader:
    """The harness's own accesses to guest RAM, through one view per region (not recorded).

    ``read`` and ``write`` work like ``GuestMemory``'s (ten times cheaper for small accesses);
    a range across regions goes to the memory itself. Write observers are not told.
    """

    def __init__(self, memory: Any) -> None:
        self._memory = memory
        self._regions = [(r.gpa, r.gpa + r.size, memory.view(r.gpa, r.size))
                         for r in memory.regions]

    def read(self, gpa: int, n: int) -> bytes:
        for lo, hi, view in self._regions:
            if lo <= gpa and gpa + n <= hi:
                return bytes(view[gpa - lo:gpa - lo + n])
        return self._memory.read(gpa, n)  # spans regions, or GuestMemoryError

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def write(self, gpa: int, data: bytes) -> None:
        for lo, hi, view in self._regions:
            if lo <= gpa and gpa + len(data) <= hi:
                view[gpa - lo:gpa - lo + len(data)] = data
                return
        self._memory.write(gpa, data)

    def contains(self, gpa: int, n: int) -> bool:
        return self._memory.contains(gpa, n)

    def release(self) -> None:
        for _, _, view in self._regions:
            view.release()
        self._regions = []


def pop_step_bound(size: int, pending: int) -> int:
    """Most parser calls one ``pop`` may make: at most min(pending, N) + 1 avail entries, each
    read as idx and head, and for each a fast walk and a careful walk of at most N + 2
    descriptors (virtqueue.policy, "Bounds")."""
    entries = min(pending, size) + 1
    return entries * (2 * (size + 2) + 4) + 4


class StepCounter:
    """Counts ``DESC``/``U16`` parser calls while active; raises past ``bound``."""

    def __init__(self) -> None:
        self.steps = 0
        self.bound = 0
        self.max_seen = 0

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            if owner is DESC or owner is U16:
                self.steps += 1
                if self.steps > self.bound:
                    sys.setprofile(None)
                    raise FuzzFailure("fuzz.bounds", f"one pop made more than {self.bound} "
                                      "descriptor/ring reads (a loop?)")

    def __enter__(self) -> StepCounter:
        self.steps = 0
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        self.max_seen = max(self.max_seen, self.steps)
