"""What the teaching view copies out of a running machine, as ``teach.*`` records.

Three kinds of state, each read without disturbing the run:

- a split ring (virtio §2.7: descriptor table, avail ring, used ring), read with
  :meth:`~virtqueue.memory.GuestMemory.peek` (from the memfd, so reading a page the host
  discarded does not bring it back and host accounting is unchanged); memories without ``peek``
  (QEMU's RAM over qtest) are read with ``read``, which does not allocate there either;
- the guest's free lists (Linux ``zone->free_area[order].free_list[mt]``), every block head to
  tail with its Reported flag, from :meth:`~guest.mm.PageAllocator.free_blocks`;
- the device's records (:class:`~device.records.BalloonRecords` range sets).

:class:`RingProbe` and :class:`RecordsProbe` are :data:`~sim.teach.capture.Probe` objects: the
recorder calls them with every event and they answer the ring-changing ones (``vq.add``,
``vq.pop``, ``vq.push``, ``vq.get_buf``, ``vq.reject``) and the device's recording ones with a
snapshot taken at that very moment. :func:`traced_walk` wraps the free-block walker so its
visits and the callback's answers become events too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from protocol.split_ring import avail_size, desc_table_size, used_size
from sim.teach.capture import teach_log

__all__ = [
    "BUFFER_PEEK",
    "RING_EVENTS",
    "FreeListProbe",
    "RecordsProbe",
    "RingGeometry",
    "RingProbe",
    "free_lists_record",
    "read_ring",
    "traced_walk",
]

RING_EVENTS = frozenset({"vq.add", "vq.pop", "vq.push", "vq.get_buf", "vq.reject",
                         "teach.tamper"})
"""Events after which the ring of their queue is copied."""
RECORD_EVENTS = frozenset({"balloon.report", "balloon.hint", "balloon.inflate",
                           "balloon.deflate"})
"""Device events after which its records are copied."""
BUFFER_PEEK = 32
"""Bytes of a small device-readable buffer shown with its chain (PFN arrays, command IDs)."""
_RANGES_KEPT = 8
_BLOCKS_KEPT = 4096


@dataclass(frozen=True, slots=True)
class RingGeometry:
    """Where one split ring lives: its queue index, name, size and the three areas."""

    index: int
    name: str
    size: int
    desc: int
    avail: int
    used: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "size": self.size, "desc": self.desc,
                "avail": self.avail, "used": self.used}


def _peek(memory: Any, gpa: int, length: int) -> bytes:
    peek = getattr(memory, "peek", None)
    return peek(gpa, length) if peek is not None else memory.read(gpa, length)


def read_ring(memory: Any, ring: RingGeometry) -> dict[str, Any]:
    """The three areas of ``ring`` as plain values (one ``teach.ring`` body)."""
    n = ring.size
    desc = _peek(memory, ring.desc, desc_table_size(n))
    avail = _peek(memory, ring.avail, avail_size(n))
    used = _peek(memory, ring.used, used_size(n))
    a = struct.unpack(f"<HH{n}HH", avail)
    u = struct.unpack(f"<HH{2 * n}IH", used)
    elems = u[2:2 + 2 * n]
    return {
        "size": n,
        "desc": [list(d) for d in struct.iter_unpack("<QIHH", desc)],
        "avail": {"flags": a[0], "idx": a[1], "ring": list(a[2:2 + n]), "used_event": a[-1]},
        "used": {"flags": u[0], "idx": u[1],
                 "ring": [[elems[2 * i], elems[2 * i + 1]] for i in range(n)],
                 "avail_event": u[-1]},
    }


class RingProbe:
    """Copies a ring after every event that changes it, for the queues being watched."""

    def __init__(self, memory: Any, rings: Iterable[RingGeometry], *,
                 buffers_after: str = "vq.add") -> None:
        self.memory = memory
        self.rings = {r.index: r for r in rings}
        self.buffers_after = buffers_after
        """The event after which a chain's first readable buffer is copied: the driver's
        ``vq.add``, or ``vq.pop`` when only the device end is traced (a real driver)."""

    def __call__(self, record: dict[str, Any]) -> list[dict[str, Any]] | None:
        ring = self.rings.get(record.get("queue"))  # type: ignore[arg-type]
        if ring is None:
            return None
        name = record["event"]
        out = []
        if name == self.buffers_after and record.get("readable"):
            out.append(self._buffer(record))
        if name in RING_EVENTS:
            out.append({"event": "teach.ring", "queue": ring.index, "after": name,
                        **read_ring(self.memory, ring)})
        return out or None

    def _buffer(self, record: dict[str, Any]) -> dict[str, Any]:
        """The first bytes of the chain's first readable buffer, as le32 words."""
        addr, length = record["readable"][0]
        data = _peek(self.memory, addr, min(length, BUFFER_PEEK))
        words = [w for (w,) in struct.iter_unpack("<I", data[:len(data) & ~3])]
        return {"event": "teach.buffer", "queue": record["queue"], "head": record["head"],
                "addr": addr, "len": length, "le32": words}


def _ranges(rs: Any) -> dict[str, Any]:
    ranges = [[s, e] for s, e in rs]
    return {"total": rs.total, "count": len(ranges), "ranges": ranges[:_RANGES_KEPT]}


class RecordsProbe:
    """Copies the device's records after it recorded something (report, hint, inflate...)."""

    def __init__(self, records: Any) -> None:
        self.records = records

    def __call__(self, record: dict[str, Any]) -> list[dict[str, Any]] | None:
        if record["event"] not in RECORD_EVENTS or "queue" not in record:
            return None
        r = self.records
        return [{"event": "teach.records", "queue": record["queue"],
                 "ballooned": _ranges(r.ballooned), "reported": _ranges(r.reported),
                 "hinted": _ranges(r.hinted), "hinted_round": _ranges(r.hinted_round)}]


class FreeListProbe:
    """Copies the free lists after events that move blocks between lists (a report drained
    back to the tails, a walker pass that rotated what it reported)."""

    EVENTS = frozenset({"report.batch", "teach.walk.end"})

    def __init__(self, mm: Any) -> None:
        self.mm = mm

    def __call__(self, record: dict[str, Any]) -> list[dict[str, Any]] | None:
        if record["event"] not in self.EVENTS:
            return None
        return [{"event": "teach.free_lists", "probe": True,
                 **free_lists_record(self.mm, f"after {record['event']}")}]


def free_lists_record(mm: Any, label: str) -> dict[str, Any]:
    """Every free block, zones in order, orders ascending, each list head to tail.

    ``blocks`` rows are ``[zone, order, migratetype, pfn, reported]`` (at most 4096 of them;
    ``truncated`` says if more were left out). Logged as a ``teach.free_lists`` event.
    """
    blocks = []
    truncated = False
    for b in mm.free_blocks():
        if len(blocks) == _BLOCKS_KEPT:
            truncated = True
            break
        blocks.append([b.zone.display_name, b.order, b.mt.name, b.pfn, b.reported])
    zones = {z.name: {"free_pages": z.nr_free_pages, "managed_pages": z.managed_pages,
                      "low_wmark": z.watermark_low} for z in mm.zones}
    return {"label": label, "blocks": blocks, "truncated": truncated, "zones": zones}


def traced_walk(walk: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``walk(cursor, min_order, callback, **kw)`` (:func:`guest.walker.walk_free_blocks`
    bound to an allocator) so each call and each callback visit is an event.

    Events: ``teach.walk.call`` (resume or new pass), ``teach.walk.visit`` before the callback
    sees a block, ``teach.walk.result`` with its answer (0 reported, > 0 skipped, < 0 stop),
    ``teach.walk.end`` with the :class:`~guest.walker.WalkResult`.
    """

    def run(cursor: Any, min_order: int, callback: Callable[..., int], **kw: Any) -> Any:
        def visit(zone: Any, pfn: int, order: int, mt: Any) -> int:
            teach_log.debug("teach.walk.visit", zone=zone.name, pfn=pfn, order=order,
                            mt=mt.name)
            result = callback(zone, pfn, order, mt)
            teach_log.debug("teach.walk.result", pfn=pfn, order=order, result=result)
            return result

        teach_log.debug("teach.walk.call", resume=cursor is not None, min_order=min_order,
                        budget=kw.get("budget"))
        result = walk(cursor, min_order, visit, **kw)
        teach_log.debug("teach.walk.end", status=result.status.name, visited=result.visited,
                        reported=result.reported, value=result.value)
        return result

    return run
