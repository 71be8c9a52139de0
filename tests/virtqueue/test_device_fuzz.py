"""Arbitrary guest bytes in the descriptor table, indirect tables and avail ring.

Whatever the guest wrote, ``pop`` returns a chain whose every segment is guest RAM, returns
None, or raises a DriverViolation (only under needs-reset); never another exception, never an
access outside RAM (GuestMemory and the ring views would raise), and every chain walk reads at
most N + 2 descriptors. RAM is small (64 KiB, sometimes with a hole) so that random addresses
mostly miss it, and the strategies mix plausible values in so that valid chains are common too.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import virtqueue.device as device_module
from protocol.errors import DriverViolation
from protocol.rules import RULES
from virtqueue.device import DeviceQueue
from virtqueue.layout import DESC, U16, split_layout
from virtqueue.memory import GuestMemory
from virtqueue.policy import ErrorPolicy

RAM = 0x10000
HOLE = (0x8000, 0x1000)
TABLES = (0x4000, 0x5000, 0x9000 + 8)  # the last one is unaligned (IN-13: allowed)
U64 = (1 << 64) - 1


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` about three times in four."""
    return st.one_of(common, common, common, rare)


def _desc(size: int, table_len: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    addr = _mostly(st.integers(0x1000, RAM - 0x400),
                   st.one_of(st.sampled_from(TABLES), st.integers(0, U64),
                             st.sampled_from([RAM - 8, HOLE[0] - 4, (1 << 64) - 16, 1 << 40])))
    length = _mostly(st.integers(1, 0x200),
                     st.one_of(st.sampled_from([0, 16, 24, table_len, 1 << 31]),
                               st.integers(0, (1 << 32) - 1)))
    flags = _mostly(st.sampled_from([0, 1, 2, 3, 4, 3, 1]), st.integers(0, 0xFFFF))
    nxt = _mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, length, flags, nxt)


@st.composite
def rings(draw) -> dict:
    size = draw(st.sampled_from([1, 2, 4, 8]), label="size")
    table_len = 16 * draw(st.integers(1, 6))
    descs = draw(st.lists(_desc(size, table_len), min_size=size, max_size=size))
    tables = [draw(st.lists(_desc(table_len // 16, table_len), min_size=table_len // 16,
                            max_size=table_len // 16)) for _ in TABLES]
    ring = draw(st.lists(_mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                         min_size=size, max_size=size))
    start = draw(st.sampled_from([0, 0xFFFE]))
    idx = draw(_mostly(st.integers(1, size).map(lambda d: (start + d) & 0xFFFF),
                       st.integers(0, 0xFFFF)), label="avail_idx")
    return {"size": size, "descs": descs, "tables": tables, "ring": ring, "idx": idx,
            "start": start}


def _drain(memory: GuestMemory, size: int, policy: ErrorPolicy, indirect: bool,
           start: int = 0) -> None:
    desc, avail, used, _ = split_layout(0, size)
    q = DeviceQueue(index=0, size=size, desc=desc, avail=avail, used=used, memory=memory,
                    indirect=indirect, policy=policy, next_avail=start, next_used=start)
    for _ in range(size + 2):
        try:
            chain = q.pop()
        except DriverViolation as v:
            event(f"raised {v.rule_id}")
            assert policy is ErrorPolicy.NEEDS_RESET and q.broken
            assert v.rule_id in RULES and v.section == RULES[v.rule_id].section
            assert q.pop() is None
            return
        if chain is None:
            return
        event("truncated chain" if chain.violation else f"chain{' indirect' * chain.indirect}")
        segments = chain.readable + chain.writable
        assert 1 <= len(segments) <= size
        assert all(s.len > 0 and memory.contains(s.addr, s.len) for s in segments)
        assert chain.readable_len == sum(s.len for s in chain.readable) <= 1 << 32
        assert chain.writable_len == sum(s.len for s in chain.writable)
        assert chain.violation is None or policy is ErrorPolicy.TRUNCATE
        assert len(chain.read(memory, limit=64)) == min(64, chain.readable_len)
        assert chain.write(memory, b"\xa5" * 8) == min(8, chain.writable_len)  # may hit rings
        q.push(chain.head, min(8, chain.writable_len))
    # every pop consumed an avail entry, and at most `size` can be pending


@pytest.fixture(scope="module")
def counted_walks():
    """Check every careful walk's step count (the fast walk is bounded by its counter)."""
    real = device_module.walk_chain
    seen: list[int] = []

    def walk(head, *, desc, size, ram, indirect):
        w = real(head, desc=desc, size=size, ram=ram, indirect=indirect)
        assert w.visited <= size + 2
        seen.append(w.visited)
        return w

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device_module, "walk_chain", walk)
        yield seen


@pytest.mark.parametrize("holes", [(), (HOLE,)], ids=["one-region", "with-hole"])
@settings(max_examples=150, deadline=None)
@given(r=rings(), policy=st.sampled_from(ErrorPolicy), indirect=_mostly(st.just(True),
                                                                      st.just(False)))
def test_structured_garbage_gives_chains_or_violations(counted_walks, holes, r, policy,
                                                       indirect) -> None:
    with GuestMemory.create(RAM, holes=holes) as memory:
        desc, avail, _, _ = split_layout(0, r["size"])
        memory.write(desc, b"".join(DESC.pack(*d) for d in r["descs"]))
        for gpa, table in zip(TABLES, r["tables"], strict=True):
            if memory.contains(gpa, 16 * len(table)):
                memory.write(gpa, b"".join(DESC.pack(*d) for d in table))
        memory.write(avail + 2, U16.pack(r["idx"]))
        memory.write(avail + 4, b"".join(U16.pack(h) for h in r["ring"]))
        _drain(memory, r["size"], policy, indirect, r["start"])


@settings(max_examples=150, deadline=None)
@given(size=st.sampled_from([1, 2, 4, 8, 16]), data=st.data(),
       policy=st.sampled_from(ErrorPolicy), indirect=st.booleans())
def test_raw_bytes_give_chains_or_violations(counted_walks, size, data, policy,
                                             indirect) -> None:
    desc, avail, _, _ = split_layout(0, size)
    table = data.draw(st.binary(min_size=16 * size, max_size=16 * size), label="table")
    ring = data.draw(st.binary(min_size=4 + 2 * size, max_size=4 + 2 * size), label="avail")
    heap = data.draw(st.binary(min_size=0x100, max_size=0x100), label="tables")
    sane_idx = data.draw(st.booleans(), label="sane avail idx")
    with GuestMemory.create(RAM) as memory:
        memory.write(desc, table)
        memory.write(avail, ring)
        if sane_idx:
            memory.write(avail + 2, U16.pack(data.draw(st.integers(1, size))))
        for gpa in TABLES:
            memory.write(gpa, heap)
        _drain(memory, size, policy, indirect)
