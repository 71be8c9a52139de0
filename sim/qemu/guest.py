"""Our guest on QEMU: the simulator's balloon driver, unchanged, on QEMU's RAM and registers.

:func:`build_guest` wires what a Linux guest has at boot, with QEMU's pieces underneath:

- a :class:`~guest.mm.PageAllocator` over microvm's RAM map (:func:`guest_ram_layout`): the
  BIOS window 0xf0000-0xfffff is not RAM at all, and the low :data:`KERNEL_RESERVED` bytes are
  memblock-reserved as a kernel's would be (x86 Linux reserves the first MiB; the next MiB
  stands for the kernel image). Everything else is free memory the buddy allocator hands out;
  QEMU keeps nothing else in guest RAM here (no firmware runs: the vCPU is paused or halted);
- :class:`~sim.qemu.memory.QtestMemory` (RAM over qtest) and the transport found by scanning
  microvm's virtio-mmio slots (:func:`~sim.qemu.mmio.find_balloon`);
- :class:`~guest.virtio_mmio.VirtioMmioTransport` (through a
  :class:`~sim.qemu.observe.KickCounter`) with a
  :class:`~sim.qemu.observe.WatchedInterruptLine` (InterruptStatus polled, as QEMU's line cannot
  be waited on without intercepting the IOAPIC);
- :class:`~guest.balloon.VirtioBalloon` with the given :class:`~guest.balloon.BalloonOptions`,
  the same class the simulated machine runs;
- a :class:`~sim.qemu.observe.ChainTap` so scenarios can see the chains the driver publishes.

:func:`run_guest` probes the driver, runs it in a nursery and stops it on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from guest.balloon import BalloonOptions, VirtioBalloon
from guest.mm import PageAllocator
from guest.virtio_mmio import VirtioMmioTransport
from protocol.balloon import BalloonQueue
from protocol.errors import ConfigError
from sim.qemu.memory import QtestMemory, microvm_ram_regions
from sim.qemu.mmio import MmioSlot, QtestMmioBus, find_balloon
from sim.qemu.observe import ChainTap, KickCounter, WatchedInterruptLine
from sim.qemu.process import QemuProcess
from virtqueue.memory import MemoryRegion

__all__ = [
    "DEFAULT_POLL_PERIOD",
    "KERNEL_RESERVED",
    "QemuGuest",
    "build_guest",
    "guest_ram_layout",
    "run_guest",
]

log = structlog.get_logger("vballoon.sim")

KERNEL_RESERVED = 2 << 20
"""Bytes at the bottom of RAM the allocator never gets: x86 Linux's reserved first MiB (real
mode trampoline, BIOS data) and one MiB standing for the kernel image."""
DEFAULT_POLL_PERIOD = 0.001
"""Seconds between InterruptStatus polls (one qtest round trip is ~50 us)."""


def guest_ram_layout(ram_size: int, *, reserved: int = KERNEL_RESERVED
                     ) -> tuple[tuple[MemoryRegion, ...], tuple[tuple[int, int], ...]]:
    """microvm's RAM regions for ``-m ram_size`` and the ``(gpa, size)`` ranges to reserve."""
    if not isinstance(reserved, int) or reserved < 0 or reserved % 4096:
        raise ConfigError(f"reserved low memory must be a multiple of 4 KiB, not {reserved!r}")
    regions = microvm_ram_regions(ram_size)
    if reserved >= regions[-1].end:
        raise ConfigError(f"{reserved:#x} reserved bytes leave no RAM of {ram_size:#x}")
    return regions, ((0, reserved),) if reserved else ()


@dataclass(slots=True)
class QemuGuest:
    """A guest wired to a running QEMU (see module docstring); built by :func:`build_guest`."""

    qemu: QemuProcess
    slot: MmioSlot
    bus: QtestMmioBus
    memory: QtestMemory
    mm: PageAllocator
    transport: VirtioMmioTransport
    irq: WatchedInterruptLine
    balloon: VirtioBalloon
    tap: ChainTap
    kicks: KickCounter

    def vq(self, queue: BalloonQueue):
        """The driver's ``VirtQueue`` for ``queue`` (KeyError if it was not set up)."""
        return self.balloon.vqs[queue]

    def queue_summary(self) -> list[dict[str, int | str]]:
        """Per queue: index, size, buffers made available, used by QEMU, reaped by the driver,
        and the driver's kicks (QueueNotify writes)."""
        out = []
        for _, vq in sorted(self.balloon.vqs.items()):
            ring = vq.ring
            out.append({
                "queue": vq.name, "index": vq.index, "size": vq.size,
                "avail_idx": ring.avail_idx_shadow,
                "used_idx": int.from_bytes(self.memory.read(ring.used + 2, 2), "little"),
                "reaped": ring.last_used_idx, "in_flight": ring.in_flight,
                "kicks": self.kicks.kicks[vq.index],
            })
        return out

    def tap_queues(self, *queues: BalloonQueue) -> None:
        """Record the chains published on ``queues`` (those the driver set up)."""
        for queue in queues:
            vq = self.balloon.vqs.get(queue)
            if vq is not None:
                self.tap.tap(vq.name, vq.ring)


def build_guest(qemu: QemuProcess, options: BalloonOptions | None = None, *,
                reserved: int = KERNEL_RESERVED,
                poll_period: float = DEFAULT_POLL_PERIOD) -> QemuGuest:
    """Wire our guest to ``qemu``'s balloon; nothing is probed yet (see module docstring)."""
    slot, bus = find_balloon(qemu.qtest)
    regions, reserve = guest_ram_layout(qemu.options.memory, reserved=reserved)
    mm = PageAllocator(regions, reserved=reserve)
    memory = qemu.memory
    kicks = KickCounter(bus)
    transport = VirtioMmioTransport(kicks, None, memory)
    irq = WatchedInterruptLine(transport, memory, period=poll_period)
    transport.irq = irq
    balloon = VirtioBalloon(transport, mm, memory, options=options or BalloonOptions())
    log.debug("qemu.guest", base=slot.base, managed_pages=mm.totalram_pages(),
              reserved=reserved)
    return QemuGuest(qemu, slot, bus, memory, mm, transport, irq, balloon, ChainTap(memory),
                     kicks)


@asynccontextmanager
async def run_guest(qemu: QemuProcess, options: BalloonOptions | None = None, *,
                    reserved: int = KERNEL_RESERVED, poll_period: float = DEFAULT_POLL_PERIOD,
                    tap: tuple[BalloonQueue, ...] = ()) -> AsyncIterator[QemuGuest]:
    """Build, probe and run the driver; yield the guest; stop the driver on exit.

    ``tap``: queues whose chains are recorded from the end of the probe on.
    The driver is cancelled on exit, not removed: call ``guest.balloon.remove()`` first for a
    Linux-like unload (deflate everything, reset the device). Errors of the driver's tasks
    (QEMU dying under them) leave as the error itself, not wrapped in an exception group.
    """
    guest = build_guest(qemu, options, reserved=reserved, poll_period=poll_period)
    guest.balloon.probe()
    guest.tap_queues(*tap)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(guest.balloon.run)
            yield guest
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    finally:
        guest.tap.close()


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception worth reporting from a nursery's group (the first, unwrapped)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup) and first.exceptions:
        first = first.exceptions[0]
    return first
