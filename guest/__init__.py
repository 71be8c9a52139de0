"""The Linux-like guest: page allocator, free page walker, page reporting, hinting, driver.

Read bottom-up: :mod:`guest.mm` (the buddy allocator of Linux 6.1 ``mm/page_alloc.c``),
:mod:`guest.walker` (the restartable walk of the 2018 ``walk_free_mem_block`` thread),
:mod:`guest.reporting` (``mm/page_reporting.c``), :mod:`guest.workload` (allocation churn that
writes real bytes). Everything here is sans-I/O: no trio, no sockets, no clock of its own.
"""
