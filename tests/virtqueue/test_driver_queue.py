"""The driver end: Linux virtio_ring.c behaviour, and its checks of what the device wrote."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from protocol.errors import DeviceViolation, UsageError
from protocol.rules import RULES
from protocol.split_ring import DescFlags
from virtqueue.device import DeviceQueue
from virtqueue.driver import DriverQueue, QueueBroken, QueueFull
from virtqueue.layout import DESC, U16, USED_ELEM, split_layout
from virtqueue.memory import GuestMemory

N = 4
IND = (0x4000, 0x1000)
BUF = 0x8000


class PlainMemory:
    """Only read/write/check/contains, like QEMU's RAM over qtest: no views."""

    def __init__(self, memory: GuestMemory) -> None:
        self._m = memory
        self.writes = 0

    def read(self, gpa: int, length: int) -> bytes:
        return self._m.read(gpa, length)

    def write(self, gpa: int, data) -> None:
        self.writes += 1
        self._m.write(gpa, data)

    def check(self, gpa: int, length: int) -> None:
        self._m.check(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        return self._m.contains(gpa, length)


@pytest.fixture
def memory():
    with GuestMemory.create(0x10000) as m:
        yield m


def make(memory, *, size=N, event_idx=False, **kw) -> tuple[DriverQueue, dict]:
    desc, avail, used, _ = split_layout(0, size)
    where = {"desc": desc, "avail": avail, "used": used}
    q = DriverQueue(index=2, size=size, memory=memory, event_idx=event_idx, indirect=True,
                    indirect_area=IND, **where, **kw)
    return q, where


def device_for(memory, where, size=N, **kw) -> DeviceQueue:
    return DeviceQueue(index=2, size=size, memory=memory, indirect=True, **where, **kw)


def u16(memory, gpa: int) -> int:
    return U16.unpack(memory.read(gpa, 2))[0]


def test_add_writes_linux_layout_on_memory_without_views(memory) -> None:
    plain = PlainMemory(memory)
    q, where = make(plain)
    head = q.add([(BUF, 10)], [(BUF + 0x100, 20), (BUF + 0x200, 30)], "a")
    assert head == 0 and q.num_free == N - 3
    descs = [DESC.unpack(memory.read(where["desc"] + 16 * i, 16)) for i in range(3)]
    nxt, wr = int(DescFlags.NEXT), int(DescFlags.WRITE)
    assert descs == [(BUF, 10, nxt, 1), (BUF + 0x100, 20, nxt | wr, 2), (BUF + 0x200, 30, wr, 3)]
    assert u16(memory, where["avail"] + 2) == 1 and u16(memory, where["avail"] + 4) == 0
    head2 = q.add([], [(BUF, 1)], "b", use_indirect=True)
    assert head2 == 3 and q.num_free == 0
    table_addr, table_len, flags, _ = DESC.unpack(memory.read(where["desc"] + 48, 16))
    assert (table_addr, table_len, flags) == (IND[0] + 3 * (IND[1] // N), 16,
                                              int(DescFlags.INDIRECT))
    assert DESC.unpack(memory.read(table_addr, 16)) == (BUF, 1, wr, 0)
    dev = device_for(memory, where)
    assert dev.pop().writable_len == 50 and dev.pop().indirect


def test_queue_full_leaves_state_alone_and_notifies_like_linux(memory) -> None:
    kicks = []
    q, _ = make(memory, notify=kicks.append)
    q.add([(BUF, 1)] * 3, [], "a")
    with pytest.raises(QueueFull):
        q.add([(BUF, 1)], [(BUF, 1)], "b")
    assert kicks == [2]  # Linux forces a notify when a buffer with out parts does not fit
    with pytest.raises(QueueFull):
        q.add([], [(BUF, 1), (BUF, 1)], "c")
    assert kicks == [2] and q.num_free == 1 and q.avail_idx_shadow == 1
    assert q.add([], [(BUF, 1)], "d") == 3


@pytest.mark.parametrize(("args", "kw"), [
    (([], [], "t"), {}),
    (([(BUF, 1)], [], None), {}),
    (([(-1, 1)], [], "t"), {}),
    (([(BUF, 1 << 32)], [], "t"), {}),
    (([(1 << 64, 1)], [], "t"), {}),
    (([(BUF, 1)] * (N + 1), [], "t"), {"use_indirect": True}),  # longer than the queue
])
def test_add_rejects_bad_arguments(memory, args, kw) -> None:
    q, _ = make(memory)
    with pytest.raises(UsageError):
        q.add(*args, **kw)
    assert q.num_free == N and q.avail_idx_shadow == 0


def test_indirect_needs_feature_area_and_room(memory) -> None:
    desc, avail, used, _ = split_layout(0, N)
    q = DriverQueue(index=0, size=N, desc=desc, avail=avail, used=used, memory=memory)
    with pytest.raises(UsageError):
        q.add([(BUF, 1)], [], "t", use_indirect=True)
    q2 = DriverQueue(index=0, size=N, desc=desc, avail=avail, used=used, memory=memory,
                     indirect=True, indirect_area=(IND[0], 32 * N))  # 2 entries per head
    with pytest.raises(UsageError):
        q2.add([(BUF, 1)] * 3, [], "t", use_indirect=True)
    with pytest.raises(UsageError):
        DriverQueue(index=0, size=N, desc=desc, avail=avail, used=used, memory=memory,
                    indirect=True, indirect_area=(IND[0], 8 * N))
    with pytest.raises(UsageError):
        DriverQueue(index=0, size=12, desc=desc, avail=avail, used=used, memory=memory)


def _used(memory, where, slot: int, head: int, length: int, idx: int) -> None:
    memory.write(where["used"] + 4 + 8 * slot, USED_ELEM.pack(head, length))
    memory.write(where["used"] + 2, U16.pack(idx))


@pytest.mark.parametrize(("rule", "head", "length", "idx"), [
    ("US-02", N, 0, 1),  # id beyond the queue
    ("US-03", 2, 0, 1),  # id is a descriptor of the chain, not its head
    ("US-04", 0, 11, 1),  # more than the 10 writable bytes
    ("US-05", 0, 0, 2),  # two used entries for one buffer in flight
])
def test_reject_bad_used_element(memory, rule, head, length, idx) -> None:
    q, where = make(memory)
    q.add([(BUF, 5)], [(BUF + 0x100, 4), (BUF + 0x200, 6)], "a")
    _used(memory, where, 0, head, length, idx)
    with capture_logs() as logs, pytest.raises(DeviceViolation) as info:
        q.get_buf()
    assert info.value.rule_id == rule and info.value.section == RULES[rule].section
    assert RULES[rule].side == "device"
    assert [(e["event"], e["rule_id"], e["side"]) for e in logs] == [("vq.reject", rule,
                                                                       "device")]
    assert q.broken and q.get_buf() is None
    with pytest.raises(QueueBroken):
        q.add([(BUF, 1)], [], "b")
    q.reset()
    assert not q.broken and q.num_free == N and q.in_flight == 0
    assert u16(memory, where["used"] + 2) == 0  # rings zeroed again


def test_get_buf_returns_tokens_and_frees_descriptors(memory) -> None:
    q, where = make(memory)
    dev = device_for(memory, where)
    q.add([(BUF, 1)], [], "a")
    q.add([], [(BUF, 8), (BUF + 8, 8)], "b")
    a, b = dev.pop(), dev.pop()
    dev.push(b.head, 9)  # out of order
    dev.push(a.head, 0)
    assert q.get_buf() == ("b", 9) and q.num_free == N - 1
    assert q.get_buf() == ("a", 0) and q.num_free == N
    assert q.get_buf() is None
    assert q.add([(BUF, 1)] * N, [], "c") == a.head  # the free list is reused


def test_detach_unused_takes_back_everything_and_winds_avail_idx(memory) -> None:
    q, where = make(memory)
    for t in "abc":
        q.add([(BUF, 1)], [], t)
    assert q.detach_unused() == ["a", "b", "c"]
    assert q.num_free == N and q.in_flight == 0 and u16(memory, where["avail"] + 2) == 0


def test_callbacks_without_event_idx_use_avail_flags(memory) -> None:
    q, where = make(memory)
    q.disable_cb()
    assert u16(memory, where["avail"]) == 1
    assert q.enable_cb() is True and u16(memory, where["avail"]) == 0
    dev = device_for(memory, where)
    q.add([(BUF, 1)], [], "a")
    dev.push(dev.pop().head, 0)
    assert q.enable_cb() is False  # a used buffer is pending


def test_callbacks_with_event_idx_use_used_event(memory) -> None:
    q, where = make(memory, event_idx=True)
    used_event = where["avail"] + 4 + 2 * N
    dev = device_for(memory, where, event_idx=True)
    for t in "ab":
        q.add([(BUF, 1)], [], t)
    for _ in range(2):
        dev.push(dev.pop().head, 0)
    assert q.get_buf() == ("a", 0) and u16(memory, used_event) == 1  # Linux: last_used_idx
    q.disable_cb()
    assert u16(memory, used_event) == 0 and u16(memory, where["avail"]) == 0  # the "hack"
    assert q.get_buf() == ("b", 0) and u16(memory, used_event) == 0  # disabled: not moved
    for t in "cdef":
        q.add([(BUF, 1)], [], t)
    assert q.enable_cb_delayed() is True
    assert u16(memory, used_event) == 2 + 3  # last_used + 3/4 of the 4 outstanding


def test_kick_follows_used_flags_and_avail_event(memory) -> None:
    kicks = []
    q, where = make(memory, notify=kicks.append)
    dev = device_for(memory, where)
    q.add([(BUF, 1)], [], "a")
    assert q.kick() is True and kicks == [2]
    dev.disable_notification()
    q.add([(BUF, 1)], [], "b")
    assert q.kick() is False and kicks == [2]
    qe, where_e = make(memory, event_idx=True, notify=kicks.append)
    deve = device_for(memory, where_e, event_idx=True)
    assert deve.enable_notification() is False  # avail_event = 0
    qe.add([(BUF, 1)], [], "a")
    qe.add([(BUF, 1)], [], "b")
    with capture_logs() as logs:
        assert qe.kick_prepare() is True  # 0 in [0, 2)
    assert logs == [{"event": "vq.kick", "log_level": "debug", "queue": 2, "old": 0, "new": 2,
                     "avail_event": 0, "used_flags": None, "event_idx": True, "notify": True}]
    qe.add([(BUF, 1)], [], "c")
    assert qe.kick_prepare() is False  # 0 not in [2, 3)


def test_forced_kick_before_the_added_count_wraps(memory) -> None:
    kicks = []
    q, _ = make(memory, notify=kicks.append)
    q.num_added = 0xFFFE
    q.add([(BUF, 1)], [], "a")
    assert kicks == [2] and q.num_added == 0


def test_initial_idx_starts_every_index_there(memory) -> None:
    q, where = make(memory, event_idx=True, initial_idx=0xFFFF)
    assert u16(memory, where["avail"] + 2) == 0xFFFF == u16(memory, where["used"] + 2)
    dev = device_for(memory, where, event_idx=True, next_avail=0xFFFF, next_used=0xFFFF)
    for t in "ab":
        q.add([], [(BUF, 4)], t)
    for _ in range(2):
        chain = dev.pop()
        dev.push(chain.head, 4)
    assert dev.next_avail == 1 == dev.next_used
    assert [q.get_buf(), q.get_buf(), q.get_buf()] == [("a", 4), ("b", 4), None]


def test_add_event_fields(memory) -> None:
    q, _ = make(memory)
    with capture_logs() as logs:
        q.add([(BUF, 3)], [(BUF + 16, 4)], "a", use_indirect=True)
    assert logs == [{"event": "vq.add", "log_level": "debug", "queue": 2, "head": 0,
                     "readable": [[BUF, 3]], "writable": [[BUF + 16, 4]], "indirect": True,
                     "descs": 1, "avail_idx": 1, "num_free": N - 1}]
