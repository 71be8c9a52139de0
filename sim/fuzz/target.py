"""The fuzz target: run one decoded input through the device end and check everything.

:func:`fuzz_one` is what atheris calls and what a finding replays. It decodes the input
(:mod:`sim.fuzz.encoding`) and runs the case; any broken property raises :class:`FuzzFailure`
naming the check (``fuzz.exception``, ``fuzz.bounds``, ``fuzz.memory``, ``fuzz.oracle``,
``fuzz.expected``, ``fuzz.used``, ``fuzz.readonly``, ``fuzz.driver``). Checks on a layout:

* no exception but :class:`~protocol.errors.VballoonError` leaves the device end, and only the
  DriverViolation the reference model (:mod:`sim.fuzz.oracle`) predicts;
* every ``pop`` makes a bounded number of descriptor reads (:class:`StepCounter`);
* once built, the queue asks for no memory outside RAM (:class:`CheckingMemory`) and hands out
  only segments inside RAM, whose bytes read back through the checked memory;
* chains, the raised rule, used entries stored by ``pop``, ``next_avail`` and ``broken`` equal
  the model's; for builder layouts also the labelled rule and the exact chains and bytes;
* pushes land in the used ring in order (or are dropped on a broken queue), a second push of a
  head is refused (US-01), and nothing but the used ring was written (SPL-V-2).

Driver-mode inputs build valid chains with :class:`~virtqueue.driver.DriverQueue` and check that
every byte and token makes the round trip exactly.
"""

from __future__ import annotations

import traceback
from typing import Any

from protocol.errors import DeviceViolation, DriverViolation, VballoonError
from protocol.split_ring import USED_IDX, USED_RING, avail_size, desc_table_size, used_size
from sim.fuzz.encoding import BytesChoices, Case, decode
from sim.fuzz.memory import (
    CheckingMemory,
    FastReader,
    FuzzFailure,
    StepCounter,
    pop_step_bound,
)
from sim.fuzz.oracle import Expected, predict
from virtqueue.cases import MUTATIONS, Layout
from virtqueue.layout import USED_ELEM
from virtqueue.policy import ErrorPolicy
from virtqueue.strategies import build_arbitrary, build_near_valid, build_valid, feasible_kinds

__all__ = ["FuzzFailure", "Stats", "fuzz_one", "run_case", "run_layout"]


class Stats:
    """Counters over many runs (for the benchmark and the CLI's summary)."""

    def __init__(self) -> None:
        self.cases = 0
        self.pops = 0
        self.rejected = 0
        self.max_steps = 0


STATS = Stats()


def fuzz_one(data: bytes, policy: ErrorPolicy | str | None = None) -> None:
    """Decode ``data`` and run it; :class:`FuzzFailure` if any check fails."""
    try:
        case = decode(data, policy)
    except Exception as exc:  # noqa: BLE001 - the decoder must accept every input
        raise FuzzFailure("fuzz.exception", f"decoding raised {exc!r}") from exc
    run_case(case)


def run_case(case: Case) -> None:
    """Run a decoded case (see the module docstring)."""
    STATS.cases += 1
    if case.mode == "driver":
        from sim.fuzz.driver_program import run_driver_program

        run_driver_program(case.program)
        return
    layout = case.layout if case.mode == "raw" else _structured(case)
    if layout is not None:
        run_layout(layout, case.policy)


def _structured(case: Case) -> Layout | None:
    ch = BytesChoices(case.program)
    size = 1 << ch.integer(0, 8)
    try:
        if case.kind == "valid":
            return build_valid(ch, size=size)
        if case.kind == "arbitrary":
            return build_arbitrary(ch, size=size)
        if case.kind in MUTATIONS and case.kind in feasible_kinds(size):
            return build_near_valid(ch, size=size, kind=case.kind)
    except VballoonError:
        return None  # the decisions asked for more than the arena holds: nothing to test
    return None


def _fail(check: str, message: str, exc: BaseException | None = None) -> FuzzFailure:
    if exc is not None and not isinstance(exc, FuzzFailure):
        tb = "".join(traceback.format_exception(exc)[-3:]).strip()
        message = f"{message}: {exc!r}\n{tb}"
    return FuzzFailure(check, message)


def _unprotected(gpa: int, n: int, used: int, used_n: int) -> list[tuple[int, int]]:
    """[gpa, gpa+n) minus the used ring area, as (start, length) pieces."""
    pieces = []
    if gpa < used:
        pieces.append((gpa, min(n, used - gpa)))
    end, used_end = gpa + n, used + used_n
    if end > used_end:
        lo = max(gpa, used_end)
        pieces.append((lo, end - lo))
    return [(a, m) for a, m in pieces if m > 0]


def run_layout(layout: Layout, policy: ErrorPolicy | str = ErrorPolicy.NEEDS_RESET) -> None:
    """Every check of the module docstring on one layout."""
    policy = ErrorPolicy(policy)
    memory = layout.geometry.memory()
    reader = FastReader(memory)
    try:
        _run(layout, policy, memory, reader)
    finally:
        reader.release()
        memory.close()


def _run(layout: Layout, policy: ErrorPolicy, memory: Any, reader: FastReader) -> None:
    g, n = layout.geometry, layout.size
    layout.write_into(reader, strict=False)
    oracle = predict(reader, geometry=g, size=n, desc=layout.desc, avail=layout.avail,
                     used=layout.used, start=layout.start, indirect=layout.indirect,
                     policy=policy)
    proxy = CheckingMemory(memory)
    try:
        queue = layout.device_queue(proxy, policy)
    except DriverViolation as v:
        if v.rule_id != oracle.construct_rule:
            raise _fail("fuzz.oracle", f"construction raised {v.rule_id}, the model says "
                        f"{oracle.construct_rule}") from None
        return
    except Exception as exc:  # noqa: BLE001 - anything else is a finding
        raise _fail("fuzz.exception", "DeviceQueue() raised", exc) from exc
    if oracle.construct_rule is not None:
        raise _fail("fuzz.oracle", f"construction accepted a queue the model rejects with "
                    f"{oracle.construct_rule}")
    protected = [(layout.desc, desc_table_size(n)), (layout.avail, avail_size(n)),
                 *((gpa, len(blob)) for gpa, blob in layout.writes)]
    snapshot = [(a, m, reader.read(a, m)) for gpa, size in protected
                for a, m in _unprotected(gpa, size, layout.used, used_size(n))]
    proxy.strict = True
    chains, raised = _pop_all(queue, reader, n)
    _compare_model(queue, reader, layout, oracle, chains, raised)
    _check_chains(proxy, chains)
    if layout.expected is not None:
        _compare_expected(proxy, layout, policy, chains, raised)
    _push_all(queue, reader, layout, chains)
    for a, m, before in snapshot:
        if reader.read(a, m) != before:
            raise _fail("fuzz.readonly", f"the device wrote [{a:#x}, +{m:#x}), which is not "
                        "the used ring (SPL-V-2)")


def _pop_all(queue: Any, memory: Any, n: int) -> tuple[list, DriverViolation | None]:
    counter = StepCounter()
    chains: list = []
    for _ in range(n + 2):
        idx = memory.read_u16(queue.avail + 2)
        counter.bound = pop_step_bound(n, (idx - queue.next_avail) & 0xFFFF)
        try:
            with counter:
                chain = queue.pop()
        except DriverViolation as v:
            STATS.rejected += 1
            return chains, v
        except FuzzFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _fail("fuzz.exception", "pop() raised", exc) from exc
        finally:
            STATS.max_steps = max(STATS.max_steps, counter.steps)
        if chain is None:
            return chains, None
        STATS.pops += 1
        chains.append(chain)
    raise _fail("fuzz.bounds", f"pop() returned more than {n} chains without a push")


def _compare_model(queue: Any, memory: Any, layout: Layout, oracle: Expected, chains: list,
                   raised: DriverViolation | None) -> None:
    got = [(c.head, tuple(map(tuple, c.readable)), tuple(map(tuple, c.writable)), c.indirect,
            None if c.violation is None else c.violation.rule_id) for c in chains]
    want = [(p.head, p.readable, p.writable, p.indirect, p.violation) for p in oracle.pops]
    if got != want:
        raise _fail("fuzz.oracle", f"pops differ from the model:\n  device {got}\n  model  {want}")
    rule = None if raised is None else raised.rule_id
    if rule != oracle.raised:
        raise _fail("fuzz.oracle", f"pop raised {rule}, the model says {oracle.raised}")
    start, n = layout.start, layout.size
    stored = [USED_ELEM.unpack(memory.read(layout.used + USED_RING + 8 * ((start + k) % n), 8))
              for k in range((queue.next_used - start) & 0xFFFF)]
    if stored != oracle.used or queue.next_used != (start + len(oracle.used)) & 0xFFFF:
        raise _fail("fuzz.oracle", f"used entries stored by pop {stored} (next_used "
                    f"{queue.next_used}), the model says {oracle.used}")
    if (queue.next_avail, queue.broken) != (oracle.next_avail, oracle.broken):
        raise _fail("fuzz.oracle", f"next_avail/broken {queue.next_avail}/{queue.broken}, the "
                    f"model says {oracle.next_avail}/{oracle.broken}")


def _check_chains(proxy: CheckingMemory, chains: list) -> None:
    for c in chains:
        if c.readable_len != sum(s.len for s in c.readable) or c.writable_len != sum(
                s.len for s in c.writable):
            raise _fail("fuzz.oracle", f"chain {c.head}: lengths do not add up: {c}")
        for s in c.segments:
            if s.len <= 0 or not proxy.contains(s.addr, s.len):
                raise _fail("fuzz.memory", f"chain {c.head} has segment {s} outside RAM")
        if len(c.read(proxy)) != c.readable_len:
            raise _fail("fuzz.memory", f"chain {c.head}: read() returned a short read")


def _compare_expected(proxy: CheckingMemory, layout: Layout, policy: ErrorPolicy, chains: list,
                      raised: DriverViolation | None) -> None:
    """Builder layouts: the exact chains (valid), or the labelled rule after the prefix."""
    expected = layout.expected
    if layout.rule is not None and policy is not ErrorPolicy.NEEDS_RESET:
        return  # the label speaks of needs-reset; the model covers the other policies
    rule = None if raised is None else raised.rule_id
    if rule != layout.rule:
        raise _fail("fuzz.expected", f"{layout.label}: device raised {rule}, the layout says "
                    f"{layout.rule}")
    if len(chains) != len(expected):
        raise _fail("fuzz.expected", f"{layout.label}: {len(chains)} chains, expected "
                    f"{len(expected)}")
    for c, e in zip(chains, expected, strict=True):
        if (c.head, tuple(map(tuple, c.readable)), tuple(map(tuple, c.writable)),
                c.indirect) != (e.head, e.readable, e.writable, e.indirect):
            raise _fail("fuzz.expected", f"chain {c.head} differs from {e}")
        if c.read(proxy) != e.data:
            raise _fail("fuzz.expected", f"chain {c.head}: readable bytes differ")


def _push_all(queue: Any, memory: Any, layout: Layout, chains: list) -> None:
    """Push every popped chain (reverse order), check the used ring, then a double push."""
    used, n = layout.used, layout.size
    before = queue.next_used
    order = list(reversed(chains))
    for k, c in enumerate(order):
        written = min(c.writable_len, k * 7)
        try:
            queue.push(c.head, written)
        except Exception as exc:  # noqa: BLE001
            raise _fail("fuzz.used", f"push({c.head}, {written}) raised", exc) from exc
    if queue.broken:
        if queue.next_used != before:
            raise _fail("fuzz.used", "a broken queue stored used entries")
        return
    for k, c in enumerate(order):
        slot = used + USED_RING + 8 * ((before + k) % n)
        if USED_ELEM.unpack(memory.read(slot, 8)) != (c.head, min(c.writable_len, k * 7)):
            raise _fail("fuzz.used", f"used slot {(before + k) % n} does not hold chain "
                        f"{c.head}")
    if queue.next_used != (before + len(order)) & 0xFFFF or queue.in_flight:
        raise _fail("fuzz.used", "next_used or the in-flight count is wrong after the pushes")
    wrote_idx = order or before != layout.start  # else the ring holds the input's own bytes
    if wrote_idx and memory.read_u16(used + USED_IDX) != queue.next_used:
        raise _fail("fuzz.used", "used idx in memory is not the device's next_used")
    if order:
        try:
            queue.push(order[0].head, 0)
        except DeviceViolation as v:
            if v.rule_id != "US-01":
                raise _fail("fuzz.used", f"a double push raised {v.rule_id}, not US-01") from v
        else:
            raise _fail("fuzz.used", "a head pushed twice was accepted")
    try:
        queue.needs_interrupt()
    except Exception as exc:  # noqa: BLE001
        raise _fail("fuzz.exception", "needs_interrupt() raised", exc) from exc
