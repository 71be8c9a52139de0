"""The rules a vhost-user front-end can break, and the error the back-end raises when it does.

Each rule has a stable ID (``VU-nn``) and names the part of QEMU's ``docs/interop/vhost-user.rst``
it comes from. A :class:`FrontendViolation` ends the session: the back-end logs it as one
``vhost_user.violation`` event and closes the connection, which is also the only fatal-error
signal a vhost-user back-end has (Linux's UML front-end has no status channel). Ring placement
problems (alignment, a ring outside RAM, a bad queue size) are the virtio rules of
:mod:`protocol.rules` instead (``CFG-nn``), raised as :class:`~protocol.errors.DriverViolation`.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import ProtocolViolation

__all__ = ["VHOST_USER_RULES", "FrontendViolation", "violation"]

_DOC = "vhost-user"

VHOST_USER_RULES: dict[str, tuple[str, str]] = {
    "VU-01": ("Message format", "a message arrives whole: the 12-byte header, then exactly "
              "`size` payload bytes, without stalling"),
    "VU-02": ("Front-end message types", "the request code is one the document defines"),
    "VU-03": ("Header", "flags carry version 1 and no bits but NEED_REPLY (REPLY is the "
              "back-end's)"),
    "VU-04": ("Message format", "the payload size is the size of the request's layout"),
    "VU-05": ("Communication", "a message carries exactly the fds its request needs (at most 8)"),
    "VU-06": ("Protocol features", "a request is sent only when its feature is negotiated and "
              "the back-end supports it"),
    "VU-07": ("Feature negotiation", "SET_FEATURES / SET_PROTOCOL_FEATURES ask only for bits "
              "the back-end offered"),
    "VU-08": ("SET_MEM_TABLE", "the memory table has 1..8 regions, one fd each, disjoint in "
              "guest and front-end address, each inside its file"),
    "VU-09": ("Ring states", "a vring index names an existing queue"),
    "VU-10": ("Ring states", "vring values are valid: base fits 16 bits, enable is 0 or 1, "
              "no log flag or reserved bits, kick fds are given (no polling)"),
    "VU-11": ("SET_VRING_ADDR", "ring addresses are front-end addresses inside the memory "
              "table, which is sent before the ring is used"),
    "VU-12": ("GET_CONFIG", "a config access is at most 256 bytes and its flags are known"),
    "VU-13": ("Back-end communication", "the back-end request fd is a Unix stream socket"),
}
"""rule ID -> (section of the vhost-user document, one-line paraphrase of the rule)."""


class FrontendViolation(ProtocolViolation):
    """The vhost-user front-end broke a rule of the vhost-user protocol; raised back-end side.

    Same fields as every :class:`~protocol.errors.ProtocolViolation`; build it with
    :func:`violation`, which fills ``section`` from :data:`VHOST_USER_RULES`.
    """


def violation(rule_id: str, message: str, **values: Any) -> FrontendViolation:
    """A FrontendViolation of rule ``rule_id`` (one of :data:`VHOST_USER_RULES`)."""
    section, _summary = VHOST_USER_RULES[rule_id]
    return FrontendViolation(
        rule_id=rule_id, section=f"{_DOC}: {section}", message=message, **values
    )
