"""Guest-physical memory: bounds-checked access to RAM regions backed by real memfds.

Simulated RAM is one sparse memfd (``memfd_create`` + ``ftruncate`` + ``mmap``): a 1 TiB guest
costs nothing until touched, and :meth:`GuestMemory.discard` punches a real hole, so "memory
returned to the host" is measured from the file's allocated blocks, not counted. shmem has no
shared zero page: *reading* a hole through the mapping allocates a zeroed page, as it does in a
real shmem-backed VM, so a read of a discarded page brings it back. The vhost-user
path maps the fds a real front-end sends (:meth:`GuestMemory.from_fds`). Every access outside
the regions raises :class:`~protocol.errors.GuestMemoryError` and touches nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.errors import GuestMemoryError, UsageError

__all__ = ["PAGE_SIZE", "GuestMemory", "Memory", "MemoryRegion"]

PAGE_SIZE = 4096
_U64_END = 1 << 64
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
PROBE_PIECE = 64 * PAGE_SIZE
"""Largest piece :meth:`GuestMemory.data_ranges_bounded` yields at once."""

WriteObserver = Callable[[int, int], None]


class Memory(Protocol):
    """What the rings and drivers need of guest memory; GuestMemory and qtest's memory have it."""

    def read(self, gpa: int, length: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...
    def check(self, gpa: int, length: int) -> None: ...
    def contains(self, gpa: int, length: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A guest-physical range [gpa, gpa + size) backed by ``size`` bytes of a file at fd_offset.

    ``user_addr`` is the front-end's virtual address of the region (vhost-user rings are given
    in that address space); ``None`` for simulated RAM.
    """

    gpa: int
    size: int
    fd_offset: int = 0
    user_addr: int | None = None

    @property
    def end(self) -> int:
        return self.gpa + self.size


class _Mapped:
    """One mapped region: its description, fd, and a memoryview of exactly its bytes."""

    __slots__ = ("region", "fd", "map", "view")

    def __init__(self, region: MemoryRegion, fd: int, map_: mmap.mmap, view: memoryview) -> None:
        self.region = region
        self.fd = fd
        self.map = map_
        self.view = view


class GuestMemory:
    """Guest RAM as regions of real memfds; see the module docstring.

    Use :meth:`create` for simulated RAM or :meth:`from_fds` for RAM received from a peer.
    """

    def __init__(self, mapped: Sequence[_Mapped], owned_fds: Sequence[int]) -> None:
        self._mapped = sorted(mapped, key=lambda m: m.region.gpa)
        for a, b in zip(self._mapped, self._mapped[1:], strict=False):
            if b.region.gpa < a.region.end:
                raise UsageError(f"memory regions overlap at {b.region.gpa:#x}")
        self._starts = [m.region.gpa for m in self._mapped]
        self._owned_fds = list(owned_fds)
        self._observers: list[WriteObserver] = []
        self._closed = False
        only = self._mapped[0] if len(self._mapped) == 1 else None
        self._only = (only.region.gpa, only.region.end, only.view) if only else None
        """(start, end, view) when RAM is one region: the fast path of read and write."""
        self.returned_bytes = 0
        """Bytes the host got back through :meth:`discard`, measured from the allocated blocks
        of the memfds (a discard of a never-written page returns nothing)."""

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        size: int,
        *,
        base: int = 0,
        holes: Sequence[tuple[int, int]] = (),
        name: str = "vballoon-ram",
    ) -> GuestMemory:
        """Simulated RAM: one sparse memfd of ``size`` bytes at guest-physical ``base``.

        ``holes`` are (gpa, length) ranges inside [base, base + size) that are not RAM (e.g. a
        BIOS hole); they stay in the file but no access reaches them.
        """
        if size <= 0 or size % PAGE_SIZE or base % PAGE_SIZE:
            raise UsageError(f"RAM size and base must be positive multiples of {PAGE_SIZE}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            whole = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        pieces = _subtract(base, base + size, holes)
        view = memoryview(whole)
        mapped = [
            _Mapped(MemoryRegion(s, e - s, s - base), fd, whole, view[s - base:e - base])
            for s, e in pieces
        ]
        return cls(mapped, [fd])

    @classmethod
    def from_fds(cls, regions: Sequence[tuple[int, MemoryRegion]]) -> GuestMemory:
        """Map regions received from elsewhere (vhost-user SET_MEM_TABLE); takes the fds.

        The fds are owned from the call on: if any region is invalid, all of them are closed.
        """
        mapped = []
        fds = [fd for fd, _ in regions]
        try:
            for fd, region in regions:
                if region.size <= 0 or region.gpa + region.size > _U64_END:
                    raise GuestMemoryError(region.gpa, region.size, "is not a valid region")
                start = region.fd_offset - region.fd_offset % mmap.ALLOCATIONGRANULARITY
                lead = region.fd_offset - start
                m = mmap.mmap(fd, region.size + lead, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                mapped.append(_Mapped(region, fd, m, memoryview(m)[lead:lead + region.size]))
            return cls(mapped, fds)
        except (OSError, ValueError, UsageError, GuestMemoryError) as exc:
            # UsageError here is overlapping regions: the peer's error, not ours.
            for m in mapped:
                m.view.release()
                m.map.close()
            _close_fds(fds)
            if isinstance(exc, GuestMemoryError):
                raise
            raise GuestMemoryError(0, 0, f"cannot be mapped: {exc}") from None

    # ---- geometry -----------------------------------------------------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(m.region for m in self._mapped)

    @property
    def size(self) -> int:
        """Total bytes of RAM (holes excluded)."""
        return sum(m.region.size for m in self._mapped)

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        return self._mapped[-1].region.end if self._mapped else 0

    def _find(self, gpa: int) -> _Mapped | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            m = self._mapped[i]
            if gpa < m.region.end:
                return m
        return None

    def _pieces(self, gpa: int, length: int) -> list[tuple[_Mapped, int, int]]:
        """Split [gpa, gpa+length) into (mapping, offset, n) pieces, or raise GuestMemoryError."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(gpa, length, "has a negative address or length")
        if gpa + length > _U64_END:
            raise GuestMemoryError(gpa, length, "overflows 64 bits")
        out = []
        pos, left = gpa, length
        while True:
            m = self._find(pos)
            if m is None:  # name the whole access; say where it leaves RAM if not at its start
                where = "" if pos == gpa else f" from {pos:#x}"
                raise GuestMemoryError(gpa, length, f"is outside guest RAM{where}")
            off = pos - m.region.gpa
            n = min(left, m.region.size - off)
            out.append((m, off, n))
            left -= n
            pos += n
            if left == 0:
                return out

    def contains(self, gpa: int, length: int) -> bool:
        """Whether [gpa, gpa + length) is entirely RAM."""
        try:
            self._pieces(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless [gpa, gpa + length) is entirely RAM."""
        self._pieces(gpa, length)

    def user_to_gpa(self, addr: int) -> int:
        """Translate a front-end virtual address (vhost-user ring addresses) to guest-physical."""
        for m in self._mapped:
            ua = m.region.user_addr
            if ua is not None and ua <= addr < ua + m.region.size:
                return m.region.gpa + (addr - ua)
        raise GuestMemoryError(addr, 0, "is not a front-end address of any region")

    # ---- access -------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of [gpa, gpa + length); it must lie inside one region."""
        pieces = self._pieces(gpa, length)
        if len(pieces) != 1:
            raise GuestMemoryError(gpa, length, "spans more than one region")
        m, off, n = pieces[0]
        return m.view[off:off + n]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``gpa``."""
        only = self._only
        if only is not None and length >= 0 and only[0] <= gpa and gpa + length <= only[1]:
            off = gpa - only[0]
            return bytes(only[2][off:off + length])
        pieces = self._pieces(gpa, length)
        if len(pieces) == 1:
            m, off, n = pieces[0]
            return bytes(m.view[off:off + n])
        return b"".join(bytes(m.view[off:off + n]) for m, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa`` (all or nothing: the range is checked first)."""
        length = len(data)
        only = self._only
        if only is not None and only[0] <= gpa and gpa + length <= only[1]:
            off = gpa - only[0]
            only[2][off:off + length] = data
        else:
            pos = 0
            for m, off, n in self._pieces(gpa, length):
                m.view[off:off + n] = data[pos:pos + n]
                pos += n
        if self._observers:
            self._notify(gpa, length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte``."""
        pieces = self._pieces(gpa, length)
        for m, off, n in pieces:
            chunk = bytes([byte]) * min(n, 1 << 20)
            done = 0
            while done < n:
                k = min(len(chunk), n - done)
                m.view[off + done:off + done + k] = chunk[:k]
                done += k
        if self._observers:
            self._notify(gpa, length)

    def peek(self, gpa: int, length: int) -> bytes:
        """Read like :meth:`read` but from the file, so a hole stays a hole.

        For inspection (checks, teaching views): reading a hole through the mapping would
        allocate a zeroed page, which is what a guest access does, not what an observer should.
        """
        out = []
        for m, off, n in self._pieces(gpa, length):
            data = os.pread(m.fd, n, m.region.fd_offset + off)
            out.append(data.ljust(n, b"\0"))
        return b"".join(out)

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.read(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, _U32.pack(value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value))

    # ---- host side: discard, accounting, dirty tracking -----------------------------------
    def discard(self, gpa: int, length: int) -> None:
        """Give [gpa, gpa + length) back to the host: punch a hole; it then reads as zeros.

        Both ends must be page aligned (QEMU discards only whole host pages).
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(gpa, length, f"is not aligned to {PAGE_SIZE} bytes")
        for m, off, n in self._pieces(gpa, length):
            foff = m.region.fd_offset + off
            before = os.fstat(m.fd).st_blocks
            if _libc.fallocate(m.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, foff, n) != 0:
                err = ctypes.get_errno()
                raise GuestMemoryError(gpa, length, f"cannot be discarded: {os.strerror(err)}")
            self.returned_bytes += (before - os.fstat(m.fd).st_blocks) * 512
        if self._observers:
            self._notify(gpa, length)

    def allocated_bytes(self) -> int:
        """Bytes the host really holds for this RAM (the memfds' allocated blocks)."""
        fds = {m.fd for m in self._mapped}
        return sum(os.fstat(fd).st_blocks * 512 for fd in fds)

    def data_ranges(self, gpa: int | None = None, length: int | None = None
                    ) -> Iterator[tuple[int, int]]:
        """Yield (start, end) guest-physical ranges that hold data, skipping holes.

        Uses SEEK_DATA/SEEK_HOLE, so never-written and discarded pages cost nothing to skip.
        """
        lo = self._mapped[0].region.gpa if gpa is None else gpa
        hi = self.end if length is None else lo + length
        for m in self._mapped:
            r = m.region
            s, e = max(lo, r.gpa), min(hi, r.end)
            if s >= e:
                continue
            pos = r.fd_offset + (s - r.gpa)
            stop = r.fd_offset + (e - r.gpa)
            while pos < stop:
                try:
                    d = os.lseek(m.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                if d >= stop:
                    break
                h = min(os.lseek(m.fd, d, os.SEEK_HOLE), stop)
                yield r.gpa + (d - r.fd_offset), r.gpa + (h - r.fd_offset)
                pos = h

    def data_ranges_bounded(self, gpa: int, length: int) -> Iterator[tuple[int, int]]:
        """Like :meth:`data_ranges` over [gpa, gpa + length), at a cost bounded by what is read.

        On a fully written memfd SEEK_HOLE scans to the end of the file (~27 ms per GiB),
        whatever range was asked. Here SEEK_DATA skips holes, and data is probed page by page
        (SEEK_DATA at the page) and yielded in pieces of at most :data:`PROBE_PIECE` bytes, so
        a caller that stops early has paid for what it took plus one piece. Adjacent pieces
        are not merged (the migration model classifies each chunk it sends this way).
        """
        hi = gpa + length
        for m in self._mapped:
            r = m.region
            s, e = max(gpa, r.gpa), min(hi, r.end)
            if s >= e:
                continue
            stop = r.fd_offset + (e - r.gpa)
            d = _seek_data(m.fd, r.fd_offset + (s - r.gpa))
            while d is not None and d < stop:
                h = d - d % PAGE_SIZE + PAGE_SIZE
                nxt = _seek_data(m.fd, h) if h < stop else None
                while nxt == h and h - d < PROBE_PIECE:
                    h += PAGE_SIZE
                    nxt = _seek_data(m.fd, h) if h < stop else None
                yield r.gpa + (d - r.fd_offset), r.gpa + (min(h, stop) - r.fd_offset)
                d = nxt

    def add_write_observer(self, observer: WriteObserver) -> None:
        """Call ``observer(gpa, length)`` after every write, fill or discard (dirty logging)."""
        self._observers.append(observer)

    def remove_write_observer(self, observer: WriteObserver) -> None:
        self._observers.remove(observer)

    @property
    def write_observers(self) -> Sequence[WriteObserver]:
        """The live list of observers (read it, don't change it): code that writes through a
        :meth:`view` tests it and then calls :meth:`mark_written` (the device's used ring)."""
        return self._observers

    def mark_written(self, gpa: int, length: int) -> None:
        """Tell the write observers that [gpa, gpa + length) was written through a view."""
        if self._observers:
            self._notify(gpa, length)

    def _notify(self, gpa: int, length: int) -> None:
        for cb in self._observers:
            cb(gpa, length)

    # ---- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close the fds this object owns. Views handed out must be released first."""
        if self._closed:
            return
        self._closed = True
        self._only = None
        maps = {id(m.map): m.map for m in self._mapped}
        for m in self._mapped:
            m.view.release()
        for mp in maps.values():
            try:
                mp.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when it does
        _close_fds(self._owned_fds)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_fds(fds: Sequence[int]) -> None:
    """Close each distinct fd once (one fd may back several regions)."""
    for fd in dict.fromkeys(fds):
        os.close(fd)


def _subtract(lo: int, hi: int, holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the (start, length) holes, as sorted (start, end) pieces."""
    pieces = [(lo, hi)]
    for hs, hl in sorted(holes):
        he = hs + hl
        if hs % PAGE_SIZE or hl % PAGE_SIZE or hl <= 0 or hs < lo or he > hi:
            raise UsageError(f"hole [{hs:#x}, +{hl:#x}) must be page aligned and inside RAM")
        out = []
        for s, e in pieces:
            if he <= s or hs >= e:
                out.append((s, e))
                continue
            if s < hs:
                out.append((s, hs))
            if he < e:
                out.append((he, e))
        pieces = out
    return pieces


def _seek_data(fd: int, pos: int) -> int | None:
    """lseek(SEEK_DATA): the first data offset at or after ``pos``, None past the last data."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
