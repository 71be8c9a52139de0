"""Draw narrated steps with rich: ring tables, free lists, device records, each step one screen.

Sizes are chosen for a 100 x 40 terminal: a ring is drawn as three tables side by side
(descriptor table, avail ring, used ring) of at most :data:`MAX_ROWS` rows, a window around the
rows in play when the queue is larger; the free lists are one row per order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from sim.teach.model import (
    FreeListBlock,
    RecordsBlock,
    RingBlock,
    Step,
    TableBlock,
    fmt_size,
)

__all__ = ["MAX_ROWS", "render_step", "print_steps"]

MAX_ROWS = 8
"""Ring rows drawn per table; larger queues show a window around the rows in play."""
_ACTOR_STYLE = {"guest": "green", "device": "magenta", "host": "cyan", "story": "yellow",
                "mixed": "white"}
_ACTOR_NAME = {"guest": "guest (driver)", "device": "device (host)", "host": "host (VMM)",
               "story": "story", "mixed": "guest and host"}
_FLAG_NAMES = ((1, "N"), (2, "W"), (4, "I"))
_MT_ORDER = ("UNMOVABLE", "MOVABLE", "RECLAIMABLE", "HIGHATOMIC", "CMA", "ISOLATE")
_HERO_LIST_MAX = 14


def _window(size: int, rows: set[int]) -> range:
    """At most MAX_ROWS consecutive indices of ``range(size)`` covering ``rows`` if they fit."""
    if size <= MAX_ROWS:
        return range(size)
    low = min(rows) if rows else 0
    start = max(0, min(low - 1, size - MAX_ROWS))
    return range(start, start + MAX_ROWS)


def _flags(value: int) -> str:
    names = [name for bit, name in _FLAG_NAMES if value & bit]
    rest = value & ~7
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "-"


def _ring(block: RingBlock) -> RenderableType:
    ring = block.ring
    size = ring["size"]
    rows = set(block.rows)
    changed = {i for i, _ in block.fields}
    desc = Table(title=f"{block.name}: descriptor table", title_justify="left",
                 caption=None if size <= MAX_ROWS else f"rows {_window(size, rows).start}.."
                 f"{_window(size, rows).stop - 1} of {size}", pad_edge=False, padding=(0, 1))
    for col in ("#", "addr", "len", "flags", "next"):
        desc.add_column(col, justify="right" if col != "flags" else "left", no_wrap=True)
    for i in _window(size, rows):
        addr, length, flags, nxt = ring["desc"][i]
        style = "bold reverse" if i in changed else "bold yellow" if i in rows else (
            "dim" if not (addr or length or flags) else "")
        mark = "*" if i in changed else ">" if i in rows else " "
        desc.add_row(f"{mark}{i}", f"{addr:#x}", fmt_size(length) if length else "0", _flags(flags),
                     str(nxt) if flags & 1 else f"({nxt})", style=style)
    a = ring["avail"]
    avail = Table(title=f"avail idx={a['idx']}", title_justify="left",
                  caption=f"flags={a['flags']} used_event={a['used_event']}", pad_edge=False,
                  padding=(0, 1))
    avail.add_column("slot", justify="right")
    avail.add_column("head", justify="right")
    slots = {block.avail_slot} if block.avail_slot is not None else set()
    for s in _window(size, slots | {max(a["idx"] - 1, 0) % size}):
        style = "bold yellow" if s == block.avail_slot else "dim" if s >= a["idx"] and \
            a["idx"] < size else ""
        mark = ">" if s == block.avail_slot else " "
        avail.add_row(f"{mark}{s}", str(a["ring"][s]), style=style)
    u = ring["used"]
    used = Table(title=f"used idx={u['idx']}", title_justify="left",
                 caption=f"flags={u['flags']} avail_event={u['avail_event']}", pad_edge=False,
                 padding=(0, 1))
    for col in ("slot", "id", "len"):
        used.add_column(col, justify="right")
    uslots = {block.used_slot} if block.used_slot is not None else set()
    for s in _window(size, uslots | {max(u["idx"] - 1, 0) % size}):
        ident, length = u["ring"][s]
        style = "bold yellow" if s == block.used_slot else "dim" if s >= u["idx"] and \
            u["idx"] < size else ""
        mark = ">" if s == block.used_slot else " "
        used.add_row(f"{mark}{s}", str(ident), str(length), style=style)
    grid = Table.grid(padding=(0, 2))
    grid.add_row(desc, avail, used)
    return grid


def _free_lists(block: FreeListBlock) -> RenderableType:
    snap = block.snapshot
    count: Counter[tuple[int, str]] = Counter()
    reported: Counter[tuple[int, str]] = Counter()
    lists: dict[tuple[str, int, str], list[tuple[int, bool]]] = defaultdict(list)
    for zone, order, mt, pfn, rep in snap["blocks"]:
        count[order, mt] += 1
        reported[order, mt] += rep
        lists[zone, order, mt].append((pfn, rep))
    present = {mt for _, mt in count} | {"UNMOVABLE", "MOVABLE", "RECLAIMABLE"}
    mts = [mt for mt in _MT_ORDER if mt in present]
    zones = ", ".join(f"{z} {v['free_pages']} free pages (low wmark {v['low_wmark']})"
                      for z, v in snap["zones"].items() if v["managed_pages"])
    table = Table(title=Text("free_area[order].free_list[mt] (R = Reported)"),
                  title_justify="left", caption=zones, pad_edge=False, padding=(0, 1))
    table.add_column("order", justify="right")
    table.add_column("size", justify="right")
    for mt in mts:
        table.add_column(mt.title(), justify="right")
    hero_key = None
    for (zone, order, mt), blocks in lists.items():
        if block.hero is not None and any(p <= block.hero < p + (1 << order) for p, _ in blocks):
            hero_key = (zone, order, mt)
    for order in range(11):
        cells = []
        for mt in mts:
            n, r = count[order, mt], reported[order, mt]
            cell = "" if not n else f"{n}" + (f" ({r} R)" if r else "")
            if hero_key is not None and hero_key[1:] == (order, mt):
                cell = f"[bold yellow]{cell}[/]"
            cells.append(cell)
        table.add_row(str(order), fmt_size(4096 << order), *cells)
    parts: list[RenderableType] = [table]
    if block.hero is not None:
        parts.append(_hero_list(lists, hero_key, block.hero))
    return Group(*parts)


def _hero_list(lists: dict[tuple[str, int, str], list[tuple[int, bool]]],
               key: tuple[str, int, str] | None, hero: int) -> Text:
    if key is None:
        return Text(f"pfn {hero:#x} is on no free list now (allocated or isolated)",
                    style="italic")
    zone, order, mt = key
    blocks = lists[key]
    text = Text(f"{zone} order {order} {mt.title()}, head -> tail: ")
    shown = blocks if len(blocks) <= _HERO_LIST_MAX else blocks[:_HERO_LIST_MAX - 1]
    for pfn, rep in shown:
        style = "bold yellow reverse" if pfn <= hero < pfn + (1 << order) else ""
        label = f"{pfn:#x}{'R' if rep else ''}"
        text.append(f"[{label}]" if style else label, style=style)
        text.append(" ")
    if len(shown) < len(blocks):
        text.append(f"... ({len(blocks)} blocks) ")
    text.append("<- tail")
    return text


def _records(block: RecordsBlock) -> RenderableType:
    table = Table(title="the device's records (guest-physical ranges)",
                  title_justify="left", pad_edge=False, padding=(0, 1))
    for col in ("kind", "total", "ranges", "first ranges"):
        table.add_column(col, no_wrap=col != "first ranges")
    hero = block.hero
    for kind in ("ballooned", "reported", "hinted_round"):
        rs = block.records[kind]
        if not rs["total"] and kind != "ballooned":
            continue
        text = Text()
        for s, e in rs["ranges"][:3]:
            covers = hero is not None and s <= hero[0] and hero[0] + hero[1] <= e
            text.append(f"[{s:#x}, {e:#x})", style="bold yellow" if covers else "")
            text.append(" ")
        table.add_row(kind, fmt_size(rs["total"]) if rs["total"] else "0", str(rs["count"]),
                      text)
    return table


def _table(block: TableBlock) -> RenderableType:
    table = Table(title=block.title, title_justify="left", pad_edge=False, padding=(0, 1))
    for col in block.columns:
        table.add_column(col, justify="right")
    for row in block.rows:
        table.add_row(*row)
    return table


def render_step(step: Step, number: int, total: int) -> RenderableType:
    """One step as a rich renderable: a rule with who and when, the title, why, body."""
    style = _ACTOR_STYLE.get(step.actor, "white")
    when = f" · t={step.t:.3f} s" if step.t is not None else ""
    parts: list[RenderableType] = [
        Rule(f"step {number}/{total} · {_ACTOR_NAME.get(step.actor, step.actor)}{when}",
             style=style, align="left"),
        Text(step.title, style=f"bold {style}"),
    ]
    if step.why:
        parts.append(Text(f"why: {step.why}", style="italic dim"))
    parts.extend(Text(line) for line in step.lines)
    for block in step.blocks:
        if isinstance(block, RingBlock):
            parts.append(_ring(block))
        elif isinstance(block, FreeListBlock):
            parts.append(_free_lists(block))
        elif isinstance(block, RecordsBlock):
            parts.append(_records(block))
        else:
            parts.append(_table(block))
    parts.extend(Text(note, style="dim") for note in step.notes)
    return Group(*parts)


def print_steps(steps: list[Step], console: Console, *, pause: Any = None) -> None:
    """Print every step; ``pause()`` (if given) is called between steps."""
    for n, step in enumerate(steps, 1):
        console.print(render_step(step, n, len(steps)))
        if pause is not None and n < len(steps):
            pause()
        else:
            console.print()
