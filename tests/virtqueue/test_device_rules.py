"""Device-end validation: one hand-built bad layout per rule, under each of the three policies.

Every case publishes a bad chain first and a good chain (head 7) after it, then checks that
``pop`` names the rule (ID, section, offending values) and that the queue's next behaviour is the
policy's (virtqueue/policy.py): needs-reset raises once and breaks the queue; truncate returns
the valid prefix with ``violation`` set (or skips when there is none); skip returns the bad head
used with length 0 (or nothing, when the head itself is bad) and pops the good chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from protocol.errors import DeviceViolation, DriverViolation, UsageError
from protocol.rules import RULES
from virtqueue import events
from virtqueue.chain import Segment
from virtqueue.device import DeviceQueue
from virtqueue.memory import GuestMemory
from virtqueue.policy import ErrorPolicy

try:  # tests/ as plain directories (pytest's default) or as packages
    from vq_ringkit import INDIRECT, NEXT, WRITE, RawRing
except ModuleNotFoundError:  # pragma: no cover - depends on the layout
    from tests.virtqueue.vq_ringkit import INDIRECT, NEXT, WRITE, RawRing

N = 8
GOOD = N - 1
RAM = 1 << 32  # sparse: costs nothing, and lets DC-09 use 4 GiB buffers inside RAM
OUT = 1 << 33  # not RAM
DATA = 0x10000
TABLE = 0x20000
L = 32


def S(i: int) -> int:
    """Address of test buffer i."""
    return DATA + 0x100 * i


@pytest.fixture(scope="module")
def memory():
    with GuestMemory.create(RAM) as m:
        yield m


@dataclass
class Case:
    id: str
    rule: str
    build: Callable[[RawRing], None]
    prefix: tuple[tuple[Segment, ...], tuple[Segment, ...], bool] | None = None
    """(readable, writable, indirect) that truncate keeps; None when nothing valid came first."""
    head: int = 0
    head_valid: bool = True
    indirect: bool = True
    pre_pops: int = 0
    values: dict = field(default_factory=dict)
    """Some of the offending values the violation must carry."""


def _r(*idx: int) -> tuple[Segment, ...]:
    return tuple(Segment(S(i), L) for i in idx)


def _pub(ring: RawRing, head: int = 0) -> None:
    ring.publish(head)


def dc01(r):
    r.set_desc(0, S(0), L, NEXT, 9)
    _pub(r)


def dc02(r):
    r.set_desc(0, S(0), L, NEXT, 1)
    r.set_desc(1, S(1), L, NEXT, 0)
    _pub(r)


def _readable_table(count: int, loop_to: int | None = None) -> list[tuple[int, int, int, int]]:
    entries = [(S(j), L, NEXT, j + 1) for j in range(count)]
    last = entries[-1]
    entries[-1] = (last[0], L, NEXT, loop_to) if loop_to is not None else (last[0], L, 0, 0)
    return entries


def dc04(r):
    n = r.table(TABLE, _readable_table(N + 1))
    r.set_desc(0, TABLE, n, INDIRECT)
    _pub(r)


def dc05(r):
    r.chain(0, [(S(0), L, 0), (S(1), 0, 0)])
    _pub(r)


def dc05_first(r):
    r.set_desc(0, S(0), 0, 0)
    _pub(r)


def dc06(r):
    r.chain(0, [(S(0), L, WRITE), (S(1), L, 0)])
    _pub(r)


def dc07(r):
    r.chain(0, [(S(0), L, 0), (OUT, L, 0)])
    _pub(r)


def dc07_straddle(r):
    r.set_desc(0, RAM - 16, L, WRITE)
    _pub(r)


def dc08(r):
    r.chain(0, [(S(0), L, 0), ((1 << 64) - 16, L, 0)])
    _pub(r)


def dc09(r):
    r.chain(0, [(0, 0xFFFF_FFFF, 0), (0, 2, 0)])
    _pub(r)


def in01(r):
    n = r.table(TABLE, [(S(1), L, 0, 0)])
    r.set_desc(0, S(0), L, NEXT, 1)
    r.set_desc(1, TABLE, n, INDIRECT)
    _pub(r)


def in02(r):
    r.set_desc(0, S(0), L, NEXT, 1)
    r.set_desc(1, TABLE, 0, INDIRECT)
    _pub(r)


def in03(r):
    r.set_desc(0, TABLE, 24, INDIRECT)
    _pub(r)


def in04(r):
    r.set_desc(0, TABLE, 16 * 65537, INDIRECT)
    _pub(r)


def in05(r):
    r.set_desc(0, OUT, 32, INDIRECT)
    _pub(r)


def in05_overflow(r):
    r.set_desc(0, (1 << 64) - 16, 32, INDIRECT)
    _pub(r)


def in06(r):
    n = r.table(TABLE, [(S(0), L, NEXT, 1), (TABLE, 32, INDIRECT, 0)])
    r.set_desc(0, TABLE, n, INDIRECT)
    _pub(r)


def in07(r):
    n = r.table(TABLE, [(S(0), L, 0, 0)])
    r.set_desc(0, TABLE, n, INDIRECT | NEXT, 1)
    r.set_desc(1, S(1), L, 0)
    _pub(r)


def in08(r):
    n = r.table(TABLE, _readable_table(2, loop_to=0))
    r.set_desc(0, TABLE, n, INDIRECT)
    _pub(r)


def in09(r):
    n = r.table(TABLE, [(S(0), L, NEXT, 5), (S(1), L, 0, 0)])
    r.set_desc(0, TABLE, n, INDIRECT)
    _pub(r)


def av03(r):
    _pub(r, N)


def av04(r):
    r.set_desc(0, S(0), L, 0)
    r.publish(0, 0)


CASES = [
    Case("DC-01", "DC-01", dc01, (_r(0), (), False), values={"next": 9, "size": N}),
    Case("DC-02", "DC-02", dc02, (_r(0, 1), (), False), values={"next": 0, "index": 1}),
    Case("DC-04", "DC-04", dc04, (_r(*range(N)), (), True), values={"size": N}),
    Case("DC-05", "DC-05", dc05, (_r(0), (), False), values={"index": 1}),
    Case("DC-05-first", "DC-05", dc05_first, None, values={"index": 0}),
    Case("DC-06", "DC-06", dc06, ((), _r(0), False), values={"index": 1}),
    Case("DC-07", "DC-07", dc07, (_r(0), (), False), values={"addr": OUT, "len": L}),
    Case("DC-07-straddle", "DC-07", dc07_straddle, None, values={"addr": RAM - 16}),
    Case("DC-08", "DC-08", dc08, (_r(0), (), False), values={"addr": (1 << 64) - 16}),
    Case("DC-09", "DC-09", dc09, (((Segment(0, 0xFFFF_FFFF),)), (), False),
         values={"total": (1 << 32) + 1}),
    Case("IN-01", "IN-01", in01, (_r(0), (), False), indirect=False, values={"index": 1}),
    Case("IN-02", "IN-02", in02, (_r(0), (), False), values={"len": 0}),
    Case("IN-03", "IN-03", in03, None, values={"len": 24}),
    Case("IN-04", "IN-04", in04, None, values={"len": 16 * 65537}),
    Case("IN-05", "IN-05", in05, None, values={"addr": OUT}),
    Case("IN-05-overflow", "IN-05", in05_overflow, None),
    Case("IN-06", "IN-06", in06, (_r(0), (), True), values={"table": TABLE, "index": 1}),
    Case("IN-07", "IN-07", in07, None),
    Case("IN-08", "IN-08", in08, (_r(0, 1), (), True), values={"next": 0, "entries": 2}),
    Case("IN-09", "IN-09", in09, (_r(0), (), True), values={"next": 5, "entries": 2}),
    Case("AV-03", "AV-03", av03, None, head=N, head_valid=False, values={"head": N}),
    Case("AV-04", "AV-04", av04, None, head=0, head_valid=False, pre_pops=1,
         values={"head": 0}),
]


@pytest.mark.parametrize("policy", list(ErrorPolicy), ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reject_rule_under_policy(memory, case: Case, policy: ErrorPolicy) -> None:
    ring = RawRing(memory, N)
    case.build(ring)
    q = ring.device(indirect=case.indirect, policy=policy)
    for _ in range(case.pre_pops):
        assert q.pop() is not None
    ring.set_desc(GOOD, S(GOOD), L, WRITE)
    ring.publish(GOOD)
    used_start = ring.used_idx()
    with capture_logs() as logs:
        if policy is ErrorPolicy.NEEDS_RESET:
            with pytest.raises(DriverViolation) as info:
                q.pop()
            v = info.value
            assert q.broken
            assert q.pop() is None  # broken until reset
            assert q.next_avail == case.pre_pops  # nothing consumed
            assert ring.used_elems(used_start) == []
        else:
            chain = q.pop()
            assert chain is not None
            if policy is ErrorPolicy.TRUNCATE and case.prefix is not None:
                assert chain.head == case.head
                assert (chain.readable, chain.writable, chain.indirect) == case.prefix
                v = chain.violation
                assert chain.readable_len == sum(s.len for s in chain.readable)
                q.push(chain.head, 0)  # a truncated chain is a normal in-flight chain
                chain = q.pop()
                assert ring.used_elems(used_start) == [(case.head, 0)]
            else:
                expected_used = [(case.head, 0)] if case.head_valid else []
                assert ring.used_elems(used_start) == expected_used
                v = None
            assert chain.head == GOOD and chain.violation is None
            assert chain.writable == (Segment(S(GOOD), L),)
    assert v is None or v.rule_id == case.rule
    rejects = [e for e in logs if e["event"] == "vq.reject"]
    assert len(rejects) == 1
    assert rejects[0]["rule_id"] == case.rule
    assert rejects[0]["section"] == RULES[case.rule].section
    assert rejects[0]["policy"] == str(policy)
    assert rejects[0]["log_level"] == "warning"
    for key, value in case.values.items():
        assert rejects[0]["values"][key] == value, key
    if v is not None:
        assert v.section == RULES[case.rule].section
        assert str(v).startswith(f"[{case.rule}] ")


def test_needs_reset_queue_works_again_after_reset(memory) -> None:
    ring = RawRing(memory, N)
    dc01(ring)
    q = ring.device()
    with pytest.raises(DriverViolation, match=r"^\[DC-01\] a descriptor's next is not below "
                       r"the queue size \(virtio 2\.7\.5; head=0, index=0, next=9, size=8\)$"):
        q.pop()
    q.push(GOOD, 0)  # dropped on a broken queue, like QEMU
    assert ring.used_idx() == 0
    ring = RawRing(memory, N)  # the driver re-initialises its rings
    q.reset()
    assert not q.broken and q.next_avail == 0 and q.in_flight == 0
    ring.set_desc(0, S(0), L)
    ring.publish(0)
    assert q.pop().readable == _r(0)


@pytest.mark.parametrize("bogus", [N + 1, 0xFFFF, 0x8000])
@pytest.mark.parametrize("policy", list(ErrorPolicy), ids=str)
def test_reject_avail_idx_too_far_ahead(memory, policy: ErrorPolicy, bogus: int) -> None:
    """AV-01 (and AV-02: moving backwards is a huge u16 step forward)."""
    ring = RawRing(memory, N)
    ring.set_desc(0, S(0), L)
    ring.publish(0)
    ring.set_avail_idx(bogus)
    q = ring.device(policy=policy)
    with capture_logs() as logs:
        if policy is ErrorPolicy.NEEDS_RESET:
            with pytest.raises(DriverViolation) as info:
                q.pop()
            assert info.value.rule_id == "AV-01"
            assert info.value.values["avail_idx"] == bogus
            assert q.broken and q.pop() is None
        else:
            assert q.pop() is None
            assert q.pop() is None  # still bogus: nothing consumed, logged once
            assert q.next_avail == 0 and not q.broken
            ring.set_avail_idx(1)  # the driver fixes it
            assert q.pop().head == 0
    rejects = [e for e in logs if e["event"] == "vq.reject"]
    assert [e["rule_id"] for e in rejects] == ["AV-01"]


def test_skip_goes_on_across_several_bad_chains(memory) -> None:
    ring = RawRing(memory, N)
    ring.set_desc(0, S(0), 0)  # DC-05
    ring.set_desc(1, OUT, L)  # DC-07
    ring.set_desc(2, S(2), L)
    ring.publish(0, N + 3, 1, 2)  # the second entry is AV-03
    q = ring.device(policy="skip")
    with capture_logs() as logs:
        chain = q.pop()
    assert chain.head == 2 and q.next_avail == 4
    assert ring.used_elems() == [(0, 0), (1, 0)]
    assert [e["rule_id"] for e in logs if e["event"] == "vq.reject"] == ["DC-05", "AV-03",
                                                                          "DC-07"]


# ---- layouts that look odd but are valid -----------------------------------------------------

def _pop_one(memory, build, **kw):
    ring = RawRing(memory, N)
    build(ring)
    q = ring.device(**kw)
    chain = q.pop()
    assert chain is not None and chain.violation is None
    return chain


def test_accept_direct_descriptors_then_indirect(memory) -> None:
    """SPL-V-4: zero or more direct descriptors followed by one final INDIRECT descriptor."""
    def build(r):
        n = r.table(TABLE, [(S(2), L, WRITE, 0)])
        r.chain(0, [(S(0), L, 0), (S(1), L, WRITE), (TABLE, n, INDIRECT)])
        r.publish(0)
    chain = _pop_one(memory, build, indirect=True)
    assert chain.readable == _r(0) and chain.writable == _r(1, 2) and chain.indirect


def test_accept_write_flag_on_indirect_descriptor(memory) -> None:
    """SPL-V-3 / IN-12: the WRITE flag of the descriptor pointing at a table is ignored."""
    def build(r):
        n = r.table(TABLE + 8, [(S(0), L, NEXT, 1), (S(1), L, WRITE, 0)])  # IN-13: unaligned
        r.set_desc(0, TABLE + 8, n, INDIRECT | WRITE)
        r.publish(0)
    chain = _pop_one(memory, build, indirect=True)
    assert chain.readable == _r(0) and chain.writable == _r(1)


@pytest.mark.parametrize("indirect", [False, True])
def test_accept_chain_of_exactly_queue_size(memory, indirect: bool) -> None:
    """DC-03: N buffers is the longest valid chain, direct or indirect."""
    def build(r):
        if indirect:
            n = r.table(TABLE, _readable_table(N))
            r.set_desc(0, TABLE, n, INDIRECT)
        else:
            r.chain(0, [(S(j), L, 0) for j in range(N)])
        r.publish(0)
    chain = _pop_one(memory, build, indirect=indirect)
    assert chain.readable == _r(*range(N)) and chain.readable_len == N * L


def test_accept_total_of_exactly_4_gib_and_unknown_flags(memory) -> None:
    def build(r):
        r.chain(0, [(0, 0xFFFF_FFFF, 0x80), (0, 1, 0)])
        r.publish(0)
    chain = _pop_one(memory, build)
    assert chain.readable_len == 1 << 32


def test_multi_region_memory_checks_each_buffer() -> None:
    hole = (0x20000, 0x10000)
    with GuestMemory.create(0x40000, holes=[hole]) as m:
        ring = RawRing(m, N)
        ring.set_desc(0, 0x1F000, 0x1000, WRITE)  # last page below the hole
        ring.set_desc(1, 0x1F000, 0x1001, WRITE)  # one byte into the hole
        ring.set_desc(2, 0x30000, 0x10000, 0)  # the region above
        ring.publish(0, 1, 2)
        q = ring.device(policy="skip")
        assert q.pop().writable == (Segment(0x1F000, 0x1000),)
        assert q.pop().readable == (Segment(0x30000, 0x10000),)
        assert ring.used_elems() == [(1, 0)]


# ---- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "kw"), [
    ("CFG-01", {"size": 3}),
    ("CFG-01", {"size": 0}),
    ("CFG-01", {"size": 65536}),
    ("CFG-01", {"size": 16, "max_size": 8}),
    ("CFG-02", {"desc": 0x1008}),
    ("CFG-03", {"avail": 0x2001}),
    ("CFG-04", {"used": 0x3002}),
    ("CFG-05", {"used": RAM - 16}),
    ("CFG-05", {"desc": OUT}),
    ("CFG-07", {"used": (1 << 64) - 4}),
])
def test_reject_queue_configuration(memory, rule: str, kw: dict) -> None:
    args = {"index": 3, "size": N, "desc": 0x1000, "avail": 0x2000, "used": 0x3000,
            "memory": memory} | kw
    with pytest.raises(DriverViolation) as info:
        DeviceQueue(**args)
    assert info.value.rule_id == rule
    assert info.value.values["queue"] == 3


def test_reject_area_across_a_hole() -> None:
    with GuestMemory.create(0x40000, holes=[(0x20000, 0x10000)]) as m:
        with pytest.raises(DriverViolation) as info:
            DeviceQueue(index=0, size=512, desc=0x1F000, avail=0, used=0x3000, memory=m)
    assert info.value.rule_id == "CFG-05" and info.value.values["area"] == "desc"


def test_bad_arguments_are_usage_errors(memory) -> None:
    ring = RawRing(memory, N)
    with pytest.raises(UsageError):
        ring.device(policy="ignore")
    with pytest.raises(UsageError):
        ring.device(next_avail=70000)
    q = ring.device()
    with pytest.raises(UsageError):
        q.next_avail = -1


def test_device_end_needs_views_and_reports_used_writes(memory) -> None:
    class NoViews:
        def read(self, gpa, n):
            return memory.read(gpa, n)
    with pytest.raises(UsageError, match="view"):
        DeviceQueue(index=0, size=N, desc=0, avail=0x100, used=0x200, memory=NoViews())
    ring = RawRing(memory, N)
    ring.set_desc(0, S(0), L, WRITE)
    ring.publish(0)
    q = ring.device()
    dirty: list[tuple[int, int]] = []
    memory.add_write_observer(lambda gpa, n: dirty.append((gpa, n)))
    try:
        q.push(q.pop().head, 3)
        q.disable_notification()
    finally:
        memory.remove_write_observer(memory.write_observers[0])
    assert dirty == [(ring.used + 4, 8), (ring.used + 2, 2), (ring.used, 2)]


# ---- the device's own bugs -------------------------------------------------------------------

def test_push_of_head_not_in_flight_is_a_device_violation(memory) -> None:
    ring = RawRing(memory, N)
    ring.set_desc(0, S(0), L, WRITE)
    ring.publish(0)
    q = ring.device()
    for head in (1, N, -1):
        with pytest.raises(DeviceViolation) as info:
            q.push(head, 0)
        assert info.value.rule_id == "US-01"
    chain = q.pop()
    with pytest.raises(DeviceViolation) as info:
        q.push(chain.head, L + 1)
    assert info.value.rule_id == "US-04" and info.value.values["writable_len"] == L
    q.push(chain.head, L)
    with pytest.raises(DeviceViolation, match=r"^\[US-01\]"):
        q.push(chain.head, 0)  # twice
    assert ring.used_elems() == [(0, L)]


# ---- events ----------------------------------------------------------------------------------

def test_trace_events_and_off_switch(memory) -> None:
    ring = RawRing(memory, N)
    ring.chain(0, [(S(0), L, 0), (S(1), L, WRITE)])
    ring.publish(0)
    q = ring.device()
    with capture_logs() as logs:
        chain = q.pop()
        q.push(chain.head, 5)
        assert q.needs_interrupt()
    assert [e["event"] for e in logs] == ["vq.pop", "vq.push", "vq.interrupt"]
    pop, push, irq = logs
    assert pop["readable"] == [[S(0), L]] and pop["writable"] == [[S(1), L]]
    assert pop["head"] == 0 and pop["avail_idx"] == 1 and pop["next_avail"] == 1
    assert push == {"event": "vq.push", "log_level": "debug", "queue": 0, "head": 0,
                    "written": 5, "used_idx": 1}
    assert irq["old"] == 0 and irq["new"] == 1 and irq["notify"] is True
    ring.set_desc(2, S(2), L)
    ring.set_desc(3, S(3), 0)  # DC-05
    ring.publish(2, 3)
    with events.disabled(), capture_logs() as logs:
        chain = q.pop()
        q.push(chain.head, 0)
        q.needs_interrupt()
        with pytest.raises(DriverViolation):
            q.pop()
    assert [e["event"] for e in logs] == ["vq.reject"]  # rejections are always logged
    assert events.ENABLED
