"""sim.serve and ``vballoon serve`` without a real guest: options, events, findings, rendering.

A small in-process front-end drives :attr:`BalloonServer.seam` the way the vhost-user back-end
does (features, rings in simulated RAM, activation) and plays the driver with DriverQueues, so
every event kind and every finding the server derives from the device's verdicts can be
provoked on purpose; tests/sim/test_uml_scenarios.py runs the same server against Linux.
"""

from __future__ import annotations

import io
import struct

import pytest
import structlog

from device.transport import RingConfig
from protocol.balloon import BalloonQueue, StatTag, queue_numbering
from protocol.errors import ConfigError, UsageError
from protocol.features import BalloonFeature, TransportFeature, bit, mask
from sim import cli
from sim.commands.serve import EventPrinter, run_command
from sim.serve import SERVE_FEATURES, BalloonServer, ServeEvent, parse_features, parse_size
from virtqueue import events as vq_events
from virtqueue.driver import DriverQueue
from virtqueue.layout import split_layout
from virtqueue.memory import GuestMemory

MIB = 1 << 20
RAM = 16 * MIB
RING_BASE, RING_SLOT = 1 * MIB, 64 * 1024
BUF = 2 * MIB
PAGES = 8 * MIB
B = BalloonFeature
TRANSPORT = mask(TransportFeature.RING_INDIRECT_DESC, TransportFeature.RING_EVENT_IDX,
                 TransportFeature.VERSION_1)


# ---- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("default", SERVE_FEATURES),
    ("STATS_VQ,reporting", mask(B.STATS_VQ, B.REPORTING) | TRANSPORT),
    ("stats-vq free_page_hint", mask(B.STATS_VQ, B.FREE_PAGE_HINT) | TRANSPORT),
    ("-PAGE_POISON", SERVE_FEATURES & ~bit(B.PAGE_POISON)),
    ("+MUST_TELL_HOST,-RING_EVENT_IDX", (SERVE_FEATURES | bit(B.MUST_TELL_HOST))
     & ~bit(TransportFeature.RING_EVENT_IDX)),
    ("qemu,REPORTING", mask(B.STATS_VQ, B.PAGE_POISON, B.REPORTING) | TRANSPORT),
    ("none", TRANSPORT),
    ("all", mask(*BalloonFeature) | TRANSPORT),
])
def test_parse_features(text, want):
    assert parse_features(text) == want


@pytest.mark.parametrize("text", ["", "BOGUS", "STATS_VQ,+NOPE"])
def test_parse_features_refuses_unknown_names(text):
    with pytest.raises(ConfigError):
        parse_features(text)


def test_parse_size():
    assert parse_size("64M") == parse_size("64") == parse_size("64MiB") == 64 * MIB
    assert parse_size("1G") == 1 << 30 and parse_size("512k") == 512 << 10
    for bad in ("", "lots", "-5M", "1.5G", "3X"):
        with pytest.raises(ConfigError):
            parse_size(bad)


@pytest.fixture
def _logging_restored():
    """cli.main configures logging for the process; give the suite its own back."""
    config = structlog.get_config()
    processors = list(config["processors"])
    enabled = vq_events.ENABLED
    yield
    structlog.configure(**{**config, "processors": processors})
    vq_events.set_enabled(enabled)


@pytest.mark.usefixtures("_logging_restored")
@pytest.mark.parametrize("extra", [
    ["--features", "BOGUS"], ["--features", "STATS_VQ,+RING_PACKED"], ["--target", "0"],
    ["--target", "lots"], ["--stats-interval", "-1"], ["--stats-interval", "x"]])
def test_bad_serve_options_exit_2(tmp_path, capsys, extra):
    code = cli.main(["serve", "--socket", str(tmp_path / "s"), *extra])
    assert code == 2
    assert capsys.readouterr().err.startswith("vballoon serve: error: ")


@pytest.mark.usefixtures("_logging_restored")
def test_a_socket_path_that_is_a_file_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    path = tmp_path / "file"
    path.write_text("not a socket")
    assert cli.main(["serve", "--socket", str(path)]) == 2
    assert "exists and is not a socket" in capsys.readouterr().err


# ---- a session played in-process --------------------------------------------------------------

class Frontend:
    """Drives ``server.seam`` as the back-end would, and plays the driver's queues."""

    def __init__(self, server: BalloonServer, features: int) -> None:
        self.server = server
        self.mem = GuestMemory.create(RAM)
        self.seam = server.seam
        self.seam.offered_features()
        assert self.seam.set_features(features)
        self.queues: dict[BalloonQueue, DriverQueue] = {}
        for kind, index in queue_numbering(features).items():
            desc, avail, used, _ = split_layout(RING_BASE + index * RING_SLOT, 256)
            self.queues[kind] = DriverQueue(index=index, size=256, desc=desc, avail=avail,
                                            used=used, memory=self.mem)
            self.seam.attach_queue(index, RingConfig(256, desc, avail, used), self.mem,
                                   lambda: None)
        self.seam.activate()
        self._buf = BUF

    def send(self, kind: BalloonQueue, readable: bytes = b"",
             writable: tuple[tuple[int, int], ...] = ()) -> None:
        out = []
        if readable:
            self.mem.write(self._buf, readable)
            out.append((self._buf, len(readable)))
            self._buf += (len(readable) + 15) & ~15
        self.queues[kind].add(out, list(writable), "token")
        while self.server.device.poll_queue(kind):
            pass

    def kinds(self, kind: str) -> list[ServeEvent]:
        return [e for e in self.server.events if e.kind == kind]

    def rules(self) -> list[str]:
        return [f.rule for f in self.server.findings]


@pytest.fixture
async def session(tmp_path):
    server = BalloonServer(tmp_path / "s", target_bytes=12 * MIB)
    fe = Frontend(server, SERVE_FEATURES)
    yield fe
    fe.mem.close()


async def test_negotiation_queues_and_the_pending_target(session):
    fe = session
    assert [e.kind for e in fe.server.events][:3] == ["connect", "features", "queue"]
    assert fe.kinds("features")[0].fields["accepted"][:5] == [
        "STATS_VQ", "DEFLATE_ON_OOM", "FREE_PAGE_HINT", "PAGE_POISON", "REPORTING"]
    assert [e.fields["queue"] for e in fe.kinds("queue")] == [
        "INFLATE", "DEFLATE", "STATS", "FREE_PAGE", "REPORTING"]
    target = fe.kinds("target")[-1].fields
    assert target["num_pages"] == 1024 and fe.server.device.config.num_pages == 1024
    # played in-process, there is no vhost-user session to carry the config change
    assert fe.kinds("notify")[-1].fields["sent"] is False


async def test_inflate_actual_and_pfn_findings(session):
    fe = session
    base = PAGES >> 12
    fe.send(BalloonQueue.INFLATE, struct.pack("<5I", base + 3, base + 2, base + 1, base,
                                              0x0FFF_FFFF))
    inflate = fe.kinds("inflate")[-1].fields
    assert inflate["applied"] == 4 and inflate["ballooned_bytes"] == 4 * 4096
    assert fe.rules() == ["BL-04"]  # the PFN outside RAM
    fe.seam.write_config(4, struct.pack("<I", 4))
    assert fe.kinds("actual")[-1].fields["pages"] == 4
    fe.seam.write_config(4, struct.pack("<I", RAM))  # more pages than RAM
    assert fe.rules() == ["BL-04", "BL-24"]


async def test_reports_are_checked_for_holes_and_alignment(session):
    fe = session
    fe.mem.fill(PAGES, 2 * MIB, 0x55)
    fe.send(BalloonQueue.REPORTING, writable=((PAGES, 2 * MIB),))
    report = fe.kinds("report")[-1].fields
    assert report["orders"] == [9] and report["aligned"]
    assert report["discarded"] == 2 * MIB and report["resident"] == 0
    assert fe.server.returned_bytes == 2 * MIB
    fe.send(BalloonQueue.REPORTING, writable=((PAGES + 512, 4096),))
    assert fe.rules() == ["BL-19"] and not fe.kinds("report")[-1].fields["aligned"]


async def test_stats_and_a_hinting_round(session):
    fe = session
    fe.send(BalloonQueue.STATS, struct.pack("<HQ", StatTag.MEMFREE, 5 * MIB))
    assert fe.kinds("stats")[-1].fields["values"] == {"stat-free-memory": 5 * MIB}
    cmd_id = fe.server.hint_start()
    assert fe.kinds("hint_host")[-1].fields == {"verb": "start", "cmd_id": cmd_id,
                                                "state": "REQUESTED", "skipped": False}
    fe.send(BalloonQueue.FREE_PAGE, struct.pack("<I", cmd_id))
    fe.send(BalloonQueue.FREE_PAGE, writable=((PAGES, 4 * MIB),))
    fe.send(BalloonQueue.FREE_PAGE, struct.pack("<I", 0))
    assert [(e.fields["old"], e.fields["new"]) for e in fe.kinds("hint_cmd")] == [
        ("REQUESTED", "START"), ("START", "STOP")]
    assert fe.kinds("hint")[-1].fields["round_bytes"] == 4 * MIB
    fe.send(BalloonQueue.FREE_PAGE, writable=((PAGES, 4 * MIB),))  # after STOP: ignored
    assert fe.rules() == ["BL-17"]


async def test_commands_and_reset(session):
    fe = session
    assert run_command(fe.server, "inflate 1M") == ""
    assert fe.server.device.config.num_pages == 1024 + 256
    assert run_command(fe.server, "deflate") == "" and fe.server.device.config.num_pages == 0
    assert run_command(fe.server, "hint start") == ""
    assert run_command(fe.server, "quit") == "quit"
    with pytest.raises(UsageError):
        run_command(fe.server, "hint later")
    with pytest.raises(ConfigError):
        run_command(fe.server, "balloon lots")
    fe.seam.reset()
    assert fe.kinds("reset") and not fe.server.connected
    assert "no driver yet" in run_command(fe.server, "balloon 8M")
    assert fe.server.pending_target == 8 * MIB


# ---- rendering --------------------------------------------------------------------------------

def _event(t: float, kind: str, **fields) -> ServeEvent:
    return ServeEvent(t, kind, fields)


def test_printer_folds_a_run_of_chains_into_one_line():
    out = io.StringIO()
    p = EventPrinter(out)
    p.event(_event(0.1, "queue", index=0, queue="INFLATE", size=256))
    p.event(_event(0.1, "activate", features=[], ram_bytes=RAM))
    p.event(_event(0.2, "queue", index=1, queue="DEFLATE", size=256))
    p.event(_event(0.3, "target", target_bytes=14 * MIB, num_pages=512, ram_bytes=RAM))
    for i in range(2):
        p.event(_event(0.4, "inflate", pfns=256, applied=256, ballooned_bytes=(i + 1) * MIB))
        p.event(_event(0.4, "actual", pages=256 * (i + 1), num_pages=512, bytes=0,
                       guest_bytes=0))
    p.event(_event(0.5, "report", ranges=[(0, 4 * MIB)], bytes=4 * MIB, discarded=4 * MIB,
                   resident=0, orders=[10], aligned=True, poison_val=0))
    lines = out.getvalue().splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["queues", "activate", "target",
                                                                 "balloon", "report"]
    assert "inflate=0 (256 entries), deflate=1 (256 entries)" in lines[0]
    assert lines[3].endswith("inflate +2.0 MiB in 2 chain(s); balloon now 2.0 MiB; "
                             "actual 512 pages = target")
    assert "1 range(s), 4.0 MiB (order 10, aligned); discarded 4.0 MiB" in lines[4]


def test_printer_json_lines():
    out = io.StringIO()
    EventPrinter(out, json_lines=True).event(_event(1.5, "connect", offered=["STATS_VQ"]))
    assert out.getvalue() == '{"t": 1.5, "event": "connect", "offered": ["STATS_VQ"]}\n'
