"""Guest memory and the split virtqueue, both ends (virtio spec §2.7).

:mod:`virtqueue.memory` is guest-physical RAM (a real, sparse memfd); the driver end
(:mod:`virtqueue.driver`) adds chains and reaps used buffers, the device end
(:mod:`virtqueue.device`) pops validated chains and pushes used ones.
"""
