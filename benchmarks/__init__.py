"""Benchmarks: measurements of vballoon against stated targets, run with ``python -m benchmarks``.

A benchmark is a module ``benchmarks/<name>.py`` listed in :data:`benchmarks.harness.REGISTRY`
that exposes ``run() -> list[dict]``. Each dict is one measured row:

``name`` (str)
    What was measured, e.g. ``"add_pop_chains_per_s"``; the harness prefixes ``"<benchmark>."``
    unless the name already starts with it.
``value`` (int | float | None)
    The measurement; ``None`` when it could not be taken.
``unit`` (str)
    Unit of ``value`` (``"ops/s"``, ``"ms"``, ``"bytes"``); ``""`` for a plain count.
``target`` (str | None)
    Optional: the goal as an operator and a number in ``unit``, e.g. ``">= 1e6"``, ``"<= 2.5"``,
    ``"== 0"``; ``None`` when the row is informational.
``met`` (bool | None)
    Optional: whether the target is met, for targets a comparison cannot express; by default the
    harness evaluates ``target`` against ``value``.

Benchmarks measure; they do not assert. A missed target is reported, never an error.
"""
