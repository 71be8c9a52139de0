"""The teaching view: watch a free block travel from the guest's free list, through a
descriptor, to the host's record, with the reason for every step.

Read in this order: :mod:`sim.teach.capture` (record structlog events, with probes),
:mod:`sim.teach.snapshots` (the probes: ring copies read with ``peek``, free lists, device
records, the traced walker), :mod:`sim.teach.scenarios` (the small machines ``vballoon trace``
runs; :mod:`sim.teach.peers` runs them against QEMU), :mod:`sim.teach.narrate` with
:mod:`sim.teach.lines` and :mod:`sim.teach.why` (events to steps), :mod:`sim.teach.model`
(steps as data), :mod:`sim.teach.render` (steps as rich screens); and for ``vballoon plot``:
:mod:`sim.teach.timeline` (samples of guest memory over time) and :mod:`sim.teach.plots`
(matplotlib figures).
"""
