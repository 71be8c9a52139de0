"""The Linux-like guest: page allocator, free page walker, page reporting, hinting, driver.

Read bottom-up: :mod:`guest.mm` (the buddy allocator of Linux 6.1 ``mm/page_alloc.c``),
:mod:`guest.walker` (the restartable walk of the 2018 ``walk_free_mem_block`` thread),
:mod:`guest.reporting` (``mm/page_reporting.c``), :mod:`guest.hinting` (free page hinting's
state machine), :mod:`guest.workload` (allocation churn that writes real bytes), then the driver
side of the transport (:mod:`guest.virtio_mmio`, :mod:`guest.irq`) and the driver
(:mod:`guest.balloon`, ``drivers/virtio/virtio_balloon.c``); :mod:`guest.villain` is the same
driver end with fault injection, for grading devices.

The allocator, walker, reporting and hinting cores are sans-I/O (no trio, no sockets, no clock
of their own); trio appears only at the edge, in the driver's work items and interrupt lines.
"""
