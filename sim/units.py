"""Sizes on the command line: ``4G``, ``512MiB``, ``64K`` or a bare number, as bytes."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from protocol.errors import ConfigError

__all__ = ["parse_size", "size_argument"]

_UNITS = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, *, bare: int = 1) -> int:
    """Bytes in ``text``; a number without a unit counts in ``bare`` bytes (QEMU's HMP
    ``balloon`` takes MiB). Raises ConfigError naming the text."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if m is None or (unit and unit not in _UNITS):
        raise ConfigError(f"not a size: {text!r} (examples: 4G, 512M, 64K)")
    return int(m.group(1)) * (_UNITS[unit] if unit else bare)


def size_argument(bare: int = 1) -> Callable[[str], int]:
    """An argparse ``type=`` for sizes: a bad one is a usage error (exit 2) naming the text."""
    def parse(text: str) -> int:
        try:
            return parse_size(text, bare=bare)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = "size"
    return parse
