"""Wire facts of virtio and the virtio-balloon device: constants and ``construct`` layouts only.

Read bottom-up: :mod:`protocol.features` and :mod:`protocol.status` (virtio spec §2.1-2.2, §6),
:mod:`protocol.split_ring` and :mod:`protocol.packed_ring` (§2.7-2.8), :mod:`protocol.balloon`
(§5.5), :mod:`protocol.mmio` (§4.2), :mod:`protocol.vhost_user` (QEMU's vhost-user document).
:mod:`protocol.errors` and :mod:`protocol.rules` give every rejection a stable rule ID.
This package imports nothing else of vballoon.
"""
