"""``vballoon trace --peer uml``: Linux 6.1's real driver (User-Mode Linux) on our device end.

Marked ``peer`` (skipped with a reason without UML, failed under VBALLOON_REQUIRE_PEERS=1). Each
scenario boots UML once (2-7 s); the trace is told from the device end's events only.
"""

from __future__ import annotations

import pytest

from sim.teach.model import RecordsBlock, RingBlock
from sim.teach.narrate import narrate
from sim.teach.peers import UML_SCENARIOS, run_uml_trace
from sim.uml import find_kernel

try:
    from peers import require_peer
    from test_trace import HEIGHT, WIDTH, _restore_logging, _screens  # noqa: F401 - fixture
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.peers import require_peer
    from tests.sim.test_trace import HEIGHT, WIDTH, _restore_logging, _screens  # noqa: F401

_HERO_QUEUE = {"inflate": "inflate", "reporting": "reporting_vq"}
_RECORDED = {"inflate": "balloon.inflate", "reporting": "balloon.report"}


@pytest.fixture(scope="module")
def uml_kernel():
    return require_peer("User-Mode Linux", find_kernel)


@pytest.mark.peer
@pytest.mark.parametrize("name", UML_SCENARIOS)
def test_linux_driver_chain_is_told_from_the_device_end(uml_kernel, name):
    trace = run_uml_trace(name, kernel=uml_kernel)
    records = trace.records
    scenario = next(r for r in records if r["event"] == "teach.scenario")
    assert scenario["traced_end"] == "device" and scenario["transport"] == "vhost-user"
    ring = next(q for q in scenario["focus"] if q["name"] == _HERO_QUEUE[name])
    assert not any(r["event"] in ("vq.add", "vq.get_buf") for r in records)  # Linux's own end

    steps = narrate(records)
    pop = next(i for i, s in enumerate(steps) if s.events == ["vq.pop"] and any(
        isinstance(b, RingBlock) and b.name == ring["name"] for b in s.blocks))
    block = next(b for b in steps[pop].blocks if isinstance(b, RingBlock))
    head = int(steps[pop].title.split("head ")[1].split()[0])
    # The ring copied from UML's RAM right after the pop: Linux put the head in avail.ring.
    slot = (block.ring["avail"]["idx"] - 1) % ring["size"]
    assert block.ring["avail"]["ring"][slot] == head
    assert block.ring["desc"][head][1] > 0  # the driver's buffer (or indirect table) length
    rest = [s.events[0] for s in steps[pop + 1:pop + 4]]
    assert rest == [_RECORDED[name], "vq.push", "vq.interrupt"], rest
    assert any(isinstance(b, RecordsBlock) for b in steps[pop + 1].blocks)
    push = next(b for b in steps[pop + 2].blocks if isinstance(b, RingBlock))
    assert push.ring["used"]["ring"][slot][0] == head  # {id: head} in used.ring
    # Only the first chain per watched queue has its own screens; the rest are grouped lines.
    pops = [r for r in records if r["event"] == "vq.pop" and r["queue"] == ring["index"]]
    assert len(pops) > 1 or name == "reporting"
    assert sum(s.events == ["vq.pop"] for s in steps) == len(scenario["focus"])

    for step, text in _screens(steps):
        lines = text.rstrip("\n").split("\n")
        assert len(lines) <= HEIGHT, f"{step.title!r} takes {len(lines)} lines"
        assert max(len(line) for line in lines) <= WIDTH, step.title
