"""The free_page_vq handler: command-ID out-buffers and hinted in-buffers (virtio §5.5.6.5).

QEMU ``get_free_page_hints``, one chain at a time:

- a device-readable part is the guest's command ID (le32). QEMU reads the first 4 bytes and
  breaks the device (``virtio_error("received an incorrect cmd id")``) only when there are
  fewer; the spec says exactly 4 (BAL-D-24). Here a short ID is a
  :class:`~protocol.errors.DriverViolation` BL-16 handled by the device's error policy
  (needs-reset: the device stops and nothing is pushed; skip: the chain is returned untouched;
  truncate: the ID is ignored and the rest of the chain is handled); a longer one is logged
  and its first 4 bytes are used, as QEMU does.
- the ID moves the state machine of :mod:`device.hint`;
- device-writable parts are hinted ranges, recorded (and passed to ``on_hint``) only in START
  (BL-17), otherwise ignored;
- the chain goes back used with length 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.events import emit, warn
from device.hint import FreePageHint, HintTransition
from device.records import BalloonRecords
from device.transport import HostMemory
from protocol.errors import DriverViolation
from virtqueue.policy import ErrorPolicy

if TYPE_CHECKING:
    from virtqueue.device import DescriptorChain

__all__ = ["CMD_ID_SIZE", "HintChainResult", "handle_hint_chain"]

CMD_ID_SIZE = 4
"""A command ID out-buffer is one le32."""


@dataclass(frozen=True, slots=True)
class HintChainResult:
    """What one free_page_vq chain did.

    ``give_back`` is False only when ``violation`` stopped the device (needs-reset policy).
    """

    give_back: bool
    violation: DriverViolation | None = None
    cmd_id: int | None = None
    transition: HintTransition | None = None
    hinted_bytes: int = 0


def handle_hint_chain(chain: DescriptorChain, memory: HostMemory, hint: FreePageHint,
                      records: BalloonRecords, *, policy: ErrorPolicy, queue: int,
                      on_hint: Callable[[int, int], None] | None) -> HintChainResult:
    """Apply one chain to ``hint`` and ``records`` (see the module docstring)."""
    cmd_id = transition = None
    if chain.readable_len:
        if chain.readable_len < CMD_ID_SIZE:
            v = DriverViolation(rule_id="BL-16", section="5.5.6.5",
                                message="received an incorrect cmd id", queue=queue,
                                head=chain.head, length=chain.readable_len)
            if policy is ErrorPolicy.NEEDS_RESET:
                return HintChainResult(give_back=False, violation=v)
            warn("balloon.hint", queue=queue, rule="BL-16", head=chain.head,
                 length=chain.readable_len, policy=str(policy))
            if policy is ErrorPolicy.SKIP:
                return HintChainResult(give_back=True, violation=v)
        else:
            if chain.readable_len > CMD_ID_SIZE:
                warn("balloon.hint", queue=queue, rule="BL-16", head=chain.head,
                     length=chain.readable_len, used="first 4 bytes, as QEMU")
            cmd_id = int.from_bytes(chain.read(memory, CMD_ID_SIZE), "little")
            transition = hint.guest_cmd_id(cmd_id)
            emit("balloon.hint", queue=queue, step="guest_cmd_id", cmd_id=cmd_id,
                 old=transition.old.name, new=transition.new.name, current=hint.cmd_id)
    hinted = 0
    if chain.writable:
        if hint.accepting:
            for addr, length in chain.writable:
                records.hinted.add(addr, addr + length)
                records.hinted_round.add(addr, addr + length)
                if on_hint is not None:
                    on_hint(addr, length)
            hinted = chain.writable_len
            records.count("hinted_bytes", hinted)
            emit("balloon.hint", queue=queue, head=chain.head, cmd_id=hint.cmd_id,
                 ranges=len(chain.writable), bytes=hinted)
        else:
            records.count("hinted_ignored_bytes", chain.writable_len)
            emit("balloon.hint", queue=queue, head=chain.head, rule="BL-17",
                 state=hint.state.name, ignored_bytes=chain.writable_len)
    records.count("hint_chains")
    return HintChainResult(give_back=True, cmd_id=cmd_id, transition=transition,
                           hinted_bytes=hinted)
