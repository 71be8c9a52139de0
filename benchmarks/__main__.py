"""``python -m benchmarks [NAME ...] [--json]``: see :mod:`benchmarks.harness`."""

from __future__ import annotations

from benchmarks.harness import main

raise SystemExit(main())
