"""A QMP (QEMU Machine Protocol) client on trio: commands with id matching, events collected.

QMP (QEMU ``docs/interop/qmp-spec``) is JSON objects, one per line: a greeting
(``{"QMP": {...}}``), then ``qmp_capabilities`` leaves negotiation mode; each
``{"execute": ..., "id": n}`` gets ``{"return": ...}`` or ``{"error": {"class", "desc"}}``
carrying the same id; ``{"event": ...}`` objects arrive at any time. Whoever waits reads, one
task at a time, and files each message it reads (replies by id, events in order into
:attr:`QmpClient.events`), so nothing is lost however commands and events interleave. There is
no background task, hence no nursery around the caller's code.
"""

from __future__ import annotations

import itertools
import json
import math
import select
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from protocol.errors import PeerError, UsageError, VballoonError

__all__ = ["QmpClient", "QmpCommandError", "QmpEvent", "open_qmp"]

log = structlog.get_logger("vballoon.sim")

_MAX_LINE = 16 * 1024 * 1024


class QmpCommandError(VballoonError):
    """QEMU answered a QMP command with an error object."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """One asynchronous QMP event (``BALLOON_CHANGE``, ``STOP``, ``MIGRATION`` ...)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


class QmpClient:
    """Commands and events of one QMP connection; build it with :func:`open_qmp`.

    There is no background task: whoever waits (a command for its reply, :meth:`wait_event`
    for an event) reads the socket, one task at a time, and files every message it reads
    (replies by id, events into :attr:`events`). Events that arrive while nobody waits stay
    in the socket until the next call; :meth:`poll_events` collects them without waiting.
    """

    def __init__(
        self, stream: trio.SocketStream, describe_death: Callable[[], str] | None = None
    ) -> None:
        self._stream = stream
        self._describe_death = describe_death or (lambda: "")
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._buf = bytearray()
        self._closed_reason: str | None = None
        self.greeting: dict[str, Any] = {}
        self.events: list[QmpEvent] = []
        """Every event received so far, in order."""

    # ---- connection ---------------------------------------------------------------------------

    def _take_buffered(self) -> dict[str, Any] | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > _MAX_LINE:
                raise PeerError("QMP message longer than 16 MiB")
            return None
        raw = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            msg = json.loads(raw)
        except ValueError as exc:
            raise PeerError(f"QMP sent invalid JSON: {raw[:80]!r}") from exc
        if not isinstance(msg, dict):
            raise PeerError(f"QMP sent a non-object: {raw[:80]!r}")
        return msg

    async def _read_message(self) -> dict[str, Any]:
        """The next message; PeerError (and the client marked closed) on EOF."""
        if self._closed_reason is not None:
            raise PeerError(self._closed_reason)
        while (msg := self._take_buffered()) is None:
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                self._closed_reason = f"QEMU closed the QMP connection{self._death()}"
                raise PeerError(self._closed_reason)
            self._buf += chunk
        return msg

    def _file(self, msg: dict[str, Any]) -> None:
        """Put a message where its reader will look: events in order, replies by id."""
        if "event" in msg:
            ts = msg.get("timestamp") or {}
            event = QmpEvent(
                name=str(msg["event"]),
                data=msg.get("data") or {},
                timestamp=float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6,
            )
            self.events.append(event)
            log.debug("qmp.event", name=event.name, data=event.data)
        elif isinstance(msg.get("id"), int):
            self._replies[msg["id"]] = msg
        else:
            log.warning("qmp.unmatched_reply", reply=str(msg)[:200])

    async def _pump_until(self, done: Callable[[], bool]) -> None:
        """Read and file messages, one reader at a time, until ``done()``."""
        while not done():
            async with self._read_lock:
                if done():  # another reader filed what we wait for
                    return
                self._file(await self._read_message())

    async def negotiate(self, timeout: float = 10.0) -> None:
        """Read the greeting and leave negotiation mode (``qmp_capabilities``)."""
        with trio.move_on_after(timeout) as scope:
            try:
                greeting = await self._read_message()
            except PeerError as exc:
                raise PeerError(f"no QMP greeting from QEMU: {exc}") from None
            if "QMP" not in greeting:
                raise PeerError(f"no QMP greeting from QEMU (got {str(greeting)[:80]})")
            self.greeting = greeting["QMP"]
            await self.execute("qmp_capabilities", timeout=timeout)
        if scope.cancelled_caught:
            raise PeerError(f"QMP negotiation timed out after {timeout} s{self._death()}")

    def _death(self) -> str:
        text = self._describe_death()
        return f": {text}" if text else ""

    async def _send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed_reason = f"QMP connection lost{self._death()}"
                raise PeerError(self._closed_reason) from exc

    @property
    def connected(self) -> bool:
        """False once the connection is known to be closed."""
        return self._closed_reason is None

    async def aclose(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "QMP connection closed by vballoon"
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    # ---- commands and events ------------------------------------------------------------------

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        Raises :class:`QmpCommandError` for an error reply and :class:`PeerError` when QEMU
        closes the connection or does not answer within ``timeout`` seconds.
        """
        if not command or not isinstance(command, str):
            raise UsageError(f"QMP command name must be a non-empty string, not {command!r}")
        if self._closed_reason is not None:
            raise PeerError(f"QMP {command}: {self._closed_reason}")
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            await self._send(msg)
            with trio.move_on_after(timeout):
                await self._pump_until(lambda: ident in self._replies)
        except PeerError as exc:
            raise PeerError(f"QMP {command}: {exc}") from None
        reply = self._replies.pop(ident, None)
        if reply is None:
            raise PeerError(f"QMP {command}: no reply within {timeout} s{self._death()}")
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, str(err.get("class")), str(err.get("desc")))
        return reply.get("return")

    async def wait_event(
        self,
        name: str,
        *,
        timeout: float = 10.0,
        since: int = 0,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent:
        """The first event called ``name`` at index ``since`` or later of :attr:`events`.

        Pass ``since=len(qmp.events)`` before triggering something to see only new events.
        """
        index = since
        with trio.move_on_after(timeout):
            while True:
                for event in self.events[index:]:
                    if event.name == name and (match is None or match(event)):
                        return event
                index = len(self.events)
                try:
                    await self._pump_until(lambda seen=index: len(self.events) > seen)
                except PeerError as exc:
                    raise PeerError(f"waiting for QMP event {name}: {exc}") from None
        raise PeerError(f"no QMP event {name} within {timeout} s")

    async def poll_events(self) -> list[QmpEvent]:
        """File every message QEMU has already sent, without waiting; return the new events."""
        before = len(self.events)
        async with self._read_lock:
            await trio.lowlevel.checkpoint()
            while True:
                msg = self._take_buffered()
                if msg is None:
                    readable, _, _ = select.select([self._stream.socket.fileno()], [], [], 0)
                    if not readable:
                        break
                    msg = await self._read_message()
                self._file(msg)
        return self.events[before:]

    # ---- the commands vballoon uses -------------------------------------------------------------

    async def query_status(self) -> str:
        """The run state: ``"running"``, ``"prelaunch"``, ``"paused"``, ``"inmigrate"`` ..."""
        return str((await self.execute("query-status"))["status"])

    async def cont(self) -> None:
        await self.execute("cont")

    async def stop(self) -> None:
        await self.execute("stop")

    async def quit(self, *, timeout: float = 5.0) -> None:
        """Ask QEMU to exit; a connection closed before the reply counts as success."""
        try:
            await self.execute("quit", timeout=timeout)
        except PeerError:
            if self._closed_reason is None:
                raise

    async def balloon(self, target_bytes: int) -> None:
        """Set the balloon target: the guest should end with ``target_bytes`` of RAM."""
        if not isinstance(target_bytes, int) or target_bytes <= 0:
            raise UsageError(f"balloon target must be a positive byte count, not {target_bytes!r}")
        await self.execute("balloon", {"value": target_bytes})

    async def query_balloon(self) -> int:
        """``actual``: guest RAM minus the pages the driver says it gave (config.actual)."""
        return int((await self.execute("query-balloon"))["actual"])

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def qom_set(self, path: str, prop: str, value: Any) -> None:
        await self.execute("qom-set", {"path": path, "property": prop, "value": value})

    async def qom_list(self, path: str) -> list[dict[str, Any]]:
        """Children and properties of ``path``: ``[{"name", "type"}, ...]``."""
        return list(await self.execute("qom-list", {"path": path}))

    async def guest_stats(self, balloon_path: str) -> dict[str, Any]:
        """``qom-get guest-stats`` of the balloon: ``{"stats": {...}, "last-update": t}``."""
        return dict(await self.qom_get(balloon_path, "guest-stats"))

    async def set_stats_polling_interval(self, balloon_path: str, seconds: int) -> None:
        """``qom-set guest-stats-polling-interval`` (0 disables the stats timer)."""
        if not isinstance(seconds, int) or seconds < 0:
            raise UsageError(f"stats polling interval must be an int >= 0, not {seconds!r}")
        await self.qom_set(balloon_path, "guest-stats-polling-interval", seconds)

    async def migrate(self, uri: str) -> None:
        await self.execute("migrate", {"uri": uri})

    async def migrate_set_parameters(self, **parameters: Any) -> None:
        """``migrate-set-parameters``; Python names map to QMP's (``max_bandwidth``)."""
        args = {k.replace("_", "-"): v for k, v in parameters.items()}
        await self.execute("migrate-set-parameters", args)

    async def query_migrate(self) -> dict[str, Any]:
        return dict(await self.execute("query-migrate"))

    async def wait_migration(
        self, *, timeout: float = 60.0, poll: float = 0.05
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed`` (returned) or ``failed``/``cancelled``."""
        with trio.move_on_after(timeout):
            while True:
                info = await self.query_migrate()
                status = info.get("status")
                if status == "completed":
                    return info
                if status in ("failed", "cancelled"):
                    raise PeerError(f"migration {status}: {info.get('error-desc', '')}")
                await trio.sleep(poll)
        raise PeerError(f"migration not completed within {timeout} s")


@asynccontextmanager
async def open_qmp(
    stream: trio.SocketStream,
    *,
    describe_death: Callable[[], str] | None = None,
    timeout: float = 10.0,
) -> AsyncIterator[QmpClient]:
    """Negotiate on ``stream`` (greeting, ``qmp_capabilities``); close it on exit.

    ``timeout`` bounds the negotiation.
    """
    if not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"QMP timeout must be a positive number, not {timeout!r}")
    client = QmpClient(stream, describe_death)
    try:
        await client.negotiate(timeout)
        yield client
    finally:
        await client.aclose()
