"""A client for QEMU's qtest protocol: guest-physical memory and MMIO access from outside.

qtest (QEMU ``softmmu/qtest.c``) is a line protocol on a socket: one request line, one reply
line (``OK [value]``, ``FAIL reason`` or ``ERR reason``), with asynchronous ``IRQ raise N`` /
``IRQ lower N`` lines that may arrive before any reply once an IRQ intercept is set. QEMU answers
in tens of microseconds, so the client is a plain blocking socket: no event loop is needed on the
hot path of a guest driver that reads and writes registers one at a time.

QEMU aborts (``g_assert``) on malformed input: a zero ``read`` length, a missing argument, a
number ``strtoul`` cannot parse (two spaces make an empty word). Every request is therefore
validated here and built from Python ints in one fixed format; nothing a caller passes reaches
QEMU unchecked. EOF on the socket means QEMU died and becomes :class:`PeerError`.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from protocol.errors import PeerError, UsageError, VballoonError

__all__ = ["B64_CHUNK", "IrqEvent", "QtestClient", "QtestError"]

log = structlog.get_logger("vballoon.sim")

B64_CHUNK = 256 * 1024
"""Bytes per ``b64read``/``b64write`` request. QEMU's qtest reads its socket 1 KiB at a time and
rescans its whole input buffer for a newline after each read, so the cost of one request grows
with the square of its length; 256 KiB keeps that negligible."""
MEMSET_CHUNK = 16 * 1024 * 1024
"""Bytes per ``memset`` request (QEMU allocates a buffer of the request's size)."""
_ADDR_MAX = (1 << 64) - 1
_WIDTH_CMD = {1: "b", 2: "w", 4: "l", 8: "q"}


class QtestError(VballoonError):
    """QEMU refused a qtest request (a ``FAIL`` or ``ERR`` reply)."""

    def __init__(self, request: str, reply: str) -> None:
        self.request = request
        self.reply = reply
        super().__init__(f"qtest request {request!r} refused by QEMU: {reply!r}")


@dataclass(frozen=True, slots=True)
class IrqEvent:
    """One asynchronous ``IRQ raise|lower N`` line from an intercepted device's GPIO input."""

    line: int
    raised: bool


class QtestClient:
    """Synchronous qtest requests over a connected socket.

    Args:
        sock: the accepted qtest connection (blocking mode is set here).
        timeout: seconds to wait for one reply before declaring QEMU hung.
        describe_death: returns a sentence about QEMU's exit (status, stderr tail) for errors.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 30.0,
        describe_death: Callable[[], str] | None = None,
    ) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._timeout = timeout
        self._buf = bytearray()
        self._describe_death = describe_death or (lambda: "")
        self._closed = False
        self.irq_events: list[IrqEvent] = []
        """Every IRQ line seen so far, in order (only after :meth:`irq_intercept_in`)."""
        self.irq_levels: dict[int, bool] = {}
        """The last level seen for each intercepted line."""
        self.requests = 0
        """Requests sent so far (for benchmarks and tests)."""

    # ---- raw protocol -------------------------------------------------------------------------

    def command(self, line: str) -> str:
        """Send one request line (no newline) and return the reply's text after ``OK``.

        Raises :class:`QtestError` on ``FAIL``/``ERR`` and :class:`PeerError` on EOF or timeout.
        Only this module's own methods should build ``line``; see the module docstring.
        """
        if self._closed:
            raise UsageError("qtest client is closed")
        if "\n" in line or "  " in line or not line or line != line.strip():
            raise UsageError(f"malformed qtest request {line[:80]!r}")
        try:
            self._sock.sendall(line.encode("ascii") + b"\n")
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerError(f"QEMU died (qtest socket closed on send){self._death()}") from exc
        except OSError as exc:
            raise PeerError(f"qtest send failed: {exc}{self._death()}") from exc
        self.requests += 1
        while True:
            reply = self._read_line(line)
            if reply.startswith("IRQ "):
                self._record_irq(reply)
                continue
            if reply == "OK" or reply.startswith("OK "):
                return reply[3:]
            if reply.startswith(("FAIL", "ERR")):
                raise QtestError(line[:80], reply)
            raise PeerError(f"unexpected qtest reply {reply[:80]!r} to {line[:80]!r}")

    def _read_line(self, request: str) -> str:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                raw = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return raw.decode("ascii", "replace")
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError as exc:
                raise PeerError(
                    f"QEMU gave no qtest reply to {request[:40]!r} within {self._timeout} s"
                ) from exc
            except ConnectionResetError as exc:
                raise PeerError(f"QEMU died (qtest connection reset){self._death()}") from exc
            except OSError as exc:
                raise PeerError(f"qtest receive failed: {exc}{self._death()}") from exc
            if not chunk:
                raise PeerError(f"QEMU died (qtest EOF after {request[:40]!r}){self._death()}")
            self._buf += chunk

    def _death(self) -> str:
        text = self._describe_death()
        return f": {text}" if text else ""

    def _record_irq(self, reply: str) -> None:
        parts = reply.split()
        if len(parts) != 3 or parts[1] not in ("raise", "lower") or not parts[2].isdigit():
            raise PeerError(f"malformed qtest IRQ line {reply!r}")
        event = IrqEvent(line=int(parts[2]), raised=parts[1] == "raise")
        self.irq_events.append(event)
        self.irq_levels[event.line] = event.raised
        log.debug("qtest.irq", line=event.line, raised=event.raised)

    def poll_irqs(self) -> list[IrqEvent]:
        """Collect IRQ lines already sent by QEMU without waiting; return the new ones."""
        before = len(self.irq_events)
        self._sock.setblocking(False)
        try:
            while True:
                try:
                    chunk = self._sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionResetError as exc:
                    raise PeerError(f"QEMU died (qtest connection reset){self._death()}") from exc
                if not chunk:
                    raise PeerError(f"QEMU died (qtest EOF){self._death()}")
                self._buf += chunk
        finally:
            self._sock.settimeout(self._timeout)
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end]).decode("ascii", "replace")
            del self._buf[: end + 1]
            if not line.startswith("IRQ "):
                raise PeerError(f"unsolicited qtest reply {line[:80]!r}")
            self._record_irq(line)
        return self.irq_events[before:]

    def fileno(self) -> int:
        """The socket's fd, for waiting until QEMU sends something (IRQ lines)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (QEMU keeps running: stopping it is the process owner's job)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    # ---- fixed-width access ------------------------------------------------------------------

    def read_int(self, addr: int, width: int) -> int:
        """``readb/w/l/q``: a little-endian value of ``width`` bytes at ``addr``."""
        cmd = _WIDTH_CMD.get(width)
        if cmd is None:
            raise UsageError(f"qtest access width must be 1, 2, 4 or 8, not {width!r}")
        _check_range(addr, width)
        reply = self.command(f"read{cmd} {addr:#x}")
        return _parse_int(reply, f"read{cmd}")

    def write_int(self, addr: int, width: int, value: int) -> None:
        """``writeb/w/l/q``: store ``value`` (``0 <= value < 2**(8*width)``) at ``addr``."""
        cmd = _WIDTH_CMD.get(width)
        if cmd is None:
            raise UsageError(f"qtest access width must be 1, 2, 4 or 8, not {width!r}")
        _check_range(addr, width)
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
            raise UsageError(f"value {value!r} does not fit in {width} bytes")
        self.command(f"write{cmd} {addr:#x} {value:#x}")

    def readb(self, addr: int) -> int:
        return self.read_int(addr, 1)

    def readw(self, addr: int) -> int:
        return self.read_int(addr, 2)

    def readl(self, addr: int) -> int:
        return self.read_int(addr, 4)

    def readq(self, addr: int) -> int:
        return self.read_int(addr, 8)

    def writeb(self, addr: int, value: int) -> None:
        self.write_int(addr, 1, value)

    def writew(self, addr: int, value: int) -> None:
        self.write_int(addr, 2, value)

    def writel(self, addr: int, value: int) -> None:
        self.write_int(addr, 4, value)

    def writeq(self, addr: int, value: int) -> None:
        self.write_int(addr, 8, value)

    # ---- byte strings ------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        """``read`` (hex-encoded reply): ``size`` bytes at ``addr``; ``size`` must be > 0."""
        _check_range(addr, size, nonzero=True)
        reply = self.command(f"read {addr:#x} {size:#x}")
        if not reply.startswith("0x") or len(reply) != 2 + 2 * size:
            raise PeerError(f"qtest read returned {len(reply)} characters for {size} bytes")
        return bytes.fromhex(reply[2:])

    def write(self, addr: int, data: bytes) -> None:
        """``write`` (hex-encoded request): ``data`` (non-empty) at ``addr``."""
        _check_range(addr, len(data), nonzero=True)
        self.command(f"write {addr:#x} {len(data):#x} 0x{bytes(data).hex()}")

    def b64read(self, addr: int, size: int) -> bytes:
        """``b64read`` in chunks of :data:`B64_CHUNK`: ``size`` bytes at ``addr``."""
        _check_range(addr, size, nonzero=True)
        out = bytearray()
        for off in range(0, size, B64_CHUNK):
            n = min(B64_CHUNK, size - off)
            reply = self.command(f"b64read {addr + off:#x} {n:#x}")
            try:
                chunk = base64.b64decode(reply, validate=True)
            except ValueError as exc:
                raise PeerError(f"qtest b64read returned undecodable data: {exc}") from exc
            if len(chunk) != n:
                raise PeerError(f"qtest b64read returned {len(chunk)} bytes, asked {n}")
            out += chunk
        return bytes(out)

    def b64write(self, addr: int, data: bytes) -> None:
        """``b64write`` in chunks of :data:`B64_CHUNK`: ``data`` (non-empty) at ``addr``."""
        _check_range(addr, len(data), nonzero=True)
        view = memoryview(bytes(data))
        for off in range(0, len(view), B64_CHUNK):
            chunk = view[off : off + B64_CHUNK]
            enc = base64.b64encode(chunk).decode("ascii")
            self.command(f"b64write {addr + off:#x} {len(chunk):#x} {enc}")

    def memset(self, addr: int, size: int, byte: int) -> None:
        """``memset``: ``size`` bytes of ``byte`` at ``addr`` (chunked; ``size`` may be 0)."""
        _check_range(addr, size)
        if not isinstance(byte, int) or not 0 <= byte <= 0xFF:
            raise UsageError(f"memset byte must be 0..255, not {byte!r}")
        for off in range(0, size, MEMSET_CHUNK):
            n = min(MEMSET_CHUNK, size - off)
            self.command(f"memset {addr + off:#x} {n:#x} {byte:#x}")

    # ---- interrupts and misc -----------------------------------------------------------------

    def irq_intercept_in(self, qom_path: str) -> None:
        """Intercept the unnamed GPIO inputs of the device at ``qom_path`` (one device per QEMU).

        After this, QEMU sends ``IRQ raise|lower N`` lines; they land in :attr:`irq_events`.
        """
        _check_word(qom_path)
        self.command(f"irq_intercept_in {qom_path}")

    def endianness(self) -> str:
        """The target's endianness as QEMU reports it (``"little"`` on x86)."""
        return self.command("endianness")


def _check_range(addr: int, size: int, *, nonzero: bool = False) -> None:
    if not isinstance(addr, int) or not isinstance(size, int) or isinstance(addr, bool):
        raise UsageError(f"address and size must be ints, not {addr!r}, {size!r}")
    if addr < 0 or size < 0 or addr + size - (1 if size else 0) > _ADDR_MAX:
        raise UsageError(f"access [{addr:#x}, +{size:#x}) is not within the 64-bit address space")
    if nonzero and size == 0:
        raise UsageError("qtest byte-string access needs a size > 0 (QEMU asserts on 0)")


def _check_word(word: str) -> None:
    if not word or any(c.isspace() for c in word) or not word.isascii():
        raise UsageError(f"qtest argument must be one printable ASCII word, not {word!r}")


def _parse_int(reply: str, what: str) -> int:
    try:
        return int(reply, 16)
    except ValueError:
        raise PeerError(f"qtest {what} returned {reply[:40]!r}, not a number") from None
