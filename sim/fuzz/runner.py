"""The libFuzzer process: ``python -m sim.fuzz.runner [--policy P] --findings DIR -- ARGS``.

atheris runs libFuzzer inside this process and never returns (libFuzzer exits when its time is
up), so ``vballoon fuzz`` starts this module as a child and reads libFuzzer's final statistics
from its stderr. The device end and the harness are imported inside
``atheris.instrument_imports`` so that libFuzzer sees their Python branch coverage; nothing of
ours may be imported before that (hence the local imports).

Every input goes through :func:`sim.fuzz.target.fuzz_one`. A failing input is saved by
:class:`sim.fuzz.findings.FindingStore` and the campaign goes on, so one run reports every kind
of failure it meets instead of stopping at the first. ARGS are libFuzzer's: corpus directories
and ``-flag=value`` options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

INSTRUMENTED = ["virtqueue", "protocol", "sim.fuzz"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.fuzz.runner")
    parser.add_argument("--policy", choices=["needs-reset", "truncate", "skip"])
    parser.add_argument("--findings", required=True)
    parser.add_argument("libfuzzer", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    libfuzzer = [a for a in args.libfuzzer if a != "--"]

    import atheris
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with atheris.instrument_imports(include=INSTRUMENTED):
        from sim.fuzz.findings import FindingStore
        from sim.fuzz.target import fuzz_one
        from virtqueue import events

    events.set_enabled(False)
    store = FindingStore(args.findings)
    policy = args.policy

    def test_one_input(data: bytes) -> None:
        try:
            fuzz_one(data, policy)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding; go on fuzzing
            path = store.add(data, policy, exc)
            if path is not None:
                print(f"vballoon-fuzz: finding {path.name}: {str(exc).splitlines()[0]}",
                      file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], *libfuzzer], test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main())
