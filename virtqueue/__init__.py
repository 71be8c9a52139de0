"""Guest memory and the split virtqueue, both ends (virtio spec §2.7).

:mod:`virtqueue.memory` is guest-physical RAM (a real, sparse memfd); the driver end
(:mod:`virtqueue.driver`, Linux ``virtio_ring.c`` names) adds chains and reaps used buffers, the
device end (:mod:`virtqueue.device`, rust-vmm names) pops validated chains and pushes used ones.
Around them: :mod:`virtqueue.chain` (what a pop returns), :mod:`virtqueue.walk` (the descriptor
rules), :mod:`virtqueue.policy` (what a violation does), :mod:`virtqueue.notify` (notification
suppression), :mod:`virtqueue.layout` (where the rings go), :mod:`virtqueue.events` (the trace).
"""

from virtqueue.chain import DescriptorChain, Segment
from virtqueue.device import DeviceQueue
from virtqueue.driver import DriverQueue, QueueBroken, QueueFull
from virtqueue.layout import is_queue_size, legacy_layout, split_layout
from virtqueue.memory import GuestMemory, Memory, MemoryRegion
from virtqueue.notify import interrupt_needed, kick_needed, vring_need_event
from virtqueue.policy import ErrorPolicy

__all__ = [
    "DescriptorChain",
    "DeviceQueue",
    "DriverQueue",
    "ErrorPolicy",
    "GuestMemory",
    "Memory",
    "MemoryRegion",
    "QueueBroken",
    "QueueFull",
    "Segment",
    "interrupt_needed",
    "is_queue_size",
    "kick_needed",
    "legacy_layout",
    "split_layout",
    "vring_need_event",
]
