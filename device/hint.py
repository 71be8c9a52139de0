"""Free page hinting, device side: QEMU's STOP / REQUESTED / START / DONE state machine as a table.

virtio §5.5.6.5 and QEMU ``hw/virtio/virtio-balloon.c`` (``virtio_balloon_free_page_start``,
``_stop``, ``_done``, ``get_free_page_hints``, ``virtio_balloon_get_config``). Two sides move it:

- the host (the migration code, here the VMM): ``start`` opens a round with a new command ID
  (REQUESTED), ``stop`` ends hinting before a dirty-bitmap sync (STOP), ``done`` lets the guest
  reuse every hinted page (DONE). Each real change is a config change the driver must be told.
- the guest, through 4-byte command-ID out-buffers on free_page_vq: the current ID while
  REQUESTED starts the round (START); any ID while START ends it (STOP), which is how the
  guest's STOP sign works and why a stale stop for an older round does nothing.

Hinted ranges (in-buffers) count only in START (rule BL-17). Command IDs start from
:data:`~protocol.balloon.CMD_ID_MIN` and are incremented *before* use, so QEMU's first round is
0x80000001; after 0xffffffff they wrap back to the minimum. The config field shows the ID only
while REQUESTED: 0 (STOP) in STOP *and* START, 1 (DONE) in DONE (QEMU zero-fills the config and
has no START branch).

Rules: this module knows no queues and no memory; the device feeds it events and asks
:attr:`FreePageHint.accepting` before recording hints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from protocol.balloon import CMD_ID_MIN, CommandId
from protocol.errors import UsageError

__all__ = [
    "CMD_ID_MAX",
    "CONFIG_VALUE",
    "TRANSITIONS",
    "FreePageHint",
    "HintEvent",
    "HintState",
    "HintTransition",
    "next_cmd_id",
]

CMD_ID_MAX = 0xFFFF_FFFF
"""The last command ID before QEMU wraps back to CMD_ID_MIN (``UINT_MAX``)."""


class HintState(IntEnum):
    """QEMU ``FREE_PAGE_HINT_S_*`` (the values are migrated, so they are kept)."""

    STOP = 0
    REQUESTED = 1
    START = 2
    DONE = 3


class HintEvent(Enum):
    """What moves the machine: three host verbs and the two kinds of guest command IDs."""

    HOST_START = "host-start"
    HOST_STOP = "host-stop"
    HOST_DONE = "host-done"
    GUEST_CURRENT_ID = "guest-current-id"
    """An out-buffer holding the current command ID."""
    GUEST_OTHER_ID = "guest-other-id"
    """An out-buffer holding anything else (STOP, DONE, a stale ID)."""


@dataclass(frozen=True, slots=True)
class HintTransition:
    """Result of one event: the new state, and whether the driver must get a config change."""

    old: HintState
    new: HintState
    notify: bool


S, E = HintState, HintEvent

TRANSITIONS: dict[tuple[HintState, HintEvent], tuple[HintState, bool]] = {
    # host: start always opens a new round (the ID changes even when already REQUESTED)
    **{(s, E.HOST_START): (S.REQUESTED, True) for s in S},
    # host: stop and done notify only when they change the state (QEMU checks first)
    **{(s, E.HOST_STOP): (S.STOP, s is not S.STOP) for s in S},
    **{(s, E.HOST_DONE): (S.DONE, s is not S.DONE) for s in S},
    # guest: the current ID starts a requested round; any ID ends a started one
    (S.STOP, E.GUEST_CURRENT_ID): (S.STOP, False),
    (S.REQUESTED, E.GUEST_CURRENT_ID): (S.START, False),
    (S.START, E.GUEST_CURRENT_ID): (S.STOP, False),
    (S.DONE, E.GUEST_CURRENT_ID): (S.DONE, False),
    (S.STOP, E.GUEST_OTHER_ID): (S.STOP, False),
    (S.REQUESTED, E.GUEST_OTHER_ID): (S.REQUESTED, False),
    (S.START, E.GUEST_OTHER_ID): (S.STOP, False),
    (S.DONE, E.GUEST_OTHER_ID): (S.DONE, False),
}
"""``(state, event) -> (new state, notify the driver)``: every pair is defined."""

CONFIG_VALUE: dict[HintState, int | None] = {
    S.STOP: CommandId.STOP,
    S.REQUESTED: None,  # the current command ID
    S.START: CommandId.STOP,  # QEMU has no START branch: the zeroed field reads 0
    S.DONE: CommandId.DONE,
}
"""What ``free_page_hint_cmd_id`` reads in each state (None: the current ID)."""

del S, E


def next_cmd_id(cmd_id: int) -> int:
    """The command ID after ``cmd_id``, wrapping from 0xffffffff back to CMD_ID_MIN."""
    return CMD_ID_MIN if cmd_id >= CMD_ID_MAX else cmd_id + 1


class FreePageHint:
    """The device's hinting state: ``state`` and ``cmd_id``, moved only by :meth:`apply`.

    Starts in STOP with ``cmd_id`` = CMD_ID_MIN, as QEMU's instance_init leaves it.
    """

    __slots__ = ("state", "cmd_id")

    def __init__(self, state: HintState = HintState.STOP, cmd_id: int = CMD_ID_MIN) -> None:
        self.state = state
        self.cmd_id = cmd_id

    def apply(self, event: HintEvent) -> HintTransition:
        """Move by ``event`` using :data:`TRANSITIONS`; the state is unchanged on error."""
        try:
            new, notify = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise UsageError(f"no hinting transition from {self.state.name} on {event}") from None
        old, self.state = self.state, new
        return HintTransition(old, new, notify)

    # ---- host verbs ---------------------------------------------------------------------
    def start(self) -> HintTransition:
        """Open a new round: the next command ID, state REQUESTED (QEMU free_page_start)."""
        self.cmd_id = next_cmd_id(self.cmd_id)
        return self.apply(HintEvent.HOST_START)

    def stop(self) -> HintTransition:
        """Stop hinting (QEMU free_page_stop: before a dirty-bitmap sync, on reset)."""
        return self.apply(HintEvent.HOST_STOP)

    def done(self) -> HintTransition:
        """Hinting is over; the guest may reuse hinted pages (QEMU free_page_done)."""
        return self.apply(HintEvent.HOST_DONE)

    # ---- guest input ----------------------------------------------------------------------
    def guest_cmd_id(self, cmd_id: int) -> HintTransition:
        """The guest sent ``cmd_id`` in a command-ID out-buffer."""
        current = cmd_id == self.cmd_id
        return self.apply(HintEvent.GUEST_CURRENT_ID if current else HintEvent.GUEST_OTHER_ID)

    # ---- views ----------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """Whether hinted ranges count now (only in START, rule BL-17)."""
        return self.state is HintState.START

    @property
    def config_value(self) -> int:
        """The ``free_page_hint_cmd_id`` config field as QEMU exposes it."""
        value = CONFIG_VALUE[self.state]
        return self.cmd_id if value is None else int(value)

    def __repr__(self) -> str:
        return f"FreePageHint({self.state.name}, cmd_id={self.cmd_id:#x})"
