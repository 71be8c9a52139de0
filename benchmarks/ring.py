"""Device-end split ring throughput: pop + validate + push, in descriptors per second.

The descriptor table is filled once with ``N / L`` chains of ``L`` descriptors (half readable,
half writable; one readable for L = 1), direct or through one indirect table per chain, and the
avail ring slots name those heads in order. Each round the "driver" only moves ``avail.idx`` on
by one full set of chains; the device pops every chain (full validation: avail idx, head, every
descriptor's length, RAM bounds, order, links, indirect table) and pushes it used. Events are
off, one core; each figure is per second of CPU time, the best of several short runs.

The same loop is written in C over the Linux UAPI structs (``benchmarks/ring_ref.c``, compiled
with ``gcc -O2`` into a temporary directory) to show what the layout costs without Python; the
ratio row is Python / C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from protocol.split_ring import DescFlags
from virtqueue import events
from virtqueue.device import DeviceQueue
from virtqueue.layout import DESC, U16, split_layout
from virtqueue.memory import GuestMemory

__all__ = ["SHAPES", "measure_c", "measure_python", "run"]

QUEUE_SIZE = 256
RAM = 4 << 20
DATA = 1 << 20
TABLES = 3 << 20
SEG_LEN = 512
SHAPES = ((1, False, 1e6), (16, False, 2.5e6), (1, True, None), (16, True, None))
"""(descriptors per chain, indirect, target in descriptors/s)."""


def _build(memory: GuestMemory, chain_len: int, indirect: bool) -> tuple[int, int, int, int]:
    """Fill the rings for the benchmark; returns (desc, avail, used, chains)."""
    desc, avail, used, _ = split_layout(0, QUEUE_SIZE)
    step = 1 if indirect else chain_len
    chains = QUEUE_SIZE // step
    readable = 1 if chain_len == 1 else chain_len // 2
    for c in range(chains):
        entries = []
        for j in range(chain_len):
            flags = 0 if j < readable else int(DescFlags.WRITE)
            nxt = j + 1
            if j + 1 < chain_len:
                flags |= int(DescFlags.NEXT)
            else:
                nxt = 0
            addr = DATA + (c * chain_len + j) * SEG_LEN
            entries.append((addr, SEG_LEN, flags, nxt if indirect else c * step + nxt))
        if indirect:
            table = TABLES + c * 16 * chain_len
            memory.write(table, b"".join(DESC.pack(*e) for e in entries))
            memory.write(desc + 16 * c, DESC.pack(table, 16 * chain_len,
                                                   int(DescFlags.INDIRECT), 0))
        else:
            memory.write(desc + 16 * c * step, b"".join(DESC.pack(*e) for e in entries))
    for slot in range(QUEUE_SIZE):
        memory.write(avail + 4 + 2 * slot, U16.pack((slot % chains) * step))
    return desc, avail, used, chains


def measure_python(chain_len: int, indirect: bool, seconds: float = 0.8,
                   repeats: int = 8) -> float:
    """Descriptors per second through DeviceQueue.pop/push for one chain shape.

    Rates are per second of this process's CPU time (``time.process_time``), the best of
    ``repeats`` runs of ``seconds / repeats`` each (like ``timeit``): on a shared machine CPU
    time leaves out the time other processes held the core, and the best run is the one their
    cache traffic disturbed least.
    """
    with GuestMemory.create(RAM) as memory, events.disabled():
        desc, avail, used, chains = _build(memory, chain_len, indirect)
        q = DeviceQueue(index=0, size=QUEUE_SIZE, desc=desc, avail=avail, used=used,
                        memory=memory, indirect=indirect)
        idx_view = memory.view(avail + 2, 2)
        pop, push = q.pop, q.push
        idx = 0
        best = 0.0
        for _ in range(repeats):
            rounds = 0
            start = time.process_time()
            deadline = start + seconds / repeats
            while True:
                idx = (idx + chains) & 0xFFFF
                U16.pack_into(idx_view, 0, idx)
                while (chain := pop()) is not None:
                    push(chain.head, 0)
                rounds += 1
                if rounds % 16 == 0:
                    now = time.process_time()
                    if now >= deadline:
                        break
            best = max(best, rounds * chains * chain_len / (now - start))
        del chain, pop, push, q
        idx_view.release()
        return best


def measure_c(chain_len: int, indirect: bool, seconds: float = 0.6) -> float | None:
    """The same loop in C, best of three runs (None when no C compiler is installed)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    src = Path(__file__).with_name("ring_ref.c")
    with tempfile.TemporaryDirectory(prefix="vballoon-ring-") as tmp:
        exe = os.path.join(tmp, "ring_ref")
        subprocess.run([gcc, "-O2", "-o", exe, str(src)], check=True, capture_output=True)
        rates = []
        for _ in range(3):  # best of three, as for the Python loop
            out = subprocess.run([exe, str(chain_len), str(int(indirect)), str(seconds / 3)],
                                 check=True, capture_output=True, text=True).stdout
            rates.append(float(out.split()[0]))
    return max(rates)


def run() -> list[dict]:
    """Rows: Python and C descriptors/s per chain shape, and their ratio."""
    rows: list[dict] = []
    for chain_len, indirect, target in SHAPES:
        shape = f"{chain_len}desc_{'indirect' if indirect else 'direct'}"
        py = measure_python(chain_len, indirect)
        try:
            c = measure_c(chain_len, indirect)
        except (OSError, subprocess.CalledProcessError):
            c = None
        rows.append({"name": f"device_{shape}_desc_per_s", "value": round(py), "unit": "desc/s",
                     "target": None if target is None else f">= {int(target)}"})
        rows.append({"name": f"c_ref_{shape}_desc_per_s",
                     "value": None if c is None else round(c), "unit": "desc/s",
                     "target": None})
        rows.append({"name": f"python_over_c_{shape}",
                     "value": None if not c else round(py / c, 6), "unit": "ratio",
                     "target": None})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
