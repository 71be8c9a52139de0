"""Both ends over one guest memory, driven by hypothesis against a simple model.

Any interleaving of driver adds, kicks and reaps with device pops, pushes (in any order) and
notification calls, with random chain shapes (direct and indirect, 1..9 buffers, any
readable/writable mix), small queues and indices that start just below the 16-bit wrap:

* every token comes back exactly once, in push order, with the written length;
* the device reads exactly the bytes the driver put in the readable buffers, and the driver
  reads back exactly the bytes the device wrote;
* kick_prepare and needs_interrupt decide as a naive model of notification suppression says
  (with and without EVENT_IDX), and never lose a wake-up: once the device (driver) has declared
  itself idle, work waiting for it always gets a kick (interrupt).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from protocol.errors import UsageError
from protocol.split_ring import VRING_USED_F_NO_NOTIFY, avail_event_offset, used_event_offset
from virtqueue import events
from virtqueue.chain import Segment
from virtqueue.device import DeviceQueue
from virtqueue.driver import DriverQueue, QueueFull
from virtqueue.layout import U16, split_layout
from virtqueue.memory import GuestMemory

RAM = 0x40000
IND = 0x8000
IND_LEN = 0x1000  # 16 heads x 16 entries at most
DATA = 0x10000
SLOT = 0x1000
SLOTS = 16
MAX_SEG = 64


def naive_need_event(event: int, new: int, old: int) -> bool:
    """Reference: was entry ``event`` one of those written, old .. new - 1 (mod 2^16)?"""
    k = old
    while k != new:
        if k == event:
            return True
        k = (k + 1) & 0xFFFF
    return False


@dataclass
class Sent:
    head: int
    slot: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    payload: bytes
    descs: int
    indirect: bool


class RingMachine(RuleBasedStateMachine):
    """A DriverQueue and a DeviceQueue sharing rings, checked against deques."""

    mem: GuestMemory | None = None

    @initialize(size=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans(),
                start=st.sampled_from([0, *range(0xFFFF - 6, 0x10000)]))
    def setup(self, size: int, event_idx: bool, start: int) -> None:
        self.events_were = events.set_enabled(False)
        self.mem = GuestMemory.create(RAM)
        desc, avail, used, _ = split_layout(0, size)
        self.size, self.event_idx = size, event_idx
        self.used_event_gpa = avail + used_event_offset(size)
        self.avail_event_gpa = used + avail_event_offset(size)
        self.used_flags_gpa = used
        common = {"index": 1, "size": size, "desc": desc, "avail": avail, "used": used,
                  "memory": self.mem, "event_idx": event_idx, "indirect": True}
        self.drv = DriverQueue(**common, indirect_area=(IND, IND_LEN), initial_idx=start)
        self.dev = DeviceQueue(**common, next_avail=start, next_used=start)
        self.free_slots = list(range(SLOTS))
        self.model_free = size
        self.sent: dict[str, Sent] = {}  # token -> what the driver published
        self.published: deque[str] = deque()  # added, not popped
        self.popped: dict[int, tuple[str, object]] = {}  # head -> (token, chain)
        self.used: deque[tuple[str, int, bytes]] = deque()  # pushed, not reaped
        self.count = 0
        self.avail_idx = self.kick_idx = start
        self.used_idx = self.irq_idx = start
        self.irq_decided = False
        self.dev_notify = True  # used.flags without NO_NOTIFY
        self.dev_idle = False  # enable_notification said "no more work": waiting for a kick
        self.drv_cb = True  # avail.flags without NO_INTERRUPT
        self.drv_idle = False  # enable_cb said "nothing used": waiting for an interrupt

    def teardown(self) -> None:
        if self.mem is not None:
            events.set_enabled(self.events_were)
            del self.dev
            self.mem.close()

    def _u16(self, gpa: int) -> int:
        return U16.unpack(self.mem.read(gpa, 2))[0]

    # ---- driver -------------------------------------------------------------------------
    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        fits = st.integers(1, min(self.size, 8))
        total = data.draw(st.one_of(fits, fits, fits, st.integers(1, 9)), label="buffers")
        r = data.draw(st.integers(0, total), label="readable")
        w = total - r
        lens = data.draw(st.lists(st.integers(1, MAX_SEG), min_size=r + w, max_size=r + w))
        use_indirect = data.draw(st.booleans(), label="indirect")
        slot = self.free_slots[0]
        segs, addr = [], DATA + slot * SLOT
        for n in lens:
            segs.append(Segment(addr, n))
            addr += n + data.draw(st.integers(0, 8), label="gap")
        readable, writable = tuple(segs[:r]), tuple(segs[r:])
        token = f"t{self.count}"
        needed = 1 if use_indirect else r + w
        if r + w > self.size:
            with pytest.raises(UsageError):
                self.drv.add(readable, writable, token, use_indirect=use_indirect)
            return
        if needed > self.model_free:
            with pytest.raises(QueueFull):
                self.drv.add(readable, writable, token, use_indirect=use_indirect)
            return
        payload = data.draw(st.binary(min_size=sum(lens[:r]), max_size=sum(lens[:r])))
        pos = 0
        for seg in readable:
            self.mem.write(seg.addr, payload[pos:pos + seg.len])
            pos += seg.len
        head = self.drv.add(readable, writable, token, use_indirect=use_indirect)
        self.count += 1
        self.free_slots.pop(0)
        self.model_free -= needed
        self.sent[token] = Sent(head, slot, readable, writable, payload, needed, use_indirect)
        self.published.append(token)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if self.avail_idx == 0:
            event("avail idx wrapped")

    @rule()
    def kick(self) -> None:
        old, new = self.kick_idx, self.avail_idx
        if self.event_idx:
            expected = naive_need_event(self._u16(self.avail_event_gpa), new, old)
        else:
            expected = self.dev_notify
            assert (self._u16(self.used_flags_gpa) == VRING_USED_F_NO_NOTIFY) != expected
        got = self.drv.kick_prepare()
        assert got == expected
        if self.dev_idle and self.published:
            assert got, "lost kick: the device is idle and chains wait in the avail ring"
        if got:
            self.dev_idle = False
        self.kick_idx = new

    @rule()
    def get_buf(self) -> None:
        got = self.drv.get_buf()
        if not self.used:
            assert got is None
            return
        token, n, payload = self.used.popleft()
        assert got == (token, n)
        sent = self.sent.pop(token)
        back = b"".join(self.mem.read(s.addr, s.len) for s in sent.writable)
        assert back[:n] == payload
        self.free_slots.append(sent.slot)
        self.model_free += sent.descs

    @rule()
    def disable_cb(self) -> None:
        self.drv.disable_cb()
        self.drv_cb = False
        self.drv_idle = False

    @rule()
    def enable_cb(self) -> None:
        idle = self.drv.enable_cb()
        assert idle == (not self.used)
        self.drv_cb = True
        self.drv_idle = idle

    # ---- device -------------------------------------------------------------------------
    @rule()
    def pop(self) -> None:
        chain = self.dev.pop()
        self.dev_idle = False
        if not self.published:
            assert chain is None
            return
        token = self.published.popleft()
        sent = self.sent[token]
        assert chain.head == sent.head and chain.violation is None
        assert (chain.readable, chain.writable, chain.indirect) == (
            sent.readable, sent.writable, sent.indirect)
        assert chain.readable_len == len(sent.payload)
        assert chain.writable_len == sum(s.len for s in sent.writable)
        assert chain.read(self.mem) == sent.payload
        self.popped[chain.head] = (token, chain)

    @precondition(lambda self: bool(getattr(self, "popped", None)))
    @rule(data=st.data())
    def push(self, data: st.DataObject) -> None:
        head = data.draw(st.sampled_from(sorted(self.popped)), label="head")
        token, chain = self.popped.pop(head)
        n = data.draw(st.integers(0, chain.writable_len), label="written")
        payload = data.draw(st.binary(min_size=n, max_size=n))
        assert chain.write(self.mem, payload) == n
        self.dev.push(head, n)
        self.used.append((token, n, payload))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.used_idx == 0:
            event("used idx wrapped")

    @rule()
    def needs_interrupt(self) -> None:
        old, new = self.irq_idx, self.used_idx
        if not self.event_idx:
            expected = new != old and self.drv_cb
        elif not self.irq_decided:
            expected = new != old
        else:
            expected = naive_need_event(self._u16(self.used_event_gpa), new, old)
        got = self.dev.needs_interrupt()
        assert got == expected
        if self.drv_idle and self.used:
            assert got, "lost interrupt: the driver is idle and used buffers wait"
        if got:
            self.drv_idle = False
        self.irq_idx, self.irq_decided = new, True

    @rule()
    def disable_notification(self) -> None:
        self.dev.disable_notification()
        if not self.event_idx:
            self.dev_notify = False
        self.dev_idle = False

    @rule()
    def enable_notification(self) -> None:
        more = self.dev.enable_notification()
        assert more == bool(self.published)
        self.dev_notify = True
        self.dev_idle = not more

    @precondition(lambda self: self.mem is not None
                  and not (self.published or self.popped or self.used))
    @rule(data=st.data(), rounds=st.integers(1, 24))
    def round_trips(self, data: st.DataObject, rounds: int) -> None:
        """Several add/pop/push/reap cycles in one step: moves every index on quickly."""
        for _ in range(rounds):
            self.add(data)
            self.pop()
            if self.popped:
                self.push(data)
            self.get_buf()

    # ---- invariants ---------------------------------------------------------------------
    @invariant()
    def counts_agree(self) -> None:
        if self.mem is None:
            return
        assert self.drv.num_free == self.model_free
        assert self.drv.in_flight == len(self.sent)
        assert self.dev.in_flight == len(self.popped)
        assert set(self.dev.in_flight_heads) == set(self.popped)


RingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=250,
                                         deadline=None)
TestRingMachine = RingMachine.TestCase
