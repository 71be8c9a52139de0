"""Start QEMU's microvm with a real virtio-balloon device under qtest, and always stop it.

The way libqtest does it: Python creates a private directory, listens on two unix sockets in
it (qtest and QMP), then spawns ``qemu-system-x86_64`` which connects to both as a client, so
there is no race on socket files. QEMU does not exit when its qtest socket closes, so it is
stopped explicitly on every exit path (QMP ``quit``, then SIGKILL by PID, then reaped) and it
gets ``PR_SET_PDEATHSIG(SIGKILL)`` so that it dies with this process even after ``kill -9``.

Two modes (see shared/research/qtest.md; Debian ships no ``-accel qtest``):

* :attr:`QemuMode.PAUSED` (A): ``-accel tcg -S``. The vCPU never runs and the virtual clock is
  frozen; virtio-mmio handles QueueNotify synchronously inside the MMIO write, so inflate,
  deflate, reporting and config changes all work. Timers (stats polling) never fire.
* :attr:`QemuMode.RUNNING` (B): the same plus a 64 KiB firmware of ``HLT`` bytes generated into
  the private directory, then QMP ``cont``. The vCPU halts at the reset vector (IF=0) and never
  touches RAM, while timers, iothreads and migration run in real time (needed for stats
  polling and free page hinting).
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from protocol.errors import ConfigError, PeerError
from sim.peer_process import die_with_parent
from sim.qemu.memory import QtestMemory, microvm_ram_regions
from sim.qemu.qmp import QmpClient
from sim.qemu.qtest import QtestClient

__all__ = [
    "DEBIAN_PACKAGE",
    "HLT_FIRMWARE_SIZE",
    "BalloonProperties",
    "QemuMode",
    "QemuOptions",
    "QemuProcess",
    "find_qemu_binary",
    "run_qemu",
]

log = structlog.get_logger("vballoon.sim")

QEMU_BINARY = "qemu-system-x86_64"
DEBIAN_PACKAGE = "qemu-system-x86"
HLT_FIRMWARE_SIZE = 64 * 1024
"""Size of the mode-B firmware; 64 KiB maps it at 0xf0000 like microvm's own BIOS."""
_HLT = b"\xf4"
_IOTHREAD_ID = "vballoon-io0"
_SUN_PATH_MAX = 107



class QemuMode(enum.Enum):
    """How the vCPU and the virtual clock behave (module docstring)."""

    PAUSED = "paused"
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class BalloonProperties:
    """Properties of ``-device virtio-balloon-device`` (QEMU 7.2 names and defaults)."""

    free_page_reporting: bool = False
    free_page_hint: bool = False
    """Needs an iothread; one is created when this is on."""
    deflate_on_oom: bool = False
    page_poison: bool = True
    guest_stats_polling_interval: int | None = None
    """Seconds; None leaves QEMU's default (0, disabled)."""
    id: str = "balloon0"
    """The qdev id; the QOM path is ``/machine/peripheral/<id>``."""

    def device_arg(self) -> str:
        """The ``-device`` argument for these properties."""
        onoff = {True: "on", False: "off"}
        parts = [
            "virtio-balloon-device",
            f"id={self.id}",
            f"free-page-reporting={onoff[self.free_page_reporting]}",
            f"free-page-hint={onoff[self.free_page_hint]}",
            f"deflate-on-oom={onoff[self.deflate_on_oom]}",
            f"page-poison={onoff[self.page_poison]}",
        ]
        if self.free_page_hint:
            parts.append(f"iothread={_IOTHREAD_ID}")
        if self.guest_stats_polling_interval is not None:
            parts.append(f"guest-stats-polling-interval={self.guest_stats_polling_interval}")
        return ",".join(parts)

    @property
    def qom_path(self) -> str:
        return f"/machine/peripheral/{self.id}"


@dataclass(frozen=True, slots=True)
class QemuOptions:
    """What to start. Validated by :meth:`validate` before anything is spawned."""

    memory: int = 128 << 20
    """Guest RAM in bytes, a multiple of 1 MiB (passed as ``-m <MiB>M``)."""
    mode: QemuMode = QemuMode.PAUSED
    balloon: BalloonProperties | None = field(default_factory=BalloonProperties)
    """None: no balloon device at all."""
    force_legacy: bool = False
    """False adds ``-global virtio-mmio.force-legacy=false`` (Version 2, the modern layout);
    QEMU 7.2's own default is legacy (Version 1)."""
    accel: str = "tcg"
    binary: str | os.PathLike[str] | None = None
    """Path of qemu-system-x86_64; None searches PATH."""
    incoming: str | None = None
    """``-incoming`` URI for a migration destination (e.g. ``exec:cat FILE``)."""
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 10.0
    qtest_timeout: float = 30.0

    def validate(self) -> None:
        mib = 1 << 20
        if not isinstance(self.memory, int) or self.memory < 2 * mib or self.memory % mib:
            raise ConfigError(f"QEMU memory must be a multiple of 1 MiB >= 2 MiB: {self.memory!r}")
        if self.accel not in ("tcg", "kvm"):
            raise ConfigError(f"QEMU accel must be 'tcg' or 'kvm', not {self.accel!r}")
        if not isinstance(self.mode, QemuMode):
            raise ConfigError(f"QEMU mode must be a QemuMode, not {self.mode!r}")
        interval = self.balloon.guest_stats_polling_interval if self.balloon else None
        if interval is not None and (not isinstance(interval, int) or interval < 0):
            raise ConfigError(f"guest-stats-polling-interval must be an int >= 0: {interval!r}")
        for value in (self.start_timeout, self.qtest_timeout):
            if not value > 0:
                raise ConfigError(f"QEMU timeouts must be positive, not {value!r}")

    def argv(self, binary: str, workdir: Path) -> list[str]:
        """The full command line, QEMU connecting to sockets in ``workdir``."""
        args = [
            binary,
            "-M", "microvm",
            "-accel", self.accel,
            "-S",
            "-m", f"{self.memory >> 20}M",
            "-display", "none",
            "-nodefaults",
            "-no-user-config",
            "-qtest", f"unix:{workdir / 'qtest.sock'}",
            "-qtest-log", "/dev/null",
            "-chardev", f"socket,path={workdir / 'qmp.sock'},id=vballoon-qmp",
            "-mon", "chardev=vballoon-qmp,mode=control",
        ]  # fmt: skip
        if self.mode is QemuMode.RUNNING:
            args += ["-bios", str(workdir / "hlt.bin")]
        if not self.force_legacy:
            args += ["-global", "virtio-mmio.force-legacy=false"]
        if self.balloon is not None:
            if self.balloon.free_page_hint:
                args += ["-object", f"iothread,id={_IOTHREAD_ID}"]
            args += ["-device", self.balloon.device_arg()]
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args + list(self.extra_args)


def find_qemu_binary(binary: str | os.PathLike[str] | None = None) -> str:
    """The QEMU executable to run, or :class:`PeerError` naming the package that provides it."""
    if binary is None:
        found = shutil.which(QEMU_BINARY)
        if found is None:
            raise PeerError(
                f"{QEMU_BINARY} not found on PATH; install the Debian package {DEBIAN_PACKAGE} "
                f"(apt-get install --no-install-recommends {DEBIAN_PACKAGE})"
            )
        return found
    path = os.fspath(binary)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise PeerError(
            f"QEMU binary {path!r} does not exist or is not executable; install the Debian "
            f"package {DEBIAN_PACKAGE} (apt-get install --no-install-recommends {DEBIAN_PACKAGE})"
        )
    return path


class QemuProcess:
    """A running QEMU: its qtest client, QMP client, guest RAM view, PID and private directory.

    Built only by :func:`run_qemu`, which owns its lifetime.
    """

    def __init__(self, options: QemuOptions, popen: subprocess.Popen, workdir: Path) -> None:
        self.options = options
        self._popen = popen
        self.workdir = workdir
        self.pid: int = popen.pid
        self.qtest: QtestClient
        self.qmp: QmpClient
        self.memory: QtestMemory
        self.startup_seconds: float = 0.0
        """Spawn until the first qtest reply (QMP negotiated), measured at start."""

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters QEMU wrote to stdout/stderr."""
        try:
            with open(self.workdir / "stderr.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def describe_death(self) -> str:
        """A sentence for errors: QEMU's exit status (if it exited) and its stderr tail."""
        try:  # the socket EOF usually beats the exit by a few milliseconds
            code = self._popen.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            code = None
        status = "still running" if code is None else f"exit status {code}"
        tail = self.stderr_tail()
        return f"{status}; stderr: {tail}" if tail else status

    async def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for QEMU to exit; True if it did (it is reaped)."""
        if self._popen.poll() is not None:
            return True
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._popen.poll()
            return True
        try:
            with trio.move_on_after(timeout):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self._popen.poll() is not None

    async def stop(self) -> None:
        """QMP ``quit``, then SIGKILL by PID if QEMU is still there, then reap it."""
        if self._popen.poll() is None and hasattr(self, "qmp") and self.qmp.connected:
            with trio.move_on_after(3):
                try:
                    await self.qmp.quit(timeout=2.0)
                except Exception as exc:  # noqa: BLE001 - the kill below is the fallback
                    log.debug("qemu.quit_failed", pid=self.pid, error=str(exc))
            await self.wait_exit(2.0)
        if self._popen.poll() is None:
            log.warning("qemu.kill", pid=self.pid)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.wait_exit(5.0)
        if self._popen.poll() is None:  # pragma: no cover - SIGKILL not delivered in 5 s
            self._popen.wait()


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(f"socket path too long for AF_UNIX ({len(str(path))} bytes): {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen(1)
    sock.setblocking(False)
    return sock


async def _accept(listener: socket.socket) -> socket.socket:
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        return conn


async def _accept_both(
    qemu: QemuProcess, qtest_listener: socket.socket, qmp_listener: socket.socket
) -> tuple[socket.socket, socket.socket]:
    """Accept QEMU's two connections, failing fast if it exits or takes too long."""
    accepted: dict[str, socket.socket] = {}
    died = False

    async def take(name: str, listener: socket.socket) -> None:
        accepted[name] = await _accept(listener)

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal died
        await qemu.wait_exit(float("inf"))
        died = True
        scope.cancel()  # stop waiting for connections that will never come

    timeout = qemu.options.start_timeout
    try:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as outer:
                outer.start_soon(watch, outer.cancel_scope)
                async with trio.open_nursery() as inner:
                    inner.start_soon(take, "qtest", qtest_listener)
                    inner.start_soon(take, "qmp", qmp_listener)
                outer.cancel_scope.cancel()
        if died:
            raise PeerError(f"QEMU exited during startup: {qemu.describe_death()}")
        if len(accepted) != 2:
            raise PeerError(
                f"QEMU did not connect its qtest and QMP sockets within {timeout} s: "
                f"{qemu.describe_death()}"
            )
    except BaseException:
        for sock in accepted.values():
            sock.close()
        raise
    return accepted["qtest"], accepted["qmp"]


@asynccontextmanager
async def run_qemu(options: QemuOptions | None = None) -> AsyncIterator[QemuProcess]:
    """Start QEMU as ``options`` say, yield it ready for qtest and QMP, always stop it.

    On exit (normal, exception or cancellation) QEMU is quit or killed, reaped, and its
    private directory removed. Raises :class:`PeerError` when QEMU is missing, refuses its
    command line (its stderr is in the message) or dies; :class:`ConfigError` for bad options.
    """
    options = options or QemuOptions()
    options.validate()
    binary = find_qemu_binary(options.binary)
    workdir = Path(tempfile.mkdtemp(prefix="vballoon-qemu-"))
    listeners: list[socket.socket] = []
    qemu: QemuProcess | None = None
    qmp: QmpClient | None = None
    try:
        listeners.append(_listen(workdir / "qtest.sock"))
        listeners.append(_listen(workdir / "qmp.sock"))
        if options.mode is QemuMode.RUNNING:
            (workdir / "hlt.bin").write_bytes(_HLT * HLT_FIRMWARE_SIZE)
        started = time.perf_counter()
        qemu = QemuProcess(options, _spawn(options.argv(binary, workdir), workdir), workdir)
        log.info("qemu.spawn", pid=qemu.pid, mode=options.mode.value, memory=options.memory)
        try:
            qtest_sock, qmp_sock = await _accept_both(qemu, *listeners)
            qemu.qtest = QtestClient(
                qtest_sock, timeout=options.qtest_timeout, describe_death=qemu.describe_death
            )
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(qmp_sock))
            qmp = qemu.qmp = QmpClient(stream, qemu.describe_death)
            await qmp.negotiate(options.start_timeout)
            qemu.qtest.endianness()
            qemu.startup_seconds = time.perf_counter() - started
            if options.mode is QemuMode.RUNNING:
                await qmp.cont()
        except PeerError as exc:
            if await qemu.wait_exit(1.0):
                raise PeerError(f"QEMU exited during startup: {qemu.describe_death()}") from exc
            raise
        qemu.memory = QtestMemory(qemu.qtest, microvm_ram_regions(options.memory), pid=qemu.pid)
        log.info("qemu.ready", pid=qemu.pid, startup_ms=round(qemu.startup_seconds * 1e3, 1))
        yield qemu
    finally:
        with trio.CancelScope(shield=True):
            if qemu is not None:
                await qemu.stop()
                if hasattr(qemu, "qtest"):
                    qemu.qtest.close()
                log.info("qemu.stop", pid=qemu.pid, returncode=qemu.returncode)
            if qmp is not None:
                await qmp.aclose()
            for listener in listeners:
                listener.close()
            shutil.rmtree(workdir, ignore_errors=True)


def _spawn(argv: list[str], workdir: Path) -> subprocess.Popen:
    """Popen QEMU with stdout/stderr into ``workdir/stderr.log`` and PDEATHSIG set.

    Popen runs in the calling (trio) thread on purpose: PDEATHSIG fires when the forking
    *thread* exits, and trio's worker threads come and go.
    """
    with open(workdir / "stderr.log", "wb") as errlog:
        try:
            return subprocess.Popen(  # noqa: S603 - argv is built from validated options
                argv,
                stdin=subprocess.DEVNULL,
                stdout=errlog,
                stderr=errlog,
                close_fds=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509
            )
        except OSError as exc:
            raise PeerError(f"cannot start {argv[0]}: {exc}") from exc
