"""What kind of guest the balloon driver runs in, and Linux's feature choice (``validate``).

The options stand for kernel configuration a real guest has (``init_on_free``, page poisoning,
``CONFIG_HUGETLB_PAGE``, which kernel version's stats layout) and for vballoon's own choices
(which hinting design, ring size caps). :func:`validate_features` is Linux 6.1
``virtballoon_validate`` (``drivers/virtio/virtio_balloon.c``) with the newest kernel's extra
INDIRECT_DESC pruning as an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import ConfigError
from protocol.features import BalloonFeature, TransportFeature, bit, has, mask

__all__ = [
    "LINUX_FEATURE_TABLE",
    "BalloonOptions",
    "HintMode",
    "StatsLayout",
    "validate_features",
]

LINUX_FEATURE_TABLE = mask(
    BalloonFeature.MUST_TELL_HOST,
    BalloonFeature.STATS_VQ,
    BalloonFeature.DEFLATE_ON_OOM,
    BalloonFeature.FREE_PAGE_HINT,
    BalloonFeature.PAGE_POISON,
    BalloonFeature.REPORTING,
)
"""The device bits Linux's balloon driver asks for (its ``features[]`` table). Transport bits
(VERSION_1, INDIRECT_DESC, EVENT_IDX...) are added by the virtio core when offered."""


class HintMode(StrEnum):
    """How free pages are hinted (``VIRTIO_BALLOON_F_FREE_PAGE_HINT``)."""

    ALLOC = "alloc"
    """Linux 4.20+: allocate order-10 blocks and hold them until the host says DONE."""
    WALK = "walk"
    """The seed thread's design (``walk_free_mem_block``, 2018): walk the free lists and hint
    blocks that stay free, so the guest may reuse a page the host was told it could skip."""


class StatsLayout(StrEnum):
    """Which kernel's ``update_balloon_stats`` the stats buffer follows."""

    LINUX_6_1 = "6.1"
    """SWAP_IN, SWAP_OUT, MAJFLT, MINFLT, [HTLB_PGALLOC, HTLB_PGFAIL], MEMFREE, MEMTOT, AVAIL,
    CACHES."""
    LINUX_6_12 = "6.12"
    """6.1's plus OOM_KILL, ALLOC_STALL, ASYNC_SCAN, DIRECT_SCAN, ASYNC_RECLAIM, DIRECT_RECLAIM
    after MINFLT."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BalloonOptions:
    """The guest configuration the driver honours.

    Attributes:
        features: the driver's feature table (device bits only); default Linux's.
        init_on_free: Linux ``want_init_on_free()``: freed pages are zeroed.
        page_poisoning: Linux ``page_poisoning_enabled_static()``: freed pages are filled with
            PAGE_POISON (0xaa). With neither, PAGE_POISON is declined and REPORTING is kept.
        drop_indirect: prune INDIRECT_DESC in validate, as the newest Linux does (2026) so a
            32-entry report never needs an indirect table.
        hint_mode: :class:`HintMode`.
        hint_order: order of hinted blocks (Linux ``VIRTIO_BALLOON_HINT_BLOCK_ORDER``, 10).
        hint_busy_wait: seconds that pass each time a hinting run finds the ring full (Linux
            busy-loops there; a simulation must let time move so the device can drain it).
        stats_layout: :class:`StatsLayout`.
        hugetlb: ``CONFIG_HUGETLB_PAGE``: the stats carry HTLB_PGALLOC and HTLB_PGFAIL.
        stats_kick_before_driver_ok: Linux primes *and kicks* the stats queue in ``init_vqs``,
            before DRIVER_OK, which GEN-D-20 forbids; False defers the kick until after.
        max_queue_size: cap on every queue's size (Linux takes QueueNumMax; small test guests
            want smaller rings). The cap never takes the reporting queue below 32 entries or
            the free page queue below 2, the sizes Linux's probe insists on.
    """

    features: int = LINUX_FEATURE_TABLE
    init_on_free: bool = False
    page_poisoning: bool = False
    drop_indirect: bool = False
    hint_mode: HintMode = HintMode.ALLOC
    hint_order: int = 10
    hint_busy_wait: float = 0.001
    stats_layout: StatsLayout = StatsLayout.LINUX_6_1
    hugetlb: bool = False
    stats_kick_before_driver_ok: bool = True
    max_queue_size: int | None = None

    def __post_init__(self) -> None:
        if self.features & ~LINUX_FEATURE_TABLE:
            raise ConfigError(f"driver features {self.features:#x} include bits outside the "
                              f"balloon's table {LINUX_FEATURE_TABLE:#x}")
        if not 0 <= self.hint_order <= 10:
            raise ConfigError(f"hint_order must be 0..10 (MAX_ORDER - 1), not {self.hint_order}")
        if not self.hint_busy_wait > 0:
            raise ConfigError(f"hint_busy_wait must be positive, not {self.hint_busy_wait}")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be positive, not {self.max_queue_size}")
        object.__setattr__(self, "hint_mode", HintMode(self.hint_mode))
        object.__setattr__(self, "stats_layout", StatsLayout(self.stats_layout))

    @property
    def poison_val(self) -> int:
        """What Linux writes to ``poison_val``: 0 with init_on_free, else 0xaaaaaaaa."""
        return 0 if self.init_on_free else 0xAAAAAAAA

    @property
    def free_fill_byte(self) -> int | None:
        """The byte a freed page is filled with in this guest, or None (left as it was)."""
        if self.init_on_free:
            return 0
        if self.page_poisoning:
            return 0xAA
        return None


def validate_features(features: int, options: BalloonOptions) -> int:
    """Linux ``virtballoon_validate``: the accepted features after the driver's pruning.

    - Neither init_on_free nor poisoning: decline PAGE_POISON (nothing to tell the host).
    - Else, PAGE_POISON not offered: decline REPORTING (BAL-D-3: the host discarding a reported
      page would destroy the pattern the guest relies on).
    - Always decline ACCESS_PLATFORM (the balloon passes guest-physical addresses).
    - ``drop_indirect``: decline INDIRECT_DESC (newest Linux).
    """
    if not options.init_on_free and not options.page_poisoning:
        features &= ~bit(BalloonFeature.PAGE_POISON)
    elif not has(features, BalloonFeature.PAGE_POISON):
        features &= ~bit(BalloonFeature.REPORTING)
    features &= ~bit(TransportFeature.ACCESS_PLATFORM)
    if options.drop_indirect:
        features &= ~bit(TransportFeature.RING_INDIRECT_DESC)
    return features
