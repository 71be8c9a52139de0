"""What ``vballoon serve`` offers, and the option values it reads (features, sizes).

:func:`parse_features` turns ``STATS_VQ,REPORTING`` / ``default,-PAGE_POISON`` into a mask and
:func:`parse_size` turns ``64M`` / ``1G`` / ``512`` (MiB, as QEMU's HMP ``balloon``) into bytes;
both raise ConfigError naming what they could not read (the CLI's exit status 2).
"""

from __future__ import annotations

import re

from protocol.errors import ConfigError
from protocol.features import BalloonFeature, TransportFeature, mask
from sim.units import parse_size as _parse_size

__all__ = ["SERVE_FEATURES", "parse_features", "parse_size"]

_TRANSPORT = mask(TransportFeature.RING_INDIRECT_DESC, TransportFeature.RING_EVENT_IDX,
                  TransportFeature.VERSION_1)
SERVE_FEATURES = mask(BalloonFeature.STATS_VQ, BalloonFeature.DEFLATE_ON_OOM,
                      BalloonFeature.FREE_PAGE_HINT, BalloonFeature.PAGE_POISON,
                      BalloonFeature.REPORTING) | _TRANSPORT
"""What ``vballoon serve`` offers: every balloon feature QEMU can offer (not the legacy
MUST_TELL_HOST) and the split-ring transport bits."""

_FEATURE_SETS = {
    "default": SERVE_FEATURES & ~_TRANSPORT,
    "all": mask(*BalloonFeature),
    "qemu": mask(BalloonFeature.STATS_VQ, BalloonFeature.PAGE_POISON),
    "none": 0,
}
_NAMES = {f.name: int(f) for f in BalloonFeature} | {f.name: int(f) for f in TransportFeature}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512KiB`` or a plain number of MiB (QEMU's HMP ``balloon``), as bytes."""
    return _parse_size(text, bare=1 << 20)


def parse_features(text: str, base: int = SERVE_FEATURES) -> int:
    """A feature mask from ``STATS_VQ,REPORTING``, ``default,-PAGE_POISON`` or ``+MUST_TELL_HOST``.

    Bare names and the sets ``default``, ``all``, ``qemu``, ``none`` give the balloon bits
    (replacing ``base``'s); ``+NAME`` / ``-NAME`` add or drop a bit of ``base`` (or of what the
    earlier words built). Transport bits stay as in ``base`` unless named with ``+`` or ``-``.
    Names are case-insensitive, ``-`` and ``_`` alike inside a name. ConfigError if unknown.
    """
    words = [w for w in re.split(r"[,\s]+", text.strip()) if w]
    if not words:
        raise ConfigError("--features needs at least one name")
    balloon, transport = base & mask(*BalloonFeature), base & ~mask(*BalloonFeature)
    replaced = False
    for word in words:
        sign = word[0] if word[0] in "+-" else ""
        key = word[len(sign):].upper().replace("-", "_").removeprefix("VIRTIO_BALLOON_F_")
        key = key.removeprefix("VIRTIO_F_")
        if key.lower() in _FEATURE_SETS and not sign:
            if not replaced:
                balloon, replaced = 0, True
            balloon |= _FEATURE_SETS[key.lower()]
            continue
        if key not in _NAMES:
            raise ConfigError(f"unknown feature {word!r}; known: {', '.join(_NAMES)} and the "
                              f"sets {', '.join(_FEATURE_SETS)}")
        bit = 1 << _NAMES[key]
        if not sign and not replaced:
            balloon, replaced = 0, True
        is_balloon = key in BalloonFeature.__members__
        if sign == "-":
            balloon, transport = balloon & ~bit, transport & ~bit
        elif is_balloon:
            balloon |= bit
        else:
            transport |= bit
    return balloon | transport
