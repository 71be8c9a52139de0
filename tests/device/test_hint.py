"""Free page hinting: the state table, and the device checked against a model of QEMU's code.

The model below is written the way QEMU's ``virtio-balloon.c`` reads (if/else on the status),
not as a table, so the device's table is checked against an independent statement of the same
behaviour. The state machine test drives the real device through virtio-mmio and a DriverQueue,
calling ``poll_queue`` directly (no trio tasks), so every step is deterministic.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from device.hint import (
    CMD_ID_MAX,
    CONFIG_VALUE,
    TRANSITIONS,
    FreePageHint,
    HintEvent,
    HintState,
    next_cmd_id,
)
from device.ranges import RangeSet
from protocol.balloon import CMD_ID_MIN
from protocol.balloon import BalloonQueue as Q
from protocol.features import BalloonFeature, TransportFeature, mask
from protocol.mmio import MmioReg
from protocol.status import DeviceStatus

try:
    from balloon_guest import PAGE_BASE, Guest
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.balloon_guest import PAGE_BASE, Guest

HINT_FEATURES = mask(BalloonFeature.FREE_PAGE_HINT, TransportFeature.VERSION_1)
CMD_ID_REG = int(MmioReg.CONFIG) + 8


# ---- the table ------------------------------------------------------------------------------
def test_table_is_total():
    assert set(TRANSITIONS) == {(s, e) for s in HintState for e in HintEvent}
    assert set(CONFIG_VALUE) == set(HintState)


def test_cmd_ids_start_after_min_and_wrap():
    h = FreePageHint()
    h.start()
    assert h.cmd_id == CMD_ID_MIN + 1  # QEMU increments before use
    assert next_cmd_id(CMD_ID_MAX) == CMD_ID_MIN
    h = FreePageHint(cmd_id=CMD_ID_MAX)
    h.start()
    assert h.cmd_id == CMD_ID_MIN and h.state is HintState.REQUESTED


def test_config_value_per_state():
    h = FreePageHint(cmd_id=0x80000005)
    expected = {HintState.STOP: 0, HintState.REQUESTED: 0x80000005, HintState.START: 0,
                HintState.DONE: 1}
    for state, value in expected.items():
        h.state = state
        assert h.config_value == value


def test_stale_stop_does_not_end_a_requested_round():
    h = FreePageHint()
    h.start()
    assert h.guest_cmd_id(0).new is HintState.REQUESTED
    assert h.guest_cmd_id(h.cmd_id).new is HintState.START
    assert h.guest_cmd_id(h.cmd_id).new is HintState.STOP  # any ID ends a started round


def test_missing_transition_raises_and_keeps_state(monkeypatch):
    h = FreePageHint(HintState.START)
    monkeypatch.delitem(TRANSITIONS, (HintState.START, HintEvent.HOST_DONE))
    with pytest.raises(Exception, match="no hinting transition from START"):
        h.done()
    assert h.state is HintState.START


# ---- the device against a model of QEMU -------------------------------------------------------
class QemuHintModel:
    """QEMU's free page hint code, transcribed as control flow."""

    def __init__(self) -> None:
        self.status = HintState.STOP
        self.cmd_id = CMD_ID_MIN
        self.hinted = RangeSet()
        self.round = RangeSet()
        self.calls: list[tuple[int, int]] = []

    def start(self) -> bool:
        self.cmd_id = CMD_ID_MIN if self.cmd_id == 0xFFFFFFFF else self.cmd_id + 1
        self.status = HintState.REQUESTED
        self.round = RangeSet()
        return True

    def stop(self) -> bool:
        if self.status != HintState.STOP:
            self.status = HintState.STOP
            return True
        return False

    def done(self) -> bool:
        if self.status != HintState.DONE:
            self.status = HintState.DONE
            return True
        return False

    def element(self, cmd_id: int | None, ranges: list[tuple[int, int]]) -> None:
        if cmd_id is not None:
            if self.status == HintState.REQUESTED and cmd_id == self.cmd_id:
                self.status = HintState.START
            elif self.status == HintState.START:
                self.status = HintState.STOP
        if ranges and self.status == HintState.START:
            for addr, n in ranges:
                self.hinted.add(addr, addr + n)
                self.round.add(addr, addr + n)
                self.calls.append((addr, n))

    def config(self) -> int:
        return {HintState.REQUESTED: self.cmd_id, HintState.DONE: 1}.get(self.status, 0)


page_ranges = st.lists(
    st.tuples(st.integers(0, 1023), st.integers(1, 8)).map(
        lambda t: (PAGE_BASE + t[0] * 4096, t[1] * 4096)),
    min_size=1, max_size=4)


@settings(max_examples=60, stateful_step_count=30)
class HintMachine(RuleBasedStateMachine):
    @initialize(start_near_wrap=st.booleans())
    def setup(self, start_near_wrap):
        self.g = Guest(features=HINT_FEATURES)
        self.g.init()
        self.model = QemuHintModel()
        if start_near_wrap:  # exercise the wrap of command IDs within a few rounds
            self.g.device.hint.cmd_id = self.model.cmd_id = CMD_ID_MAX - 1
        self.calls: list[tuple[int, int]] = []
        self.g.device.on_hint = lambda gpa, n: self.calls.append((gpa, n))

    def teardown(self):
        if hasattr(self, "g"):
            self.g.mem.close()

    def _config_change(self, verb, expect_notify: bool) -> None:
        gen = self.g.r(MmioReg.CONFIG_GENERATION)
        verb()
        assert self.g.r(MmioReg.CONFIG_GENERATION) == gen + int(expect_notify)

    @rule()
    def host_start(self):
        expect = self.model.start()
        gen = self.g.r(MmioReg.CONFIG_GENERATION)
        assert self.g.device.hint_start() == self.model.cmd_id
        assert self.g.r(MmioReg.CONFIG_GENERATION) == gen + int(expect)

    @rule()
    def host_stop(self):
        self._config_change(self.g.device.hint_stop, self.model.stop())

    @rule()
    def host_done(self):
        self._config_change(self.g.device.hint_done, self.model.done())

    def _send(self, cmd_id: int | None, ranges: list[tuple[int, int]]) -> None:
        readable = [self.g.alloc(struct.pack("<I", cmd_id))] if cmd_id is not None else []
        self.g.send(Q.FREE_PAGE, readable, ranges)
        self.g.device.poll_queue(Q.FREE_PAGE)
        assert [n for _, n in self.g.used(Q.FREE_PAGE)] == [0]
        self.model.element(cmd_id, ranges)

    @rule(ranges=st.one_of(st.just([]), page_ranges))
    def guest_current_id(self, ranges):
        self._send(self.model.cmd_id, ranges)

    @rule(cmd_id=st.sampled_from([0, 1, 2, CMD_ID_MIN, 0xFFFFFFFF]), ranges=page_ranges)
    def guest_other_id(self, cmd_id, ranges):
        self._send(cmd_id, ranges)

    @rule(ranges=page_ranges)
    def guest_hints(self, ranges):
        self._send(None, ranges)

    @invariant()
    def matches_model(self):
        if not hasattr(self, "g"):
            return
        d = self.g.device
        assert d.hint.state == self.model.status
        assert d.hint.cmd_id == self.model.cmd_id
        assert self.g.mmio.read32(CMD_ID_REG) == self.model.config()
        assert d.hinted == self.model.hinted
        assert d.hinted_round == self.model.round
        assert self.calls == self.model.calls
        assert d.needs_reset is None


TestHintMachine = HintMachine.TestCase


# ---- violations on free_page_vq ----------------------------------------------------------------
def _hint_guest(**kw) -> Guest:
    g = Guest(features=HINT_FEATURES, **kw)
    g.init()
    g.device.hint_start()
    return g


def test_short_cmd_id_needs_reset():
    g = _hint_guest()
    g.send(Q.FREE_PAGE, [g.alloc(b"\x01\x00")], [(PAGE_BASE, 4096)])  # 2 bytes: BL-16
    g.device.poll_queue(Q.FREE_PAGE)
    assert g.device.needs_reset.rule_id == "BL-16"
    assert g.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert g.used(Q.FREE_PAGE) == []  # QEMU pushes nothing once broken
    assert g.device.hinted.total == 0


def test_short_cmd_id_under_skip_is_returned_untouched():
    g = _hint_guest(policy="skip")
    g.device.hint.state = HintState.START
    g.send(Q.FREE_PAGE, [g.alloc(b"\x01\x00")], [(PAGE_BASE, 4096)])
    g.device.poll_queue(Q.FREE_PAGE)
    assert len(g.used(Q.FREE_PAGE)) == 1
    assert g.device.hint.state is HintState.START and g.device.hinted.total == 0
    assert g.device.needs_reset is None


def test_short_cmd_id_under_truncate_keeps_the_hints():
    g = _hint_guest(policy="truncate")
    g.device.hint.state = HintState.START
    g.send(Q.FREE_PAGE, [g.alloc(b"\x01\x00")], [(PAGE_BASE, 4096)])
    g.device.poll_queue(Q.FREE_PAGE)
    assert len(g.used(Q.FREE_PAGE)) == 1
    assert g.device.hint.state is HintState.START and g.device.hinted.total == 4096


def test_long_cmd_id_uses_first_four_bytes_like_qemu():
    g = _hint_guest()
    g.send(Q.FREE_PAGE, [g.alloc(struct.pack("<II", g.device.hint.cmd_id, 7))])
    g.device.poll_queue(Q.FREE_PAGE)
    assert g.device.hint.state is HintState.START and g.device.needs_reset is None


def test_hint_verbs_do_nothing_without_negotiation():
    g = Guest(features=HINT_FEATURES)
    g.init(accept=mask(TransportFeature.VERSION_1))
    gen = g.r(MmioReg.CONFIG_GENERATION)
    assert g.device.hint_start() is None
    assert not g.device.hint_stop() and not g.device.hint_done()
    assert g.device.hint.state is HintState.STOP
    assert g.r(MmioReg.CONFIG_GENERATION) == gen


def test_reset_stops_hinting():
    g = _hint_guest()
    g.w(MmioReg.STATUS, 0)
    assert g.device.hint.state is HintState.STOP
