"""The layout strategies against the device end: valid layouts deliver exactly, each mutation is
rejected with exactly its labelled rule, arbitrary layouts never crash it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DriverViolation, UsageError, VballoonError
from virtqueue import events
from virtqueue.cases import MUTATIONS, Geometry, Layout, RandomChoices
from virtqueue.layout import USED_ELEM
from virtqueue.policy import ErrorPolicy
from virtqueue.strategies import (
    Options,
    arbitrary_layouts,
    build_near_valid,
    build_valid,
    feasible_kinds,
    near_valid_chains,
    valid_chains,
)


@pytest.fixture(autouse=True)
def _quiet():
    with events.disabled():
        yield


def _pop_all(layout: Layout, policy: ErrorPolicy = ErrorPolicy.NEEDS_RESET):
    memory = layout.geometry.memory()
    layout.write_into(memory)
    queue = layout.device_queue(memory, policy)
    chains, raised = [], None
    try:
        while (chain := queue.pop()) is not None:
            chains.append(chain)
    except DriverViolation as v:
        raised = v
    return memory, queue, chains, raised


def _assert_delivers(layout: Layout, policy: ErrorPolicy) -> None:
    memory, queue, chains, raised = _pop_all(layout, policy)
    assert raised is None
    assert [c.head for c in chains] == [e.head for e in layout.expected]
    for c, e in zip(chains, layout.expected, strict=True):
        assert (tuple(map(tuple, c.readable)), tuple(map(tuple, c.writable))) == (
            e.readable, e.writable)
        assert c.indirect == e.indirect and c.violation is None
        assert c.read(memory) == e.data
        assert c.writable_len == e.writable_len
    for c in chains:  # complete them in order; the used ring holds them in that order
        queue.push(c.head, c.writable_len)
    for k, e in enumerate(layout.expected):
        slot = layout.used + 4 + 8 * ((layout.start + k) % layout.size)
        assert USED_ELEM.unpack(memory.read(slot, 8)) == (e.head, e.writable_len)
    assert queue.pop() is None and queue.in_flight == 0


@settings(max_examples=60)
@given(valid_chains(), st.sampled_from(list(ErrorPolicy)))
def test_valid_layouts_deliver_exact_bytes(layout: Layout, policy: ErrorPolicy) -> None:
    assert layout.valid and layout.rule is None and layout.pending == len(layout.entries)
    _assert_delivers(layout, policy)


@settings(max_examples=150)
@given(near_valid_chains())
def test_near_valid_layouts_raise_their_rule(layout: Layout) -> None:
    _, queue, chains, raised = _pop_all(layout)
    assert raised is not None and raised.rule_id == layout.rule, (layout.label, raised)
    assert [c.head for c in chains] == [e.head for e in layout.expected]
    assert queue.broken


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_every_mutation_kind_in_every_size(kind: str) -> None:
    """Deterministic sweep, so no kind is left to chance: sizes 1..256, three seeds each."""
    done = 0
    for size in (1, 2, 4, 16, 64, 256):
        if kind not in feasible_kinds(size):
            continue
        for seed in range(3):
            layout = build_near_valid(RandomChoices(f"{kind}-{size}-{seed}"), size=size,
                                      kind=kind)
            assert (layout.label, layout.rule) == (kind, MUTATIONS[kind])
            _, _, chains, raised = _pop_all(layout)
            assert raised is not None and raised.rule_id == layout.rule
            assert [c.head for c in chains] == [e.head for e in layout.expected]
            done += 1
    assert done or kind == "chain_too_big"


def test_chain_too_big_in_a_big_ram() -> None:
    geometry = Geometry(ram=((0, 64 << 20),), arena=(0, 1 << 20))
    assert "chain_too_big" in feasible_kinds(128, geometry)
    assert "chain_too_big" not in feasible_kinds(32, geometry)
    layout = build_near_valid(RandomChoices(7), size=128, kind="chain_too_big",
                              geometry=geometry)
    _, _, chains, raised = _pop_all(layout)
    assert raised.rule_id == "DC-09" and len(chains) == len(layout.expected)


@settings(max_examples=20)
@given(valid_chains(sizes=(32,), ram_size=4 << 20, options=Options(indirect=False)))
def test_valid_chains_in_a_given_ram_and_size(layout: Layout) -> None:
    assert layout.size == 32 and layout.geometry.ram == ((0, 4 << 20),)
    assert not any(e.indirect for e in layout.expected)
    _assert_delivers(layout, ErrorPolicy.NEEDS_RESET)


@settings(max_examples=60)
@given(arbitrary_layouts(), st.sampled_from(list(ErrorPolicy)))
def test_arbitrary_layouts_only_raise_driver_violations(layout: Layout,
                                                        policy: ErrorPolicy) -> None:
    assert layout.expected is None
    memory = layout.geometry.memory()
    layout.write_into(memory)
    queue = layout.device_queue(memory, policy)
    for _ in range(layout.size + 1):
        try:
            chain = queue.pop()
        except DriverViolation:
            break
        if chain is None:
            break
        for seg in chain.segments:
            assert memory.contains(seg.addr, seg.len)
        assert len(chain.read(memory)) == chain.readable_len
    else:
        pytest.fail("more chains than the queue size were popped without a push")


def test_unusual_valid_layouts_are_drawn() -> None:
    """SPL-V-4 (direct then INDIRECT), SPL-V-3 (WRITE on INDIRECT), wrap: all come up."""
    seen = set()
    for seed in range(200):
        layout = build_valid(RandomChoices(seed), size=16, options=Options(indirect=True))
        seen.add(("wrap", layout.start + len(layout.entries) > 0xFFFF))
        for e in layout.expected:
            seen.add(("indirect", e.indirect))
    assert {("indirect", True), ("indirect", False), ("wrap", False)} <= seen


def test_layout_round_trips_through_a_dict() -> None:
    layout = build_near_valid(RandomChoices(3), size=8, kind="loop")
    again = Layout.from_dict(layout.to_dict())
    assert again == layout


def test_options_align4_and_payload() -> None:
    layout = build_valid(RandomChoices(1), size=8, options=Options(
        align4=True, payload=lambda ch, n: b"\x01" * n, indirect=False, start=0))
    assert layout.start == 0
    for e in layout.expected:
        assert all(n % 4 == 0 for _, n in e.readable + e.writable)
        assert set(e.data) <= {1}


@settings(max_examples=100)
@given(st.integers(1, 1 << 20), st.randoms())
def test_outside_address_is_never_ram(length: int, rnd) -> None:
    g = Geometry(ram=((0x1000, 0x10000), (0x20000, 0x10000)))
    addr = g.outside_address(RandomChoices(rnd.random()), length)
    assert addr + length <= 1 << 64
    assert not g.inside(addr, length)


def test_geometry_and_builder_misuse() -> None:
    with pytest.raises(UsageError):
        Geometry(ram=((0x800, 0x1000),))
    with pytest.raises(UsageError):
        Geometry(ram=((0, 0x1000),), arena=(0, 0x2000))
    assert "duplicate_head" not in feasible_kinds(1)
    with pytest.raises(UsageError):
        build_near_valid(RandomChoices(0), size=1, kind="duplicate_head")
    with pytest.raises(UsageError):
        near_valid_chains(kinds=["no_such_kind"])
    with pytest.raises(VballoonError):
        build_valid(RandomChoices(0), size=256, geometry=Geometry(ram=((0, 0x1000),)))
