"""A write tap on the guest's own RAM accesses, for the checks that need to see page use.

On the simulated machine the guest reaches its RAM through a memory object; giving the guest a
:class:`GuestWriteTap` instead of the bare :class:`~virtqueue.memory.GuestMemory` lets the
monitor see every guest write and fill (address, length, fill byte) *after* it happened,
without seeing the device's own writes (discards, the used ring), which go to the bare memory.
That is what BAL-D-9/10/12/34/39 need: whether the guest touched a page it had handed to the
device. A real guest (UML) writes its RAM directly, so those requirements stay NOT-EXERCISED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["GuestWriteTap"]

WriteHook = Callable[[int, int, int | None], None]
"""``hook(gpa, length, fill_byte_or_None)`` after each guest write."""


class GuestWriteTap:
    """``memory`` as the guest sees it, reporting each write to ``hook`` (see module doc)."""

    def __init__(self, memory: Any, hook: WriteHook) -> None:
        self._memory = memory
        self._hook = hook

    @property
    def inner(self) -> Any:
        """The tapped memory."""
        return self._memory

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._memory.write(gpa, data)
        self._hook(gpa, len(data), None)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._memory.fill(gpa, length, byte)
        self._hook(gpa, length, byte)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(2, "little"))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._memory, name)
