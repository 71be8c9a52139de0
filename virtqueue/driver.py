"""The driver end of a split virtqueue, modelled on Linux ``drivers/virtio/virtio_ring.c`` (6.1).

:class:`DriverQueue` adds buffers (direct or through an indirect table), decides kicks, reaps
used buffers and validates what the device wrote there. Names and behaviour follow Linux's
``virtqueue_add_split``, ``virtqueue_kick_prepare_split``, ``virtqueue_get_buf_ctx_split``,
``virtqueue_disable_cb_split``, ``virtqueue_enable_cb_prepare_split`` /
``virtqueue_enable_cb_delayed_split`` and ``virtqueue_detach_unused_buf_split``.

Guest memory is reached only through ``read`` and ``write`` (the :class:`~virtqueue.memory.Memory`
protocol), so the same driver runs on simulated RAM and on QEMU's RAM over qtest. Like Linux,
the driver keeps its own copy of what it put in the table (the free list, each chain's length)
and never trusts the device-written used ring: a bad used element is a
:class:`~protocol.errors.DeviceViolation` (US-02..05) and the queue is broken afterwards (Linux
``BAD_RING``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from protocol.errors import DeviceViolation, UsageError
from protocol.rules import RULES
from protocol.split_ring import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VRING_AVAIL_F_NO_INTERRUPT,
    DescFlags,
    avail_event_offset,
    avail_size,
    desc_table_size,
    used_event_offset,
    used_size,
)
from virtqueue import events as _ev
from virtqueue.layout import DESC, U16, USED_ELEM, is_queue_size
from virtqueue.notify import kick_needed

__all__ = ["DriverQueue", "QueueBroken", "QueueFull"]

_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)
_INDIRECT = int(DescFlags.INDIRECT)


class QueueFull(UsageError):
    """Not enough free descriptors for the chain (Linux ``-ENOSPC``); reap used buffers first."""


class QueueBroken(UsageError):
    """The queue saw a device violation and refuses work until it is reset (Linux ``-EIO``)."""


class DriverQueue:
    """One split virtqueue seen from the driver.

    Args:
        index: the queue index (for events, errors and ``notify``).
        size: queue size N (power of two, 1..32768).
        desc, avail, used: guest-physical addresses of the three areas (zeroed here, SPL-D-16).
        memory: guest RAM (``read``/``write``).
        event_idx: VIRTIO_F_EVENT_IDX negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC negotiated.
        indirect_area: ``(gpa, length)`` of RAM for indirect tables; each head owns the slot
            ``gpa + head * (length // N rounded down to 16)``, so tables never collide.
        notify: ``notify(index)`` kicks the device; used by :meth:`kick` and, as in Linux, when
            65535 buffers were added without a kick or an add with readable buffers fails for
            lack of space.
        initial_idx: start the free-running indices here instead of 0 (tests that cross the
            16-bit wrap; Linux always starts at 0). The ring fields are written to match.
    """

    def __init__(self, *, index: int, size: int, desc: int, avail: int, used: int, memory: Any,
                 event_idx: bool = False, indirect: bool = False,
                 indirect_area: tuple[int, int] | None = None,
                 notify: Callable[[int], None] | None = None, initial_idx: int = 0) -> None:
        if not is_queue_size(size):
            raise UsageError(f"queue size must be a power of two from 1 to 32768, not {size!r}")
        if not isinstance(initial_idx, int) or not 0 <= initial_idx <= 0xFFFF:
            raise UsageError(f"initial_idx must be a 16-bit index, not {initial_idx!r}")
        self.index = index
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.memory = memory
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.notify = notify
        self._initial_idx = initial_idx
        self._slot = 0
        self.indirect_area = indirect_area
        if indirect_area is not None:
            gpa, length = indirect_area
            self._slot = (length // size) & ~15
            if self._slot < 16:
                raise UsageError(f"indirect area of {length} bytes has less than one descriptor "
                                 f"per head for {size} heads")
            memory.check(gpa, length)
        for addr, length in ((desc, desc_table_size(size)), (avail, avail_size(size)),
                             (used, used_size(size))):
            memory.check(addr, length)
        self.reset()

    def reset(self) -> None:
        """Forget every buffer and zero the rings (Linux ``virtqueue_reinit_split``)."""
        n = self.size
        m = self.memory
        m.write(self.desc, bytes(desc_table_size(n)))
        m.write(self.avail, bytes(avail_size(n)))
        m.write(self.used, bytes(used_size(n)))
        start = self._initial_idx
        if start:
            for addr in (self.avail + AVAIL_IDX, self.used + USED_IDX,
                         self.avail + used_event_offset(n), self.used + avail_event_offset(n)):
                m.write(addr, U16.pack(start))
        self._next = [(i + 1) % n for i in range(n)]  # desc_extra[i].next: the free list
        self._state: list[tuple[object, int, int] | None] = [None] * n  # token, descs, wlen
        self.free_head = 0
        self.num_free = n
        self.avail_idx_shadow = start
        self.avail_flags_shadow = 0
        self.last_used_idx = start
        self.num_added = 0
        self.broken = False
        self._heads_in_flight = 0

    # ---- add --------------------------------------------------------------------------------
    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
            token: object, *, use_indirect: bool = False) -> int:
        """Publish one buffer: ``readable`` then ``writable`` (addr, len) pieces; returns head.

        Writes the descriptors (or one INDIRECT descriptor and its table), the avail entry and
        ``avail.idx``. The device may use the chain from then on; :meth:`kick_prepare` says
        whether to tell it.

        Raises:
            QueueFull: fewer free descriptors than the chain needs (1 when indirect).
            QueueBroken: the queue saw a device violation.
            UsageError: no buffers, ``token`` None, a piece that cannot be encoded, or indirect
                without the feature or an area for tables.
        """
        if self.broken:
            raise QueueBroken(f"queue {self.index} is broken (a device violation); reset it")
        if token is None:
            raise UsageError("token must not be None (it is what get_buf returns)")
        pieces = [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        total = len(pieces)
        if not total:
            raise UsageError("a chain needs at least one buffer")
        for addr, length, _ in pieces:
            if not (isinstance(addr, int) and isinstance(length, int)
                    and 0 <= addr < 1 << 64 and 0 <= length < 1 << 32):
                raise UsageError(f"buffer ({addr!r}, {length!r}) is not a u64 address and a u32 "
                                 "length")
        if total > self.size:  # §2.7.5.3.1, also through an indirect table (Linux allows it)
            raise UsageError(f"a chain of {total} buffers is longer than the queue size "
                             f"{self.size}")
        if use_indirect:
            if not self.indirect or self.indirect_area is None:
                raise UsageError("indirect chains need VIRTIO_F_INDIRECT_DESC and indirect_area")
            if total * 16 > self._slot:
                raise UsageError(f"{total} buffers do not fit a {self._slot}-byte indirect slot")
        descs = 1 if use_indirect else total
        if self.num_free < descs:
            if readable and self.notify is not None:
                self.notify(self.index)  # Linux: "force a notify if there are outgoing parts"
            raise QueueFull(f"queue {self.index} has {self.num_free} free descriptors, the "
                            f"chain needs {descs}")
        head = self.free_head
        wlen = sum(length for _, length, flags in pieces if flags)
        if use_indirect:
            table = self.indirect_area[0] + head * self._slot
            entries = b"".join(
                DESC.pack(addr, length, flags | (_NEXT if j + 1 < total else 0),
                          j + 1 if j + 1 < total else 0)
                for j, (addr, length, flags) in enumerate(pieces))
            self.memory.write(table, entries)
            self._write_descs([(head, DESC.pack(table, len(entries), _INDIRECT,
                                                self._next[head]))])
            self.free_head = self._next[head]
        else:
            writes = []
            i = head
            for j, (addr, length, flags) in enumerate(pieces):
                nxt = self._next[i]
                more = j + 1 < total
                writes.append((i, DESC.pack(addr, length, flags | (_NEXT if more else 0), nxt)))
                i = nxt
            self._write_descs(writes)
            self.free_head = i
        self.num_free -= descs
        self._state[head] = (token, descs, wlen)
        self._heads_in_flight += 1
        slot = self.avail_idx_shadow & (self.size - 1)
        self.memory.write(self.avail + AVAIL_RING + 2 * slot, U16.pack(head))
        self.avail_idx_shadow = (self.avail_idx_shadow + 1) & 0xFFFF
        self.memory.write(self.avail + AVAIL_IDX, U16.pack(self.avail_idx_shadow))
        self.num_added += 1
        if _ev.ENABLED:
            _ev.add(self.index, head, readable, writable, indirect=use_indirect, descs=descs,
                    avail_idx=self.avail_idx_shadow, num_free=self.num_free)
        if self.num_added == 0xFFFF:  # Linux: kick before the 16-bit count could wrap
            self.kick()
        return head

    def _write_descs(self, writes: list[tuple[int, bytes]]) -> None:
        """Write descriptors, merging runs of consecutive indices into one memory write."""
        run_start, run = writes[0][0], [writes[0][1]]
        for i, data in writes[1:]:
            if i == run_start + len(run):
                run.append(data)
                continue
            self.memory.write(self.desc + 16 * run_start, b"".join(run))
            run_start, run = i, [data]
        self.memory.write(self.desc + 16 * run_start, b"".join(run))

    # ---- kick -------------------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """Whether the device must be notified of the buffers added since the last call.

        With EVENT_IDX: iff ``avail_event`` lies in [old, new) (SPL-D-18); without: unless
        ``used.flags`` has NO_NOTIFY (SPL-D-17). Resets the added count (Linux semantics: a call
        with nothing added still follows the flag without EVENT_IDX).
        """
        new = self.avail_idx_shadow
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            event = self._read_u16(self.used + avail_event_offset(self.size))
            flags = None
            notify = kick_needed(event_idx=True, used_flags=0, avail_event=event, old=old,
                                 new=new)
        else:
            event = None
            flags = self._read_u16(self.used + USED_FLAGS)
            notify = kick_needed(event_idx=False, used_flags=flags, avail_event=0, old=old,
                                 new=new)
        if _ev.ENABLED:
            _ev.kick(self.index, old=old, new=new, event=event, used_flags=flags,
                     event_idx=self.event_idx, notify=notify)
        return notify

    def kick(self) -> bool:
        """:meth:`kick_prepare`, then ``notify(index)`` if needed; returns whether it notified."""
        if self.kick_prepare() and self.notify is not None:
            self.notify(self.index)
            return True
        return False

    # ---- reap -------------------------------------------------------------------------------
    def more_used(self) -> bool:
        """Whether the device has returned buffers not yet reaped."""
        return self._read_u16(self.used + USED_IDX) != self.last_used_idx

    def get_buf(self) -> tuple[object, int] | None:
        """Reap the next used buffer: ``(token, written length)``, or None if there is none.

        Raises:
            DeviceViolation: the used ring is bad: idx ahead by more than the buffers in flight
                (US-05), id >= N (US-02), id not a head in flight (US-03), len above the
                chain's writable bytes (US-04). The queue is broken afterwards (get_buf returns
                None, add raises QueueBroken) until :meth:`reset`.
        """
        if self.broken:
            return None
        used_idx = self._read_u16(self.used + USED_IDX)
        last = self.last_used_idx
        if used_idx == last:
            return None
        pending = (used_idx - last) & 0xFFFF
        if pending > self._heads_in_flight:
            self._bad_ring("US-05", "used idx moved ahead by more than the buffers in flight",
                           used_idx=used_idx, last_used_idx=last,
                           in_flight=self._heads_in_flight)
        slot = last & (self.size - 1)
        head, length = USED_ELEM.unpack(self.memory.read(self.used + USED_RING + 8 * slot, 8))
        if head >= self.size:
            self._bad_ring("US-02", "a used element's id is beyond the queue size", id=head,
                           size=self.size, used_slot=slot)
        state = self._state[head]
        if state is None:
            self._bad_ring("US-03", "a used element's id is not a head in flight", id=head,
                           used_slot=slot)
        token, _, wlen = state
        if length > wlen:
            self._bad_ring("US-04", "a used element's len exceeds the buffer's writable bytes",
                           id=head, len=length, writable_len=wlen)
        self._detach(head)
        self.last_used_idx = last = (last + 1) & 0xFFFF
        if not self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self._write_u16(self.avail + used_event_offset(self.size), last)
        if _ev.ENABLED:
            _ev.get_buf(self.index, head=head, length=length, last_used_idx=last)
        return token, length

    def _detach(self, head: int) -> None:
        """Give the chain's descriptors back to the free list (Linux ``detach_buf_split``)."""
        _, descs, _ = self._state[head]
        self._state[head] = None
        self._heads_in_flight -= 1
        i = head
        for _ in range(descs - 1):
            i = self._next[i]
        self._next[i] = self.free_head
        self.free_head = head
        self.num_free += descs

    def _bad_ring(self, rule_id: str, message: str, **values: Any) -> NoReturn:
        v = DeviceViolation(rule_id=rule_id, section=RULES[rule_id].section, message=message,
                            queue=self.index, **values)
        self.broken = True
        _ev.reject(self.index, v, policy="broken", side="device")
        raise v

    def detach_unused(self) -> list[object]:
        """Take back every buffer still in flight (after a device reset); returns their tokens.

        Like Linux ``virtqueue_detach_unused_buf``, each detached buffer also winds
        ``avail.idx`` back by one.
        """
        tokens = []
        for head, state in enumerate(self._state):
            if state is not None:
                tokens.append(state[0])
                self._detach(head)
                self.avail_idx_shadow = (self.avail_idx_shadow - 1) & 0xFFFF
        if tokens:
            self._write_u16(self.avail + AVAIL_IDX, self.avail_idx_shadow)
        return tokens

    # ---- callbacks (used-buffer notifications) ----------------------------------------------
    def disable_cb(self) -> None:
        """Ask the device not to interrupt (Linux ``virtqueue_disable_cb``).

        Without EVENT_IDX sets ``avail.flags`` NO_INTERRUPT. With EVENT_IDX, where the flags
        must stay 0, Linux 6.1 writes ``used_event = 0`` ("a hack", its comment says): an index
        the device will not reach soon.
        """
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            return
        self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            self._write_u16(self.avail + used_event_offset(self.size), 0)
        else:
            self._write_u16(self.avail + AVAIL_FLAGS, self.avail_flags_shadow)

    def enable_cb_prepare(self) -> int:
        """Ask for interrupts again; returns the index to give :meth:`poll`."""
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._write_u16(self.avail + AVAIL_FLAGS, self.avail_flags_shadow)
        last = self.last_used_idx
        self._write_u16(self.avail + used_event_offset(self.size), last)
        return last

    def poll(self, last_used_idx: int) -> bool:
        """Whether used buffers arrived after ``last_used_idx`` (from :meth:`enable_cb_prepare`)."""
        return self._read_u16(self.used + USED_IDX) != last_used_idx

    def enable_cb(self) -> bool:
        """Ask for interrupts again; False if used buffers are already pending (reap them)."""
        return not self.poll(self.enable_cb_prepare())

    def enable_cb_delayed(self) -> bool:
        """Ask for an interrupt only after 3/4 of the outstanding buffers are used (EVENT_IDX).

        Returns False if that many are already used (Linux ``virtqueue_enable_cb_delayed``).
        """
        if self.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
            self.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            if not self.event_idx:
                self._write_u16(self.avail + AVAIL_FLAGS, self.avail_flags_shadow)
        bufs = ((self.avail_idx_shadow - self.last_used_idx) & 0xFFFF) * 3 // 4
        self._write_u16(self.avail + used_event_offset(self.size),
                        (self.last_used_idx + bufs) & 0xFFFF)
        used_idx = self._read_u16(self.used + USED_IDX)
        return not (used_idx - self.last_used_idx) & 0xFFFF > bufs

    # ---- memory helpers ---------------------------------------------------------------------
    def _read_u16(self, gpa: int) -> int:
        return U16.unpack(self.memory.read(gpa, 2))[0]

    def _write_u16(self, gpa: int, value: int) -> None:
        self.memory.write(gpa, U16.pack(value))

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet reaped."""
        return self._heads_in_flight

    def __repr__(self) -> str:
        return (f"<DriverQueue {self.index} size={self.size} num_free={self.num_free} "
                f"avail_idx={self.avail_idx_shadow} last_used={self.last_used_idx}"
                f"{' broken' if self.broken else ''}>")
