"""Cases about what a device must do for a well-behaved driver: notifications, features,
reset, page poison and hinting (virtio §2.1-§2.7, §4.2, §5.5).

Where :mod:`guest.villain.attacks` sends bad input, these cases send valid input in a
situation the spec says something about, and check the device's answer from the driver's side:
an interrupt that must (or should not) come, a queue that must not be touched, a page that
must keep its contents, a feature set that must be accepted again. Cases that need the host
(a new balloon target, a hinting round) use the port's :class:`~guest.villain.port.HostControl`
and are skipped where it cannot do that.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from guest.villain.attacks import _live, _outcome, _stats_case
from guest.villain.cases import AttackCase
from guest.villain.driver import PATTERN
from guest.villain.verdicts import DeviceVerdict
from protocol.balloon import BalloonQueue, CommandId, ConfigOffset
from protocol.features import BalloonFeature, TransportFeature, bit, names
from protocol.split_ring import AVAIL_FLAGS, AVAIL_RING, DescFlags
from virtqueue.layout import DESC, split_layout

if TYPE_CHECKING:
    from guest.villain.suite import Outcome, Suite

__all__ = ["BEHAVIOUR"]

V = DeviceVerdict
_K = BalloonQueue
_DEFINED = 0
for _f in (*BalloonFeature, *TransportFeature):
    if _f is not TransportFeature.UNUSED:
        _DEFINED |= bit(_f)
_PREREQUISITES: dict[int, int] = {}
"""Feature -> the features it needs; the spec defines none for a balloon's bits."""
_WRITE = int(DescFlags.WRITE)
_EVENT_IDX = bit(TransportFeature.RING_EVENT_IDX)
_POISON = 0xAAAA_AAAA


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


# ---- features -------------------------------------------------------------------------------

async def _gen_v4(suite: Suite, case: AttackCase) -> Outcome:
    offered = suite.driver.offered
    missing = {f: need for f, need in _PREREQUISITES.items()
               if offered >> f & 1 and offered & need != need}
    return _outcome(V.FAIL if missing else V.PASS, "every offered feature comes with its "
                    "prerequisites (the spec defines none among a balloon's bits)" if not
                    missing else f"offered without prerequisites: {missing}",
                    {"offered": names(offered)})


async def _gen_v6(suite: Suite, case: AttackCase) -> Outcome:
    offered = suite.driver.offered
    bad = offered & ~_DEFINED
    return _outcome(V.FAIL if bad else V.PASS, f"offered {names(offered)}" + (
        f"; undefined for a balloon: {names(bad)}" if bad else ", all defined"),
        {"offered": names(offered), "undefined": names(bad)})


async def _gen_v7(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    features = drv.features()
    first = await port.begin(features)
    await port.reset()
    second = await port.begin(features)
    values = {"features": names(features), "first": first, "after_reset": second}
    if not first:
        return _outcome(V.FAIL, "FEATURES_OK refused for features the device offers", values)
    return _outcome(V.PASS if second else V.FAIL, "the same feature set was accepted again "
                    "after a reset" if second else "FEATURES_OK refused after a reset for a "
                    "set accepted before", values)


# ---- reset and queues --------------------------------------------------------------------

async def _gen_v13(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not port.status_visible:
        return _outcome(V.SKIP, "a reset is a new connection on this transport: the old ring "
                        "is gone with it")
    await _live(suite)
    ring = await drv.control_ring(_K.INFLATE)
    await port.reset()
    drv.fill_pool(1)
    drv.publish(ring, [drv.pfn_buffer(ring, [drv.pool_pfn(0)])])
    await port.notify(ring.index)
    await port.settle()
    used = drv.used(ring.used, ring.size)[0]
    taken = drv.pool_pfn(0) in drv.discarded(1)
    recovered, how = await drv.recover()
    values = {"used_idx": used, "discarded": taken, "recovered": recovered}
    if used or taken:
        return _outcome(V.FAIL, "the device used a queue after a reset, before the driver "
                        "set it up again", values)
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    return _outcome(V.PASS, "after the reset the old ring was left alone", values)


async def _mmio_v5(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    await port.begin(drv.features())
    base = port.layout.control
    desc, avail, used, total = split_layout(base, 8)
    drv.memory.write(base, bytes(total))
    await port.setup_queue(0, 8, desc, avail, used, ready=False)
    await port.driver_ok()
    drv.fill_pool(1)
    pfn = drv.pool_pfn(0)
    drv.memory.write(base + 0x400, struct.pack("<I", pfn))
    drv.memory.write(desc, DESC.pack(base + 0x400, 4, 0, 0))
    drv.memory.write(avail + AVAIL_RING, _u16(0))
    drv.memory.write(avail + 2, _u16(1))
    await port.notify(0)
    await port.settle()
    used_idx = drv.used(used, 8)[0]
    taken = pfn in drv.discarded(1)
    recovered, how = await drv.recover()
    values = {"used_idx": used_idx, "discarded": taken, "recovered": recovered}
    if used_idx or taken:
        return _outcome(V.FAIL, "the device used a queue that was never made ready", values)
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    return _outcome(V.PASS, "a queue that was not ready was left alone", values)


# ---- notifications -------------------------------------------------------------------------

async def _inflate_one(suite: Suite, ring, k: int) -> bool | None:
    """Publish one PFN on ``ring``, notify, settle; whether a used interrupt came."""
    port, drv = suite.port, suite.driver
    drv.publish(ring, [drv.pfn_buffer(ring, [drv.pool_pfn(k)])])
    await port.notify(ring.index)
    want = ring.avail_idx

    async def used() -> bool:
        return drv.used(ring.used, ring.size)[0] >= want

    await port.settle(until=used)
    return await port.take_used_interrupt(ring.index)


async def _spl_v7(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    await _live(suite)
    drv.fill_pool(4)
    ring = await drv.control_ring(_K.INFLATE)
    await port.take_used_interrupt(ring.index)
    drv.memory.write(ring.avail + AVAIL_FLAGS, _u16(0))
    first = await _inflate_one(suite, ring, 0)
    if first is None:
        return _outcome(V.SKIP, "used-buffer notifications are not observable on this port")
    drv.memory.write(ring.avail + AVAIL_FLAGS, _u16(1))  # VRING_AVAIL_F_NO_INTERRUPT
    second = await _inflate_one(suite, ring, 1)
    values = {"interrupt_with_flags_0": first, "interrupt_with_no_interrupt": second}
    await drv.recover()
    if not first:
        return _outcome(V.FAIL, "no used-buffer notification with avail.flags 0 (MUST)",
                        values)
    note = ("notified although avail.flags had NO_INTERRUPT (a SHOULD NOT)" if second
            else None)
    return _outcome(V.PASS, "notified with avail.flags 0; "
                    + ("also with NO_INTERRUPT" if second else "silent with NO_INTERRUPT"),
                    values, note)


async def _spl_v8(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not drv.offers(_EVENT_IDX):
        return _outcome(V.SKIP, "EVENT_IDX is not offered")
    await port.begin(drv.features(_EVENT_IDX))
    drv.fill_pool(4)
    ring = await drv.control_ring(_K.INFLATE)
    await port.driver_ok()
    used_event = ring.avail + AVAIL_RING + 2 * ring.size
    drv.memory.write(ring.avail + AVAIL_FLAGS, _u16(1))  # must be ignored with EVENT_IDX
    drv.memory.write(used_event, _u16(0))
    first = await _inflate_one(suite, ring, 0)  # the used entry goes to index 0 == used_event
    if first is None:
        return _outcome(V.SKIP, "used-buffer notifications are not observable on this port")
    drv.memory.write(used_event, _u16(10))
    second = await _inflate_one(suite, ring, 1)  # index 1 != 10
    flags = struct.unpack("<H", drv.memory.read(ring.used, 2))[0]
    values = {"notified_at_used_event": first, "notified_elsewhere": second,
              "used_flags": flags}
    await drv.recover()
    if not first:
        return _outcome(V.FAIL, "no notification when the used entry reached used_event "
                        "(avail.flags 1 must be ignored with EVENT_IDX)", values)
    if flags:
        return _outcome(V.FAIL, f"used.flags {flags} with EVENT_IDX (SPL-V-9: must be 0)",
                        values)
    return _outcome(V.PASS, "notified at used_event despite avail.flags 1"
                    + ("; also before it" if second else "; silent otherwise"), values,
                    "notified although used_event was not reached (a SHOULD NOT)"
                    if second else None)


async def _spl_v10(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    await _live(suite)
    drv.fill_pool(1)
    ring = await drv.control_ring(_K.INFLATE)
    for _ in range(3):
        await port.notify(ring.index)
    await port.settle()
    if await port.needs_reset() or not port.alive():
        return _outcome(V.FAIL, "spurious notifications broke the device")
    spurious_used = drv.used(ring.used, ring.size)[0]
    await _inflate_one(suite, ring, 0)
    used = drv.used(ring.used, ring.size)[0]
    values = {"used_after_spurious": spurious_used, "used_after_real": used}
    if spurious_used:
        return _outcome(V.FAIL, "spurious notifications produced used elements", values)
    if used != 1:
        return _outcome(V.FAIL, "a real inflate after spurious notifications was not used",
                        values)
    return _outcome(V.PASS, "3 notifications with nothing available were ignored; the next "
                    "real buffer was used", values)


async def _mmio_v2(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    if not port.status_visible:
        return _outcome(V.SKIP, "this transport has no InterruptStatus")
    await _live(suite)
    drv.fill_pool(1)
    ring = await drv.control_ring(_K.INFLATE)
    drv.publish(ring, [drv.pfn_buffer(ring, [drv.pool_pfn(0)])])
    await port.notify(ring.index)
    await port.settle()
    first, second = await port.interrupt_status(), await port.interrupt_status()
    await port.acknowledge()
    after = await port.interrupt_status()
    values = {"reads": [first, second], "after_ack": after}
    await drv.recover()
    ok = bool(first & 1) and first == second and not after and not (first & ~3)
    return _outcome(V.PASS if ok else V.FAIL, f"InterruptStatus read {first:#x} twice, "
                    f"{after:#x} after InterruptACK", values)


# ---- config ------------------------------------------------------------------------------------

async def _mmio_v4(suite: Suite, case: AttackCase) -> Outcome:
    port, host = suite.port, suite.port.host
    if host is None:
        return _outcome(V.SKIP, "the suite cannot reach this device's host controls")
    if await port.config_generation() is None:
        return _outcome(V.SKIP, "this transport has no ConfigGeneration")
    await _live(suite)
    before = await port.config_generation()
    old = await port.read_config(ConfigOffset.NUM_PAGES)
    await host.set_target(32 << 20)
    after = await port.config_generation()
    new = await port.read_config(ConfigOffset.NUM_PAGES)
    values = {"generation": [before, after], "num_pages": [old, new]}
    await suite.driver.recover()
    if old == new:
        return _outcome(V.SKIP, "the host's new target did not change num_pages", values)
    return _outcome(V.PASS if after != before else V.FAIL, f"num_pages {old} -> {new}, "
                    f"ConfigGeneration {before} -> {after}", values)


# ---- page poison and hinting -------------------------------------------------------------------

async def _bal_v4(suite: Suite, case: AttackCase) -> Outcome:
    entries = [(t, 1000 + t) for t in (7, 6, 5, 4, 3, 2, 1, 0)]
    data = b"".join(struct.pack("<HQ", t, v) for t, v in entries)
    return await _stats_case(suite, case, data, must_accept=True)


async def _bal_v14(suite: Suite, case: AttackCase) -> Outcome:
    port, drv = suite.port, suite.driver
    need = bit(BalloonFeature.PAGE_POISON) | bit(BalloonFeature.REPORTING)
    if not drv.offers(need):
        return _outcome(V.SKIP, "PAGE_POISON and REPORTING are not both offered")
    await port.begin(drv.features(need))
    ring = await drv.control_ring(_K.REPORTING)
    await port.write_config(ConfigOffset.POISON_VAL, _POISON)
    await port.driver_ok()
    page = drv.pool_pfn(0) << 12
    drv.memory.fill(page, 4096, 0xAA)
    drv.publish(ring, [(page, 4096, _WRITE)])
    await port.notify(ring.index)

    async def used() -> bool:
        return drv.used(ring.used, ring.size)[0] >= 1

    await port.settle(until=used)
    idx = drv.used(ring.used, ring.size)[0]
    kept = drv.memory.read(page, 4096) == b"\xaa" * 4096
    recovered, how = await drv.recover()
    values = {"used_idx": idx, "page_kept": kept, "recovered": recovered}
    if not kept:
        return _outcome(V.FAIL, "a reported page no longer holds poison_val 0xaaaaaaaa",
                        values)
    if not recovered:
        return _outcome(V.WEDGED, how, values)
    return _outcome(V.PASS, "the reported page still holds poison_val"
                    + (" and the report was used" if idx else " (the report was not used)"),
                    values)


async def _hint_ready(suite: Suite) -> tuple[object, object] | Outcome:
    port, drv = suite.port, suite.driver
    host = port.host
    if host is None or not host.can_hint():
        return _outcome(V.SKIP, "the suite cannot start a hinting round on this device (QEMU "
                        "starts one only inside a live migration)")
    if not drv.offers(bit(BalloonFeature.FREE_PAGE_HINT)):
        return _outcome(V.SKIP, "FREE_PAGE_HINT is not offered")
    await _live(suite)
    ring = await drv.control_ring(_K.FREE_PAGE)
    return host, ring


async def _bal_v7(suite: Suite, case: AttackCase) -> Outcome:
    ready = await _hint_ready(suite)
    if not isinstance(ready, tuple):
        return ready
    host, _ = ready
    port = suite.port
    await host.hint_start()
    first = await port.read_config(ConfigOffset.FREE_PAGE_HINT_CMD_ID)
    await host.hint_start()  # no STOP from the driver in between
    second = await port.read_config(ConfigOffset.FREE_PAGE_HINT_CMD_ID)
    await host.hint_done()
    await suite.driver.recover()
    values = {"first": first, "second": second}
    ok = first is not None and first >= 2 and second != first
    return _outcome(V.PASS if ok else V.FAIL, f"command IDs {first!r} then {second!r} without "
                    "a STOP from the driver in between", values)


async def _bal_v10(suite: Suite, case: AttackCase) -> Outcome:
    ready = await _hint_ready(suite)
    if not isinstance(ready, tuple):
        return ready
    host, ring = ready
    port, drv = suite.port, suite.driver
    drv.fill_pool(2)
    await host.hint_start()
    cmd = await port.read_config(ConfigOffset.FREE_PAGE_HINT_CMD_ID) or 0
    drv.publish(ring, [(drv.put(ring, struct.pack("<I", cmd)), 4, 0)])
    page = drv.pool_pfn(0) << 12
    drv.publish(ring, [(page, 4096, _WRITE)])
    drv.publish(ring, [(drv.put(ring, struct.pack("<I", CommandId.STOP)), 4, 0)])
    await port.notify(ring.index)
    await port.settle()
    await host.hint_done()
    await port.settle()
    kept = drv.memory.read(page, 4096) == bytes([PATTERN]) * 4096
    await drv.recover()
    values = {"cmd_id": cmd, "page_kept": kept}
    return _outcome(V.PASS if kept else V.FAIL, "the hinted page was left alone after DONE"
                    if kept else "the hinted page changed after DONE", values)


BEHAVIOUR: dict[str, Callable[[Suite, AttackCase], Awaitable[Outcome]]] = {
    "GEN-V-4": _gen_v4, "GEN-V-6": _gen_v6, "GEN-V-7": _gen_v7, "GEN-V-13": _gen_v13,
    "MMIO-V-5": _mmio_v5, "SPL-V-7": _spl_v7, "SPL-V-8": _spl_v8, "SPL-V-10": _spl_v10,
    "MMIO-V-2": _mmio_v2, "MMIO-V-4": _mmio_v4, "BAL-V-4": _bal_v4, "BAL-V-14": _bal_v14,
    "BAL-V-7": _bal_v7, "BAL-V-10": _bal_v10,
}
"""Case ID -> handler for the behaviour cases."""
