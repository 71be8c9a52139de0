"""The one-line forms of events, for the narrator's grouped steps and its detailed ones.

A grouped step (:mod:`sim.teach.narrate`) tells each chain on one line built from fragments:
``add head 2: W 0x3800000 + 4 MiB ...; avail.idx 3 -> kick suppressed -> walker: reported (0)``
for the driver, ``pop head 2 -> 1024 pages off the bitmap -> hinted 4 MiB -> push ...`` for the
device. :func:`line` gives each event's fragment and whether it continues the previous line.
"""

from __future__ import annotations

from typing import Any

from sim.teach.model import fmt_size, order_of
from sim.teach.why import SHORT

__all__ = ["HOST_HINT_STEPS", "actor", "block_text", "join", "line", "plain", "segs", "short"]

HOST_HINT_STEPS = frozenset({"start", "stop", "done"})
"""``balloon.hint`` steps that are host verbs (the migration's notifier), not guest input."""


def actor(rec: dict[str, Any]) -> str:
    """Who acts in ``rec``: ``guest`` (driver, mm, walker), ``device`` or ``host`` (VMM, QMP)."""
    ev = rec["event"]
    if ev in ("vq.add", "vq.kick", "vq.get_buf") or ev.startswith(("driver.", "report.",
                                                                    "teach.walk")):
        return "guest"
    if ev.startswith("migration.") and ev != "migration.hint" or ev == "balloon.target":
        return "host"
    if ev.startswith("qmp."):
        return "host"
    if ev.startswith("mm."):
        return "guest"
    if ev == "balloon.hint" and rec.get("step") in HOST_HINT_STEPS:
        return "host"
    return "device"


def segs(rec: dict[str, Any]) -> list[tuple[str, int, int]]:
    """A ``vq.add``/``vq.pop`` record's buffers as ``(R|W, addr, len)``, in chain order."""
    return ([("R", a, n) for a, n in rec.get("readable", [])]
            + [("W", a, n) for a, n in rec.get("writable", [])])


def block_text(addr: int, length: int) -> str:
    """``0x1c00000 + 4 MiB (pfn 0x1c00, order 10)``: a buffer as the block it is."""
    order = order_of(length)
    where = f"pfn {addr >> 12:#x}" + (f", order {order}" if order is not None else "")
    return f"{addr:#x} + {fmt_size(length)} ({where})"



def join(key: Any, parts: list[str]) -> str:
    """One grouped line from its fragments (reaped heads as a list, the rest as a path)."""
    if isinstance(key, tuple) and key[0] == "get_buf":
        return f"get_buf head{'s' if len(parts) > 1 else ''} {', '.join(parts)}"
    return " -> ".join(parts)


def short(event: str) -> str:
    """A few words for an event family (:data:`~sim.teach.why.SHORT`), for a why line."""
    parts = event.split(".")
    for n in (3, 2, 1):
        if ".".join(parts[:n]) in SHORT:
            return SHORT[".".join(parts[:n])]
    return event


def line(rec: dict[str, Any]) -> tuple[Any, str, bool]:
    """``(key, text, attach)``: a grouped line's fragment; ``attach`` joins it to the previous
    line (same key, or any line when the key is None)."""
    ev = rec["event"]
    q, head = rec.get("queue"), rec.get("head")
    if ev == "vq.add":
        pieces = segs(rec)
        what = (", ".join(f"{k} {block_text(a, n)}" for k, a, n in pieces) if len(pieces) == 1
                else f"{len(pieces)} buffers, {fmt_size(sum(n for _, _, n in pieces))}")
        return ("chain", q, head), f"add head {head}: {what}; avail.idx {rec['avail_idx']}", False
    if ev == "vq.kick":
        return None, "kick" if rec["notify"] else "no kick", True
    if ev == "teach.walk.result":
        r = rec["result"]
        if r == 0:
            return None, "walker: reported (0)", True
        what = "skipped" if r > 0 else "stop: the cursor keeps this block"
        return ("walk", rec["pfn"]), f"walker: block {rec['pfn']:#x} -> {r} ({what})", False
    if ev == "vq.pop":
        bad = f" (truncated: {rec['violation']})" if rec.get("violation") else ""
        return ("chain", q, head), f"pop head {head}{bad}", False
    if ev == "vq.push":
        return ("chain", q, head), f"push (used.idx {rec['used_idx']})", True
    if ev == "vq.interrupt":
        return None, "interrupt" if rec["notify"] else "no interrupt", True
    if ev == "vq.get_buf":
        return ("get_buf", q), str(head), True
    if ev == "migration.hint":
        text = "VMM ignored it" if rec.get("ignored") else f"{rec['pages']} pages off the bitmap"
        return None, text, True
    if ev == "balloon.hint" and rec.get("step") == "guest_cmd_id":
        return ("chain", q, head), (f"cmd id {rec['cmd_id']:#x}: {rec['old']} -> "
                                    f"{rec['new']}"), True
    if ev == "balloon.hint" and rec.get("step") in HOST_HINT_STEPS:
        return None, (f"host: hinting {rec['step']} {rec['old']} -> {rec['new']} (cmd id "
                      f"{rec['current']:#x})"), False
    if ev == "balloon.hint":
        text = (f"ignored ({rec['rule']}: hint outside START)" if "rule" in rec
                else f"hinted {fmt_size(rec.get('bytes', 0))}")
        return ("chain", q, head), text, True
    if ev == "balloon.report":
        return ("chain", q, head), f"reported {fmt_size(rec.get('reported', 0))}", True
    if ev in ("balloon.inflate", "balloon.deflate"):
        return ("chain", q, head), f"{rec.get('applied')} PFNs {ev.split('.')[1]}d", True
    return None, plain(rec), False


def plain(rec: dict[str, Any]) -> str:
    """A line for an event that is not part of a chain (passes, syncs, QMP, the walker)."""
    ev = rec["event"]
    fields = {k: v for k, v in rec.items() if k not in ("event", "level", "t")}
    texts = {
        "report.batch": lambda: f"drain: {fields.get('nents')} blocks back at the tails",
        "report.pass": lambda: (f"reporting pass ends ({fields.get('state')})"
                                + (f", next at t={fields['next']:g} s" if fields.get("next")
                                   else "")),
        "driver.report": lambda: f"report done: {fields.get('nents')} blocks, "
                                 f"{fmt_size(fields.get('bytes', 0))}",
        "driver.hint.start": lambda: f"hint run starts: cmd id {fields.get('cmd_id', 0):#x}",
        "driver.hint.stop": lambda: f"hint run stops ({fields.get('reason')}): "
                                    f"{fields.get('blocks')} blocks hinted",
        "driver.hint.done": lambda: f"DONE: {fields.get('freed_blocks')} held blocks freed",
        "driver.inflate": lambda: f"balloon holds {fields.get('num_pages')} pages",
        "driver.deflate": lambda: f"balloon holds {fields.get('num_pages')} pages",
        "driver.actual": lambda: f"actual <- {fields.get('actual')}",
        "balloon.target": lambda: f"host: target {fmt_size(fields.get('target', 0))}, "
                                  f"num_pages {fields.get('num_pages')}",
        "balloon.config": lambda: f"{fields.get('field', 'config')} "
                                  f"{fields.get('old')} -> {fields.get('actual')}",
        "balloon.needs_reset": lambda: f"device NEEDS_RESET ({fields.get('rule')})",
        "migration.sync": lambda: f"VMM: bitmap sync {fields.get('sync')} "
                                  f"({fields.get('reason')}): {fields.get('bitmap_pages')} pages "
                                  f"to send",
        "migration.round": lambda: f"VMM: round {fields.get('index')} sent "
                                   f"{fmt_size(fields.get('bytes', 0))}, skipped "
                                   f"{fields.get('hinted_pages')} hinted pages",
        "teach.walk.end": lambda: f"walk {fields.get('status')}: {fields.get('visited')} "
                                  f"offered, {fields.get('reported')} rotated to the tails",
        "teach.walk.call": lambda: "walk resumes from its cursor",
        "qmp.event": lambda: f"QMP event {fields.get('name')} {fields.get('data') or ''}",
    }
    maker = texts.get(ev)
    if maker is not None:
        return maker()
    brief = ", ".join(f"{k}={v}" for k, v in list(fields.items())[:4])
    return f"{ev} {brief}".strip()
