"""Inflating 256 MiB of a User-Mode Linux guest (mem=512M) through the vhost-user back-end.

The real Linux 6.1 ``virtio_balloon`` fills the balloon 256 pages (1 MiB) per inflate chain. Per
chain: the driver kicks (a socketpair write), the back-end wakes the device, which pops the
chain, discards the pages (hole punch in UML's RAM file), pushes it and writes the call fd;
UML takes the interrupt, then writes ``actual`` with SET_CONFIG and waits for the ack before
the next chain. Measured from the moment the host sets the target to ``actual`` reaching it:

* ``inflate_256MiB_seconds`` (wall) and the rate;
* ``device_share``: the share of that time our code spends on the critical path: CPU time
  (``time.thread_time``, system time included: the hole punches and the call-fd writes are
  ours) inside the device's queue handling (``BalloonDevice.poll_queue``) and the back-end's
  handling of each message (``Session._handle``: parse, config access, reply). Target <= 25 %:
  the guest should mostly wait on itself, not on us. Split into ``device_queue_share`` and
  ``backend_message_share``;
* ``device_share_wall``: the same with ``perf_counter``; higher on a loaded machine, where the
  scheduler preempts us inside those calls (2 cores shared with UML's processes);
* ``process_cpu_share``: all CPU time of this process (trio, the event rendering of
  :mod:`sim.serve`, structlog, the above) over the same wall time.

Each chain is sequential (the driver waits for the used buffer, then for the SET_CONFIG ack),
so the guest speeds up as we do: the share, not the wall time, says who is waiting on whom.

Raises PeerError when UML is missing (the harness reports "not available").
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from device.vhost_user.session import Session
from protocol.features import BalloonFeature, TransportFeature, mask
from sim.uml import find_kernel
from sim.uml_boot import MIB, ScenarioContext, run_boot
from virtqueue import events as vq_events

__all__ = ["INFLATE_BYTES", "run"]

INFLATE_BYTES = 256 * MIB
GUEST_MEM = "512M"
SHARE_TARGET = 25.0
FEATURES = mask(BalloonFeature.STATS_VQ, TransportFeature.RING_INDIRECT_DESC,
                TransportFeature.RING_EVENT_IDX, TransportFeature.VERSION_1)
"""No reporting or hinting: nothing else may touch the queues while the balloon fills."""


@dataclass(frozen=True, slots=True)
class _Timing:
    seconds: float
    queue: _Accumulator
    messages: _Accumulator
    cpu_seconds: float
    pages: int


class _Accumulator:
    """Sums the CPU time (``thread_time``) and wall time spent inside wrapped calls."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - c0
                self.wall += time.perf_counter() - t0
        return timed


@contextmanager
def _timed_messages(acc: _Accumulator):
    """Time ``Session._handle`` (every front-end message) while the block runs."""
    original = Session._handle
    Session._handle = acc.wrap(original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Session._handle = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class _TimedInflate:
    """The scenario: at the guest's marker, set the target and time until ``actual`` meets it."""

    size: int = INFLATE_BYTES
    name: str = "timed_inflate"

    def guest(self) -> str:
        return "step bench-ready\n"

    async def host(self, ctx: ScenarioContext) -> _Timing:
        await ctx.reached("bench-ready")
        device, config = ctx.device, ctx.device.config
        queue, messages = _Accumulator(), _Accumulator()
        device.poll_queue = queue.wrap(device.poll_queue)  # type: ignore[method-assign]
        try:
            with _timed_messages(messages):
                cpu0, t0 = time.process_time(), time.perf_counter()
                num_pages = ctx.server.balloon(device.ram_size - self.size)
                await ctx.wait("actual reaching the target", lambda: config.actual == num_pages)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
        finally:
            del device.poll_queue
        ctx.go("bench-ready")
        return _Timing(seconds, queue, messages, cpu, num_pages or 0)


async def _measure() -> tuple[_Timing, float]:
    result = await run_boot([_TimedInflate()], features=FEATURES, mem=GUEST_MEM,
                            kernel=find_kernel())
    return result.results["timed_inflate"], result.uml.boot_time or 0.0


def run() -> list[dict[str, Any]]:
    find_kernel()  # PeerError ("not available") before anything else
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        with vq_events.disabled():
            timing, boot_seconds = trio.run(_measure)
    finally:
        structlog.configure(**previous)
    wall = timing.seconds
    queue, messages = timing.queue, timing.messages

    def pct(x: float) -> float:
        return round(100 * x / wall, 2)

    return [
        {"name": "inflate_256MiB_seconds", "value": round(wall, 4), "unit": "s"},
        {"name": "inflate_rate", "value": round(timing.pages * 4096 / MIB / wall, 1),
         "unit": "MiB/s"},
        {"name": "device_share", "value": pct(queue.cpu + messages.cpu), "unit": "%",
         "target": f"<= {SHARE_TARGET:g}"},
        {"name": "device_queue_share", "value": pct(queue.cpu), "unit": "%"},
        {"name": "backend_message_share", "value": pct(messages.cpu), "unit": "%"},
        {"name": "device_share_wall", "value": pct(queue.wall + messages.wall), "unit": "%"},
        {"name": "process_cpu_share", "value": pct(timing.cpu_seconds), "unit": "%"},
        {"name": "boot_seconds", "value": round(boot_seconds, 3), "unit": "s"},
    ]
