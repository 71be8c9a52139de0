"""Named scenarios: our guest's balloon driver against QEMU 7.2's real virtio-balloon.

Each scenario starts QEMU (microvm, virtio-mmio, qtest), runs the simulator's driver on it
(:mod:`sim.qemu.guest`), makes QEMU's host side act through QMP, and records
:class:`~sim.qemu.results.Check` s with their evidence in a
:class:`~sim.qemu.results.ScenarioResult`:

- ``negotiation``: what QEMU offers for four property sets and what the driver accepts by
  Linux 6.1's rules; queue numbering, QueueNumMax, config size; a target set before DRIVER_OK.
- ``inflate``: QMP ``balloon`` down and back up; ``query-balloon``, ``BALLOON_CHANGE``; the
  inflated pages read as zeros and QEMU's RSS drops by them.
- ``stats``: QEMU parses our stats buffer (``guest-stats``), then gives it back on its polling
  timer and parses the refill (mode B, the timer runs in real time).
- ``reporting`` and ``hinting``: :mod:`sim.qemu.free_pages`.

:func:`run_scenario` runs one by name; :func:`run_scenarios` several in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from guest.balloon import BalloonOptions
from guest.workload import Workload
from protocol.balloon import BalloonQueue, ConfigOffset, StatTag, config_size, queue_numbering
from protocol.errors import ConfigError, PeerError
from protocol.features import BalloonFeature as BF
from protocol.features import TransportFeature as TF
from protocol.features import mask, names
from protocol.mmio import CONFIG_OFFSET, MmioReg
from protocol.status import DeviceStatus
from sim.qemu.free_pages import hinting, reporting
from sim.qemu.guest import build_guest, run_guest
from sim.qemu.kit import (
    PAGE,
    MiB,
    ScenarioOptions,
    check_rss_drop,
    fill_free_ram,
    pages_equal,
    qemu_options,
    sample,
    wait_until,
)
from sim.qemu.process import BalloonProperties, QemuMode, QemuOptions, run_qemu
from sim.qemu.qmp import QmpEvent
from sim.qemu.results import Recorder, ScenarioResult

__all__ = ["ORDER", "SCENARIOS", "ScenarioOptions", "run_scenario", "run_scenarios"]

Scenario = Callable[[ScenarioOptions, Recorder], Awaitable[None]]
_U64_UNSET = (1 << 64) - 1
_PATTERN = 0x5A


# ---- negotiation ------------------------------------------------------------------------------

QEMU_TRANSPORT = mask(TF.RING_INDIRECT_DESC, TF.RING_EVENT_IDX, TF.VERSION_1, TF.RING_RESET)
"""Transport bits QEMU 7.2's virtio-mmio offers (RING_RESET: ``queue_reset=on``)."""
LINUX_TRANSPORT = mask(TF.RING_INDIRECT_DESC, TF.RING_EVENT_IDX, TF.VERSION_1)
"""What Linux 6.1 keeps of those (``vring_transport_features`` knows no RING_RESET)."""


@dataclass(frozen=True, slots=True)
class NegotiationCase:
    """QEMU properties, a guest configuration, and what each side should choose."""

    name: str
    properties: BalloonProperties
    guest: BalloonOptions
    offered: int
    accepted: int
    why: str
    target_before_probe: bool = False
    """Set a QMP balloon target before the driver probes (no DRIVER_OK yet)."""


NEGOTIATION_CASES = (
    NegotiationCase("reporting", BalloonProperties(free_page_reporting=True), BalloonOptions(),
                    mask(BF.STATS_VQ, BF.PAGE_POISON, BF.REPORTING) | QEMU_TRANSPORT,
                    mask(BF.STATS_VQ, BF.REPORTING) | LINUX_TRANSPORT,
                    "no poisoning and no init_on_free: PAGE_POISON declined",
                    target_before_probe=True),
    NegotiationCase("all-properties",
                    BalloonProperties(free_page_reporting=True, free_page_hint=True,
                                      deflate_on_oom=True), BalloonOptions(),
                    mask(BF.STATS_VQ, BF.DEFLATE_ON_OOM, BF.FREE_PAGE_HINT, BF.PAGE_POISON,
                         BF.REPORTING) | QEMU_TRANSPORT,
                    mask(BF.STATS_VQ, BF.DEFLATE_ON_OOM, BF.FREE_PAGE_HINT, BF.REPORTING)
                    | LINUX_TRANSPORT, "every balloon bit Linux knows but PAGE_POISON"),
    NegotiationCase("poisoning-guest",
                    BalloonProperties(free_page_reporting=True, free_page_hint=True,
                                      deflate_on_oom=True), BalloonOptions(page_poisoning=True),
                    mask(BF.STATS_VQ, BF.DEFLATE_ON_OOM, BF.FREE_PAGE_HINT, BF.PAGE_POISON,
                         BF.REPORTING) | QEMU_TRANSPORT,
                    mask(BF.STATS_VQ, BF.DEFLATE_ON_OOM, BF.FREE_PAGE_HINT, BF.PAGE_POISON,
                         BF.REPORTING) | LINUX_TRANSPORT,
                    "page poisoning: PAGE_POISON accepted, poison_val = 0xaaaaaaaa"),
    NegotiationCase("no-page-poison", BalloonProperties(free_page_reporting=True,
                                                        page_poison=False),
                    BalloonOptions(page_poisoning=True),
                    mask(BF.STATS_VQ, BF.REPORTING) | QEMU_TRANSPORT,
                    mask(BF.STATS_VQ) | LINUX_TRANSPORT,
                    "poisoning guest, PAGE_POISON not offered: REPORTING declined (BAL-D-3)"),
)


async def negotiation(options: ScenarioOptions, rec: Recorder) -> None:
    """Offer and acceptance for each :data:`NEGOTIATION_CASES` entry (see module docstring)."""
    r = rec.result
    for case in NEGOTIATION_CASES:
        async with run_qemu(_qemu(options, case.properties)) as qemu:
            guest = build_guest(qemu, case.guest, poll_period=options.poll_period)
            bus = guest.bus
            num_max = []
            for index in range(6):
                bus.write32(MmioReg.QUEUE_SEL, index)
                num_max.append(bus.read32(MmioReg.QUEUE_NUM_MAX))
            early = case.target_before_probe
            if early:  # a target before the driver runs: QEMU raises nothing (no DRIVER_OK)
                generation = bus.read32(MmioReg.CONFIG_GENERATION)
                await rec.qmp(qemu, "balloon", {"value": options.memory - 4 * MiB},
                              variant=case.name)
                isr = bus.read32(MmioReg.INTERRUPT_STATUS)
                same_gen = bus.read32(MmioReg.CONFIG_GENERATION) == generation
                r.check(f"{case.name}: no config interrupt before DRIVER_OK",
                        isr == 0 and same_gen, f"InterruptStatus {isr:#x}, ConfigGeneration "
                        f"{'unchanged' if same_gen else 'changed'} after QMP balloon")
            guest.balloon.probe()
            t = guest.transport
            offered, accepted = t.device_features, guest.balloon.features
            r.check(f"{case.name}: QEMU offers", offered == case.offered,
                    f"{_names(offered)} (expected {_names(case.offered)})")
            r.check(f"{case.name}: driver accepts (Linux rules)", accepted == case.accepted,
                    f"{_names(accepted)}; {case.why}")
            status = t.get_status()
            want = DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK
            r.check(f"{case.name}: FEATURES_OK and DRIVER_OK stay set", status & want == want,
                    f"status {int(status):#x}")
            layout = {vq.name: vq.index for vq in guest.balloon.vqs.values()}
            qemu_layout = queue_numbering(offered)
            agree = all(qemu_layout.get(q) == vq.index for q, vq in guest.balloon.vqs.items())
            r.check(f"{case.name}: driver's queue indices are QEMU's", agree,
                    f"driver {layout}; QEMU numbers by offered features "
                    f"{ {q.name.lower(): i for q, i in qemu_layout.items()} }")
            n = len(qemu_layout)
            r.check(f"{case.name}: QueueNumMax", num_max == [1024] * n + [0] * (6 - n),
                    f"{num_max} for queues 0..5 (QEMU: 1024 = VIRTQUEUE_MAX_SIZE for each "
                    f"of its {n} queues)")
            size = config_size(offered)
            past = bus.read32(CONFIG_OFFSET + size)
            r.check(f"{case.name}: config space size", past == 0xFFFFFFFF,
                    f"{size} bytes; the word at +{size} reads {past:#x}")
            if accepted & mask(BF.PAGE_POISON):
                poison = t.read_config32(ConfigOffset.POISON_VAL)
                r.check(f"{case.name}: poison_val written", poison == case.guest.poison_val,
                        f"config poison_val reads {poison:#x}")
            if early:
                towards = guest.balloon.towards_target()
                r.check(f"{case.name}: probe picks up the pending target",
                        towards == 1024 and guest.balloon.size_work.pending,
                        f"towards_target {towards} pages, size work queued "
                        f"{guest.balloon.size_work.pending}")
            r.facts[case.name] = {"offered": _names(offered), "accepted": _names(accepted),
                                  "queues": layout, "queue_num_max": num_max,
                                  "config_size": size}
            rec.queues(guest, case.name)
            await guest.balloon.remove()
            r.check(f"{case.name}: remove resets the device", t.get_status() == 0,
                    f"status {int(t.get_status()):#x}, driver pages left "
                    f"{len(guest.mm.allocations())}")


def _names(features: int) -> str:
    return ",".join(names(features))


def _qemu(options: ScenarioOptions, props: BalloonProperties, *,
          mode: QemuMode = QemuMode.PAUSED) -> QemuOptions:
    return qemu_options(options, props, mode=mode)


# ---- inflate -----------------------------------------------------------------------------------

async def inflate(options: ScenarioOptions, rec: Recorder) -> None:
    """Inflate to a QMP target, check it from both sides, deflate back (module docstring)."""
    r = rec.result
    ram = options.memory
    pages = ram // 4 // PAGE
    async with run_qemu(_qemu(options, BalloonProperties())) as qemu:
        fill_free_ram(qemu.memory, _PATTERN)
        filled = rec.rss(qemu, "filled")
        async with run_guest(qemu, poll_period=options.poll_period,
                             tap=(BalloonQueue.INFLATE, BalloonQueue.DEFLATE)) as guest:
            b = guest.balloon
            since = len(qemu.qmp.events)
            await rec.qmp(qemu, "balloon", {"value": ram - pages * PAGE})
            reached = await wait_until(lambda: b.balloon.num_pages == pages and b.transport
                                       .read_config32(ConfigOffset.ACTUAL) == pages, 30)
            r.check("driver inflates to the target", reached,
                    f"{b.balloon.num_pages} of {pages} pages in the balloon, config actual "
                    f"{b.transport.read_config32(ConfigOffset.ACTUAL)}")
            answer = await rec.qmp(qemu, "query-balloon")
            r.check("query-balloon after inflate", answer.get("actual") == ram - pages * PAGE,
                    f"actual {answer.get('actual')} (RAM {ram} - {pages} pages)")
            await _balloon_change(r, qemu, since, ram - pages * PAGE, "inflate")
            inflated = rec.rss(qemu, "inflated")
            check_rss_drop(r, "RSS drops by the inflated pages", filled - inflated, pages * PAGE)
            gpas = [pfn * PAGE for pfn in sample(sorted(b.balloon.pages), 256)]
            n, bad = pages_equal(qemu.memory, gpas, lambda g, k: bytes(k))
            r.check("inflated pages read back as zeros", n > 0 and not bad,
                    f"{n} of {len(b.balloon.pages)} pages read, {len(bad)} not zero")
            free = [blk.pfn * PAGE for blk in guest.mm.free_blocks()]
            n, bad = pages_equal(qemu.memory, sample(free, 64),
                                 lambda g, k: bytes([_PATTERN]) * k)
            r.check("free pages keep their data", n > 0 and not bad,
                    f"{n} free blocks' first pages read, {len(bad)} lost the guest's data")
            chains = guest.tap.of("inflate")
            pfns = sum(c.nbytes for c in chains) // 4
            r.check("inflate buffers carry the PFNs", pfns == pages and len(chains)
                    == -(-pages // 256), f"{len(chains)} buffers, {pfns} PFNs, "
                    f"at most 256 each")
            since = len(qemu.qmp.events)
            await rec.qmp(qemu, "balloon", {"value": ram})
            back = await wait_until(lambda: b.balloon.num_pages == 0 and b.transport
                                    .read_config32(ConfigOffset.ACTUAL) == 0, 30)
            r.check("driver deflates to 0", back, f"{b.balloon.num_pages} pages left")
            answer = await rec.qmp(qemu, "query-balloon")
            r.check("query-balloon after deflate", answer.get("actual") == ram,
                    f"actual {answer.get('actual')} (RAM {ram})")
            await _balloon_change(r, qemu, since, ram, "deflate")
            rec.rss(qemu, "deflated")
            deflates = guest.tap.of("deflate")
            r.check("deflate buffers carry the PFNs", sum(c.nbytes for c in deflates) // 4
                    == pages, f"{len(deflates)} buffers")
            rec.queues(guest)
            rec.chains(guest)
            r.facts["inflated_pages"] = pages
            r.facts["interrupts"] = {"taken": guest.irq.interrupts, "used": guest.irq.vring,
                                     "config": guest.irq.config}
            await b.remove()
            r.check("remove leaves nothing behind", b.transport.get_status() == 0
                    and not guest.mm.allocations(),
                    f"status {int(b.transport.get_status())}, "
                    f"{len(guest.mm.allocations())} driver blocks still allocated")


async def _balloon_change(r: ScenarioResult, qemu, since: int, actual: int, what: str) -> None:
    def match(event: QmpEvent) -> bool:
        return event.data.get("actual") == actual

    try:
        # QEMU throttles BALLOON_CHANGE to one per second: the last one can lag that long
        await qemu.qmp.wait_event("BALLOON_CHANGE", since=since, match=match, timeout=3)
        held, seen = True, actual
    except PeerError:
        held = False
        seen = [e.data.get("actual") for e in qemu.qmp.events[since:]
                if e.name == "BALLOON_CHANGE"]
    r.check(f"BALLOON_CHANGE after {what}", held, f"actual {seen}")


# ---- stats -------------------------------------------------------------------------------------

async def stats(options: ScenarioOptions, rec: Recorder) -> None:
    """Our stats buffer through QEMU's parser, and QEMU's polling timer (module docstring)."""
    r = rec.result
    path = BalloonProperties().qom_path
    async with run_qemu(_qemu(options, BalloonProperties(), mode=QemuMode.RUNNING)) as qemu:
        async with run_guest(qemu, poll_period=options.poll_period) as guest:
            b, mm = guest.balloon, guest.mm
            sent = dict(b.last_stats)
            first = await _stats_when(rec, qemu, path, lambda s: s["last-update"] != 0, 3)
            _compare_stats(r, "probe's buffer parsed", first, sent, mm.totalram_pages() * PAGE)
            unset = [k for k in ("stat-htlb-pgalloc", "stat-htlb-pgfail")
                     if first["stats"].get(k) == _U64_UNSET]
            r.check("tags not sent stay unset", len(unset) == 2,
                    f"{unset} read as 2^64-1 (QEMU resets every stat before parsing)")
            work = Workload(mm, guest.memory, "idle", stamp_stride=64)
            for _ in range(4):
                work.alloc(9)
            want = mm.nr_free_pages() * PAGE
            await rec.qmp(qemu, "qom-set", {"path": path, "property":
                                            "guest-stats-polling-interval", "value": 1})
            t0 = rec.elapsed()
            second = await _stats_when(rec, qemu, path, lambda s: s["stats"].get(
                "stat-free-memory") == want, 3)
            t1 = rec.elapsed()
            _compare_stats(r, "buffer given back at once and refilled", second, dict(b.last_stats),
                           mm.totalram_pages() * PAGE)
            r.check("second update has changed values", second["stats"]["stat-free-memory"]
                    == first["stats"]["stat-free-memory"] - 8 * MiB,
                    f"free memory {first['stats']['stat-free-memory']} -> "
                    f"{second['stats']['stat-free-memory']} after allocating 8 MiB")
            for _ in range(4):
                work.alloc(9)
            want = mm.nr_free_pages() * PAGE
            third = await _stats_when(rec, qemu, path, lambda s: s["stats"].get(
                "stat-free-memory") == want, 4)
            t2 = rec.elapsed()
            r.check("polling timer fires again", third["stats"].get("stat-free-memory") == want
                    and 0.5 <= t2 - t1 <= 3.5, f"free memory {want} seen {t2 - t1:.2f} s after "
                    f"the previous update (interval 1 s)")
            summary = {row["queue"]: row for row in guest.queue_summary()}["stats"]
            r.check("QEMU keeps one stats buffer parked", summary["used_idx"] >= 2 and
                    summary["avail_idx"] == summary["used_idx"] + 1,
                    f"{summary['avail_idx']} buffers made available, {summary['used_idx']} "
                    f"given back")
            await rec.qmp(qemu, "qom-set", {"path": path, "property":
                                            "guest-stats-polling-interval", "value": 0})
            r.check("workload data intact", not work.verify(),
                    f"{work.allocs} allocations verified")
            rec.queues(guest)
            r.facts["update_latency_s"] = {"enable_to_refill": round(t1 - t0, 3),
                                           "periodic": round(t2 - t1, 3)}
            r.facts["last_update"] = [first["last-update"], second["last-update"],
                                      third["last-update"]]
            work.free_all()
            await b.remove()


async def _stats_when(rec: Recorder, qemu, path: str, ready: Callable[[dict], bool],
                      timeout: float) -> dict:
    """Poll ``qom-get guest-stats`` until ``ready(answer)``; record the last answer."""
    answer: dict = {}

    async def fetch() -> bool:
        nonlocal answer
        answer = await qemu.qmp.guest_stats(path)
        return ready(answer)

    with trio.move_on_after(timeout):
        while not await fetch():
            await trio.sleep(0.02)
    await rec.qmp(qemu, "qom-get", {"path": path, "property": "guest-stats"})
    return answer


def _compare_stats(r: ScenarioResult, name: str, answer: dict, sent: dict, total: int) -> None:
    got = answer.get("stats", {})
    pairs = {"stat-free-memory": sent.get(StatTag.MEMFREE),
             "stat-total-memory": sent.get(StatTag.MEMTOT),
             "stat-available-memory": sent.get(StatTag.AVAIL),
             "stat-disk-caches": sent.get(StatTag.CACHES)}
    wrong = {k: (got.get(k), v) for k, v in pairs.items() if got.get(k) != v}
    r.check(f"{name}: QEMU shows our values", not wrong and got.get("stat-total-memory")
            == total, f"MEMFREE {got.get('stat-free-memory')}, MEMTOT "
            f"{got.get('stat-total-memory')} (allocator: {total}); differing: {wrong or 'none'}")


# ---- registry ----------------------------------------------------------------------------------

SCENARIOS: dict[str, Scenario] = {
    "negotiation": negotiation,
    "inflate": inflate,
    "stats": stats,
    "reporting": reporting,
    "hinting": hinting,
}
ORDER = tuple(SCENARIOS)
"""The order ``all`` runs them in."""


async def run_scenario(name: str, options: ScenarioOptions | None = None) -> ScenarioResult:
    """Run scenario ``name`` against QEMU and return what it found.

    Raises:
        ConfigError: an unknown scenario or bad options.
        PeerError: QEMU is missing, refused its command line or died.
    """
    options = options or ScenarioOptions()
    options.validate()
    func = SCENARIOS.get(name)
    if func is None:
        raise ConfigError(f"unknown QEMU scenario {name!r}; choose from {', '.join(ORDER)}")
    result = ScenarioResult(name)
    rec = Recorder(result)
    try:
        await func(options, rec)
    except BaseExceptionGroup as group:
        raise _first(group) from None
    finally:
        result.seconds = rec.elapsed()
    return result


async def run_scenarios(names: Iterable[str], options: ScenarioOptions | None = None
                        ) -> list[ScenarioResult]:
    """Run several scenarios one after the other."""
    return [await run_scenario(name, options) for name in names]


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
