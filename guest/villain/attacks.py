"""The attacks outside descriptor layouts: bad balloon payloads, config, features and status.

Each handler takes the :class:`~guest.villain.suite.Suite` and its case and returns an
:class:`~guest.villain.suite.Outcome`. Payload attacks put valid chains with a bad payload on
the right queue of the driver's control ring (:class:`~guest.villain.driver.ControlRing`),
notify, observe (used ring, DEVICE_NEEDS_RESET, discarded pool pages), then prove the device
serviceable (:meth:`~guest.villain.driver.HostileDriver.recover`). What QEMU does for each is in
research/peers.md §8.6; the grading follows :mod:`guest.villain.verdicts`.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guest.villain.cases import AttackCase
from guest.villain.driver import ControlRing, HostileDriver
from guest.villain.verdicts import DeviceVerdict
from protocol.balloon import BalloonQueue, ConfigOffset
from protocol.errors import VballoonError
from protocol.features import BalloonFeature, TransportFeature, bit
from protocol.mmio import MAGIC_VALUE, VERSION
from protocol.split_ring import DescFlags

if TYPE_CHECKING:
    from guest.villain.suite import Outcome, Suite

__all__ = ["HANDLERS"]

V = DeviceVerdict
_WRITE = int(DescFlags.WRITE)
_K = BalloonQueue
_BAD_PFN = 0xFFFF_FF00
"""A PFN 16 TiB up: outside any test guest's RAM."""


def _outcome(verdict: DeviceVerdict, evidence: str, values: dict[str, Any] | None = None,
             note: str | None = None) -> Outcome:
    from guest.villain.suite import Outcome

    return Outcome(verdict, evidence, values or {}, note)


@dataclass(slots=True)
class _Run:
    signal: str
    busy: bool
    alive: bool
    needs_reset: bool
    config_irq: bool | None
    used_idx: int
    used: list[tuple[int, int]]
    discarded: set[int]
    heads: list[int]
    recovered: bool
    how: str

    def values(self) -> dict[str, Any]:
        return {"used_idx": self.used_idx, "used": [h for h, _ in self.used],
                "needs_reset": self.needs_reset, "discarded": sorted(self.discarded)[:8],
                "recovered": self.recovered}


Builder = Callable[[HostileDriver, ControlRing], list[list[tuple[int, int, int]]]]


async def _attack(suite: Suite, case: AttackCase, kind: BalloonQueue, build: Builder, *,
                  pool: int = 8, rounds: int = 1) -> _Run | None:
    """Publish ``build``'s chains on queue ``kind`` (one notify per chain when ``rounds`` is
    the chain count), observe, recover. None if the queue cannot be set up."""
    port, drv = suite.port, suite.driver
    if not await port.begin(drv.features()):
        raise VballoonError("the device refused FEATURES_OK for features it offers")
    drv.fill_pool(pool)
    ring = await drv.control_ring(kind)
    if ring is None:
        return None
    await port.driver_ok()
    chains = build(drv, ring)
    heads = []
    per_round = max(1, len(chains) // rounds)
    for start in range(0, len(chains), per_round):
        for chain in chains[start:start + per_round]:
            heads.append(drv.publish(ring, chain))
        await port.notify(ring.index)
        expected = min(start + 1, len(chains))

        async def done(n: int = expected) -> bool:
            return (not port.alive() or await port.needs_reset()
                    or drv.used(ring.used, ring.size)[0] >= n)

        await port.settle(until=done)
    busy = getattr(port, "stuck", False)
    alive = port.alive()
    needs_reset = await port.needs_reset() if alive else False
    irq = await port.config_interrupt() if alive and needs_reset else None
    idx, used, _ = drv.used(ring.used, ring.size)
    discarded = drv.discarded(pool)
    suite.note_reset(case, needs_reset, irq)
    recovered, how = await drv.recover()
    run_signal = getattr(port, "reset_signal", "DEVICE_NEEDS_RESET set")
    return _Run(run_signal, busy, alive, needs_reset, irq, idx, used, discarded, heads,
                recovered, how)


def _health(run: _Run) -> Outcome | None:
    """The verdicts every payload case shares: died, wedged, refused with a reset."""
    if not run.alive:
        return _outcome(V.FAIL, "the device died", run.values())
    if not run.recovered:
        return _outcome(V.WEDGED, run.how, run.values())
    if run.busy:
        return _outcome(V.WEDGED, "the device never became idle (a busy loop) until reset",
                        run.values())
    if run.needs_reset:
        return _outcome(V.REJECT, f"{run.signal}; serviceable after a reset", run.values())
    return None


def _pfn_grade(case: AttackCase, device: str, run: _Run, named: set[int],
               consumed: str) -> Outcome:
    """Grade a chain whose PFNs ``named`` a lenient device would take."""
    from guest.villain.suite import not_checked_note

    health = _health(run)
    if health is not None:
        return health
    stray = run.discarded - named
    if stray:
        return _outcome(V.FAIL, f"pages the chain did not name were discarded: "
                        f"{sorted(stray)[:4]}", run.values())
    if not run.used_idx:
        return _outcome(V.REJECT, "the chain was kept, not used; serviceable after a reset",
                        run.values())
    taken = named & run.discarded
    if named and taken == named:
        return _outcome(V.PASS, consumed, run.values(), not_checked_note(case, device))
    if taken:
        return _outcome(V.PASS, f"{len(taken)} of {len(named)} PFNs taken, the rest ignored",
                        run.values(), not_checked_note(case, device))
    return _outcome(V.REJECT, "the chain was returned used without effect", run.values())


# ---- inflate and deflate payloads -------------------------------------------------------------

async def _bl01(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    pfns = [drv.pool_pfn(0), drv.pool_pfn(1)]
    run = await _attack(suite, case, _K.INFLATE,
                        lambda d, r: [[d.pfn_buffer(r, pfns, tail=b"\x01\x02")]])
    return _pfn_grade(case, suite.port.name, run, set(pfns),
                      "the 2 PFNs were taken and the 2 trailing bytes ignored")


async def _bl02(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    pfns = [drv.pool_pfn(k) for k in range(1024)]
    run = await _attack(suite, case, _K.INFLATE, lambda d, r: [[d.pfn_buffer(r, pfns)]],
                        pool=1024)
    return _pfn_grade(case, suite.port.name, run, set(pfns), "all 1024 PFNs were taken")


async def _bl03(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    pfns = [drv.pool_pfn(0), drv.pool_pfn(1)]
    run = await _attack(suite, case, _K.INFLATE,
                        lambda d, r: [[d.pfn_buffer(r, pfns, flags=_WRITE)]])
    out = _pfn_grade(case, suite.port.name, run, set(pfns), "PFNs in a device-writable "
                     "buffer were taken")
    if out.verdict is V.REJECT and run.used_idx:
        out.evidence = "the device-writable buffer was ignored and returned used"
    return out


async def _bl04(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    pfns = [drv.pool_pfn(0), _BAD_PFN, drv.pool_pfn(1)]
    run = await _attack(suite, case, _K.INFLATE, lambda d, r: [[d.pfn_buffer(r, pfns)]])
    return _pfn_grade(case, suite.port.name, run, {pfns[0], pfns[2]},
                      "the PFNs in RAM were taken, the one outside RAM skipped")


async def _bl09(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    pfn = drv.pool_pfn(0)
    run = await _attack(suite, case, _K.DEFLATE, lambda d, r: [[d.pfn_buffer(r, [pfn])]])
    if run is None:
        return _outcome(V.SKIP, "no deflate queue")
    health = _health(run)
    if health is not None:
        return health
    if run.discarded:
        return _outcome(V.FAIL, "deflating discarded a page", run.values())
    if run.used_idx:
        return _outcome(V.PASS, "the deflate of a never-inflated page was acknowledged",
                        run.values())
    return _outcome(V.REJECT, "the deflate was kept, not used", run.values())


# ---- stats -----------------------------------------------------------------------------------

def _stats(entries: list[tuple[int, int]], tail: bytes = b"") -> bytes:
    return b"".join(struct.pack("<HQ", t, v) for t, v in entries) + tail


async def _stats_case(suite: Suite, case: AttackCase, data: bytes, *,
                      must_accept: bool = False) -> Outcome:
    run = await _attack(suite, case, _K.STATS,
                        lambda d, r: [[(d.put(r, data), len(data), 0)]])
    if run is None:
        return _outcome(V.SKIP, "no stats queue")
    if must_accept and run.needs_reset and run.alive:
        return _outcome(V.FAIL, "DEVICE_NEEDS_RESET for a buffer the device must accept",
                        run.values())
    health = _health(run)
    if health is not None:
        return health
    state = "returned used" if run.used_idx else "parked (kept until the next request)"
    return _outcome(V.PASS, f"the {len(data)}-byte stats buffer was taken without harm and "
                    f"{state}", run.values())


async def _bl11(suite: Suite, case: AttackCase) -> Outcome:
    return await _stats_case(suite, case, _stats([(4, 1 << 20)], b"\x05" * 5))


async def _bl12(suite: Suite, case: AttackCase) -> Outcome:
    return await _stats_case(suite, case, _stats([(k % 10, k) for k in range(819)]))


async def _bl13(suite: Suite, case: AttackCase) -> Outcome:
    return await _stats_case(suite, case, _stats([(0x7FFF, 1), (4, 4096), (0x1234, 2)]),
                             must_accept=True)


async def _bl14(suite: Suite, case: AttackCase) -> Outcome:
    data = _stats([(4, 4096)])
    run = await _attack(suite, case, _K.STATS,
                        lambda d, r: [[(d.put(r, data), len(data), 0)],
                                      [(d.put(r, data), len(data), 0)]], rounds=2)
    if run is None:
        return _outcome(V.SKIP, "no stats queue")
    health = _health(run)
    if health is not None:
        return health
    first = run.heads[0]
    if any(h == first for h, _ in run.used):
        return _outcome(V.PASS, "the parked buffer was returned used when the second one "
                        "arrived", run.values() | {"heads": run.heads})
    return _outcome(V.REJECT, "both buffers kept; serviceable after a reset",
                    run.values() | {"heads": run.heads})


# ---- free page hinting and reporting -----------------------------------------------------------

async def _bl16(suite: Suite, case: AttackCase) -> Outcome:
    run = await _attack(suite, case, _K.FREE_PAGE,
                        lambda d, r: [[(d.put(r, b"\x02\x00"), 2, 0)]])
    if run is None:
        return _outcome(V.SKIP, "no free page queue")
    from guest.villain.suite import not_checked_note

    health = _health(run)
    if health is not None:
        return health
    if run.used_idx:
        return _outcome(V.PASS, "the 2-byte command ID was returned used without an error",
                        run.values(), not_checked_note(case, suite.port.name))
    return _outcome(V.REJECT, "the 2-byte command ID was kept, not used", run.values())


async def _bl17(suite: Suite, case: AttackCase) -> Outcome:
    page = suite.driver.pool_pfn(0) << 12
    run = await _attack(suite, case, _K.FREE_PAGE, lambda d, r: [[(page, 4096, _WRITE)]])
    if run is None:
        return _outcome(V.SKIP, "no free page queue")
    health = _health(run)
    if health is not None:
        return health
    if run.discarded:
        return _outcome(V.FAIL, "a page hinted outside any round was discarded", run.values())
    if run.used_idx:
        return _outcome(V.PASS, "the hint without a command ID was ignored and returned used",
                        run.values())
    return _outcome(V.REJECT, "the hint was kept, not used", run.values())


async def _report_case(suite: Suite, case: AttackCase, buffer: Callable[[int],
                       tuple[int, int, int]], pages: set[int]) -> Outcome:
    run = await _attack(suite, case, _K.REPORTING,
                        lambda d, r: [[buffer(d.pool_pfn(0) << 12)]])
    if run is None:
        return _outcome(V.SKIP, "no reporting queue")
    return _pfn_grade(case, suite.port.name, run, pages, "the bad range was discarded")


async def _bl19(suite: Suite, case: AttackCase) -> Outcome:
    drv = suite.driver
    return await _report_case(suite, case, lambda gpa: (gpa + 512, 4096, _WRITE),
                              {drv.pool_pfn(0), drv.pool_pfn(1)})


async def _bl21(suite: Suite, case: AttackCase) -> Outcome:
    return await _report_case(suite, case, lambda gpa: (gpa, 4096, 0),
                              {suite.driver.pool_pfn(0)})


# ---- config --------------------------------------------------------------------------------------

async def _live(suite: Suite, features: int | None = None) -> bool:
    port, drv = suite.port, suite.driver
    ok = await port.begin(drv.features() if features is None else features)
    if ok:
        await port.driver_ok()
    return ok


async def _bl23(suite: Suite, case: AttackCase) -> Outcome:
    port = suite.port
    await _live(suite)
    before = await port.read_config(ConfigOffset.NUM_PAGES)
    await port.write_config(ConfigOffset.NUM_PAGES, (before or 0) + 12345)
    after = await port.read_config(ConfigOffset.NUM_PAGES)
    recovered, how = await suite.driver.recover()
    values = {"before": before, "after": after, "recovered": recovered}
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    if after != before:
        return _outcome(V.FAIL, f"the driver changed num_pages ({before} -> {after}), a "
                        "device-owned field", values)
    return _outcome(V.REJECT, "the write to num_pages was ignored", values)


async def _bl24(suite: Suite, case: AttackCase) -> Outcome:
    port = suite.port
    await _live(suite)
    await port.write_config(ConfigOffset.ACTUAL, 0xFFFF_FFFF)
    after = await port.read_config(ConfigOffset.ACTUAL)
    await port.write_config(ConfigOffset.ACTUAL, 0)
    recovered, how = await suite.driver.recover()
    values = {"after": after, "recovered": recovered}
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    if after == 0xFFFF_FFFF:
        return _outcome(V.PASS, "actual 0xffffffff stored without harm", values)
    return _outcome(V.REJECT, f"actual read back as {after!r}", values)


async def _bl25(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not drv.offers(bit(BalloonFeature.PAGE_POISON)):
        return _outcome(V.SKIP, "poison_val is not in the config space (PAGE_POISON not "
                        "offered)")
    await _live(suite)  # PAGE_POISON not accepted
    await port.write_config(ConfigOffset.POISON_VAL, 0xAAAA_AAAA)
    after = await port.read_config(ConfigOffset.POISON_VAL)
    recovered, how = await drv.recover()
    values = {"after": after, "recovered": recovered}
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    if after == 0:
        return _outcome(V.REJECT, "poison_val forced to 0 (PAGE_POISON not negotiated)",
                        values)
    from guest.villain.suite import not_checked_note

    return _outcome(V.PASS, f"poison_val stored as {after!r}", values,
                    not_checked_note(case, port.name))


async def _gen_v14(suite: Suite, case: AttackCase) -> Outcome:
    port = suite.port
    await port.reset()
    value = await port.read_config(ConfigOffset.NUM_PAGES)
    if value is None:
        return _outcome(V.SKIP, "config space is not readable before features on this port")
    return _outcome(V.PASS, f"num_pages read as {value} right after reset, before "
                    "FEATURES_OK", {"num_pages": value})


# ---- features and status -------------------------------------------------------------------------

async def _gen_v5(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    extra = next(bit(n) for n in (6, 7, 8, 9, 10, 50) if not drv.offers(bit(n)))
    held = await port.begin(drv.features(extra))
    recovered, how = await drv.recover()
    values = {"extra_bit": extra.bit_length() - 1, "features_ok": held,
              "recovered": recovered}
    if held:
        return _outcome(V.FAIL, f"FEATURES_OK held with bit {extra.bit_length() - 1}, which "
                        "the device never offered", values)
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    return _outcome(V.REJECT, "FEATURES_OK left clear for a feature never offered", values)


async def _gen_v8(suite: Suite, case: AttackCase) -> Outcome:
    has = suite.driver.offers(bit(TransportFeature.VERSION_1))
    return _outcome(V.PASS if has else V.FAIL, f"VERSION_1 {'is' if has else 'is not'} "
                    "offered", {"offered": hex(suite.driver.offered)})


async def _gen_v1(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not port.status_visible:
        return _outcome(V.SKIP, "this transport has no DRIVER_OK")
    await port.begin(drv.features())
    ring = await drv.control_ring(_K.INFLATE)
    pfn = drv.pool_pfn(0)
    drv.fill_pool(1)
    drv.publish(ring, [drv.pfn_buffer(ring, [pfn])])
    await port.notify(ring.index)

    async def used() -> bool:
        return drv.used(ring.used, ring.size)[0] >= 1

    await port.settle(until=used)
    early = drv.used(ring.used, ring.size)[0] >= 1 or pfn in drv.discarded(1)
    await port.driver_ok()
    await port.notify(ring.index)
    await port.settle(until=used)
    later = drv.used(ring.used, ring.size)[0] >= 1
    recovered, how = await drv.recover()
    values = {"used_before_driver_ok": early, "used_after": later, "recovered": recovered}
    if early:
        return _outcome(V.FAIL, "the device used a buffer notified before DRIVER_OK", values)
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    return _outcome(V.PASS, "nothing was used before DRIVER_OK"
                    + ("; the buffer was used once DRIVER_OK was set" if later else ""), values)


async def _gen_v12(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not port.status_visible:
        return _outcome(V.SKIP, "this transport has no status register")
    await port.begin(drv.features())
    await drv.control_ring(_K.INFLATE)
    await port.driver_ok()
    await port.reset()
    status = await port.status()
    isr = await port.interrupt_status()
    ready = await port.queue_ready(0)
    values = {"status": status, "interrupt_status": isr, "queue_ready": ready}
    ok = status == 0 and not isr and not ready
    return _outcome(V.PASS if ok else V.FAIL, "after a reset Status, InterruptStatus and "
                    f"QueueReady read {status}, {isr}, {ready}", values)


async def _mmio_v1(suite: Suite, case: AttackCase) -> Outcome:
    ident = await suite.port.identity()
    if ident is None:
        return _outcome(V.SKIP, "this transport has no virtio-mmio registers")
    ok = ident["magic"] == MAGIC_VALUE and ident["version"] == VERSION
    return _outcome(V.PASS if ok else V.FAIL, f"MagicValue {ident['magic']:#x}, Version "
                    f"{ident['version']}", ident)


HANDLERS: dict[str, Callable[[Suite, AttackCase], Awaitable[Outcome]]] = {
    "BL-01": _bl01, "BL-02": _bl02, "BL-03": _bl03, "BL-04": _bl04, "BL-09": _bl09,
    "BL-11": _bl11, "BL-12": _bl12, "BL-13": _bl13, "BL-14": _bl14, "BL-16": _bl16,
    "BL-17": _bl17, "BL-19": _bl19, "BL-21": _bl21, "BL-23": _bl23, "BL-24": _bl24,
    "BL-25": _bl25, "GEN-V-14": _gen_v14, "GEN-V-5": _gen_v5, "GEN-V-8": _gen_v8,
    "GEN-V-1": _gen_v1, "GEN-V-12": _gen_v12, "MMIO-V-1": _mmio_v1,
}
"""Case ID -> handler, for every case that is not a descriptor layout."""
