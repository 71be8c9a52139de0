"""The one exception hierarchy of vballoon: every error that leaves our code is a VballoonError.

Protocol violations carry a stable rule ID (see :mod:`protocol.rules`), the spec section the rule
comes from, and the offending values, so a conformance report or a fuzz finding can say exactly
which rule broke and with what.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "DeviceViolation",
    "DriverViolation",
    "GuestMemoryError",
    "PeerError",
    "ProtocolViolation",
    "UsageError",
    "VballoonError",
]


class VballoonError(Exception):
    """Root of every error vballoon raises on purpose."""


class ProtocolViolation(VballoonError):
    """A peer broke a protocol rule; abstract: raise DriverViolation or DeviceViolation.

    Args:
        rule_id: stable ID from :data:`protocol.rules.RULES` (e.g. ``"DC-01"``).
        section: the virtio spec section (or peer source) the rule comes from.
        message: one sentence saying what was wrong.
        **values: the offending values (``head=``, ``next=``, ``addr=`` ...).
    """

    def __init__(self, *, rule_id: str, section: str, message: str, **values: Any) -> None:
        if type(self) is ProtocolViolation:
            raise TypeError("ProtocolViolation is abstract: raise a Driver- or DeviceViolation")
        self.rule_id = rule_id
        self.section = section
        self.message = message
        self.values = values
        super().__init__(str(self))

    def __str__(self) -> str:
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        where = f"virtio {self.section}" if self.section[:1].isdigit() else self.section
        return f"[{self.rule_id}] {self.message} ({where}{'; ' + detail if detail else ''})"

    def __reduce__(self):  # keep pickling (pytest-xdist, multiprocessing) working
        return (_rebuild, (type(self), self.rule_id, self.section, self.message, self.values))


def _rebuild(cls, rule_id, section, message, values):
    return cls(rule_id=rule_id, section=section, message=message, **values)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return repr(value)
    return hex(value) if value > 0xFFFF else str(value)


class DriverViolation(ProtocolViolation):
    """The driver (guest) broke a rule; raised on the device side."""


class DeviceViolation(ProtocolViolation):
    """The device (host) broke a rule; raised on the driver side."""


class GuestMemoryError(VballoonError):
    """An access to guest-physical memory outside RAM (or one that overflows 64 bits)."""

    def __init__(self, gpa: int, length: int, reason: str = "outside guest RAM") -> None:
        self.gpa = gpa
        self.length = length
        self.reason = reason
        super().__init__(f"guest memory access [{gpa:#x}, +{length:#x}) {reason}")

    def __reduce__(self):
        return (type(self), (self.gpa, self.length, self.reason))


class ConfigError(VballoonError):
    """A bad configuration value or command-line option, named in the message."""


class UsageError(VballoonError):
    """Local misuse of an API (a bug in the caller, not a peer's violation)."""


class PeerError(VballoonError):
    """A real peer (QEMU, User-Mode Linux) is missing, refused to start, or died."""
