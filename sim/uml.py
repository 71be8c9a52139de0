"""Boot Debian's User-Mode Linux (Linux 6.1) so the real ``virtio_balloon`` driver can be a peer.

UML is an ordinary process; no KVM is needed. The guest's root is the host's own ``/`` through
hostfs and its init is a shell script generated into a private directory: it mounts proc and
sysfs, loads ``virtio_balloon.ko`` (with the host's ``insmod``, from kmod), runs a caller's
scenario, prints markers (``VBALLOON-MARK <text>`` lines) and powers off with sysrq ``o``.
Booting to init takes about a second. With ``socket`` set, UML's ``virtio_uml`` connects to a
vhost-user back-end (:mod:`device.vhost_user`) at that path as device ``device_id`` (5 =
balloon) while the kernel boots, so the back-end must listen before :func:`boot` is called.

Findings this harness encodes (see shared/research/uml-vhost-user.md):

* After ``echo o > /proc/sysrq-trigger`` init must keep running (``sleep``): sysrq power-off is
  asynchronous, and an init that exits first panics the kernel ("Attempted to kill init") and
  UML dies with SIGABRT instead of exiting 0.
* UML keeps guest RAM in an unlinked file in ``$TMPDIR`` (default: ``/dev/shm`` if it is a
  tmpfs); that file is what ``virtio_uml`` sends the back-end with SET_MEM_TABLE. The directory
  must exist and allow ``PROT_EXEC`` mappings, else UML exits 1 before printing a kernel line.
  This harness picks ``/dev/shm`` when it is a tmpfs mounted without ``noexec``, and its own
  private directory otherwise; it always sets TMPDIR explicitly.
* UML makes an mconsole socket directory under ``uml_dir`` (default ``~/.uml``) and leaves it
  behind when killed; ``uml_dir=`` points it into the private directory, removed afterwards.
* UML forks helper processes; it is started in its own session and the whole process group is
  SIGKILLed on timeout or when the caller leaves early. It also gets ``PR_SET_PDEATHSIG`` so it
  dies with this process; therefore Popen runs in the trio thread (trio's own ``open_process``
  forks from a worker thread, whose exit would kill UML).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from protocol.errors import ConfigError, PeerError
from sim.peer_process import die_with_parent

__all__ = [
    "BALLOON_MODULE",
    "MARK_PREFIX",
    "UmlGuest",
    "UmlKernel",
    "UmlMachine",
    "UmlResult",
    "boot",
    "find_kernel",
    "group_members",
    "run",
]

log = structlog.get_logger("vballoon.sim")

UML_BINARY = "linux.uml"
MODULES_ROOT = "/usr/lib/uml/modules"
BALLOON_MODULE = "kernel/drivers/virtio/virtio_balloon.ko"
MARK_PREFIX = "VBALLOON-MARK "
_MARK_RE = re.compile(re.escape(MARK_PREFIX) + r"(.*)")
_INSTALL = "apt-get install -y user-mode-linux kmod"
_TMPFS = "tmpfs"



# ---- what to run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UmlKernel:
    """An installed UML kernel: its binary, release and module directory."""

    binary: str
    release: str
    modules_dir: Path

    @property
    def balloon_module(self) -> Path:
        return self.modules_dir / BALLOON_MODULE


def find_kernel(binary: str | os.PathLike[str] | None = None,
                modules_root: str | os.PathLike[str] = MODULES_ROOT) -> UmlKernel:
    """The UML kernel to boot, or a PeerError that says what to install."""
    path = shutil.which(UML_BINARY) if binary is None else os.fspath(binary)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise PeerError(f"User-Mode Linux kernel {binary or UML_BINARY!r} not found "
                        f"({_INSTALL})")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerError(f"{path} --version failed: {exc}") from None
    release = out.stdout.decode("utf-8", "replace").strip()
    modules_dir = Path(modules_root) / release
    kernel = UmlKernel(path, release, modules_dir)
    if not kernel.balloon_module.is_file():
        raise PeerError(f"virtio_balloon.ko for UML {release} not found at "
                        f"{kernel.balloon_module} ({_INSTALL})")
    if shutil.which("insmod", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        raise PeerError(f"insmod not found: the guest runs the host's binaries ({_INSTALL})")
    return kernel


@dataclass(frozen=True, slots=True)
class UmlMachine:
    """One UML boot: the scenario and what the guest is attached to."""

    scenario: str = ""
    """Shell commands run (sourced, in a subshell) after the module is loaded; ``mark TEXT``
    prints a marker. The guest sees the host's files; write only where you mean to."""
    socket: str | os.PathLike[str] | None = None
    """vhost-user socket to attach (``virtio_uml.device=SOCKET:DEVICE_ID``); None: no device."""
    device_id: int = 5
    mem: str = "128M"
    """Guest RAM. With 64M and ``init_on_free=1`` about 2% of boots start broken (kthreads
    cannot be created, init cannot fork); 0 in 100 boots with 128M."""
    load_balloon: bool = True
    cmdline: tuple[str, ...] = ()
    """Extra kernel parameters, e.g. ``("init_on_free=1",)``."""
    timeout: float = 30.0
    """Seconds from spawn to power-off before the process group is killed."""
    memory_dir: str | os.PathLike[str] | None = None
    """TMPDIR for UML's RAM file; None picks /dev/shm (tmpfs) or the run's own directory."""

    def validate(self) -> None:
        if not re.fullmatch(r"[1-9][0-9]*[KMG]?", self.mem):
            raise ConfigError(f"UML mem must look like 64M, not {self.mem!r}")
        if not self.timeout > 0:
            raise ConfigError(f"UML timeout must be positive, not {self.timeout!r}")
        if self.socket is not None and ":" in os.fspath(self.socket):
            raise ConfigError(f"vhost-user socket path may not contain ':': {self.socket}")
        if self.memory_dir is not None and not os.path.isdir(self.memory_dir):
            raise ConfigError(f"UML memory_dir {self.memory_dir} is not a directory")


@dataclass(frozen=True, slots=True)
class UmlResult:
    """What a boot produced."""

    console: str
    returncode: int | None
    """UML's exit status: 0 after a clean power-off, negative for a signal."""
    duration: float
    """Seconds from spawn to exit."""
    boot_time: float | None
    """Seconds from spawn to the init script's first marker (None if init never ran)."""
    timed_out: bool
    killed: bool
    """Killed by the harness (timeout, or :meth:`UmlGuest.kill`)."""

    @property
    def markers(self) -> list[str]:
        return _markers(self.console)

    @property
    def powered_off(self) -> bool:
        return "reboot: Power down" in self.console and self.returncode == 0

    @property
    def scenario_status(self) -> int | None:
        for m in self.markers:
            if m.startswith("scenario-exit "):
                return int(m.split()[1])
        return None

    def check(self) -> UmlResult:
        """Return self if the guest ran its scenario (status 0) and powered off; else PeerError."""
        if self.timed_out or not self.powered_off or self.scenario_status != 0:
            tail = "\n".join(self.console.splitlines()[-25:])
            raise PeerError(f"UML run failed (returncode={self.returncode}, timed_out="
                            f"{self.timed_out}, scenario={self.scenario_status}):\n{tail}")
        return self


# ---- the running guest ---------------------------------------------------------------------


class UmlGuest:
    """A booting or running UML process; built by :func:`boot`, which owns its lifetime."""

    def __init__(self, popen: subprocess.Popen, deadline: float) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._deadline = deadline
        self._started = time.monotonic()
        self._chunks: list[str] = []
        self._changed = trio.Event()
        self._eof = trio.Event()
        self._exited = trio.Event()
        self.boot_time: float | None = None
        self.timed_out = False
        self.killed = False
        self._result: UmlResult | None = None
        self._exit_time = deadline

    @property
    def console(self) -> str:
        return "".join(self._chunks).replace("\r", "")

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    def kill(self) -> None:
        """SIGKILL UML and every helper it forked (its process group)."""
        self.killed = True
        _killpg(self.pid)

    async def wait_for_marker(self, text: str) -> None:
        """Wait until the scenario printed marker ``text``; PeerError if UML ends first."""
        while text not in _markers(self.console):
            if self._eof.is_set():
                raise PeerError(f"UML ended before marker {text!r}:\n"
                                + "\n".join(self.console.splitlines()[-25:]))
            await self._changed.wait()

    async def wait(self) -> UmlResult:
        """Wait for UML to exit (power-off, kill or timeout) and return the result."""
        await self._exited.wait()
        await self._eof.wait()
        if self._result is None:
            self._result = UmlResult(
                console=self.console, returncode=self._popen.returncode,
                duration=self._exit_time - self._started, boot_time=self.boot_time,
                timed_out=self.timed_out, killed=self.killed)
        return self._result

    # ---- tasks run by boot() -------------------------------------------------------------
    async def _read_console(self, stream: trio.lowlevel.FdStream) -> None:
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                self._chunks.append(data.decode("utf-8", "replace"))
                if self.boot_time is None and MARK_PREFIX + "init" in self.console:
                    self.boot_time = time.monotonic() - self._started
                self._changed.set()
                self._changed = trio.Event()
        self._eof.set()
        self._changed.set()

    async def _reap(self) -> None:
        pidfd = os.pidfd_open(self.pid)
        try:
            with trio.move_on_at(self._deadline) as scope:
                await trio.lowlevel.wait_readable(pidfd)
            if scope.cancelled_caught:
                self.timed_out = True
                self.kill()
                log.warning("uml.timeout", pid=self.pid)
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self._popen.wait()
        self._exit_time = time.monotonic()
        await _kill_group(self.pid)  # helpers that outlived UML, if any
        self._exited.set()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(name))
    return members


async def _kill_group(pgid: int, grace: float = 5.0) -> None:
    """SIGKILL process group ``pgid`` and wait (pidfds) until every member has exited."""
    _killpg(pgid)
    with trio.move_on_after(grace):
        for pid in group_members(pgid):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
    left = group_members(pgid)
    if left:
        log.warning("uml.survivors", pgid=pgid, pids=left)


def _markers(console: str) -> list[str]:
    return [m.group(1).strip() for m in _MARK_RE.finditer(console)]


# ---- boot ------------------------------------------------------------------------------------


@asynccontextmanager
async def boot(machine: UmlMachine, kernel: UmlKernel | None = None
               ) -> AsyncIterator[UmlGuest]:
    """Start UML for ``machine`` and yield the running guest; on exit it is dead and reaped.

    Leaving the block early (or an error) kills the process group. The private directory
    (init script, scenario, maybe the RAM file) is removed afterwards.
    """
    machine.validate()
    kernel = kernel or find_kernel()
    workdir = Path(tempfile.mkdtemp(prefix="vballoon-uml-"))
    try:
        init = _write_init(workdir, machine, kernel)
        env = dict(os.environ, TMPDIR=os.fspath(machine.memory_dir or _memory_dir(workdir)))
        argv = _argv(kernel, machine, init)
        log.info("uml.boot", argv=argv, tmpdir=env["TMPDIR"])
        read_fd, write_fd = os.pipe()
        try:
            popen = subprocess.Popen(  # noqa: S603 - argv built from validated fields
                argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                close_fds=True, start_new_session=True, env=env,
                preexec_fn=die_with_parent,  # noqa: PLW1509
            )
        except OSError as exc:
            os.close(read_fd)
            raise PeerError(f"cannot start {kernel.binary}: {exc}") from None
        finally:
            os.close(write_fd)
        guest = UmlGuest(popen, trio.current_time() + machine.timeout)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest._read_console, trio.lowlevel.FdStream(read_fd))
                nursery.start_soon(guest._reap)
                try:
                    yield guest
                finally:
                    if guest.running:
                        guest.kill()
        except BaseExceptionGroup as group:
            # The two tasks do not raise, so this is the caller's own error: give it back
            # unwrapped rather than inside trio's (strict) exception group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            if guest.running:  # an error or cancellation stopped _reap: finish its job here
                with trio.CancelScope(shield=True):
                    _killpg(popen.pid)
                    popen.wait()  # SIGKILLed: returns at once
                    await _kill_group(popen.pid)
        result = await guest.wait()
        log.info("uml.exit", returncode=result.returncode, duration=round(result.duration, 3),
                 boot_time=result.boot_time, timed_out=result.timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def run(machine: UmlMachine, kernel: UmlKernel | None = None) -> UmlResult:
    """Boot, run the scenario, power off; returns the result (see :meth:`UmlResult.check`)."""
    async with boot(machine, kernel) as guest:
        return await guest.wait()


def _argv(kernel: UmlKernel, machine: UmlMachine, init: Path) -> list[str]:
    argv = [kernel.binary, f"mem={machine.mem}", "root=/dev/root", "rootfstype=hostfs",
            "rootflags=/", "rw", f"init={init}", "con=null", "con0=fd:0,fd:1",
            f"uml_dir={init.parent}"]
    if machine.socket is not None:
        argv.append(f"virtio_uml.device={os.fspath(machine.socket)}:{machine.device_id}")
    return argv + list(machine.cmdline)


def _write_init(workdir: Path, machine: UmlMachine, kernel: UmlKernel) -> Path:
    scenario = workdir / "scenario.sh"
    scenario.write_text(machine.scenario + "\n")
    load = (f"insmod {kernel.balloon_module} || mark insmod-failed $?\nmark module-loaded\n"
            if machine.load_balloon else "")
    init = workdir / "init.sh"
    init.write_text(
        "#!/bin/sh\n"
        "# Generated by vballoon sim.uml: PID 1 of a User-Mode Linux guest.\n"
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"mark() {{ echo \"{MARK_PREFIX}$*\"; }}\n"
        "mount -t proc proc /proc\n"
        "mount -t sysfs sysfs /sys\n"
        "mark init\n"
        f"{load}"
        f"( . {scenario} )\n"
        "mark \"scenario-exit $?\"\n"
        "echo o > /proc/sysrq-trigger\n"
        "# Power-off is asynchronous: init must not exit first (that panics the kernel).\n"
        "while :; do sleep 1; done\n"
    )
    init.chmod(0o755)
    return init


def _memory_dir(workdir: Path) -> str:
    """/dev/shm if it is a tmpfs that allows exec mappings, else the run's own directory."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _dev, mountpoint, fstype, options, *_ = line.split()
                if mountpoint == "/dev/shm" and fstype == _TMPFS and \
                        "noexec" not in options.split(",") and os.access("/dev/shm", os.W_OK):
                    return "/dev/shm"
    except OSError:
        pass
    return os.fspath(workdir)
