"""Feature-mask helpers: bit, mask, has, names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.features import BalloonFeature, TransportFeature, bit, has, mask, names


def test_bit_and_mask() -> None:
    assert bit(TransportFeature.VERSION_1) == 1 << 32
    assert mask(BalloonFeature.STATS_VQ, BalloonFeature.REPORTING) == 0b100010
    assert mask() == 0


def test_names_in_bit_order_with_unknown_bits() -> None:
    features = mask(TransportFeature.VERSION_1, BalloonFeature.STATS_VQ, 63)
    assert names(features) == ["STATS_VQ", "VERSION_1", "BIT_63"]


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(min_value=0, max_value=63))
def test_has_agrees_with_mask(features: int, n: int) -> None:
    assert has(features, n) == bool(features & bit(n))
    assert has(features | bit(n), n) and not has(features & ~bit(n), n)
