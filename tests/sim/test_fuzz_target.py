"""The fuzz target on seeds and random inputs, and proof that its checks catch planted bugs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import GuestMemoryError
from sim.fuzz import target
from sim.fuzz.encoding import (
    GEOMETRIES,
    BytesChoices,
    decode,
    encode_driver,
    encode_layout,
    encode_structured,
)
from sim.fuzz.findings import FindingStore, load, replay, signature
from sim.fuzz.memory import CheckingMemory, FuzzFailure
from sim.fuzz.oracle import predict
from sim.fuzz.seeds import classic_layouts, seed_inputs, write_corpus
from virtqueue import events
from virtqueue.cases import RandomChoices
from virtqueue.device import DeviceQueue
from virtqueue.policy import ErrorPolicy
from virtqueue.strategies import build_near_valid, build_valid


@pytest.fixture(autouse=True)
def _quiet():
    with events.disabled():
        yield


SEEDS = seed_inputs(per_kind=1)


def test_every_seed_passes_under_every_policy() -> None:
    for name, data in SEEDS:
        for policy in ErrorPolicy:
            try:
                target.fuzz_one(data, policy)
            except FuzzFailure as exc:  # pragma: no cover - the failure message is the point
                pytest.fail(f"seed {name} under {policy}: {exc}")


def test_seeds_are_deterministic_and_cover_every_mode(tmp_path) -> None:
    assert seed_inputs(per_kind=1) == SEEDS
    modes = {decode(data).mode for _, data in SEEDS}
    assert modes == {"raw", "structured", "driver"}
    written = write_corpus(tmp_path, per_kind=1)
    assert written == len({data for _, data in SEEDS}) and write_corpus(tmp_path, 1) == 0


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_random_bytes_never_break_a_check(data: bytes) -> None:
    target.fuzz_one(data)


@settings(max_examples=100)
@given(st.sampled_from(["valid", "arbitrary", "loop", "table_loop", "duplicate_head"]),
       st.binary(min_size=0, max_size=600), st.sampled_from(list(ErrorPolicy)))
def test_structured_and_driver_inputs(kind: str, decisions: bytes, policy) -> None:
    target.fuzz_one(encode_structured(kind, decisions, policy))
    target.fuzz_one(encode_driver(decisions, policy))


def test_raw_encoding_round_trips_a_layout() -> None:
    layout = build_near_valid(RandomChoices(5), size=16, kind="nested_indirect")
    case = decode(encode_layout(layout, "skip"))
    again = case.layout
    assert case.mode == "raw" and case.policy is ErrorPolicy.SKIP
    assert (again.size, again.desc, again.avail, again.used, again.table, again.start,
            again.entries, again.avail_idx, again.indirect, again.geometry.ram) == (
        layout.size, layout.desc, layout.avail, layout.used, layout.table, layout.start,
        layout.entries, layout.avail_idx, layout.indirect, layout.geometry.ram)
    assert b"".join(d for _, d in again.writes) == b"".join(d for _, d in layout.writes)
    assert decode(encode_layout(layout), "truncate").policy is ErrorPolicy.TRUNCATE


def test_bytes_choices_shrink_to_the_minimum() -> None:
    ch = BytesChoices(b"")
    assert (ch.integer(3, 9), ch.boolean(), ch.data(2)) == (3, False, b"\0\0")
    ch = BytesChoices(b"\xff\xff")
    assert 0 <= ch.integer(0, 300) <= 300
    assert len(GEOMETRIES) == 16 and len({g.ram for g in GEOMETRIES}) > 8


@pytest.mark.parametrize("layout", classic_layouts(), ids=lambda x: x.label)
def test_oracle_agrees_with_the_classic_layouts(layout) -> None:
    memory = layout.geometry.memory()
    layout.write_into(memory)
    model = predict(memory, geometry=layout.geometry, size=layout.size, desc=layout.desc,
                    avail=layout.avail, used=layout.used, start=layout.start,
                    indirect=layout.indirect, policy=ErrorPolicy.NEEDS_RESET)
    assert model.raised == layout.rule
    assert [(p.head, p.readable, p.writable) for p in model.pops] == [
        (e.head, e.readable, e.writable) for e in layout.expected]


# ---- the checks catch planted bugs ---------------------------------------------------------

def _valid(size: int = 16, seed: int = 1):
    return build_valid(RandomChoices(seed), size=size)


def test_catches_a_loop_in_pop(monkeypatch) -> None:
    monkeypatch.setattr(target, "pop_step_bound", lambda size, pending: 1)
    with pytest.raises(FuzzFailure, match=r"fuzz\.bounds"):
        target.run_layout(_valid())


def test_catches_a_non_vballoon_exception(monkeypatch) -> None:
    def broken_pop(self):
        raise IndexError("planted")

    monkeypatch.setattr(DeviceQueue, "pop", broken_pop)
    with pytest.raises(FuzzFailure, match=r"fuzz\.exception.*IndexError"):
        target.run_layout(_valid())


def test_catches_a_wrong_chain(monkeypatch) -> None:
    real = DeviceQueue.pop

    def short_pop(self):
        chain = real(self)
        if chain is not None and chain.readable:
            return chain._replace(readable=chain.readable[:-1])
        return chain

    monkeypatch.setattr(DeviceQueue, "pop", short_pop)
    with pytest.raises(FuzzFailure, match=r"fuzz\.(oracle|expected)"):
        for seed in range(20):
            target.run_layout(_valid(seed=seed))


def test_catches_a_write_to_the_descriptor_table(monkeypatch) -> None:
    real = DeviceQueue.push

    def scribbling_push(self, head, written):
        real(self, head, written)
        self.memory.write(self.desc, b"\xff")

    monkeypatch.setattr(DeviceQueue, "push", scribbling_push)
    with pytest.raises(FuzzFailure, match=r"fuzz\.readonly"):
        target.run_layout(_valid())


def test_catches_a_missed_violation(monkeypatch) -> None:
    layout = build_near_valid(RandomChoices(2), size=8, kind="zero_length")
    monkeypatch.setattr(DeviceQueue, "pop", lambda self: None)
    with pytest.raises(FuzzFailure, match=r"fuzz\.oracle"):
        target.run_layout(layout)


def test_checking_memory_refuses_requests_outside_ram() -> None:
    layout = _valid()
    memory = layout.geometry.memory()
    proxy = CheckingMemory(memory)
    with pytest.raises(GuestMemoryError):  # while building: the memory's own refusal
        proxy.read(1 << 30, 4)
    proxy.strict = True
    with pytest.raises(FuzzFailure, match=r"fuzz\.memory"):
        proxy.read(1 << 30, 4)
    assert proxy.read(0, 4) == bytes(4)
    assert [a[0] for a in proxy.accesses] == ["read", "read", "read"]


# ---- findings ------------------------------------------------------------------------------

def test_findings_are_stored_once_per_signature_and_replay(tmp_path, monkeypatch) -> None:
    store = FindingStore(tmp_path, per_signature=2)
    inputs = [encode_layout(_valid(seed=s)) for s in range(4)]
    failure = FuzzFailure("fuzz.oracle", "pop raised DC-01, the model says 7")
    paths = [store.add(data, "skip", failure) for data in inputs]
    assert paths[2] is None and paths[3] is None and len(store.written) == 2
    assert signature(failure) == signature(FuzzFailure("fuzz.oracle",
                                                       "pop raised DC-09, the model says 3"))
    data, policy = load(paths[0])
    assert (data, policy) == (inputs[0], "skip")
    replay(paths[0])  # the device end has no such bug: replays clean
    monkeypatch.setattr(DeviceQueue, "pop", lambda self: None)
    with pytest.raises(FuzzFailure):
        replay(paths[0])
