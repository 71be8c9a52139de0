"""The free page scenarios against QEMU: free page reporting and free page hinting.

``reporting`` (QEMU ``free-page-reporting=on``, vCPU paused): the guest's free RAM holds data,
16-byte sentinels sit just outside every free block that may be reported, and the driver's
first reporting pass (2 s after probe, Linux's ``PAGE_REPORTING_DELAY``) hands QEMU its free
blocks of order 9 and 10. Two variants run side by side:

- ``discard``: a guest without page poisoning (PAGE_POISON declined, ``poison_val`` 0): QEMU
  discards the blocks: they read back as zeros, the sentinels survive, RssAnon falls by the
  reported bytes;
- ``poison``: a poisoning guest (PAGE_POISON negotiated, ``poison_val`` 0xaaaaaaaa, free pages
  hold 0xaa): QEMU must not discard (it would zero the poison): contents and RSS stay.

``hinting`` (QEMU ``free-page-hint=on`` with an iothread, vCPU running HLT so timers and
migration run): a real precopy migration to ``exec:cat > /dev/null`` at a limited bandwidth,
once with our driver hinting (it echoes QEMU's command ID, sends its free 4 MiB blocks, sends
STOP, frees them on DONE) and once with a driver that declines FREE_PAGE_HINT; QEMU's
``query-migrate`` shows how many pages the hints saved. RAM is filled with non-zero data first:
zero pages cost QEMU almost nothing, so skipping them would prove nothing.

Both record the chains the driver published (reporting: one chain per batch, indirect when it
has several entries) and the hinting run proves event-index interrupt suppression on the free
page queue (:class:`~sim.qemu.observe.WatchedInterruptLine`).
"""

from __future__ import annotations

import struct

import trio

from guest.balloon import LINUX_FEATURE_TABLE, BalloonOptions
from guest.mm import Gfp
from guest.reporting import PageReportingState
from protocol.balloon import CMD_ID_MIN, BalloonQueue, CommandId, ConfigOffset
from protocol.features import BalloonFeature, bit
from sim.qemu.guest import QemuGuest, run_guest
from sim.qemu.kit import (
    PAGE,
    MiB,
    ScenarioOptions,
    check_rss_drop,
    fill_free_ram,
    pages_equal,
    qemu_options,
    wait_until,
)
from sim.qemu.process import BalloonProperties, QemuMode, run_qemu
from sim.qemu.results import Recorder, ScenarioResult

__all__ = ["hinting", "reporting"]

_SENTINEL = struct.Struct("<8sQ")
_REPORT_ORDER = 9
_U32 = struct.Struct("<I")


# ---- reporting ---------------------------------------------------------------------------------

async def reporting(options: ScenarioOptions, rec: Recorder) -> None:
    """Both reporting variants, concurrently (each mostly waits for the 2 s delay)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report_variant, options, rec, False)
        nursery.start_soon(_report_variant, options, rec, True)


async def _report_variant(options: ScenarioOptions, rec: Recorder, poison: bool) -> None:
    r = rec.result
    name = "poison" if poison else "discard"
    pattern = 0xAA if poison else 0x5A
    props = BalloonProperties(free_page_reporting=True)
    async with run_qemu(qemu_options(options, props)) as qemu:
        fill_free_ram(qemu.memory, pattern)
        guest_options = BalloonOptions(page_poisoning=poison)
        async with run_guest(qemu, guest_options, poll_period=options.poll_period,
                             tap=(BalloonQueue.REPORTING,)) as guest:
            b = guest.balloon
            poisoned = b.has(BalloonFeature.PAGE_POISON)
            poison_val = guest.transport.read_config32(ConfigOffset.POISON_VAL)
            r.check(f"{name}: PAGE_POISON {'negotiated' if poison else 'declined'}",
                    poisoned == poison and b.has(BalloonFeature.REPORTING)
                    and poison_val == (0xAAAAAAAA if poison else 0),
                    f"REPORTING {b.has(BalloonFeature.REPORTING)}, PAGE_POISON {poisoned}, "
                    f"config poison_val {poison_val:#x}")
            pinned = _pin_pages(guest)
            markers = _place_sentinels(guest, pinned)
            before = rec.rss(qemu, f"{name}: before the pass")
            core = b.reporting.core
            done = await wait_until(lambda: core.statistics().passes >= 1
                                    and core.state is PageReportingState.IDLE, 12)
            after = rec.rss(qemu, f"{name}: after the pass")
            stats = core.statistics()
            chains = guest.tap.of("reporting_vq")
            segments = [(a, n) for c in chains for a, n, _ in c.segments]
            reported = sum(n for _, n in segments)
            r.check(f"{name}: reporting pass ran", done and chains and reported
                    == stats.bytes_reported, f"{stats.passes} pass(es), {len(chains)} chains, "
                    f"{reported / MiB:.0f} MiB in {len(segments)} blocks (core counted "
                    f"{stats.bytes_reported / MiB:.0f} MiB)")
            multi = [c for c in chains if len(c.segments) > 1]
            r.check(f"{name}: multi-entry reports go indirect", multi and all(
                c.indirect for c in multi), f"{len(multi)} chains of more than one entry, "
                f"{sum(c.indirect for c in multi)} through an indirect table")
            summary = {row["queue"]: row for row in guest.queue_summary()}["reporting_vq"]
            r.check(f"{name}: QEMU used every report", summary["used_idx"] == len(chains)
                    == summary["reaped"], f"{len(chains)} published, {summary['used_idx']} "
                    f"used, {summary['reaped']} reaped")
            _check_contents(r, name, guest, segments, markers, pattern, discard=not poison)
            drop = before - after
            if poison:
                r.check(f"{name}: RSS does not drop", drop <= MiB,
                        f"RssAnon fell {drop / MiB:.2f} MiB (allowed 1 MiB) after "
                        f"{reported / MiB:.0f} MiB were reported")
            else:
                check_rss_drop(r, f"{name}: RSS drops by the reported bytes", drop, reported)
            r.facts[name] = {"reported_bytes": reported, "blocks": len(segments),
                             "chains": len(chains), "sentinels": len(markers),
                             "rss_drop": drop, "features": b.features}
            rec.queues(guest, name)
            rec.chains(guest, name)


def _pin_pages(guest: QemuGuest) -> set[int]:
    """Keep one page allocated in the middle of every other 4 MiB block, as a guest's
    long-lived allocations do; the pfns. The order-9 half before each such page is a
    reporting candidate whose neighbour is an allocated page of ours."""
    mm = guest.mm
    blocks = []
    while (pfn := mm.alloc_pages(10, gfp=Gfp.NOWARN)) is not None:
        blocks.append(pfn)
    pinned = set()
    for i, pfn in enumerate(blocks):
        if i % 2:
            mm.free_pages(pfn, 10)
            continue
        mm.split_page(pfn, 10)
        keep = pfn + (1 << _REPORT_ORDER)
        for page in range(pfn, pfn + 1024):
            if page != keep:
                mm.free_pages(page, 0)
        pinned.add(keep)
    return pinned


def _place_sentinels(guest: QemuGuest, owned: set[int]) -> dict[int, bytes]:
    """Write a 16-byte marker just before and just after every free block of order >= 9.

    Only into free pages or pages in ``owned`` (never the driver's rings); before the
    reporting pass, so the markers a discard must not touch are known exactly.
    """
    markers: dict[int, bytes] = {}
    mm, memory = guest.mm, guest.memory
    for block in list(mm.free_blocks()):
        if block.order < _REPORT_ORDER:
            continue
        start = block.pfn * PAGE
        for gpa in (start - 16, start + (PAGE << block.order)):
            if gpa < 0 or not memory.contains(gpa, 16):
                continue
            if gpa // PAGE not in owned and mm.find_free_block(gpa // PAGE) is None:
                continue
            markers[gpa] = _SENTINEL.pack(b"vbsentnl", gpa)
            memory.write(gpa, markers[gpa])
    return markers


def _check_contents(r: ScenarioResult, name: str, guest: QemuGuest,
                    segments: list[tuple[int, int]], markers: dict[int, bytes], pattern: int,
                    *, discard: bool) -> None:
    """Reported blocks (first, middle, last page) and the sentinels just outside them."""

    def expected(gpa: int, n: int) -> bytes:
        if discard:
            return bytes(n)
        data = bytearray([pattern]) * n
        for m, marker in markers.items():
            if gpa - 16 < m < gpa + n:
                lo, hi = max(m, gpa), min(m + 16, gpa + n)
                data[lo - gpa:hi - gpa] = marker[lo - m:hi - m]
        return bytes(data)

    pages = [p for a, n in segments for p in (a, a + (n // 2 // PAGE) * PAGE, a + n - PAGE)]
    n, bad = pages_equal(guest.memory, pages, expected)
    what = "read back as zeros" if discard else "keep the poison pattern"
    r.check(f"{name}: reported blocks {what}", n > 0 and not bad,
            f"{n} pages read (first, middle, last of each block), {len(bad)} differ")

    def inside(gpa: int) -> bool:
        return any(a <= gpa < a + n for a, n in segments)

    outside = sorted({g for a, n in segments for g in (a - 16, a + n)
                      if g in markers and not inside(g)})
    lost = [g for g in outside if guest.memory.read(g, 16) != markers[g]]
    r.check(f"{name}: neighbours intact", outside and not lost,
            f"{len(outside)} sentinels just outside reported blocks, {len(lost)} changed")


# ---- hinting -----------------------------------------------------------------------------------

async def hinting(options: ScenarioOptions, rec: Recorder) -> None:
    """The same migration with and without hints (module docstring)."""
    r = rec.result
    hinted = await _hint_variant(options, rec, True)
    plain = await _hint_variant(options, rec, False)
    if hinted is None or plain is None:
        return
    saved = plain["normal"] - hinted["normal"]
    pages = r.facts["hints"]["bytes_hinted"] // PAGE
    r.check("hints save roughly the hinted pages", 0.75 * pages <= saved <= pages + 64,
            f"{saved} fewer normal pages sent ({plain['normal']} -> {hinted['normal']}) for "
            f"{pages} hinted pages ({saved / max(pages, 1):.0%}); blocks the migration had "
            f"already sent when their hint came are not saved")
    r.check("fewer bytes on the wire", hinted["transferred"] < plain["transferred"],
            f"ram.transferred {plain['transferred']:,} -> {hinted['transferred']:,} bytes "
            f"({1 - hinted['transferred'] / plain['transferred']:.0%} less)")


async def _hint_variant(options: ScenarioOptions, rec: Recorder, hint: bool) -> dict | None:
    r = rec.result
    name = "hints" if hint else "no-hints"
    props = BalloonProperties(free_page_hint=True)
    features = LINUX_FEATURE_TABLE if hint else LINUX_FEATURE_TABLE & ~bit(
        BalloonFeature.FREE_PAGE_HINT)
    async with run_qemu(qemu_options(options, props, mode=QemuMode.RUNNING)) as qemu:
        fill_free_ram(qemu.memory, 0x5A)
        async with run_guest(qemu, BalloonOptions(features=features),
                             poll_period=options.poll_period,
                             tap=(BalloonQueue.FREE_PAGE,)) as guest:
            b = guest.balloon
            r.check(f"{name}: FREE_PAGE_HINT {'negotiated' if hint else 'declined'}",
                    b.has(BalloonFeature.FREE_PAGE_HINT) == hint, f"features {b.features:#x}")
            score = None
            if hint:
                score = guest.irq.watch("free_page_vq", b.vqs[BalloonQueue.FREE_PAGE].ring)
            free_before = guest.mm.nr_free_pages()
            await rec.qmp(qemu, "migrate-set-parameters",
                          {"max-bandwidth": options.migration_bandwidth}, variant=name)
            await rec.qmp(qemu, "migrate", {"uri": "exec:cat > /dev/null"}, variant=name)
            await qemu.qmp.wait_migration(timeout=60)
            info = await rec.qmp(qemu, "query-migrate", variant=name)
            ram = info.get("ram", {})
            r.check(f"{name}: migration completed", info.get("status") == "completed",
                    f"status {info.get('status')}, {info.get('total-time')} ms, "
                    f"{ram.get('normal')} normal pages, {ram.get('transferred'):,} bytes")
            r.facts[f"migration {name}"] = {k: ram.get(k) for k in (
                "transferred", "normal", "duplicate")} | {"total_time_ms": info.get("total-time"),
                                                          "downtime_ms": info.get("downtime")}
            if hint:
                await _check_hints(r, guest, free_before, score)
            rec.queues(guest, name)
            rec.chains(guest, name)
            return {"normal": ram.get("normal", 0), "transferred": ram.get("transferred", 0)}


async def _check_hints(r: ScenarioResult, guest: QemuGuest, free_before: int, score) -> None:
    b = guest.balloon
    hinting = b.hinting
    done = await wait_until(lambda: not hinting.held, 5)
    cmd_id = guest.transport.read_config32(ConfigOffset.FREE_PAGE_HINT_CMD_ID)
    stats = b.hint_statistics()
    r.check("hints: DONE frees the blocks", done and cmd_id == CommandId.DONE
            and guest.mm.nr_free_pages() == free_before,
            f"cmd id reads {cmd_id:#x}, {len(hinting.held)} blocks still held, free pages "
            f"{guest.mm.nr_free_pages()} (before {free_before})")
    chains = guest.tap.of("free_page_vq")
    ids = [(i, _U32.unpack(c.out_data[:4])[0]) for i, c in enumerate(chains)
           if len(c.out_data) >= 4]
    blocks = [i for i, c in enumerate(chains) if c.segments and c.segments[0][2]]
    first = ids[0][1] if ids else None
    r.check("hints: START on QEMU's command ID", first == CMD_ID_MIN + 1
            and hinting.cmd_id_active == first,
            f"driver echoed {first:#x} first (QEMU's first ID is {CMD_ID_MIN + 1:#x})"
            if first is not None else "no command ID sent")
    ordered = bool(ids) and ids[-1][1] == CommandId.STOP and all(
        ids[0][0] < i < ids[-1][0] for i in blocks)
    r.check("hints: blocks between the ID and STOP", ordered and len(blocks)
            == stats.blocks_hinted > 0, f"{len(blocks)} blocks of 4 MiB sent between ID "
            f"{first or 0:#x} and STOP; driver counted {stats.blocks_hinted}")
    summary = {row["queue"]: row for row in guest.queue_summary()}["free_page_vq"]
    r.check("hints: QEMU used every buffer", summary["used_idx"] == len(chains),
            f"{len(chains)} published, {summary['used_idx']} used")
    r.check("hints: event idx suppressed interrupts", score is not None and score.suppressed > 0,
            f"{score.suppressed if score else 0} of {score.used_seen if score else 0} used "
            f"buffers came back with no interrupt (driver's used_event "
            f"{sorted(score.used_events) if score else []}: disable_cb), "
            f"{guest.irq.vring} used-buffer interrupts taken in all; the driver kicked "
            f"{summary['kicks']} times for {len(chains)} buffers (QEMU's avail_event)")
    r.facts["hints"] = {"blocks_hinted": stats.blocks_hinted, "bytes_hinted": stats.bytes_hinted,
                        "runs": stats.runs, "cmd_ids_echoed": [hex(v) for _, v in ids],
                        "suppressed_interrupts": score.to_dict() if score else None}
