"""The fuzz corpus seeds: layouts the unit tests use, encoded as fuzz inputs.

Seeds are the builders' layouts (:mod:`virtqueue.strategies`) drawn from fixed ``random`` seeds
(every size, valid, each near-valid mutation, arbitrary) plus a few hand-built classics
(:func:`classic_layouts`: chains of exactly N, direct-then-indirect, WRITE on an INDIRECT
descriptor, a two-descriptor loop, a buffer ending at the last byte of RAM), all in the ``raw``
encoding so libFuzzer mutates real rings byte by byte; plus a few ``structured`` and ``driver``
inputs. The list is deterministic: the same files every time.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from protocol.errors import VballoonError
from sim.fuzz.encoding import encode_driver, encode_layout, encode_structured
from virtqueue.cases import MUTATIONS, ExpectedChain, Geometry, Layout, RandomChoices
from virtqueue.layout import DESC, split_layout
from virtqueue.policy import ErrorPolicy
from virtqueue.strategies import build_arbitrary, build_near_valid, build_valid, feasible_kinds

__all__ = ["classic_layouts", "seed_inputs", "write_corpus"]

_SIZES = (1, 2, 4, 8, 16, 64, 256)
_NEXT, _WRITE, _INDIRECT = 1, 2, 4


def _layout(label: str, size: int, descs: dict[int, tuple[int, int, int, int]],
            heads: list[int], writes: tuple[tuple[int, bytes], ...] = (),
            expected: tuple[ExpectedChain, ...] = (), rule: str | None = None,
            ram: int = 1 << 20) -> Layout:
    desc, avail, used, _ = split_layout(0, size)
    table = b"".join(DESC.pack(*descs.get(i, (0, 0, 0, 0))) for i in range(size))
    return Layout(size=size, geometry=Geometry(ram=((0, ram),)), desc=desc, avail=avail,
                  used=used, table=table, start=0, entries=tuple(heads), avail_idx=len(heads),
                  writes=writes, indirect=True, expected=expected, rule=rule, label=label)


def classic_layouts() -> list[Layout]:
    """Hand-built layouts of the classic cases (each with its expected outcome)."""
    buf, data = 0x10000, bytes(range(32))
    full = {i: (buf + 32 * i, 32, _NEXT, i + 1) for i in range(7)} | {7: (buf + 224, 32, 0, 0)}
    table = b"".join(DESC.pack(buf + 0x100 + 16 * k, 16, _WRITE | (_NEXT if k < 2 else 0), k + 1)
                     for k in range(3))
    end = (1 << 20) - 8
    return [
        _layout("chain_of_exactly_n", 8, full, [0], ((buf, bytes(256)),),
                (ExpectedChain(0, tuple((buf + 32 * i, 32) for i in range(8)), (), bytes(256),
                               False, 0),)),
        _layout("direct_then_indirect", 4,
                {0: (buf, 32, _NEXT, 2), 2: (0x20000, 48, _INDIRECT | _WRITE, 0)}, [0],
                ((buf, data), (0x20000, table)),
                (ExpectedChain(0, ((buf, 32),), tuple((buf + 0x100 + 16 * k, 16)
                                                      for k in range(3)), data, True, 0),)),
        _layout("two_descriptor_loop", 4, {1: (buf, 32, _NEXT, 3), 3: (buf + 32, 32, _NEXT, 1)},
                [1], rule="DC-02"),
        _layout("buffer_at_ram_end", 2, {0: (end, 8, 0, 0)}, [0], ((end, data[:8]),),
                (ExpectedChain(0, ((end, 8),), (), data[:8], False, 0),)),
        _layout("buffer_past_ram_end", 2, {0: (end, 9, 0, 0)}, [0], rule="DC-07"),
        _layout("indirect_table_of_24_bytes", 2, {0: (0x20000, 24, _INDIRECT, 0)}, [0],
                rule="IN-03"),
    ]


def seed_inputs(per_kind: int = 2) -> list[tuple[str, bytes]]:
    """(name, input) pairs: see the module docstring."""
    out: list[tuple[str, bytes]] = []
    policies = list(ErrorPolicy)
    for i, layout in enumerate(classic_layouts()):
        out.append((f"classic-{layout.label}", encode_layout(layout, policies[i % 3])))
    for size in _SIZES:
        for n in range(per_kind):
            seed = f"{size}-{n}"
            layouts = [build_valid(RandomChoices(f"valid-{seed}"), size=size),
                       build_arbitrary(RandomChoices(f"arbitrary-{seed}"), size=size)]
            for kind in feasible_kinds(size):
                try:
                    layouts.append(build_near_valid(RandomChoices(f"{kind}-{seed}"), size=size,
                                                    kind=kind))
                except VballoonError:
                    continue  # does not fit the default arena at this size
            for k, layout in enumerate(layouts):
                out.append((f"raw-{layout.label}-{seed}", encode_layout(layout,
                                                                        policies[k % 3])))
    rng = random.Random(0)
    for kind in ("valid", *MUTATIONS, "arbitrary"):
        out.append((f"structured-{kind}", encode_structured(kind, rng.randbytes(256))))
    for n in range(4):
        out.append((f"driver-{n}", encode_driver(rng.randbytes(512))))
    return out


def write_corpus(directory: str | Path, per_kind: int = 2) -> int:
    """Write the seeds into ``directory`` (created) as ``seed-<name>-<hash>``; returns how many
    files were new."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    new = 0
    for name, data in seed_inputs(per_kind):
        target = path / f"seed-{name}-{hashlib.sha1(data).hexdigest()[:12]}"
        if not target.exists():
            target.write_bytes(data)
            new += 1
    return new
