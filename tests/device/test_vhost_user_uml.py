"""device.vhost_user with the real Linux 6.1 virtio_balloon driver (Debian's User-Mode Linux).

Each test boots UML (about 1.5 s to init) with ``virtio_uml.device=SOCKET:5`` while the
back-end serves in the same trio nursery. The device is the RecordingBalloon test double, which
shows exactly what the driver sent, except for one test with the real
:class:`device.balloon.BalloonDevice`. Guests wait on a file in a private directory (polling in
the guest) so the test decides when they power off; no test sleeps.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import trio
from structlog.testing import capture_logs

from device.vhost_user import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend
from protocol.balloon import BALLOON_PAGE_SIZE, BalloonQueue, StatTag
from protocol.features import BalloonFeature, bit
from sim.uml import UmlMachine, UmlResult, boot, find_kernel

try:
    from peers import require_peer
    from vhost_user_double import ALL_BALLOON, RecordingBalloon
except ModuleNotFoundError:  # pragma: no cover - tests/ imported as a package
    from tests.device.vhost_user_double import ALL_BALLOON, RecordingBalloon
    from tests.peers import require_peer

pytestmark = pytest.mark.peer

POISON = bit(BalloonFeature.PAGE_POISON)
REPORTING = bit(BalloonFeature.REPORTING)
BOOT_BUDGET = 10.0  # seconds from spawn to power-off; typically 2-3


@pytest.fixture(scope="module")
def uml_kernel():
    return require_peer("User-Mode Linux", find_kernel)


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="vu-uml-", dir="/tmp")  # short: AF_UNIX path limit
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _machine(rundir: str, *, cmdline: tuple[str, ...] = (), wait_for_go: bool = True
             ) -> UmlMachine:
    go = os.path.join(rundir, "go")
    scenario = "mark ready\n"
    if wait_for_go:
        scenario += f"while [ ! -e {go} ]; do sleep 0.05; done\n"
    return UmlMachine(scenario=scenario, socket=os.path.join(rundir, "s"), cmdline=cmdline,
                      timeout=30)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _go(rundir: str) -> None:
    open(os.path.join(rundir, "go"), "w").close()


async def _serve(nursery, rundir: str, device) -> VhostUserBackend:
    backend = VhostUserBackend(os.path.join(rundir, "s"), device)
    await nursery.start(backend.serve)
    return backend


async def test_linux_negotiates_maps_memory_and_sends_stats(nursery, rundir, uml_kernel,
                                                           record_property):
    device = RecordingBalloon(ALL_BALLOON)
    backend = await _serve(nursery, rundir, device)
    async with boot(_machine(rundir), uml_kernel) as guest:
        with trio.fail_after(BOOT_BUDGET):
            await guest.wait_for_marker("ready")
            # The driver primes the stats buffer at probe; the double returns it (used ring +
            # call fd) and the driver answers with a fresh one: a full round trip.
            await device.wait_until(lambda d: len(d.stats_samples) >= 2)
        _go(rundir)
        result = (await guest.wait()).check()
    session = await backend.wait_sessions_ended(1)
    record_property("uml_boot_seconds", round(result.boot_time, 3))
    record_property("uml_run_seconds", round(result.duration, 3))
    assert result.duration < BOOT_BUDGET

    # What the driver accepted: everything offered but PAGE_POISON, which validate() drops
    # on a kernel without page poisoning or init_on_free; that change makes UML send
    # SET_FEATURES again, and the second one lacks bit 30 (virtio_uml re-derives it from
    # features the core already cleared), so no SET_VRING_ENABLE follows.
    assert device.features == [ALL_BALLOON, ALL_BALLOON & ~POISON]
    assert session.features == ALL_BALLOON & ~POISON
    assert session.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert session.error is None

    # Five queues, densely numbered, 256 entries (UML's fixed size), all in the mapped RAM.
    assert sorted(i for i, _ in device.attach_log) == [0, 1, 2, 3, 4]
    for _, ring in device.attach_log:
        assert ring.size == 256 and ring.next_avail == 0 and ring.next_used == 0
    assert device.activations == 1 and device.resets == 1
    assert sorted(device.detached) == [0, 1, 2, 3, 4]

    # The stats buffer: 10-byte records read through GuestMemory from UML's own RAM file.
    first = dict(device.stats_samples[0])
    assert set(first) <= {int(t) for t in StatTag}
    memtot = first[StatTag.MEMTOT]
    assert 64 << 20 < memtot <= 128 << 20  # mem=128M, minus what the kernel keeps
    assert first[StatTag.MEMFREE] <= first[StatTag.AVAIL] <= memtot
    assert device.kicks[2] >= 2  # stats is queue 2

    assert device.config_reads[0] == (0, 4)  # num_pages, with offset 0 (UML reads from 0)
    assert "Free page reporting enabled" in result.console


INIT_ON_FREE_ATTEMPTS = 3
BROKEN_BOOT = "at crypto/api.c:170 crypto_wait_for_test"


async def _boot_init_on_free(rundir: str, offered: int, uml_kernel
                             ) -> tuple[RecordingBalloon, UmlResult, list[dict]]:
    """Boot with ``init_on_free=1`` against a fresh device; (device, result, captured logs).

    Known UML 6.1 flake: with init_on_free=1 and mem=64M about 2% of boots (with or without a
    device) start broken, none seen in 100 boots with the harness's default 128M. Kthread
    creation fails during initcalls (a WARNING in ``crypto_wait_for_test``, then "zswap: pool
    creation failed"); usually init's first fork then fails ("Cannot fork") and the kernel
    panics, once UML aborted after powering off. Only boots showing that early warning are
    retried; anything else fails the test.
    """
    for _ in range(INIT_ON_FREE_ATTEMPTS):
        device = RecordingBalloon(offered)
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await _serve(nursery, rundir, device)
                machine = _machine(rundir, cmdline=("init_on_free=1",), wait_for_go=False)
                async with boot(machine, uml_kernel) as guest:
                    result = await guest.wait()
                nursery.cancel_scope.cancel()
        if BROKEN_BOOT not in result.console:
            return device, result.check(), logs
    pytest.fail(f"UML never reached init in {INIT_ON_FREE_ATTEMPTS} boots")


async def test_init_on_free_keeps_page_poison_and_writes_poison_val(rundir, uml_kernel):
    device, result, logs = await _boot_init_on_free(rundir, ALL_BALLOON, uml_kernel)
    # With init_on_free the driver keeps PAGE_POISON (no second SET_FEATURES, bit 30 stays,
    # rings are enabled explicitly) and tells the host freed pages read as zeros: poison_val 0.
    assert device.features == [ALL_BALLOON]
    assert (12, bytes(4)) in device.config_writes
    enables = [e["index"] for e in logs if e["event"] == "vhost_user.vring.enable" and
               e["enabled"]]
    assert sorted(enables) == [0, 1, 2, 3, 4]
    assert "Free page reporting enabled" in result.console


async def test_init_on_free_without_page_poison_disables_reporting(rundir, uml_kernel):
    device, result, _ = await _boot_init_on_free(rundir, ALL_BALLOON & ~POISON, uml_kernel)
    # Pages must stay zeroed, but the host cannot be told so: Linux gives up reporting.
    assert device.features == [ALL_BALLOON & ~POISON, ALL_BALLOON & ~POISON & ~REPORTING]
    assert sorted(i for i, _ in device.attach_log) == [0, 1, 2, 3]
    assert "Free page reporting enabled" not in result.console


async def test_guest_killed_mid_session_then_a_new_guest_is_served(nursery, rundir, uml_kernel):
    device = RecordingBalloon(ALL_BALLOON)
    backend = await _serve(nursery, rundir, device)
    fds_before = _open_fds()
    with capture_logs() as logs:
        async with boot(_machine(rundir), uml_kernel) as guest:
            with trio.fail_after(BOOT_BUDGET):
                await guest.wait_for_marker("ready")
                await device.wait_until(lambda d: d.stats_samples)
            guest.kill()
            killed = await guest.wait()
        with trio.fail_after(BOOT_BUDGET):
            session = await backend.wait_sessions_ended(1)
    assert killed.killed and killed.returncode == -9
    assert session.error is None and "gone" in session.reason
    assert not [e for e in logs if e["log_level"] == "error"]
    assert sorted(device.detached) == [0, 1, 2, 3, 4] and device.resets == 1
    assert _open_fds() <= fds_before  # RAM fd, kick/call fds

    # The same back-end (and device) serves the next guest from scratch.
    async with boot(_machine(rundir, wait_for_go=False), uml_kernel) as guest:
        (await guest.wait()).check()
    second = await backend.wait_sessions_ended(2)
    assert second.error is None and device.resets == 2
    assert len(device.attach_log) == 10


async def test_real_balloon_device_inflates_for_linux(nursery, rundir, uml_kernel):
    from device.balloon import BalloonDevice

    device = BalloonDevice(features=ALL_BALLOON, numbering="negotiated",
                           queue_sizes={q: 256 for q in BalloonQueue})  # UML always uses 256
    acked = trio.Event()
    write_config = device.write_config

    def spy(offset: int, data: bytes) -> None:  # the driver acks with SET_CONFIG(actual)
        write_config(offset, data)
        if device.config.actual >= 256:
            acked.set()

    device.write_config = spy
    await nursery.start(device.run)
    backend = await _serve(nursery, rundir, device)
    fds_before = _open_fds()
    async with boot(_machine(rundir), uml_kernel) as guest:
        with trio.fail_after(BOOT_BUDGET):
            await guest.wait_for_marker("ready")
            device.balloon(device.ram_size - (1 << 20))  # take 1 MiB: 256 pages
            await acked.wait()
        ballooned = device.ballooned.total
        _go(rundir)
        (await guest.wait()).check()
    assert ballooned == 256 * BALLOON_PAGE_SIZE
    assert device.summary()["needs_reset"] is None
    assert (await backend.wait_sessions_ended(1)).error is None
    assert _open_fds() <= fds_before  # UML's RAM file is unmapped and closed again
