"""The monitor's balloon checks: what the driver puts on each queue and in config space (§5.5).

:class:`BalloonChecks` is told about every chain the driver publishes and every chain the
device uses (by :class:`~device.monitor.rings.RingWatch`), every config access, every config
change the device announces, and, on the simulated machine, every guest write to its own RAM.
It keeps the driver's balloon as the device sees it (pages inflating, in the balloon,
deflating, deflated) and grades:

- inflate/deflate payloads: BL-01 whole le32 PFNs, BL-02 at most 256, BL-03 device-readable,
  BL-04 PFNs name RAM; BAL-D-13 / BL-09 a deflated page's inflate was acknowledged; BAL-D-7
  no deflate unless the balloon is above the target (without DEFLATE_ON_OOM); BAL-D-4 a target
  above the balloon is followed by inflation; BAL-D-14 ``actual`` is written after the balloon
  changed, with the balloon's size;
- page use, from guest writes: BAL-D-12 (inflating), BAL-D-9 (in the balloon), BAL-D-10
  (deflating, with MUST_TELL_HOST), BAL-D-34 (deflated pages initialised with poison_val),
  BAL-D-39 (reported pages);
- stats: BL-11 / BAL-D-20 whole 10-byte entries, BL-12 bounded, BL-14 / BAL-D-16 one buffer at
  a time, BAL-D-17 a buffer after init, BAL-D-18 a new one after each use, BAL-D-19 no
  duplicate tags, BAL-D-23 the same tags every time;
- free page hinting: BL-16 / BAL-D-24 4-byte command IDs, BAL-D-25 a round opens with the
  current ID, BAL-D-26 once, BL-17 hints only under it, BAL-D-27 hints follow, BAL-D-28 none
  after an announced STOP/DONE was read, BAL-D-29 a round ends with STOP;
- reporting: BL-19 4 KiB aligned ranges, BL-21 device-writable, BAL-D-41 large blocks,
  BAL-D-38 reported pages hold poison_val (PAGE_POISON);
- config: BL-23 only ``actual`` and ``poison_val`` written, inside the config size, BL-24
  ``actual`` within bounds, BL-25 ``poison_val`` only with PAGE_POISON, BAL-D-35 before
  DRIVER_OK, BAL-D-36 unchanged while DRIVER_OK, GEN-D-14 optional fields only when their
  feature is offered, GEN-D-13 one field per read.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from device.monitor.grades import Ledger
from device.monitor.rings import Published
from protocol.balloon import (
    ARRAY_PFNS_MAX,
    BALLOON_PAGE_SIZE,
    PFN_SHIFT,
    BalloonQueue,
    CommandId,
    ConfigOffset,
    config_size,
)
from protocol.features import BalloonFeature, has

__all__ = ["BalloonChecks"]

_K = BalloonQueue
_STAT_SIZE = 10
_STATS_MAX_BYTES = 4096
"""The largest stats buffer a device is expected to parse (vballoon and Cloud Hypervisor)."""
_LARGE_BLOCK = 2 << 20
"""BAL-D-41: x86 pageblock size, the smallest block Linux reports."""
_FIELDS = {ConfigOffset.NUM_PAGES: "num_pages", ConfigOffset.ACTUAL: "actual",
           ConfigOffset.FREE_PAGE_HINT_CMD_ID: "free_page_hint_cmd_id",
           ConfigOffset.POISON_VAL: "poison_val"}


def _pages(gpa: int, n: int) -> range:
    return range(gpa >> PFN_SHIFT, (gpa + n + BALLOON_PAGE_SIZE - 1) >> PFN_SHIFT)


class BalloonChecks:
    """Balloon-specific grading (see the module docstring)."""

    def __init__(self, ledger: Ledger, *, memory: Callable[[], Any],
                 driver_ok: Callable[[], bool | None], field_reads: bool = True) -> None:
        self.ledger = ledger
        self.field_reads = field_reads
        self._memory = memory
        self._driver_ok = driver_ok
        self.offered = 0
        self.features = 0
        self.inflating: dict[int, int] = {}
        self.ballooned: set[int] = set()
        self.deflating: dict[int, int] = {}
        self.deflated: set[int] = set()
        self.num_pages_read: int | None = None
        self.num_pages_max = 0
        self.target_pending: int | None = None
        self.actual_due = False
        self.actual_written: int | None = None
        self.poison_val: int | None = None
        self.stats_first_tags: tuple[int, ...] | None = None
        self.stats_exposed: set[int] = set()
        self.stats_refill_due = 0
        self.announced_cmd: int | None = None
        self.driver_cmd: int | None = None
        self.open_round: int | None = None
        self.round_hints = 0
        self.ids_sent: Counter[int] = Counter()
        self.rounds: list[dict[str, int]] = []
        self.reporting: dict[int, tuple[int, int]] = {}
        self.inflated_total = 0
        self.below_target: list[tuple[str, dict[str, Any]]] = []

    def device_reset(self) -> None:
        """The device was reset: the guest has every page back, nothing is in flight.

        Deflates below the target are excused as a removal only if the driver emptied the
        balloon before resetting (Linux's remove_common)."""
        self._flush_below_target(then_reset=self.count == 0)
        self.inflating.clear()
        self.ballooned.clear()
        self.deflating.clear()
        self.deflated.clear()
        self.reporting.clear()
        self.stats_exposed.clear()
        self.stats_refill_due = 0
        self.actual_due = False
        self.target_pending = None
        if self.open_round is not None:
            self._close_round(stopped=False)

    def _flush_below_target(self, *, then_reset: bool) -> None:
        for evidence, values in self.below_target:
            self.ledger.fail("BAL-D-7", evidence + (" (the driver then emptied the balloon and "
                             "reset the device: a removal)" if then_reset else ""),
                             then_reset=then_reset, **values)
        self.below_target.clear()

    # ---- negotiation ---------------------------------------------------------------------
    def negotiated(self, offered: int, features: int) -> None:
        self.offered, self.features = offered, features

    def _has(self, feature: BalloonFeature) -> bool:
        return has(self.features, feature)

    @property
    def count(self) -> int:
        """Pages in the balloon as the device knows it (acknowledged inflates, minus
        acknowledged deflates)."""
        return len(self.ballooned) + len(self.deflating)

    # ---- chains ----------------------------------------------------------------------------
    def published(self, kind: BalloonQueue, chain: Published) -> None:
        if kind in (_K.INFLATE, _K.DEFLATE):
            self._pfn_chain(kind, chain)
        elif kind is _K.STATS:
            self._stats(chain)
        elif kind is _K.FREE_PAGE:
            self._hint(chain)
        else:
            self._report(chain)

    def used(self, kind: BalloonQueue, chain: Published) -> None:
        led, head = self.ledger, chain.head
        if kind is _K.INFLATE:
            for pfn in self._pfns(chain):
                if self.inflating.pop(pfn, None) is not None:
                    self.ballooned.add(pfn)
                    led.ok("BAL-D-12", f"page {pfn:#x} untouched until its inflate (head "
                           f"{head}) was used", pfn=pfn)
            self.actual_due = True
        elif kind is _K.DEFLATE:
            for pfn in self._pfns(chain):
                if self.deflating.pop(pfn, None) is not None:
                    self.deflated.add(pfn)
                    if self._has(BalloonFeature.MUST_TELL_HOST):
                        led.ok("BAL-D-10", f"page {pfn:#x} untouched until its deflate (head "
                               f"{head}) was used", pfn=pfn)
            self.actual_due = True
        elif kind is _K.STATS:
            self.stats_exposed.discard(head)
            self.stats_refill_due += 1
        elif kind is _K.REPORTING:
            for gpa, n in chain.writable:
                if self.reporting.pop(gpa, None) is not None:
                    led.ok("BAL-D-39", f"reported range [{gpa:#x}, +{n:#x}) untouched until "
                           "the device used it", gpa=gpa, len=n)

    @staticmethod
    def _pfns(chain: Published) -> list[int]:
        data = chain.data[:len(chain.data) & ~3]
        return [p for (p,) in struct.iter_unpack("<I", data)]

    def _pfn_chain(self, kind: BalloonQueue, chain: Published) -> None:
        led, q, head = self.ledger, chain.queue, chain.head
        name = "inflate" if kind is _K.INFLATE else "deflate"
        where = f"{name} chain (queue {q}, head {head})"
        led.check("BL-01", chain.readable_len % 4 == 0, f"{where}: {chain.readable_len} "
                  "readable bytes", queue=q, head=head, readable_len=chain.readable_len)
        pfns = self._pfns(chain)
        led.check("BL-02", len(pfns) <= ARRAY_PFNS_MAX, f"{where}: {len(pfns)} PFNs",
                  queue=q, head=head, pfns=len(pfns), max=ARRAY_PFNS_MAX)
        led.check("BL-03", not chain.writable, f"{where}: {len(chain.writable)} device-writable "
                  "descriptors", queue=q, head=head, writable_len=chain.writable_len)
        memory = self._memory()
        outside = [p for p in pfns if not memory.contains(p << PFN_SHIFT, BALLOON_PAGE_SIZE)]
        led.check("BL-04", not outside, f"{where}: {len(outside)} of {len(pfns)} PFNs name no "
                  "RAM", queue=q, head=head, outside=[hex(p) for p in outside[:8]])
        if kind is _K.INFLATE:
            for p in pfns:
                self.inflating[p] = head
            self.inflated_total += len(pfns)
            if self.target_pending is not None:
                led.ok("BAL-D-4", f"target {self.target_pending} pages above the balloon "
                       f"({self.count}): the driver inflates (head {head})",
                       num_pages=self.target_pending, balloon=self.count)
                self.target_pending = None
            return
        unknown = [p for p in pfns if p not in self.ballooned]
        evidence = (f"{where}: every PFN was in the balloon (inflate acknowledged)" if not
                    unknown else f"{where}: {len(unknown)} PFNs were not in the balloon "
                    "(never inflated, or the inflate not yet used)")
        for rule in ("BAL-D-13", "BL-09"):
            led.check(rule, not unknown, evidence, queue=q, head=head,
                      pfns=[hex(p) for p in unknown[:8]])
        if not self._has(BalloonFeature.DEFLATE_ON_OOM) and self.num_pages_read is not None:
            evidence = f"{where}: balloon {self.count} pages, target read {self.num_pages_read}"
            if self.count > self.num_pages_read:
                led.ok("BAL-D-7", evidence, balloon=self.count, num_pages=self.num_pages_read)
            else:  # judged at the next reset or the end: a removal deflates everything
                self.below_target.append((evidence, dict(
                    queue=q, head=head, balloon=self.count, num_pages=self.num_pages_read)))
        for p in pfns:
            if p in self.ballooned:
                self.ballooned.discard(p)
                self.deflating[p] = head

    def _stats(self, chain: Published) -> None:
        led, q, head = self.ledger, chain.queue, chain.head
        n = chain.readable_len
        for rule in ("BL-11", "BAL-D-20"):
            led.check(rule, n % _STAT_SIZE == 0 and not chain.writable,
                      f"stats buffer (head {head}): {n} readable bytes, "
                      f"{chain.writable_len} writable", queue=q, head=head, readable_len=n)
        led.check("BL-12", n <= _STATS_MAX_BYTES, f"stats buffer (head {head}): {n} bytes",
                  queue=q, head=head, readable_len=n, max=_STATS_MAX_BYTES)
        others = sorted(self.stats_exposed - {head})
        for rule in ("BL-14", "BAL-D-16"):
            led.check(rule, not others, f"stats buffer (head {head}) made available while "
                      f"{len(others)} other(s) were available", queue=q, head=head,
                      others=others)
        self.stats_exposed.add(head)
        if self.stats_first_tags is None:
            led.ok("BAL-D-17", f"first stats buffer made available (head {head}, {n} bytes)",
                   queue=q, head=head)
        if self.stats_refill_due:
            led.ok("BAL-D-18", f"a new stats buffer (head {head}) after the device used one",
                   queue=q, head=head)
            self.stats_refill_due = 0
        tags = tuple(t for (t, _) in struct.iter_unpack("<HQ", chain.data[:n - n % 10]))
        led.check("BAL-D-19", bool(tags) and len(set(tags)) == len(tags),
                  f"stats buffer (head {head}) carries {len(tags)} entries, tags {list(tags)}",
                  queue=q, head=head, tags=list(tags))
        if self.stats_first_tags is None:
            self.stats_first_tags = tags
        else:
            same = set(tags) == set(self.stats_first_tags)
            led.check("BAL-D-23", same, f"stats buffer (head {head}) tags {sorted(tags)}, "
                      f"first buffer {sorted(self.stats_first_tags)}", queue=q, head=head,
                      tags=sorted(tags), first=sorted(self.stats_first_tags))

    def _hint(self, chain: Published) -> None:
        led, q, head = self.ledger, chain.queue, chain.head
        if chain.readable:
            n = chain.readable_len
            for rule in ("BL-16", "BAL-D-24"):
                led.check(rule, n == 4, f"command-ID out-buffer (head {head}) of {n} bytes",
                          queue=q, head=head, readable_len=n)
            if n < 4:
                return
            cmd = int.from_bytes(chain.data[:4], "little")
            if cmd >= 2:
                self._hint_open(cmd, q, head)
            elif cmd == CommandId.STOP and self.open_round is not None:
                led.ok("BAL-D-29", f"round {self.open_round:#x} closed with a STOP out-buffer "
                       f"(head {head}) after {self.round_hints} hints",
                       cmd_id=self.open_round, hints=self.round_hints)
                self._close_round(stopped=True)
        if chain.writable:
            self._hint_pages(chain)

    def _hint_open(self, cmd: int, q: int, head: int) -> None:
        led = self.ledger
        led.check("BAL-D-25", cmd == self.driver_cmd,
                  f"round opened with ID {cmd:#x} (head {head}); the driver last read "
                  f"{self.driver_cmd:#x}" if self.driver_cmd is not None else
                  f"ID {cmd:#x} sent (head {head}) before the driver read any command ID",
                  queue=q, head=head, cmd_id=cmd, read=self.driver_cmd)
        led.check("BAL-D-26", self.ids_sent[cmd] == 0, f"command ID {cmd:#x} sent "
                  f"{self.ids_sent[cmd] + 1} time(s)", cmd_id=cmd, times=self.ids_sent[cmd] + 1)
        self.ids_sent[cmd] += 1
        if self.open_round is not None:
            self._close_round(stopped=False)
        self.open_round, self.round_hints = cmd, 0

    def _close_round(self, *, stopped: bool) -> None:
        self.rounds.append({"cmd_id": self.open_round or 0, "hints": self.round_hints,
                            "stopped": int(stopped)})
        self.open_round = None

    def _hint_pages(self, chain: Published) -> None:
        led, q, head = self.ledger, chain.queue, chain.head
        current = self.open_round is not None and self.open_round == self.driver_cmd
        led.check("BL-17", current, f"hint in-buffer (head {head}) under command ID "
                  f"{self.open_round!r}, the driver's current ID {self.driver_cmd!r}",
                  queue=q, head=head, sent_under=self.open_round, current=self.driver_cmd)
        if self.open_round is None:
            led.fail("BAL-D-25", f"hint in-buffer (head {head}) before any round was opened "
                     "with a command ID", queue=q, head=head)
        if self.driver_cmd in (CommandId.STOP, CommandId.DONE) and \
                self.announced_cmd == self.driver_cmd:
            led.fail("BAL-D-28", f"hint in-buffer (head {head}) after the driver read "
                     f"{CommandId(self.driver_cmd).name}", queue=q, head=head,
                     cmd_id=self.driver_cmd)
        elif self.open_round is not None:
            led.ok("BAL-D-28", f"hints only while the ID was {self.open_round:#x}")
        if self.open_round is not None and self.round_hints == 0:
            led.ok("BAL-D-27", f"round {self.open_round:#x}: hints supplied as in-buffers "
                   f"(first: head {head}, {chain.writable_len} bytes)", cmd_id=self.open_round)
        self.round_hints += 1

    def _report(self, chain: Published) -> None:
        led, q, head = self.ledger, chain.queue, chain.head
        led.check("BL-21", not chain.readable, f"report (head {head}): {len(chain.writable)} "
                  f"writable, {len(chain.readable)} readable descriptors", queue=q, head=head,
                  readable_len=chain.readable_len)
        bad = [(gpa, n) for gpa, n in chain.writable if (gpa | n) % BALLOON_PAGE_SIZE]
        led.check("BL-19", not bad, f"report (head {head}): {len(bad)} of "
                  f"{len(chain.writable)} ranges not 4 KiB aligned", queue=q, head=head,
                  ranges=[[hex(g), n] for g, n in bad[:8]])
        if chain.writable:
            smallest = min(n for _, n in chain.writable)
            led.check("BAL-D-41", smallest >= _LARGE_BLOCK, f"report (head {head}): "
                      f"{len(chain.writable)} ranges, smallest {smallest >> 10} KiB",
                      queue=q, head=head, smallest=smallest, threshold=_LARGE_BLOCK)
        if self._has(BalloonFeature.PAGE_POISON):
            self._check_poisoned(chain)
        for gpa, n in chain.writable:
            self.reporting[gpa] = (n, head)

    def _check_poisoned(self, chain: Published) -> None:
        value = self.poison_val or 0
        unit = value.to_bytes(4, "little")
        memory = self._memory()
        for gpa, n in chain.writable:
            if not memory.contains(gpa, n):
                continue
            data = memory.read(gpa, n)
            good = data == unit * (n // 4) + unit[:n % 4]
            if not self.ledger.check(
                    "BAL-D-38", good, f"reported range [{gpa:#x}, +{n:#x}) "
                    f"{'holds' if good else 'does not hold'} poison_val {value:#x}",
                    gpa=gpa, len=n, poison_val=value):
                return

    # ---- config ----------------------------------------------------------------------------
    def device_changed(self, image: bytes) -> None:
        """The device announced a config change; ``image`` is its config space now."""
        if len(image) >= 4:
            num_pages = int.from_bytes(image[0:4], "little")
            self.num_pages_max = max(self.num_pages_max, num_pages)
            self.target_pending = num_pages if num_pages > self.count else None
        if len(image) >= 12:
            self.announced_cmd = int.from_bytes(image[8:12], "little")

    def config_read(self, offset: int, data: bytes) -> None:
        led = self.ledger
        size = len(data)
        fields = {f for f in _FIELDS if offset < f + 4 and f < offset + size}
        if self.field_reads:
            led.check("GEN-D-13", len(fields) <= 1 and size <= 4,
                      f"config read at {offset} of {size} bytes ({len(fields)} field(s))",
                      offset=offset, size=size)
        self._gated(offset, size, "read")
        for f in fields:
            if offset <= f and f + 4 <= offset + size:
                value = int.from_bytes(data[f - offset:f - offset + 4], "little")
                if f == ConfigOffset.NUM_PAGES:
                    self.num_pages_read = value
                    self.num_pages_max = max(self.num_pages_max, value)
                elif f == ConfigOffset.FREE_PAGE_HINT_CMD_ID:
                    self.driver_cmd = value

    def _gated(self, offset: int, size: int, access: str) -> None:
        for f, feature in ((ConfigOffset.FREE_PAGE_HINT_CMD_ID, BalloonFeature.FREE_PAGE_HINT),
                           (ConfigOffset.POISON_VAL, BalloonFeature.PAGE_POISON)):
            if offset < f + 4 and f < offset + size:
                self.ledger.check("GEN-D-14", has(self.offered, feature),
                                  f"config {access} of {_FIELDS[f]} with {feature.name} "
                                  f"{'offered' if has(self.offered, feature) else 'not offered'}",
                                  field=_FIELDS[f], offset=offset, size=size)

    def config_written(self, offset: int, data: bytes) -> None:
        led, size = self.ledger, len(data)
        limit = config_size(self.offered)
        writable = any(f <= offset and offset + size <= f + 4
                       for f in (ConfigOffset.ACTUAL, ConfigOffset.POISON_VAL))
        led.check("BL-23", writable and offset + size <= limit,
                  f"config write at {offset} of {size} bytes (config size {limit})",
                  offset=offset, size=size, config_size=limit, data=data.hex())
        self._gated(offset, size, "write")
        if ConfigOffset.ACTUAL <= offset < ConfigOffset.ACTUAL + 4 and size == 4:
            self._actual(int.from_bytes(data, "little"))
        if ConfigOffset.POISON_VAL <= offset < ConfigOffset.POISON_VAL + 4:
            self._poison(offset, data)

    def _actual(self, value: int) -> None:
        led = self.ledger
        memory = self._memory()
        ram_pages = memory.size >> PFN_SHIFT if memory is not None else None
        led.check("BL-24", (ram_pages is None or value <= ram_pages)
                  and value <= max(self.num_pages_max, self.count),
                  f"actual {value} written (target at most {self.num_pages_max}, RAM "
                  f"{ram_pages} pages)", actual=value, num_pages_max=self.num_pages_max,
                  ram_pages=ram_pages)
        if self.actual_due or value != (self.actual_written or 0):
            led.check("BAL-D-14", value == self.count, f"actual {value} written while the "
                      f"balloon holds {self.count} pages", actual=value, balloon=self.count)
        self.actual_due = self.actual_due and value != self.count
        self.actual_written = value

    def _poison(self, offset: int, data: bytes) -> None:
        led = self.ledger
        led.check("BL-25", self._has(BalloonFeature.PAGE_POISON),
                  f"poison_val written with PAGE_POISON "
                  f"{'negotiated' if self._has(BalloonFeature.PAGE_POISON) else 'not negotiated'}",
                  data=data.hex())
        old = self.poison_val
        image = bytearray((old or 0).to_bytes(4, "little"))
        start = offset - ConfigOffset.POISON_VAL
        image[start:start + len(data)] = data[:4 - start]
        new = int.from_bytes(image, "little")
        if self._driver_ok():
            led.check("BAL-D-36", old == new, f"poison_val written while DRIVER_OK is set: "
                      f"{old!r} -> {new:#x}", old=old, new=new)
        self.poison_val = new

    def driver_ok_set(self) -> None:
        """DRIVER_OK was written (seen only where status is visible)."""
        if self._has(BalloonFeature.PAGE_POISON):
            self.ledger.check("BAL-D-35", self.poison_val is not None,
                              "poison_val written before DRIVER_OK" if self.poison_val is not
                              None else "DRIVER_OK set but poison_val was never written",
                              poison_val=self.poison_val)
        if self.poison_val is not None:
            self.ledger.ok("BAL-D-36", f"poison_val {self.poison_val:#x} set before DRIVER_OK",
                           poison_val=self.poison_val)

    # ---- guest writes (simulated machine only) ----------------------------------------------
    def guest_wrote(self, gpa: int, n: int, fill: int | None) -> None:
        if n <= 0:
            return
        led = self.ledger
        for pfn in _pages(gpa, n):
            if pfn in self.inflating:
                led.fail("BAL-D-12", f"guest wrote page {pfn:#x} while its inflate (head "
                         f"{self.inflating[pfn]}) was not yet used", pfn=pfn, gpa=gpa, len=n)
            elif pfn in self.ballooned:
                led.fail("BAL-D-9", f"guest wrote page {pfn:#x}, which is in the balloon, "
                         "without deflating it first", pfn=pfn, gpa=gpa, len=n)
            elif pfn in self.deflating and self._has(BalloonFeature.MUST_TELL_HOST):
                led.fail("BAL-D-10", f"guest wrote page {pfn:#x} before its deflate (head "
                         f"{self.deflating[pfn]}) was used", pfn=pfn, gpa=gpa, len=n)
            elif pfn in self.deflated:
                self.deflated.discard(pfn)
                if self._has(BalloonFeature.PAGE_POISON):
                    self._first_reuse(pfn, gpa, n, fill)
        if self.reporting:
            for start, (length, head) in self.reporting.items():
                if gpa < start + length and start < gpa + n:
                    led.fail("BAL-D-39", f"guest wrote [{gpa:#x}, +{n:#x}) inside a reported "
                             f"range (head {head}) the device had not used yet", gpa=gpa,
                             len=n, range=[hex(start), length])

    def _first_reuse(self, pfn: int, gpa: int, n: int, fill: int | None) -> None:
        value = self.poison_val or 0
        unit = value.to_bytes(4, "little")
        page = pfn << PFN_SHIFT
        data = self._memory().read(page, BALLOON_PAGE_SIZE)
        good = data == unit * (BALLOON_PAGE_SIZE // 4)
        self.ledger.check("BAL-D-34", good, f"deflated page {pfn:#x} first written "
                          f"({'fill ' + hex(fill) if fill is not None else 'write'} "
                          f"[{gpa:#x}, +{n:#x})): page {'holds' if good else 'does not hold'} "
                          f"poison_val {value:#x}", pfn=pfn, poison_val=value)

    # ---- end of run -----------------------------------------------------------------------------
    def finish(self, *, guest_writes: bool, active: bool) -> None:
        led = self.ledger
        self._flush_below_target(then_reset=False)
        if self.target_pending is not None and self.target_pending > self.count:
            led.fail("BAL-D-4", f"target {self.target_pending} pages above the balloon "
                     f"({self.count} pages) and no inflate followed",
                     num_pages=self.target_pending, balloon=self.count)
        if self.actual_due:
            led.fail("BAL-D-14", f"the balloon changed to {self.count} pages but actual was "
                     f"left at {self.actual_written}", balloon=self.count,
                     actual=self.actual_written)
        if has(self.features, BalloonFeature.STATS_VQ) and active:
            if self.stats_first_tags is None:
                led.fail("BAL-D-17", "STATS_VQ negotiated but no stats buffer was made "
                         "available")
            if self.stats_refill_due:
                led.fail("BAL-D-18", "the device used the stats buffer and no new one "
                         "followed", times=self.stats_refill_due)
        if self.open_round is not None:
            self._close_round(stopped=False)
        for r in self.rounds:
            if not r["stopped"]:
                led.fail("BAL-D-29", f"round {r['cmd_id']:#x} ({r['hints']} hints) never "
                         "closed with a STOP out-buffer", **r)
            if r["hints"] == 0:
                led.fail("BAL-D-27", f"round {r['cmd_id']:#x} opened without any hint",
                         **r)
        if guest_writes and (self.ballooned or self.inflated_total):
            if not led.failed("BAL-D-9"):
                led.ok("BAL-D-9", f"no page in the balloon was written ({self.inflated_total}"
                       " pages inflated over the run)", inflated=self.inflated_total)
