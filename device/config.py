"""The balloon's config space as the device keeps it (virtio §5.5.4; QEMU get/set_config).

Four le32 fields: ``num_pages`` (device-owned target), ``actual`` (driver-owned balloon size),
``free_page_hint_cmd_id`` (device-owned; its value comes from the hinting state machine, see
:mod:`device.hint`) and ``poison_val`` (driver-owned, valid with PAGE_POISON). The space the
driver sees is a prefix whose size depends on the *offered* features
(:func:`protocol.balloon.config_size`: 8, 12 or 16 bytes), exactly as QEMU sizes it.

QEMU's rules, kept here:
- an access that does not fit inside the config size reads all ones and a write is dropped
  (virtio.c ``virtio_config_*``; rule BL-23);
- a driver write lands on the whole image, but only ``actual`` and ``poison_val`` are taken;
  bytes written over ``num_pages`` or the command ID have no effect (BL-23);
- ``poison_val`` is taken only if PAGE_POISON was negotiated, else forced to 0 (BL-25).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from device.events import emit, warn
from protocol.balloon import PFN_SHIFT, ConfigOffset, config_size

__all__ = ["ACTUAL_HISTORY_KEEP", "BalloonConfigSpace", "ConfigWrite"]

ACTUAL_HISTORY_KEEP = 1024
"""How many (time, actual) driver updates are kept."""

_CONFIG = struct.Struct("<IIII")
"""Precompiled ``protocol.balloon.BalloonConfig`` (tests prove the two equal)."""


@dataclass(frozen=True, slots=True)
class ConfigWrite:
    """What one driver write did.

    Attributes:
        dropped: the access did not fit inside the config size (nothing changed).
        old_actual / actual: ``actual`` before and after.
        poison_val: ``poison_val`` after the write.
        poison_refused: the driver wrote a non-zero poison_val without PAGE_POISON (BL-25).
        read_only_touched: the bytes written over num_pages or the command ID differ from
            what the device holds (they have no effect, BL-23).
    """

    dropped: bool
    old_actual: int
    actual: int
    poison_val: int
    poison_refused: bool = False
    read_only_touched: bool = False

    @property
    def actual_changed(self) -> bool:
        return self.actual != self.old_actual


class BalloonConfigSpace:
    """The device's copy of ``struct virtio_balloon_config`` and its access rules.

    Args:
        offered: the offered feature mask; fixes the visible size.
    """

    def __init__(self, offered: int) -> None:
        self.size = config_size(offered)
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.actual_history: deque[tuple[float, int]] = deque(maxlen=ACTUAL_HISTORY_KEEP)

    def image(self, cmd_id: int) -> bytes:
        """The visible config bytes, with ``cmd_id`` as the free_page_hint_cmd_id value."""
        return _CONFIG.pack(self.num_pages, self.actual, cmd_id, self.poison_val)[:self.size]

    def read(self, offset: int, length: int, cmd_id: int) -> bytes:
        """``length`` bytes at ``offset``; all 0xff unless the access fits (QEMU, BL-23)."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            return b"\xff" * max(length, 0)
        return self.image(cmd_id)[offset:offset + length]

    def write(self, offset: int, data: bytes, *, cmd_id: int, poison_negotiated: bool,
              now: float, ram_size: int) -> ConfigWrite:
        """Apply a driver write of ``data`` at ``offset`` the way QEMU's set_config does.

        Logs ``balloon.config`` events: the rules broken (BL-23, BL-24, BL-25) and each change
        of ``actual`` with QEMU's BALLOON_CHANGE value (RAM the guest keeps, in bytes).
        """
        w = self._apply(offset, data, cmd_id, poison_negotiated, now)
        if w.dropped:
            warn("balloon.config", rule="BL-23", offset=offset, length=len(data),
                 size=self.size, dropped=True)
            return w
        if w.read_only_touched:
            warn("balloon.config", rule="BL-23", offset=offset, length=len(data),
                 read_only=True)
        if w.poison_refused:
            warn("balloon.config", rule="BL-25", poison_val=0, reason="PAGE_POISON not "
                 "negotiated")
        if w.actual_changed:
            emit("balloon.config", field="actual", old=w.old_actual, actual=w.actual,
                 balloon_change=ram_size - (w.actual << PFN_SHIFT))
            if w.actual << PFN_SHIFT > ram_size:
                warn("balloon.config", rule="BL-24", actual=w.actual,
                     ram_pages=ram_size >> PFN_SHIFT)
        return w

    def _apply(self, offset: int, data: bytes, cmd_id: int, poison_negotiated: bool,
               now: float) -> ConfigWrite:
        old = self.actual
        if offset < 0 or not data or offset + len(data) > self.size:
            return ConfigWrite(dropped=True, old_actual=old, actual=old,
                               poison_val=self.poison_val)
        before = self.image(cmd_id)
        image = bytearray(before) + bytes(16 - self.size)
        image[offset:offset + len(data)] = data
        num_pages, actual, new_cmd_id, poison = _CONFIG.unpack(image)
        touched = (num_pages != self.num_pages
                   or (self.size > ConfigOffset.FREE_PAGE_HINT_CMD_ID and new_cmd_id != cmd_id))
        self.actual = actual
        refused = False
        if poison_negotiated:
            self.poison_val = poison
        else:
            refused = poison != 0
            self.poison_val = 0
        if actual != old:
            self.actual_history.append((now, actual))
        return ConfigWrite(dropped=False, old_actual=old, actual=actual,
                           poison_val=self.poison_val, poison_refused=refused,
                           read_only_touched=touched)

    def reset(self) -> None:
        """Device reset: QEMU clears poison_val and keeps num_pages and actual."""
        self.poison_val = 0

