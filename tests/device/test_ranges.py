"""RangeSet, the host's record of ballooned/reported/hinted memory, against a set of integers."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from device.ranges import RangeSet

SPAN = 64
bounds = st.tuples(st.integers(0, SPAN), st.integers(0, 24)).map(lambda t: (t[0], t[0] + t[1]))


class RangeSetMachine(RuleBasedStateMachine):
    """Every operation agrees with the same operation on a plain set of points."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges = RangeSet()
        self.model: set[int] = set()

    @rule(r=bounds)
    def add(self, r: tuple[int, int]) -> None:
        s, e = r
        new = set(range(s, e)) - self.model
        assert self.ranges.add(s, e) == len(new)
        self.model |= new

    @rule(r=bounds)
    def remove(self, r: tuple[int, int]) -> None:
        s, e = r
        gone = set(range(s, e)) & self.model
        assert self.ranges.remove(s, e) == len(gone)
        self.model -= gone

    @rule(r=bounds)
    def queries(self, r: tuple[int, int]) -> None:
        s, e = r
        points = set(range(s, e))
        assert self.ranges.overlap(s, e) == len(points & self.model)
        if e > s:
            assert self.ranges.contains(s, e) == (points <= self.model)
        clipped = {p for a, b in self.ranges.clip(s, e) for p in range(a, b)}
        assert clipped == points & self.model

    @precondition(lambda self: bool(self.model))
    @rule()
    def copy_is_independent(self) -> None:
        twin = self.ranges.copy()
        assert twin == self.ranges
        twin.clear()
        assert self.ranges.total == len(self.model)

    @invariant()
    def merged_sorted_and_exact(self) -> None:
        spans = list(self.ranges)
        assert all(s < e for s, e in spans)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
        assert {p for s, e in spans for p in range(s, e)} == self.model
        assert self.ranges.total == len(self.model)
        assert len(self.ranges) == len(spans)


TestRangeSet = RangeSetMachine.TestCase
TestRangeSet.settings = settings(max_examples=150, stateful_step_count=40)


def test_empty_and_reversed_ranges_change_nothing() -> None:
    r = RangeSet([(10, 20)])
    assert r.add(5, 5) == 0 and r.add(9, 3) == 0
    assert r.remove(30, 30) == 0 and r.remove(25, 15) == 0
    assert list(r) == [(10, 20)]


def test_touching_ranges_merge() -> None:
    r = RangeSet([(0, 4), (8, 12)])
    assert r.add(4, 8) == 4
    assert list(r) == [(0, 12)]
