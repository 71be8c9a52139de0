"""What the device end does after the driver breaks a ring rule: the three peers' answers.

Every violation the device end finds is a :class:`~protocol.errors.DriverViolation` with a rule
ID from :mod:`protocol.rules`, the spec section and the offending values, and it is always logged
as a ``vq.reject`` event (rule_id, section, values, policy). What happens *next* is the device's
choice, because the spec leaves it open (§2.1.2: the device MAY set DEVICE_NEEDS_RESET); real
devices differ, and a conformance tester wants to reproduce each of them:

``needs-reset`` (QEMU ``virtio_error``)
    :meth:`DeviceQueue.pop` raises the violation once, the queue becomes ``broken`` and ``pop``
    returns ``None`` until :meth:`DeviceQueue.reset`. Nothing is consumed: ``next_avail`` still
    points at the offending avail entry, which a snapshot or a teaching trace can show. Pushes on
    a broken queue are dropped (QEMU ``virtqueue_fill`` does the same). The owner of the queue
    (the device) is expected to set DEVICE_NEEDS_RESET and raise a config interrupt.

``truncate`` (rust-vmm ``DescriptorChain`` iterator)
    The chain ends just before the violation: the descriptors validated before it are returned
    as a normal, in-flight chain whose ``violation`` field holds the error. A bad *link* (next out
    of range, a loop) keeps the descriptor that carries it, since its buffer is valid; a bad
    *buffer* or indirect table is left out. If nothing valid came before (the first descriptor is
    bad), the chain is handled as under ``skip``.

``skip`` (Cloud Hypervisor)
    The chain is returned used at once with length 0 (its head is valid and not in flight, so the
    driver gets its buffer back), and ``pop`` goes on to the next avail entry in the same call.

Violations of the avail ring itself, where there is no chain to cut, are handled the same way
under ``truncate`` and ``skip``:

* AV-03 (head >= queue size) and AV-04 (head already in flight): the avail entry is consumed and
  nothing is pushed (no valid head to return; returning an in-flight head would complete the
  wrong buffer), then ``pop`` goes on to the next entry.
* AV-01 (avail idx more than the queue size ahead of ``next_avail``, which includes moving
  backwards): the bogus idx is ignored and nothing is consumed; ``pop`` returns ``None`` and logs
  one ``vq.reject`` per distinct bogus value, until the driver writes a sane idx again.

Bounds: every ``pop`` visits at most ``min(pending, N)`` avail entries and every chain walk at
most N + 2 descriptors (N buffers, one INDIRECT descriptor, the one that overflows), whatever the
guest wrote, so a pop is O(N^2) in the worst case under ``skip`` and O(N) otherwise.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorPolicy"]


class ErrorPolicy(StrEnum):
    """The device end's reaction to a driver violation (see the module docstring)."""

    NEEDS_RESET = "needs-reset"
    """QEMU: raise once, the queue is broken until reset."""
    TRUNCATE = "truncate"
    """rust-vmm: end the chain before the violation, return what came before."""
    SKIP = "skip"
    """Cloud Hypervisor: return the chain used with length 0, go on to the next one."""
