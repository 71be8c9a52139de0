"""Turn a recorded event stream into narrated steps: one free block in detail, the rest grouped.

The narrator is a pure function of the records (:func:`narrate`), so a trace can be re-told
from its ``--json`` lines. It picks a *hero* per watched queue: the first chain that carries a
payload (a reported or hinted block, a PFN array). Every step of the hero's round trip gets its
own screen, with the ring tables copied right after it: the driver's add, the kick decision
(with the ``vring_need_event`` arithmetic), the device's pop, what the device recorded, the
push, the interrupt decision, the driver's get_buf, and the free lists when the block goes back
to the tail. Everything else is told in grouped steps, one line per chain, so a learner sees the
same machinery repeat without reading it forty times. Scenario chapters, free-list copies,
tampering, rejections and the migration's summary always get their own step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.rules import RULES
from sim.teach.lines import HOST_HINT_STEPS, actor, block_text, join, line, segs, short
from sim.teach.model import (
    FreeListBlock,
    RecordsBlock,
    RingBlock,
    Step,
    TableBlock,
    chain_rows,
    fmt_size,
    need_event,
)
from sim.teach.why import why

__all__ = ["narrate"]

_SKIP = frozenset({
    "balloon.attach", "balloon.features", "balloon.activate", "balloon.reset", "balloon.stats",
    "balloon.kick", "balloon.detach", "driver.features", "driver.stats", "driver.probe",
    "driver.hint.block",
    "teach.buffer", "teach.records", "teach.ring", "teach.walk.visit",
})
_SKIP_PREFIX = ("mmio.", "virtio_mmio.", "qemu.", "vhost_user.", "uml.")
_WHY_KINDS = 6
_GROUP_SPAN = 0.25
"""Seconds of (virtual) time one grouped step may span."""
_GROUP_ROWS = 12
_WIDTH = 100
_BUFFER_LINES = 6
_LOOKAHEAD = 6
_NOTES = 4


def narrate(records: list[dict[str, Any]]) -> list[Step]:
    """The steps that tell ``records`` (library events plus the tracer's ``teach.*``)."""
    return _Narrator(records).run()


@dataclass(slots=True)
class _Hero:
    """The chain followed in detail on one queue, and how far it got."""

    queue: int
    index: int  # position of its vq.add in the records
    head: int
    block: tuple[int, int]  # (gpa, length) of the block it carries
    phase: str = "waiting"  # waiting -> traveling -> done
    kick: bool = False
    popped: bool = False
    recorded: bool = False
    pushed: bool = False
    irq: bool = False
    walked: bool = False
    show_lists: bool = False
    pending: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Group:
    t: float | None
    lines: list[tuple[Any, list[str], str]] = field(default_factory=list)
    """``(key, fragments, actor)`` per line."""
    kinds: list[str] = field(default_factory=list)
    ring: dict[str, Any] | None = None


class _Narrator:
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        scenario = next((r for r in records if r["event"] == "teach.scenario"), None)
        self.scenario = scenario
        self.focus = {q["index"]: q for q in scenario["focus"]} if scenario else {}
        self.peer = scenario.get("peer") if scenario else None
        """A real peer's device end is not instrumented: no pop, push or device records."""
        self.device_end = bool(scenario and scenario.get("traced_end") == "device")
        """Only the device end is traced (a real driver, ``--peer uml``): no add, kick or
        get_buf; a hero's round trip starts at its pop and ends at the interrupt decision."""
        self.consumed: set[int] = set()
        self.heroes = self._find_heroes()
        self.steps: list[Step] = []
        self.group: _Group | None = None
        self.rounds: list[dict[str, Any]] = []
        self.suppressed_shown: set[str] = set()
        """vq.kick / vq.interrupt: the first suppression of each is told in detail."""

    # ---- set-up -----------------------------------------------------------------------------
    def _find_heroes(self) -> dict[int, _Hero]:
        heroes: dict[int, _Hero] = {}
        start = "vq.pop" if self.device_end else "vq.add"
        for i, rec in enumerate(self.records):
            q = rec.get("queue")
            if rec["event"] != start or q in heroes or (self.focus and q not in self.focus):
                continue
            name = self.focus.get(q, {}).get("name", "")
            if name == "free_page_vq" and not rec["writable"]:
                continue  # the command ID; the hero is the first hinted block
            if rec["writable"]:
                block = tuple(rec["writable"][0])
            else:
                buf = self._ahead(i, "teach.buffer", q)
                words = buf["le32"] if buf else []
                block = ((words[0] << 12, 4096) if words and name in ("inflate", "deflate")
                         else tuple(rec["readable"][0]))
            heroes[q] = _Hero(q, i, rec["head"], block)  # type: ignore[arg-type]
        return heroes

    def _ahead(self, i: int, event: str, queue: int | None = None,
               after: str | None = None) -> dict[str, Any] | None:
        """The next ``event`` record within a few records after ``i`` (a probe's copy)."""
        for j in range(i + 1, min(i + 1 + _LOOKAHEAD, len(self.records))):
            rec = self.records[j]
            if rec["event"] != event:
                continue
            if queue is not None and rec.get("queue") != queue:
                continue
            if after is not None and rec.get("after") != after:
                continue
            self.consumed.add(j)
            return rec
        return None

    def _name(self, q: int | None) -> str:
        return self.focus.get(q, {}).get("name", f"queue {q}")

    def _hero_pfn(self) -> int | None:
        live = [h for h in self.heroes.values() if h.phase != "done"] or list(self.heroes.values())
        return live[0].block[0] >> 12 if live else None

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> list[Step]:
        started = self.scenario is None
        for i, rec in enumerate(self.records):
            started = started or rec is self.scenario
            if i in self.consumed or not started:
                continue  # before teach.scenario: set-up the boot step sums up
            self._one(i, rec)
        self._flush()
        return self.steps

    def _skip(self, rec: dict[str, Any]) -> bool:
        ev = rec["event"]
        if ev == "teach.ring" and self.group is not None and rec.get("queue") in self.focus:
            self.group.ring = rec
        if ev in _SKIP or ev.startswith(_SKIP_PREFIX):
            return True
        q = rec.get("queue")
        if q is not None and self.focus and q not in self.focus:
            return True
        if ev == "vq.interrupt" and rec["old"] == rec["new"]:
            return True  # nothing pushed since the last decision
        if ev == "balloon.hint" and rec.get("step") in HOST_HINT_STEPS:
            return rec["old"] == rec["new"]
        return ev == "teach.walk.call" and not rec.get("resume")

    def _one(self, i: int, rec: dict[str, Any]) -> None:
        ev = rec["event"]
        if ev == "teach.walk.visit":
            hero = self._walk_hero(rec)
            if hero is not None and not hero.walked:
                self._walk_visit(rec)
            return
        if self._skip(rec):
            return
        handler = {
            "teach.scenario": self._boot, "teach.chapter": self._chapter,
            "teach.free_lists": self._free_lists, "teach.tamper": self._tamper,
            "vq.reject": self._reject, "teach.outcome": self._outcome,
            "migration.done": self._migration_done,
        }.get(ev)
        if handler is not None:
            handler(i, rec)
            return
        if ev == "migration.round":
            self.rounds.append(rec)
        if self._hero_step(i, rec):
            return
        self._group_line(rec)

    # ---- steps of the hero ------------------------------------------------------------------
    def _walk_hero(self, rec: dict[str, Any]) -> _Hero | None:
        return next((h for h in self.heroes.values()
                     if h.block[0] >> 12 == rec.get("pfn") and h.phase != "done"), None)

    def _hero_step(self, i: int, rec: dict[str, Any]) -> bool:
        ev = rec["event"]
        if ev == "teach.walk.result":
            hero = self._walk_hero(rec)
            if hero is None or hero.walked:
                return False
            hero.walked = hero.show_lists = True
            self._walk_result(rec)
            return True
        if ev in ("report.batch", "teach.walk.end"):
            hero = next((h for h in self.heroes.values() if h.show_lists), None)
            if hero is None or (ev == "report.batch" and hero.phase != "done"):
                return False
            hero.show_lists = False
            self._lists_after(i, rec)
            return True
        hero = self.heroes.get(rec.get("queue"))  # type: ignore[arg-type]
        if hero is None:
            return False
        if (ev in ("vq.kick", "vq.interrupt") and not rec["notify"]
                and ev not in self.suppressed_shown and not (hero.kick or hero.irq)):
            self.suppressed_shown.add(ev)
            self._decision(rec, kick=ev == "vq.kick")
            return True
        if ev == "vq.pop" and i == hero.index and self.device_end:
            hero.phase, hero.popped = "traveling", True
            self._pop(i, rec)
            return True
        if ev == "vq.add" and i == hero.index:
            hero.phase, hero.kick = "traveling", True
            self._add(i, rec)
            return True
        if hero.phase != "traveling":
            return False
        head = rec.get("head")
        if ev == "vq.kick" and hero.kick:
            hero.kick = False
            self._decision(rec, kick=True)
        elif ev == "vq.pop" and head == hero.head and not hero.popped:
            hero.popped = True
            self._pop(i, rec)
        elif (ev == "migration.hint" and hero.popped and not hero.recorded
              and rec.get("gpa") == hero.block[0]):
            hero.pending.append(
                "the VMM's hint hook (qemu_guest_free_page_hint): "
                + (f"{rec['pages']} pages of round {rec.get('round')} leave the to-send bitmap"
                   if not rec.get("ignored") else f"ignored ({rec.get('state')})"))
        elif (ev.startswith("balloon.") and head == hero.head and hero.popped
              and not hero.recorded and "rule" not in rec):
            hero.recorded = True
            self._recorded(i, rec, hero)
        elif ev == "vq.push" and head == hero.head and hero.popped and not hero.pushed:
            hero.pushed = hero.irq = True
            self._push(i, rec)
        elif ev == "vq.interrupt" and hero.irq:
            hero.irq = False
            if self.device_end:
                hero.phase = "done"  # the driver's get_buf is not traced
            self._decision(rec, kick=False)
        elif ev == "vq.get_buf" and head == hero.head and (hero.pushed or self.peer):
            hero.phase = "done"
            hero.show_lists = True
            self._get_buf(i, rec)
        else:
            return False
        return True

    def _step(self, rec: dict[str, Any], actor: str, title: str, why_key: str | None = None,
              lines: list[str] | None = None) -> Step:
        self._flush()
        step = Step(actor=actor, title=title, why=why(why_key or rec["event"], rec),
                    t=rec.get("t"), lines=list(lines or []), events=[rec["event"]])
        self.steps.append(step)
        return step

    def _ring(self, i: int, rec: dict[str, Any], **hl: Any) -> RingBlock | None:
        snap = self._ahead(i, "teach.ring", rec.get("queue"), after=rec["event"])
        if snap is None:
            return None
        if "head" in hl:
            hl["rows"] = chain_rows(snap, hl.pop("head"))
        return RingBlock(self._name(rec.get("queue")), snap, **hl)

    def _add(self, i: int, rec: dict[str, Any]) -> None:
        q, head = rec["queue"], rec["head"]
        n = len(segs(rec))
        step = self._step(rec, "guest", f"The driver adds a chain to {self._name(q)}: head "
                          f"{head}, {n} buffer{'s' if n > 1 else ''}")
        pieces = segs(rec)
        for kind, addr, length in pieces[:_BUFFER_LINES]:
            what = "device-writable" if kind == "W" else "device-readable"
            step.lines.append(f"{kind} {what}: {block_text(addr, length)}")
        if len(pieces) > _BUFFER_LINES:
            rest = pieces[_BUFFER_LINES:]
            step.lines.append(f"... and {len(rest)} more buffers, "
                              f"{fmt_size(sum(n for _, _, n in rest))}")
        buf = self._ahead(i, "teach.buffer", q)
        if buf is not None:
            words = " ".join(f"{w:#x}" for w in buf["le32"][:8])
            more = f" ... ({buf['len'] // 4} le32 words)" if buf["len"] > 32 else ""
            step.lines.append(f"the readable buffer holds: {words}{more}")
        size = self.focus.get(q, {}).get("size", 0)
        slot = (rec["avail_idx"] - 1) % size if size else None
        step.lines.append(f"avail.ring[{slot}] = {head}, then avail.idx = {rec['avail_idx']}; "
                          f"{rec['num_free']} descriptors stay free")
        block = self._ring(i, rec, head=head, avail_slot=slot)
        if block:
            step.blocks.append(block)

    def _decision(self, rec: dict[str, Any], *, kick: bool) -> None:
        notify = rec["notify"]
        if not notify:
            self.suppressed_shown.add(rec["event"])
        old, new = rec["old"], rec["new"]
        name = self._name(rec.get("queue"))
        if kick:
            title = (f"Kick: the driver notifies the device (QueueNotify <- {rec['queue']})"
                     if notify else "No kick: the notification is suppressed")
            event, field_name, flags = rec.get("avail_event"), "avail_event", rec.get("used_flags")
        else:
            title = ("Interrupt: the device notifies the driver (InterruptStatus |= VRING)"
                     if notify else "No interrupt: the notification is suppressed")
            event, field_name, flags = rec.get("used_event"), "used_event", rec.get("avail_flags")
        step = self._step(rec, "guest" if kick else "device", title)
        if rec["event_idx"]:
            result, text = need_event(event, new, old)
            step.lines.append(f"EVENT_IDX: vring_need_event({field_name}={event}, new={new}, "
                              f"old={old})")
            step.lines.append(text)
            span = f"{old}..{(new - 1) & 0xFFFF}" if new != old else "none"
            who = "device" if kick else "driver"
            entry = "avail" if kick else "used"
            step.lines.append(f"The {who} asked to hear about {entry} entry {event}; this "
                              f"{'kick' if kick else 'push'} covers entries {span}.")
            if result != notify:
                step.lines.append("(first decision after reset: notify whenever something was "
                                  "pushed, as QEMU and rust-vmm do)")
            elif not notify and kick:
                step.lines.append("The device has not caught up since its last kick; it will "
                                  "find this chain when it drains the ring anyway.")
            elif not notify and name == "free_page_vq":
                step.lines.append("free_page_vq has no callback: Linux disabled its interrupts "
                                  "(virtqueue_disable_cb writes used_event = 0, 'a hack').")
        else:
            flag = "VRING_USED_F_NO_NOTIFY" if kick else "VRING_AVAIL_F_NO_INTERRUPT"
            step.lines.append(f"no EVENT_IDX: flags = {flags}; {flag} "
                              f"{'set' if flags else 'clear'} -> "
                              f"{'notify' if notify else 'suppressed'}")

    def _pop(self, i: int, rec: dict[str, Any]) -> None:
        head, na = rec["head"], rec["next_avail"]
        size = self.focus.get(rec["queue"], {}).get("size", 1)
        slot = (na - 1) % size
        step = self._step(rec, "device", f"The device pops head {head} from avail.ring[{slot}]")
        r, w = len(rec["readable"]), len(rec["writable"])
        step.lines.append(f"next_avail {(na - 1) & 0xFFFF} -> {na} (avail.idx is "
                          f"{rec['avail_idx']}); the chain has {r} readable and {w} writable "
                          f"buffer(s), each checked against the DC-/IN- rules")
        if rec.get("violation"):
            rule = RULES.get(rec["violation"])
            step.lines.append(f"truncated before a violation: {rec['violation']} "
                              f"({rule.summary if rule else ''})")
        buf = self._ahead(i, "teach.buffer", rec["queue"]) if self.device_end else None
        if buf is not None:
            words = " ".join(f"{w:#x}" for w in buf["le32"][:8])
            more = f" ... ({buf['len'] // 4} le32 words)" if buf["len"] > 32 else ""
            step.lines.append(f"the readable buffer holds: {words}{more}")
        block = self._ring(i, rec, head=head, avail_slot=slot)
        if block:
            step.blocks.append(block)

    def _recorded(self, i: int, rec: dict[str, Any], hero: _Hero) -> None:
        ev = rec["event"]
        titles = {
            "balloon.report": f"The device discards {fmt_size(rec.get('discarded', 0))} and "
                              f"records {fmt_size(rec.get('reported', 0))} as reported",
            "balloon.hint": f"The device records the hinted {fmt_size(rec.get('bytes', 0))}; "
                            f"the migration will not send it",
            "balloon.inflate": f"The device reads {rec.get('pfns')} PFNs, discards each page "
                               f"and records it as ballooned",
            "balloon.deflate": f"The device takes {rec.get('applied')} PFNs out of its "
                               f"balloon record",
        }
        step = self._step(rec, "device", titles.get(ev, ev), lines=hero.pending)
        for key in ("ranges", "reported", "discarded", "bytes", "pfns", "applied", "rejected",
                    "cmd_id"):
            if key in rec:
                value = rec[key]
                if key in ("reported", "discarded", "bytes"):
                    value = fmt_size(value)
                elif key == "cmd_id":
                    value = f"{value:#x}"
                step.lines.append(f"{key}: {value}")
        snap = self._ahead(i, "teach.records", rec.get("queue"))
        if snap is not None:
            step.blocks.append(RecordsBlock(snap, hero.block))

    def _push(self, i: int, rec: dict[str, Any]) -> None:
        head, used = rec["head"], rec["used_idx"]
        size = self.focus.get(rec["queue"], {}).get("size", 1)
        slot = (used - 1) % size
        step = self._step(rec, "device", f"The device returns head {head}: used.ring[{slot}] = "
                          f"{{id {head}, len {rec['written']}}}")
        step.lines.append(f"used.idx -> {used}. len = {rec['written']}: the balloon writes "
                          f"nothing into the buffers it is given (§2.7.8.2: len counts bytes "
                          f"written).")
        block = self._ring(i, rec, head=head, used_slot=slot)
        if block:
            step.blocks.append(block)

    def _get_buf(self, i: int, rec: dict[str, Any]) -> None:
        head, last = rec["head"], rec["last_used_idx"]
        size = self.focus.get(rec["queue"], {}).get("size", 1)
        step = self._step(rec, "guest", f"The driver reaps head {head}: the chain is done")
        block = self._ring(i, rec, used_slot=(last - 1) % size)
        ue = block.ring["avail"]["used_event"] if block else "?"
        step.lines.append(f"last_used_idx -> {last}; the chain's descriptors go back on the "
                          f"driver's free list; used_event = {ue} (interrupt me at the next "
                          f"one)")
        if block:
            step.blocks.append(block)

    def _walk_visit(self, rec: dict[str, Any]) -> None:
        self._step(rec, "guest", f"The walker offers block {rec['pfn']:#x} (order "
                   f"{rec['order']}, {rec['mt'].title()}) to the callback", lines=[
                       "The hinting callback checks the command ID, reaps used buffers and "
                       "needs 2 free ring entries (one is kept for the STOP ID); then it adds "
                       "the block as one device-writable buffer and kicks."])

    def _walk_result(self, rec: dict[str, Any]) -> None:
        r = rec["result"]
        meaning = ("reported: it moves to the tail of its list when the walk returns" if r == 0
                   else "skipped" if r > 0 else "stop: the walk ends here and resumes from it")
        self._step(rec, "guest", f"The callback returns {r}: {meaning}")

    def _lists_after(self, i: int, rec: dict[str, Any]) -> None:
        if rec["event"] == "report.batch":
            title = ("page_reporting_drain(): the blocks go back to the TAIL of their lists, "
                     "marked Reported")
            lines = [f"{rec.get('nents')} blocks back (zone {rec.get('zone')}); err = "
                     f"{rec.get('err')}"]
        else:
            title = (f"The walk returns {rec['status']}: the reported blocks rotate to their "
                     f"lists' tails")
            lines = [f"{rec['visited']} blocks offered, {rec['reported']} reported"]
        step = self._step(rec, "guest", title, lines=lines)
        snap = self._ahead(i, "teach.free_lists")
        if snap is not None:
            step.blocks.append(FreeListBlock(snap, self._last_hero_pfn()))

    def _last_hero_pfn(self) -> int | None:
        done = [h for h in self.heroes.values() if h.phase != "waiting"]
        return done[-1].block[0] >> 12 if done else self._hero_pfn()

    # ---- steps of the story -----------------------------------------------------------------
    def _boot(self, i: int, rec: dict[str, Any]) -> None:
        step = self._step(rec, "story", f"Boot: a {fmt_size(rec['ram'])} guest with the "
                          f"balloon on {rec.get('transport', 'virtio-mmio')} ({rec['name']})",
                          why_key="boot")
        step.lines.append("negotiated: " + ", ".join(rec["features"]))
        step.lines.append("queues: " + ", ".join(f"{k} = {v}" for k, v in rec["queues"].items()))
        for q in rec["focus"]:
            step.lines.append(f"watching {q['name']} (queue {q['index']}, {q['size']} entries): "
                              f"desc {q['desc']:#x}, avail {q['avail']:#x}, used {q['used']:#x}")
        if rec.get("peer") and self.device_end:
            step.lines.append(f"peer: {rec['peer']}: the real driver; only the device's end is "
                              f"traced (the driver shows in the avail ring)")
        elif rec.get("peer"):
            step.lines.append(f"peer: {rec['peer']}'s own device, over qtest; only the driver's "
                              f"end is traced (the device shows in the used ring)")
        if rec.get("reporting_capacity") and rec["name"] == "reporting":
            step.lines.append(f"page reporting capacity: {rec['reporting_capacity']} blocks per "
                              f"report (Linux 6.1: 32; newer kernels let the driver choose)")

    def _chapter(self, i: int, rec: dict[str, Any]) -> None:
        self._step(rec, "story", rec["title"], why_key="story", lines=[rec["text"]])

    def _free_lists(self, i: int, rec: dict[str, Any]) -> None:
        if rec.get("probe"):
            return  # a probe's copy nobody asked to see (kept in --json)
        step = self._step(rec, "guest", "The guest's free lists", lines=[rec["label"]])
        step.blocks.append(FreeListBlock(rec, self._hero_pfn()))

    def _tamper(self, i: int, rec: dict[str, Any]) -> None:
        step = self._step(rec, "guest", f"A buggy driver rewrites {rec['where']}: {rec['old']} "
                          f"-> {rec['new']}")
        step.lines.append(f"This breaks {rec['rule']}: {rec['summary']} (virtio "
                          f"§{rec['section']}).")
        block = self._ring(i, rec, head=rec["head"],
                           fields=tuple((r, "") for r in rec.get("rows", ())))
        if block:
            step.blocks.append(block)

    def _reject(self, i: int, rec: dict[str, Any]) -> None:
        rule = RULES.get(rec["rule_id"])
        step = self._step(rec, "device", f"The device rejects the chain: {rec['rule_id']} "
                          f"(virtio §{rec['section']})")
        step.lines.append(f"rule {rec['rule_id']}: {rule.summary if rule else '?'} "
                          f"(binds the {rule.side if rule else '?'})")
        step.lines.append(f"found: {rec['message']}; "
                          + ", ".join(f"{k}={v}" for k, v in rec.get("values", {}).items()))
        step.lines.append(f"policy {rec['policy']}: " + {
            "needs-reset": "DEVICE_NEEDS_RESET, the queue stops until the driver resets it",
            "truncate": "the chain ends before the bad descriptor and is used as such",
            "skip": "the chain is returned used with len 0, the device goes on",
        }.get(rec["policy"], rec["policy"]))
        head = rec.get("values", {}).get("head")
        block = self._ring(i, rec, **({"head": head} if isinstance(head, int) else {}))
        if block:
            step.blocks.append(block)

    def _outcome(self, i: int, rec: dict[str, Any]) -> None:
        step = self._step(rec, "story", rec.get("title", "Afterwards"), why_key="outcome")
        step.lines.extend(rec.get("lines", []))

    def _migration_done(self, i: int, rec: dict[str, Any]) -> None:
        step = self._step(rec, "host", f"The migration {rec.get('outcome', 'ends')}",
                          why_key="migration")
        if "total_bytes" in rec:
            step.lines.append(f"sent {fmt_size(rec['total_bytes'])}: {rec['normal_pages']} "
                              f"normal pages, {rec['zero_pages']} zero pages; "
                              f"{rec['hinted_pages']} hinted pages never sent")
            step.lines.append(f"{len(self.rounds)} rounds, downtime "
                              f"{rec['downtime'] * 1000:.1f} ms, hints received {rec['hints']}")
        rows = tuple((str(r["index"]), "yes" if r["final"] else "no", fmt_size(r["bytes"]),
                      str(r["normal_pages"]), str(r["zero_pages"]), str(r["hinted_pages"]))
                     for r in self.rounds)
        if rows:
            step.blocks.append(TableBlock("rounds", ("round", "VM stopped", "sent", "normal",
                                                     "zero", "hinted (skipped)"), rows))

    # ---- grouped steps ----------------------------------------------------------------------
    def _flush(self) -> None:
        g = self.group
        self.group = None
        if g is None or not g.lines:
            return
        names = {"guest": "The driver", "device": "The device", "host": "The host"}
        actors = list(dict.fromkeys(who for _, _, who in g.lines))
        prev = self.steps[-1] if self.steps else None
        if (len(g.lines) <= 2 and g.ring is None and prev is not None
                and len(prev.notes) + len(g.lines) <= _NOTES):
            for key, parts, who in g.lines:
                tag = "" if prev.actor == who else f" ({who})"
                prev.notes.append(f"then{tag}: {join(key, parts)}")
            prev.events.extend(g.kinds)
            return
        mixed = len(actors) > 1
        texts = [(f"{who:>6}: " if mixed else "") + join(key, parts)
                 for key, parts, who in g.lines]
        chunks: list[list[str]] = [[]]
        rows = 0
        for text in texts:  # a screen holds about _GROUP_ROWS wrapped lines besides the ring
            need = -(-len(text) // _WIDTH)
            if chunks[-1] and rows + need > _GROUP_ROWS:
                chunks.append([])
                rows = 0
            chunks[-1].append(text)
            rows += need
        kinds = " · ".join(list(dict.fromkeys(short(k) for k in g.kinds))[:_WHY_KINDS])
        who = "mixed" if mixed else actors[0]
        for n, chunk in enumerate(chunks, 1):
            count = f"{len(chunk)} line{'s' if len(chunk) > 1 else ''}"
            title = (f"More of the same ({count})" if mixed
                     else f"{names.get(who, who)}, continued ({count})")
            step = Step(actor=who, title=title, why=f"As above, one line per chain: {kinds}",
                        t=g.t, lines=chunk,
                        events=list(g.kinds) if n == 1 else [])
            if g.ring is not None and n == len(chunks):
                step.blocks.append(RingBlock(self._name(g.ring["queue"]), g.ring))
            self.steps.append(step)

    def _group_line(self, rec: dict[str, Any]) -> None:
        g = self.group
        t = rec.get("t")
        if g is not None and t is not None and g.t is not None and t - g.t > _GROUP_SPAN:
            self._flush()  # a new burst of activity gets its own step
            g = None
        if g is None:
            g = self.group = _Group(t)
        g.kinds.append(rec["event"])
        key, text, attach = line(rec)
        if attach and g.lines and (key is None or g.lines[-1][0] == key):
            g.lines[-1][1].append(text)
        else:
            g.lines.append((key, [text], actor(rec)))
