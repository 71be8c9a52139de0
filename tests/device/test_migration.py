"""Precopy live migration in virtual time: rounds, wire cost, hints, dirty log, final check."""

from __future__ import annotations

import json
import random

import pytest
import structlog
import trio

from device.dirty_log import PAGE_SHIFT
from device.migration import (
    CHUNK_TIME,
    NORMAL_PAGE_BYTES,
    ZERO_PAGE_BYTES,
    Migration,
    MigrationParams,
)
from device.migration_report import MigrationState
from device.ranges import RangeSet
from device.vcpu import VcpuGate
from protocol.errors import ConfigError, UsageError
from virtqueue.memory import PAGE_SIZE, GuestMemory

MIB = 1 << 20
RAM = 64 * MIB
PAGES = RAM // PAGE_SIZE
CMD_ID_MIN = 0x8000_0000
BW = 64 * MIB  # bytes per virtual second
TIGHT = 1e-5  # downtime limit below one page: rounds end only when the bitmap is empty


class HintDouble:
    """A balloon device reduced to the hinting verbs: records calls, lets tests send hints."""

    def __init__(self) -> None:
        self.on_hint = None
        self.calls: list[object] = []
        self.cmd_id = CMD_ID_MIN
        self.started = trio.Event()

    def hint_stop(self) -> None:
        self.calls.append("stop")

    def hint_start(self) -> int:
        self.cmd_id += 1
        self.calls.append(("start", self.cmd_id))
        self.started.set()  # the first round's request (later ones are not waited for)
        return self.cmd_id

    def hint_done(self) -> None:
        self.calls.append("done")


def _pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa >> PAGE_SHIFT, (gpa + length) >> PAGE_SHIFT))


def _data_pages(mem: GuestMemory) -> set[int]:
    out: set[int] = set()
    for s, e in mem.data_ranges():
        out |= _pages(s, e - s)
    return out


@pytest.fixture
def src():
    with GuestMemory.create(RAM) as m:
        yield m


@pytest.fixture
def dst():
    with GuestMemory.create(RAM, name="dest") as m:
        yield m


def _params(**kw) -> MigrationParams:
    return MigrationParams(**{"bandwidth": BW, "downtime_limit": TIGHT, **kw})


async def test_idle_guest_without_hints_sends_every_written_page_once(autojump_clock, src, dst):
    rng = random.Random(1)
    written = set(rng.sample(range(PAGES), 3000))
    for page in written:
        src.write(page * PAGE_SIZE + rng.randrange(PAGE_SIZE - 8), rng.randbytes(8) + b"\x01")
    src.fill(40 * MIB, MIB, 0x5A)
    written |= _pages(40 * MIB, MIB)
    m = Migration(src, dst, _params(), vm=VcpuGate())
    report = await m.run(relied=[(0, RAM)])
    assert report.outcome == "completed" and m.state is MigrationState.COMPLETED
    assert report.normal_pages == len(written)
    assert report.zero_pages == PAGES - len(written)
    assert report.total_bytes == (len(written) * NORMAL_PAGE_BYTES
                                  + report.zero_pages * ZERO_PAGE_BYTES)
    assert report.rounds[0].normal_pages == len(written)  # all in round 1, none re-sent
    assert report.syncs == 3 and [r.final for r in report.rounds] == [False, False, True]
    assert report.total_time == pytest.approx(report.total_bytes / BW)
    assert report.downtime == 0.0 and report.hinted_pages == 0 and not report.hinting
    assert report.pages_lost == 0 and report.check.compared_bytes == len(written) * PAGE_SIZE
    assert _data_pages(dst) == written  # zero pages stayed holes on the destination


async def test_hinted_region_is_skipped_in_round_1(autojump_clock, src, dst):
    src.fill(0, RAM, 0x5A)  # free memory holds stale data, as in a guest that ran a while
    dev = HintDouble()

    async def guest():
        await dev.started.wait()
        assert dev.on_hint(48 * MIB, 16 * MIB) is not None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        m = Migration(src, dst, _params(), vm=VcpuGate(), device=dev)
        report = await m.run(relied=[(0, 48 * MIB)])
    hinted = 16 * MIB // PAGE_SIZE
    assert report.rounds[0].hinted_pages == hinted == report.hinted_pages
    assert report.rounds[0].normal_pages == PAGES - hinted == report.normal_pages
    assert report.hints == 1 and report.hinted_bytes == 16 * MIB
    assert list(dst.data_ranges(48 * MIB, 16 * MIB)) == []  # never sent
    assert report.pages_lost == 0
    assert src.read(50 * MIB, 4) == b"\x5a" * 4  # hints discard nothing on the source


async def test_without_hinting_the_same_scenario_sends_everything(autojump_clock, src, dst):
    src.fill(0, RAM, 0x5A)
    dev = HintDouble()
    m = Migration(src, dst, _params(hinting=False), vm=VcpuGate(), device=dev)
    report = await m.run(relied=[(0, RAM)])
    assert dev.calls == [] and dev.on_hint is None and not m.hinting
    assert report.normal_pages == PAGES and report.cmd_ids == () and report.pages_lost == 0
    assert m.hint(0, RAM) == 0  # a stray hint changes nothing


async def test_hinted_page_written_in_the_same_round_is_resent_later(autojump_clock, src, dst):
    src.fill(0, RAM, 0x5A)
    dev = HintDouble()
    gate = VcpuGate()
    page_gpa = 60 * MIB + 3 * PAGE_SIZE
    written_at: list[float] = []

    async def guest():
        await dev.started.wait()
        dev.on_hint(32 * MIB, 32 * MIB)
        await trio.sleep(0.2)  # round 1 takes ~0.5 s: still in it
        async with gate.vcpu():  # the page is allocated again and written
            src.write(page_gpa, b"reused!")
            written_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        m = Migration(src, dst, _params(), vm=gate, device=dev)
        report = await m.run(relied=[(0, 32 * MIB), (page_gpa, PAGE_SIZE)])
    first = report.rounds[0]
    assert first.started < written_at[0] < first.ended
    assert first.normal_pages == 8192 and first.hinted_pages == 8192
    later = report.rounds[1:]
    assert later[0].dirty_pages == 1 and sum(r.normal_pages for r in later) == 1
    assert dst.read(page_gpa, 7) == b"reused!"
    assert report.pages_lost == 0 and report.dirty_faults == 1


async def test_device_writes_dirty_pages_too(autojump_clock, src, dst):
    """Like the qtest run's "+2": the ring page first goes as a zero page, then, once the
    device has pushed the hint buffer back (a used-ring write), again as a normal page."""
    src.fill(0, RAM, 0x5A)
    ring = 16 * PAGE_SIZE  # inside the first chunk (10 ms of wire: 163 pages)
    src.discard(ring, PAGE_SIZE)  # the ring page is still untouched when migration starts
    dev = HintDouble()

    async def guest():
        await dev.started.wait()  # the first chunk is on the wire
        dev.on_hint(32 * MIB, 32 * MIB)  # the device records the hint...
        src.write_u16(ring + 2, 1)  # ...and pushes the buffer back: used.idx = 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        m = Migration(src, dst, _params(), vm=VcpuGate(), device=dev)
        report = await m.run(relied=[(0, 32 * MIB)])
    first = report.rounds[0]
    assert (first.normal_pages, first.zero_pages, first.hinted_pages) == (8191, 1, 8192)
    assert report.rounds[1].dirty_pages == 1 and report.rounds[1].normal_pages == 1
    assert dst.read_u16(ring + 2) == 1 and report.pages_lost == 0


async def test_holes_and_zero_pages(autojump_clock, src, dst):
    src.fill(0, 8 * MIB, 0x5A)
    src.discard(2 * MIB, MIB)  # ballooned / reported: a hole again
    src.fill(4 * MIB, 64 * 1024, 0)  # written, but all zeros
    report = await Migration(src, dst, _params(), vm=VcpuGate()).run(relied=[(0, RAM)])
    assert report.normal_pages == 2048 - 256 - 16
    assert report.zero_pages == PAGES - report.normal_pages
    assert _data_pages(dst) == _data_pages(src) - _pages(2 * MIB, MIB) - _pages(4 * MIB, 65536)
    assert report.pages_lost == 0


async def test_zero_detect_off_sends_written_zero_pages_as_normal(autojump_clock, src):
    src.fill(0, MIB, 0)
    report = await Migration(src, None, _params(zero_detect=False), vm=VcpuGate()).run()
    assert report.normal_pages == 256 and report.check is None and report.pages_lost is None


async def test_page_discarded_after_it_was_sent_becomes_a_hole_on_the_destination(
        autojump_clock, src, dst):
    src.fill(0, RAM, 0x33)
    gate = VcpuGate()

    async def guest():
        await trio.sleep(0.3)  # round 1 has sent the first ~19 MiB
        async with gate.vcpu():
            src.discard(0, MIB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        report = await Migration(src, dst, _params(), vm=gate).run(relied=[(0, RAM)])
    assert report.rounds[1].dirty_pages == 256 and report.rounds[1].zero_pages == 256
    assert list(dst.data_ranges(0, MIB)) == [] and report.pages_lost == 0


async def test_hint_verbs_follow_qemus_notifier_points(autojump_clock, src, dst):
    dev = HintDouble()
    report = await Migration(src, dst, _params(), vm=VcpuGate(), device=dev).run()
    assert dev.calls == ["stop", ("start", 0x80000001), "stop", ("start", 0x80000002),
                         "stop", "done", "done"]
    assert report.cmd_ids == (0x80000001, 0x80000002)
    assert [r.cmd_id for r in report.rounds] == [0x80000001, 0x80000002, None]
    assert dev.on_hint is None  # the hook is gone after the migration


async def test_cancel_in_a_live_round_sends_done_and_restores_everything(autojump_clock, src, dst):
    src.fill(0, RAM, 0x5A)
    dev = HintDouble()
    previous = dev.on_hint = lambda gpa, length: None  # the device's own hook before
    gate = VcpuGate()
    m = Migration(src, dst, _params(), vm=gate, device=dev)
    with trio.move_on_after(0.25):
        await m.run()
    assert m.state is MigrationState.CANCELLED and m.report.outcome == "cancelled"
    assert dev.calls[-1] == "done" and dev.on_hint is previous
    assert gate.running and gate.pauses == 0
    assert not m._log.active  # dirty logging is off again
    assert 0 < m.report.normal_pages < PAGES and m.report.downtime == 0.0


async def test_cancel_in_the_last_round_resumes_the_guest(autojump_clock, src, dst):
    src.fill(0, 16 * MIB, 0x5A)
    dev = HintDouble()
    gate = VcpuGate()
    # threshold (10 s x 16 MiB/s) above all RAM: stop-and-copy at once, which takes ~1 s
    m = Migration(src, dst, _params(bandwidth=16 * MIB, downtime_limit=10), vm=gate, device=dev)
    with trio.move_on_after(0.5):
        await m.run()
    assert m.report.outcome == "cancelled" and gate.pauses == 1 and gate.running
    assert dev.calls[-3:] == ["stop", "done", "done"]


async def test_failure_sends_done_and_propagates(autojump_clock, src, dst):
    class Broken(HintDouble):
        def hint_start(self) -> int:
            if self.cmd_id > CMD_ID_MIN:
                raise RuntimeError("device gone")
            return super().hint_start()

    dev = Broken()
    m = Migration(src, dst, _params(), vm=VcpuGate(), device=dev)
    with pytest.raises(RuntimeError, match="device gone"):
        await m.run()
    assert m.report.outcome == "failed" and dev.calls[-1] == "done"


@pytest.mark.parametrize("bypass", [False, True])
async def test_checker_catches_a_write_the_dirty_log_missed(autojump_clock, src, dst, bypass):
    src.fill(0, RAM, 0x5A)
    dev = HintDouble()
    gate = VcpuGate()
    page_gpa = 50 * MIB

    async def guest():
        await dev.started.wait()
        dev.on_hint(48 * MIB, 16 * MIB)
        await trio.sleep(0.1)
        async with gate.vcpu():
            if bypass:  # e.g. a device DMA that skips dirty logging: the page is never sent
                src.view(page_gpa, 16)[:16] = b"relied-on data!!"
            else:
                src.write(page_gpa, b"relied-on data!!")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        m = Migration(src, dst, _params(), vm=gate, device=dev)
        report = await m.run(relied=[(page_gpa, 16)])
    if bypass:
        assert report.pages_lost == 1 and report.check.lost_sample == (page_gpa,)
    else:
        assert report.pages_lost == 0


async def test_fast_writer_hits_max_rounds_slow_writer_converges(autojump_clock):
    async def migrate(pages_per_tick: int):
        with GuestMemory.create(16 * MIB) as mem, GuestMemory.create(16 * MIB) as dest:
            mem.fill(0, 16 * MIB, 0x11)
            gate = VcpuGate()
            rng = random.Random(7)
            written: RangeSet = RangeSet([(0, 16 * MIB)])

            async def writer():
                n = 0
                while True:
                    async with gate.vcpu():
                        for _ in range(pages_per_tick):
                            n += 1
                            mem.write(rng.randrange(4096) * PAGE_SIZE, n.to_bytes(8, "little"))
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                params = MigrationParams(bandwidth=32 * MIB, downtime_limit=0.01, max_rounds=5)
                report = await Migration(mem, dest, params, vm=gate).run(relied=written)
                nursery.cancel_scope.cancel()
            return report

    fast = await migrate(200)  # ~80 MiB/s of dirtying against a 32 MiB/s link
    sending = [r for r in fast.rounds if not r.final and r.bytes]
    assert len(sending) == 5 and not fast.converged and fast.downtime > 0.01
    assert fast.pages_lost == 0 and fast.paused_writes == 0
    slow = await migrate(1)
    assert slow.converged and slow.downtime <= 0.01 and slow.pages_lost == 0


async def test_hints_count_whole_pages_only_and_only_while_live(autojump_clock, src, dst):
    src.fill(0, RAM, 1)
    dev = HintDouble()
    gate = VcpuGate()
    m = Migration(src, dst, _params(), vm=gate, device=dev)
    assert m.hint(0, RAM) == 0  # not migrating yet
    cleared: list[int] = []

    async def guest():
        await dev.started.wait()
        cleared.append(m.hint(60 * MIB + 100, 2 * PAGE_SIZE))  # covers one whole page
        cleared.append(m.hint(RAM, 16 * MIB))  # outside RAM: nothing to clear
        cleared.append(m.hint(60 * MIB, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest)
        report = await m.run()
    assert cleared == [1, 0, 0]
    assert m.hint(0, RAM) == 0  # over
    assert report.hints == 2 and report.hints_ignored == 2  # before start, and length 0


async def test_regions_with_a_base_and_a_hole(autojump_clock):
    layout = dict(base=MIB, holes=[(8 * MIB, 4 * MIB)])
    with GuestMemory.create(32 * MIB, **layout) as s, \
            GuestMemory.create(32 * MIB, **layout) as d:
        s.fill(MIB, 7 * MIB, 1)
        s.fill(12 * MIB, 21 * MIB, 2)
        report = await Migration(s, d, _params(), vm=VcpuGate()).run(
            relied=[(MIB, 7 * MIB), (12 * MIB, 21 * MIB)])
        assert report.ram_pages == 28 * 256 == report.normal_pages
        assert report.pages_lost == 0


async def test_null_sink_counts_the_same_as_a_copy(autojump_clock, src, dst):
    src.fill(0, 8 * MIB, 9)
    src.fill(20 * MIB, 4096, 0)
    a = await Migration(src, dst, _params(), vm=VcpuGate()).run()
    b = await Migration(src, None, _params(), vm=VcpuGate()).run()
    assert (a.normal_pages, a.zero_pages, a.total_bytes) == (b.normal_pages, b.zero_pages,
                                                            b.total_bytes)


async def test_bad_params_and_misuse(autojump_clock, src, dst):
    for bad in (dict(bandwidth=0), dict(bandwidth=1, downtime_limit=-1),
                dict(bandwidth=1, max_rounds=0), dict(bandwidth=1, chunk_bytes=0),
                dict(bandwidth=float("nan"))):
        with pytest.raises(ConfigError):
            MigrationParams(**bad)
    assert MigrationParams(bandwidth=1000).chunk == NORMAL_PAGE_BYTES
    assert MigrationParams(bandwidth=1 << 30).chunk == int((1 << 30) * CHUNK_TIME)
    with GuestMemory.create(RAM // 2) as small:
        with pytest.raises(UsageError):
            Migration(src, small, _params(), vm=VcpuGate())
    dst.write(0, b"x")
    with pytest.raises(UsageError):
        Migration(src, dst, _params(), vm=VcpuGate())
    m = Migration(src, None, _params(), vm=VcpuGate())
    await m.run()
    with pytest.raises(UsageError):
        await m.run()


async def test_report_is_json_and_events_have_stable_names(autojump_clock, src, dst):
    src.fill(0, MIB, 3)
    dev = HintDouble()

    async def guest():
        await dev.started.wait()
        dev.on_hint(32 * MIB, MIB)

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest)
            report = await Migration(src, dst, _params(), vm=VcpuGate(), device=dev).run(
                relied=[(0, MIB)])
    names = {e["event"] for e in logs}
    assert {"migration.sync", "migration.round", "migration.hint", "migration.check",
            "migration.done"} <= names
    d = json.loads(json.dumps(report.to_dict()))
    assert d["outcome"] == "completed" and d["pages_lost"] == 0
    assert d["rounds"][0]["normal_pages"] == 256 and d["cmd_ids"] == [0x80000001, 0x80000002]


async def test_cancel_while_waiting_for_the_guest_to_stop_resumes_it(autojump_clock, src):
    gate = VcpuGate()

    async def long_unit():
        async with gate.vcpu():
            await trio.sleep(100)  # a vCPU that will not leave guest mode soon

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_unit)
        await trio.sleep(0)
        m = Migration(src, None, _params(), vm=gate)
        with trio.move_on_after(5):
            await m.run()
        assert m.report.outcome == "cancelled" and m.state is MigrationState.CANCELLED
        assert gate.running  # resumed although pause() never returned
        nursery.cancel_scope.cancel()


async def test_resume_after_restarts_the_source(autojump_clock, src):
    gate = VcpuGate()
    report = await Migration(src, None, _params(), vm=gate).run(resume_after=True)
    assert report.outcome == "completed" and gate.running and gate.pauses == 1


async def test_device_without_the_feature_gives_no_command_ids(autojump_clock, src):
    class NotNegotiated(HintDouble):
        def hint_start(self) -> None:
            self.calls.append(("start", None))
            return None  # BalloonDevice: FREE_PAGE_HINT not negotiated

    dev = NotNegotiated()
    report = await Migration(src, None, _params(), vm=VcpuGate(), device=dev).run()
    assert report.cmd_ids == () and all(r.cmd_id is None for r in report.rounds)
    assert dev.calls[-1] == "done" and report.outcome == "completed"
