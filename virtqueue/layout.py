"""Where a split ring's three areas go in guest memory, and the compiled forms of its structs.

Two placements (virtio spec §2.7, table "Virtqueue Part Alignment"; §2.7.2 legacy interfaces):

* :func:`legacy_layout`: one contiguous block as Linux ``vring_init`` lays it out (and legacy
  PCI/MMIO and virtio_uml use): descriptor table, avail ring with ``used_event``, padding to
  ``align``, used ring with ``avail_event``.
* :func:`split_layout`: the three areas packed back to back with only their minimum alignment
  (16 / 2 / 4), as a modern driver may place them (each area's address is given separately).

The hot paths of the device end parse ring entries with precompiled :class:`struct.Struct`
objects (:data:`DESC`, :data:`USED_ELEM`, :data:`U16`); the single declaration of the layout is
the construct one in :mod:`protocol.split_ring`, and a test proves the two agree byte for byte.
"""

from __future__ import annotations

import struct

from protocol.errors import UsageError
from protocol.split_ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    avail_size,
    desc_table_size,
    used_size,
    vring_size,
    vring_used_offset,
)

__all__ = [
    "DESC",
    "U16",
    "USED_ELEM",
    "is_queue_size",
    "legacy_layout",
    "split_layout",
]

DESC = struct.Struct("<QIHH")
"""``struct virtq_desc``: addr (le64), len (le32), flags (le16), next (le16); 16 bytes."""
USED_ELEM = struct.Struct("<II")
"""``struct virtq_used_elem``: id (le32), len (le32); 8 bytes."""
U16 = struct.Struct("<H")
"""One le16 ring field: flags, idx, a ring entry, used_event, avail_event."""


def is_queue_size(size: int) -> bool:
    """Whether ``size`` is a valid split queue size: a power of two from 1 to 32768 (§2.7)."""
    return isinstance(size, int) and 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def _check_size(size: int) -> None:
    if not is_queue_size(size):
        raise UsageError(f"queue size must be a power of two from 1 to {MAX_QUEUE_SIZE}, "
                         f"not {size!r}")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def legacy_layout(base: int, size: int, align: int = 4096) -> tuple[int, int, int, int]:
    """The legacy contiguous ring at ``base``: ``(desc, avail, used, total_bytes)``.

    ``total_bytes`` equals :func:`protocol.split_ring.vring_size` (Linux ``vring_size``; the
    used ring is not padded at its end). ``base`` must be 16-byte aligned.

    >>> legacy_layout(0x10000, 256)
    (65536, 69632, 73728, 10246)
    """
    _check_size(size)
    if not isinstance(align, int) or align < USED_ALIGN or align & (align - 1):
        raise UsageError(f"ring alignment must be a power of two >= {USED_ALIGN}, not {align!r}")
    if not isinstance(base, int) or base < 0 or base % DESC_ALIGN:
        raise UsageError(f"ring base must be a {DESC_ALIGN}-byte aligned address, not {base!r}")
    desc = base
    avail = base + desc_table_size(size)
    used = base + vring_used_offset(size, align)
    return desc, avail, used, vring_size(size, align)


def split_layout(base: int, size: int) -> tuple[int, int, int, int]:
    """The three areas packed from ``base`` with 16/2/4 alignment: ``(desc, avail, used, total)``.

    The descriptor table starts at ``base`` rounded up to 16; ``total_bytes`` counts from
    ``base`` to the end of the used ring (``avail_event`` included).

    >>> split_layout(0, 16)
    (0, 256, 296, 430)
    """
    _check_size(size)
    if not isinstance(base, int) or base < 0:
        raise UsageError(f"ring base must be a non-negative address, not {base!r}")
    desc = _align_up(base, DESC_ALIGN)
    avail = _align_up(desc + desc_table_size(size), AVAIL_ALIGN)
    used = _align_up(avail + avail_size(size), USED_ALIGN)
    return desc, avail, used, used + used_size(size) - base
