"""The device end of a split virtqueue (virtio spec §2.7; names after rust-vmm virtio-queue).

:class:`DeviceQueue` pops validated :class:`~virtqueue.chain.DescriptorChain` objects from the
avail ring, pushes used elements, and decides notifications. It reads the rings through
memoryviews taken once at construction and parses them with precompiled structs
(:mod:`virtqueue.layout`), so it runs at about 1 M chains/s on one core.

Validation is complete: the queue configuration (CFG-01..07) when the queue is built, the avail
ring (AV-01, AV-03, AV-04) and every descriptor rule (DC-, IN-, see :mod:`virtqueue.walk`) on
each pop. The fast walk inside :meth:`DeviceQueue.pop` only accepts well-formed chains: it
bounds the walk with a counter (a chain longer than N buffers is a loop or too long) and hands
anything odd to the careful walker, which names the broken rule and the values. What follows a
violation is the queue's :class:`~virtqueue.policy.ErrorPolicy`.

Rules for this module: the device never writes the descriptor table or the avail ring
(SPL-V-2); it reads each descriptor once per walk; guest bytes can produce a chain, ``None`` or
a :class:`~protocol.errors.DriverViolation` and nothing else.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import DeviceViolation, DriverViolation, GuestMemoryError, UsageError
from protocol.rules import RULES
from protocol.split_ring import (
    AVAIL_ALIGN,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_IDX,
    USED_RING,
    VRING_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_size,
    desc_table_size,
    used_event_offset,
    used_size,
)
from virtqueue import events as _ev
from virtqueue.chain import DescriptorChain, Segment
from virtqueue.layout import DESC, U16, USED_ELEM, is_queue_size
from virtqueue.notify import interrupt_needed
from virtqueue.policy import ErrorPolicy
from virtqueue.walk import INDIRECT_MAX_ENTRIES, RamBounds, Walk, driver_violation, walk_chain

__all__ = ["DeviceQueue"]

_U64_END = 1 << 64
_unpack_u16 = U16.unpack_from
_pack_u16 = U16.pack_into
_unpack_desc = DESC.unpack_from
_pack_elem = USED_ELEM.pack_into
_new = tuple.__new__
_TABLE_MAX_BYTES = 16 * INDIRECT_MAX_ENTRIES
_CHAIN_MAX_BYTES = 1 << 32


class DeviceQueue:
    """One split virtqueue seen from the device.

    Args:
        index: the queue index (for events and errors).
        size: queue size N (power of two, 1..``max_size``).
        desc, avail, used: guest-physical addresses of the three areas.
        memory: guest RAM with ``view`` (:class:`~virtqueue.memory.GuestMemory`).
        event_idx: VIRTIO_F_EVENT_IDX negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC negotiated.
        policy: what a driver violation does (:mod:`virtqueue.policy`).
        next_avail, next_used: starting ring positions (vhost-user SET_VRING_BASE, migration).
        max_size: the transport's QueueNumMax.

    Raises:
        DriverViolation: CFG-01..07 when the configuration is invalid (whatever the policy).
    """

    __slots__ = (
        "avail", "broken", "desc", "event_idx", "index", "indirect", "memory", "next_used",
        "policy", "size", "used", "_avail_shadow", "_avail_v", "_bad_avail_idx", "_bounds",
        "_desc_v", "_flight", "_mask", "_next_avail", "_observers", "_ram", "_signalled_used",
        "_signalled_valid", "_used_v",
    )

    def __init__(self, *, index: int, size: int, desc: int, avail: int, used: int, memory: Any,
                 event_idx: bool = False, indirect: bool = False,
                 policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET, next_avail: int = 0,
                 next_used: int = 0, max_size: int = MAX_QUEUE_SIZE) -> None:
        for name, value in (("next_avail", next_avail), ("next_used", next_used)):
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise UsageError(f"{name} must be a 16-bit index, not {value!r}")
        try:
            self.policy = ErrorPolicy(policy)
        except ValueError:
            raise UsageError(f"unknown error policy {policy!r}") from None
        self.index = index
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.memory = memory
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self._desc_v, self._avail_v, self._used_v = _map_areas(
            index, size, desc, avail, used, memory, max_size)
        self._mask = size - 1
        self._ram = ram = RamBounds(memory)
        self._bounds = (ram.lo, ram.hi, ram.exact, ram)
        self._observers = getattr(memory, "write_observers", ())
        self._next_avail = next_avail
        self.next_used = next_used
        self._reset_state()

    def _reset_state(self) -> None:
        self.broken = False
        self._avail_shadow = self._next_avail  # avail.idx as last read (QEMU shadow_avail_idx)
        self._flight = [-1] * self.size  # per head: writable_len while in flight, else -1
        self._signalled_used = self.next_used
        self._signalled_valid = False
        self._bad_avail_idx: int | None = None

    # ---- state ------------------------------------------------------------------------------
    @property
    def next_avail(self) -> int:
        """The avail ring position of the next chain to pop (free-running u16)."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise UsageError(f"next_avail must be a 16-bit index, not {value!r}")
        self._next_avail = value
        self._avail_shadow = value

    @property
    def in_flight(self) -> int:
        """How many chains were popped and not yet pushed."""
        return sum(1 for w in self._flight if w >= 0)

    @property
    def in_flight_heads(self) -> tuple[int, ...]:
        """The heads popped and not yet pushed, ascending."""
        return tuple(h for h, w in enumerate(self._flight) if w >= 0)

    def reset(self) -> None:
        """Back to the state after a device reset: indices 0, nothing in flight, not broken.

        The ring addresses and features are kept; guest memory is not touched (the driver
        re-initialises its rings).
        """
        self._next_avail = 0
        self.next_used = 0
        self._reset_state()

    def avail_idx(self) -> int:
        """The driver's current ``avail.idx``."""
        return _unpack_u16(self._avail_v, AVAIL_IDX)[0]

    # ---- pop --------------------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated; ``None`` if there is none (or broken).

        Raises:
            DriverViolation: under ``needs-reset``, once, for the first rule the driver broke;
                the queue is ``broken`` afterwards.
        """
        if self.broken:
            return None
        avail = self._avail_v
        na = self._next_avail
        size = self.size
        idx = self._avail_shadow
        if idx == na:  # all seen entries taken: read avail.idx again
            idx = _unpack_u16(avail, 2)[0]
            if idx == na:
                return None
            if (idx - na) & 0xFFFF > size:
                return self._pop_slow()
            self._avail_shadow = idx
        head = _unpack_u16(avail, 4 + ((na & self._mask) << 1))[0]
        flight = self._flight
        if head >= size or flight[head] >= 0:
            return self._pop_slow()
        lo, hi, exact, ram = self._bounds
        addr, length, flags, nxt = _unpack_desc(self._desc_v, head << 4)
        if not flags & 5:  # one direct descriptor: the most common chain
            if not length or addr < lo or addr + length > hi or not (
                    exact or ram.contains(addr, length)):
                return self._pop_slow()
            if flags & 2:
                chain = _new(DescriptorChain, (head, (), (_new(Segment, (addr, length)),), 0,
                                               length, False, None))
                flight[head] = length
            else:
                chain = _new(DescriptorChain, (head, (_new(Segment, (addr, length)),), (),
                                               length, 0, False, None))
                flight[head] = 0
        else:
            readable: list[Segment] = []
            writable: list[Segment] = []
            rlen = wlen = 0
            buf = self._desc_v
            base = 0
            limit = size
            count = 1  # buffers so far, once this one is taken
            in_table = False
            while True:
                if flags & 4:
                    if (in_table or not self.indirect or flags & 1 or not length or length & 15
                            or length > _TABLE_MAX_BYTES or addr < lo or addr + length > hi
                            or not (exact or ram.contains(addr, length))):
                        return self._pop_slow()
                    buf, base = ram.table(addr, length)
                    limit = length >> 4
                    in_table = True
                    addr, length, flags, nxt = _unpack_desc(buf, base)
                    continue
                if not length or addr < lo or addr + length > hi or not (
                        exact or ram.contains(addr, length)):
                    return self._pop_slow()
                if flags & 2:
                    writable.append(_new(Segment, (addr, length)))
                    wlen += length
                elif writable:
                    return self._pop_slow()
                else:
                    readable.append(_new(Segment, (addr, length)))
                    rlen += length
                if not flags & 1:
                    break
                # A chain of more than N buffers is a loop or too long: let the careful walk say.
                if nxt >= limit or count >= size:
                    return self._pop_slow()
                count += 1
                addr, length, flags, nxt = _unpack_desc(buf, base + (nxt << 4))
            if rlen + wlen > _CHAIN_MAX_BYTES:
                return self._pop_slow()
            chain = _new(DescriptorChain, (head, tuple(readable), tuple(writable), rlen, wlen,
                                           in_table, None))
            flight[head] = wlen
        self._next_avail = na = (na + 1) & 0xFFFF
        if _ev.ENABLED:
            _ev.pop(self.index, chain, avail_idx=idx, next_avail=na)
        return chain

    def _pop_slow(self) -> DescriptorChain | None:
        """Pop with the careful walker and apply the policy to violations (see policy.py)."""
        size = self.size
        for _ in range(size + 1):  # each round consumes one entry; at most N are pending
            if self.broken:
                return None
            idx = _unpack_u16(self._avail_v, AVAIL_IDX)[0]
            na = self._next_avail
            pending = (idx - na) & 0xFFFF
            if pending == 0:
                return None
            if pending > size:
                return self._reject_avail_idx(idx, na, pending)
            self._avail_shadow = idx
            head = _unpack_u16(self._avail_v, AVAIL_RING + 2 * (na & self._mask))[0]
            if head >= size:
                v = driver_violation("AV-03", "an avail ring entry names a head beyond the "
                                     "queue size", queue=self.index, head=head, size=size,
                                     avail_slot=na & self._mask)
                self._reject(v)
                self._next_avail = (na + 1) & 0xFFFF
                continue
            if self._flight[head] >= 0:
                v = driver_violation("AV-04", "a head is made available while still in flight",
                                     queue=self.index, head=head, avail_slot=na & self._mask)
                self._reject(v)
                self._next_avail = (na + 1) & 0xFFFF
                continue
            w = walk_chain(head, desc=self._desc_v, size=size, ram=self._ram,
                           indirect=self.indirect)
            if w.violation is None:
                return self._take(head, w, idx, na)
            self._reject(w.violation)  # raises under needs-reset
            if self.policy is ErrorPolicy.TRUNCATE and not w.empty:
                return self._take(head, w, idx, na)
            self._next_avail = (na + 1) & 0xFFFF
            self._write_used(head, 0)
        return None  # not reached: the loop consumes every pending entry first

    def _take(self, head: int, w: Walk, idx: int, na: int) -> DescriptorChain:
        chain = DescriptorChain(head, tuple(w.readable), tuple(w.writable), w.readable_len,
                                w.writable_len, w.indirect, w.violation)
        self._flight[head] = w.writable_len
        self._next_avail = na = (na + 1) & 0xFFFF
        if _ev.ENABLED:
            _ev.pop(self.index, chain, avail_idx=idx, next_avail=na)
        return chain

    def _reject(self, v: DriverViolation) -> None:
        _ev.reject(self.index, v, policy=str(self.policy), side="driver")
        if self.policy is ErrorPolicy.NEEDS_RESET:
            self.broken = True
            raise v

    def _reject_avail_idx(self, idx: int, na: int, pending: int) -> None:
        if self.policy is not ErrorPolicy.NEEDS_RESET and self._bad_avail_idx == idx:
            return None  # already logged this bogus value; still nothing to consume
        self._bad_avail_idx = idx
        v = driver_violation("AV-01", "avail idx moved more than the queue size ahead of the "
                             "device's position", queue=self.index, avail_idx=idx,
                             next_avail=na, pending=pending, size=self.size)
        self._reject(v)
        return None

    # ---- push -------------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver as used, with ``written`` bytes written to it.

        Dropped silently on a broken queue (like QEMU).

        Raises:
            DeviceViolation: US-01 if ``head`` is not in flight, US-04 if ``written`` is
                negative or more than the chain's writable length (the device's own bugs).
        """
        if self.broken:
            return
        flight = self._flight
        if head < 0 or head >= self.size:
            raise self._bad_push(head, written, -1)
        wlen = flight[head]
        if wlen < 0 or written > wlen or written < 0:
            raise self._bad_push(head, written, wlen)
        flight[head] = -1
        used = self._used_v
        nu = self.next_used
        _pack_elem(used, 4 + ((nu & self._mask) << 3), head, written)
        self.next_used = nu = (nu + 1) & 0xFFFF
        _pack_u16(used, 2, nu)
        if self._observers:
            self._mark_used(nu)
        if _ev.ENABLED:
            _ev.push(self.index, head=head, written=written, used_idx=nu)

    def _bad_push(self, head: int, written: int, wlen: int) -> DeviceViolation:
        if wlen < 0:
            return DeviceViolation(rule_id="US-01", section=RULES["US-01"].section,
                                   message="pushed a head that is not in flight",
                                   queue=self.index, head=head, size=self.size)
        return DeviceViolation(rule_id="US-04", section=RULES["US-04"].section,
                               message="pushed a used length beyond the chain's writable bytes",
                               queue=self.index, head=head, written=written, writable_len=wlen)

    def _write_used(self, head: int, written: int) -> None:
        """Put a used element without in-flight bookkeeping (a skipped chain)."""
        nu = self.next_used
        _pack_elem(self._used_v, USED_RING + 8 * (nu & self._mask), head, written)
        self.next_used = nu = (nu + 1) & 0xFFFF
        _pack_u16(self._used_v, USED_IDX, nu)
        if self._observers:
            self._mark_used(nu)
        if _ev.ENABLED:
            _ev.push(self.index, head=head, written=written, used_idx=nu)

    def _mark_used(self, nu: int) -> None:
        """Tell the memory's write observers (dirty logging) about a used element and idx."""
        slot = USED_RING + 8 * ((nu - 1) & self._mask)
        self.memory.mark_written(self.used + slot, 8)
        self.memory.mark_written(self.used + USED_IDX, 2)

    # ---- notifications ----------------------------------------------------------------------
    def needs_interrupt(self) -> bool:
        """Whether to interrupt the driver for the used entries pushed since the last decision.

        Without EVENT_IDX: unless ``avail.flags`` has NO_INTERRUPT (SPL-V-7). With EVENT_IDX:
        iff ``used_event`` lies in [used idx at the last decision, used idx now) (SPL-V-8); the
        first decision after construction or reset interrupts if anything was pushed (QEMU and
        rust-vmm do the same, the old index being unknown). Nothing pushed: no interrupt.
        """
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        avail = self._avail_v
        if self.event_idx:
            event = _unpack_u16(avail, used_event_offset(self.size))[0]
            flags = None
            if self._signalled_valid:
                notify = interrupt_needed(event_idx=True, avail_flags=0, used_event=event,
                                          old=old, new=new)
            else:
                notify = old != new
            self._signalled_valid = True
        else:
            event = None
            flags = _unpack_u16(avail, 0)[0]
            notify = interrupt_needed(event_idx=False, avail_flags=flags, used_event=0,
                                      old=old, new=new)
        if _ev.ENABLED:
            _ev.interrupt(self.index, old=old, new=new, event=event, avail_flags=flags,
                          event_idx=self.event_idx, notify=notify)
        return notify

    def disable_notification(self) -> None:
        """Ask the driver not to kick: set ``used.flags`` NO_NOTIFY (no-op with EVENT_IDX, where
        ``used.flags`` must stay 0 and ``avail_event`` keeps its last value; vhost, rust-vmm)."""
        if not self.event_idx:
            self._write_used_u16(0, VRING_USED_F_NO_NOTIFY)

    def enable_notification(self) -> bool:
        """Ask the driver to kick again; True if more chains arrived meanwhile (pop them).

        Without EVENT_IDX clears ``used.flags``; with it, sets ``avail_event`` to
        ``next_avail`` (a kick for the next chain published). Then re-reads ``avail.idx``: a
        chain published before the driver could see the change would otherwise get no kick.
        """
        if self.event_idx:
            self._write_used_u16(avail_event_offset(self.size), self._next_avail)
        else:
            self._write_used_u16(0, 0)
        idx = self.avail_idx()
        # An avail idx already rejected as AV-01 (truncate/skip) is not "more work": nothing
        # can be consumed until the driver moves it, and reporting it would spin the caller.
        return idx != self._next_avail and idx != self._bad_avail_idx

    def _write_used_u16(self, offset: int, value: int) -> None:
        _pack_u16(self._used_v, offset, value)
        if self._observers:
            self.memory.mark_written(self.used + offset, 2)

    def __repr__(self) -> str:
        return (f"<DeviceQueue {self.index} size={self.size} next_avail={self._next_avail} "
                f"next_used={self.next_used} in_flight={self.in_flight}"
                f"{' broken' if self.broken else ''}>")


def _map_areas(index: int, size: int, desc: int, avail: int, used: int, memory: Any,
               max_size: int) -> tuple[memoryview, memoryview, memoryview]:
    """Check the queue configuration (CFG-01..07) and map the three areas."""
    if not is_queue_size(size) or size > max_size:
        raise driver_violation("CFG-01", "queue size is not a power of two from 1 to the "
                               "device's maximum", queue=index, size=size, max_size=max_size)
    areas = (
        ("desc", desc, desc_table_size(size), DESC_ALIGN, "CFG-02"),
        ("avail", avail, avail_size(size), AVAIL_ALIGN, "CFG-03"),
        ("used", used, used_size(size), USED_ALIGN, "CFG-04"),
    )
    if not callable(getattr(memory, "view", None)):
        raise UsageError("the device end needs a memory with view() (virtqueue.memory."
                         "GuestMemory), not " + type(memory).__name__)
    views = []
    for name, addr, length, align, rule_id in areas:
        if not isinstance(addr, int) or addr < 0:
            raise UsageError(f"{name} address must be a non-negative int, not {addr!r}")
        if addr % align:
            raise driver_violation(rule_id, f"the {name} area is not {align}-byte aligned",
                                   queue=index, area=name, addr=addr, align=align)
        if addr + length > _U64_END:
            raise driver_violation("CFG-07", f"the {name} area's address + length overflows "
                                   "64 bits", queue=index, area=name, addr=addr, len=length)
        try:
            views.append(memory.view(addr, length))
        except GuestMemoryError as exc:
            raise driver_violation("CFG-05", f"the {name} area is not inside one guest RAM "
                                   "region", queue=index, area=name, addr=addr, len=length,
                                   reason=exc.reason) from None
    return views[0], views[1], views[2]
