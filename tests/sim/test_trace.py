"""``vballoon trace``: the narrated teaching view, built from recorded structlog events."""

from __future__ import annotations

import io
import json

import pytest
import structlog
from rich.console import Console

from protocol.rules import RULES
from sim.cli import main as cli_main
from sim.teach.capture import recording, teach_log
from sim.teach.model import FreeListBlock, RingBlock, need_event
from sim.teach.narrate import narrate
from sim.teach.render import render_step
from sim.teach.scenarios import SCENARIOS, TAMPER_RULES, TraceOptions, run_trace
from sim.teach.snapshots import RingGeometry, read_ring
from virtqueue import events as vq_events
from virtqueue.driver import DriverQueue
from virtqueue.layout import legacy_layout
from virtqueue.memory import GuestMemory
from virtqueue.notify import vring_need_event

WIDTH, HEIGHT = 100, 40


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures structlog for its run (stderr, level): undo it after each test."""
    config = structlog.get_config()
    processors = list(config["processors"])
    enabled = vq_events.ENABLED
    yield
    structlog.configure(**{**config, "processors": processors})
    vq_events.set_enabled(enabled)


@pytest.fixture(scope="module")
def traces():
    """Each scenario once, on the default small guest (64 MiB, rings of 8)."""
    return {name: run_trace(name) for name in SCENARIOS}


def _screens(steps):
    for n, step in enumerate(steps, 1):
        console = Console(width=WIDTH, record=True, file=io.StringIO(), color_system=None)
        console.print(render_step(step, n, len(steps)))
        yield step, console.export_text()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_step_fits_one_100x40_screen(traces, name):
    steps = narrate(traces[name].records)
    assert len(steps) >= 6
    for step, text in _screens(steps):
        lines = text.rstrip("\n").split("\n")
        assert len(lines) <= HEIGHT, f"{step.title!r} takes {len(lines)} lines"
        assert max(len(line) for line in lines) <= WIDTH, step.title


@pytest.mark.parametrize("rule", TAMPER_RULES)
def test_malformed_names_the_rule_and_its_spec_section(rule):
    trace = run_trace("malformed", TraceOptions(rule=rule))
    rejects = [r for r in trace.records if r["event"] == "vq.reject"]
    assert [r["rule_id"] for r in rejects] == [rule]
    text = "".join(t for _, t in _screens(narrate(trace.records)))
    assert f"The device rejects the chain: {rule} (virtio §{RULES[rule].section})" in text
    assert RULES[rule].summary in text
    assert "DEVICE_NEEDS_RESET" in text


def test_malformed_under_truncate_is_popped_with_its_violation():
    trace = run_trace("malformed", TraceOptions(rule="DC-01", policy="truncate"))
    pops = [r for r in trace.records if r["event"] == "vq.pop" and r["queue"] == 0]
    assert [p["violation"] for p in pops] == ["DC-01"]
    titles = [s.title for s in narrate(trace.records)]
    assert "The device pops head 0 from avail.ring[0]" in titles


def test_the_hero_chain_tables_are_the_ring_as_the_events_describe_it(traces):
    records = traces["reporting"].records
    add = next(r for r in records if r["event"] == "vq.add" and r["queue"] == 4)
    step = next(s for s in narrate(records) if s.events == ["vq.add"])
    ring = next(b for b in step.blocks if isinstance(b, RingBlock))
    chain = [ring.ring["desc"][i] for i in ring.rows]
    assert [[d[0], d[1]] for d in chain] == add["writable"]  # addr, len of every descriptor
    assert all(d[2] & 2 for d in chain)  # all device-writable
    assert ring.ring["avail"]["idx"] == add["avail_idx"]
    assert ring.ring["avail"]["ring"][ring.avail_slot] == add["head"]


def test_a_suppressed_kick_shows_the_event_idx_arithmetic(traces):
    records = traces["hinting"].records
    kick = next(r for r in records if r["event"] == "vq.kick" and not r["notify"])
    assert kick["event_idx"]
    assert vring_need_event(kick["avail_event"], kick["new"], kick["old"]) is False
    step = next(s for s in narrate(records) if s.title.startswith("No kick"))
    _, text = need_event(kick["avail_event"], kick["new"], kick["old"])
    assert text in step.lines
    assert "false" in text


def test_reporting_shows_the_block_back_at_the_tail_marked_reported(traces):
    steps = narrate(traces["reporting"].records)
    drain = next(s for s in steps if s.title.startswith("page_reporting_drain()"))
    snap = next(b for b in drain.blocks if isinstance(b, FreeListBlock))
    hero = snap.hero
    order10 = [(pfn, rep) for zone, order, mt, pfn, rep in snap.snapshot["blocks"]
               if order == 10 and mt == "MOVABLE"]
    assert (hero, True) in order10
    reported = [pfn for pfn, rep in order10 if rep]
    tail = [pfn for pfn, _ in order10[-len(reported):]]
    assert tail == reported and hero in tail  # the reported blocks are the tail


def test_the_walker_visits_and_callback_results_are_told(traces):
    records = traces["hinting"].records
    visits = [r for r in records if r["event"] == "teach.walk.visit"]
    results = [r for r in records if r["event"] == "teach.walk.result"]
    assert len(visits) == len(results) > 1
    assert {r["result"] for r in results} >= {0, -1}  # reported, and a stop on a full ring
    titles = [s.title for s in narrate(records)]
    assert any(t.startswith("The walker offers block") for t in titles)
    assert any(t.startswith("The callback returns 0") for t in titles)
    assert any(t.startswith("The walk returns STOPPED") for t in titles)


def test_json_prints_one_event_object_per_line(capsys):
    assert cli_main(["trace", "malformed", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(isinstance(r.get("event"), str) for r in records)
    names = {r["event"] for r in records}
    assert {"vq.add", "vq.kick", "vq.reject", "teach.scenario", "teach.ring"} <= names


def test_step_mode_does_not_wait_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a tty: no prompt, no read
    assert cli_main(["trace", "inflate", "--step", "--width", "100"]) == 0
    out = capsys.readouterr().out
    assert "Enter" not in out and "step 1/" in out


@pytest.mark.parametrize("argv", [
    ["trace", "malformed", "--queue-size", "3"],
    ["trace", "inflate", "--ram", "10M"],
    ["trace", "reporting", "--capacity", "0"],
    ["trace", "hinting", "--width", "5"],
    ["trace", "nonsense"],
])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) if argv[1] == "nonsense" else _no_raise():
        assert cli_main(argv) == 2
    assert "error" in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_ring_copies_do_not_change_host_accounting():
    """Reading a discarded ring page for the view leaves it a hole (peek, not read)."""
    with GuestMemory.create(1 << 20) as mem:
        desc, avail, used, _ = legacy_layout(0x10000, 8)
        DriverQueue(index=0, size=8, desc=desc, avail=avail, used=used, memory=mem)
        before = mem.allocated_bytes()
        mem.discard(used & ~0xFFF, 4096)
        after_discard = mem.allocated_bytes()
        ring = read_ring(mem, RingGeometry(0, "q", 8, desc, avail, used))
        assert ring["used"]["idx"] == 0 and len(ring["desc"]) == 8
        assert mem.allocated_bytes() == after_discard < before


def test_recording_restores_logging_and_the_trace_switch():
    previous = vq_events.set_enabled(False)
    processors = list(structlog.get_config()["processors"])
    try:
        with recording() as rec:
            assert vq_events.ENABLED
            teach_log.debug("teach.chapter", title="t", text="x")
        assert rec.records[0]["event"] == "teach.chapter"
        assert vq_events.ENABLED is False
        assert structlog.get_config()["processors"] == processors
    finally:
        vq_events.set_enabled(previous)


@pytest.mark.peer
def test_malformed_against_qemu_is_refused_by_qemu(qemu_binary):
    from sim.teach.peers import run_qemu_trace

    trace = run_qemu_trace("malformed", TraceOptions(rule="DC-06"), binary=qemu_binary)
    outcome = next(r for r in trace.records if r["event"] == "teach.outcome")
    assert outcome["needs_reset"] == "DC-06" and "DEVICE_NEEDS_RESET" in outcome["status"]
    steps = narrate(trace.records)
    assert any(s.title.startswith("The driver adds a chain to inflate") for s in steps)


@pytest.mark.peer
def test_inflate_against_qemu_shows_the_used_ring_qemu_wrote(qemu_binary):
    from sim.teach.peers import run_qemu_trace

    trace = run_qemu_trace("inflate", binary=qemu_binary)
    reaped = [r for r in trace.records if r["event"] == "vq.get_buf" and r["queue"] == 0]
    assert reaped, "the driver never got its inflate buffer back from QEMU"
    rings = [r for r in trace.records if r["event"] == "teach.ring" and r["queue"] == 0
             and r["after"] == "vq.get_buf"]
    assert rings[0]["used"]["idx"] >= 1 and rings[0]["used"]["ring"][0][0] == reaped[0]["head"]
    for _, text in _screens(narrate(trace.records)):
        assert len(text.rstrip("\n").split("\n")) <= HEIGHT
