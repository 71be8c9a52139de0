"""Fuzz findings: an input that broke a check, saved so that it replays as a test.

A finding is a JSON file ``finding-<sha1 of the input>.json`` holding the input (base64), the
policy the run fixed (or null: the input's own byte), the check that failed and its message, and
a description of the decoded case. :func:`replay` runs the input again and raises the
``sim.fuzz.memory.FuzzFailure`` if the bug is still there; tests/findings/ holds the
findings that were fixed, replayed by tests/virtqueue/test_findings_replay.py. Raw libFuzzer
artifacts (``crash-*``) replay too.

:class:`FindingStore` keeps at most ``per_signature`` findings per failure signature (the check
and the first line of the message with numbers blanked), so a campaign that hits one bug a
thousand times writes a few files, not a thousand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["FindingStore", "is_finding", "load", "replay", "signature"]


def signature(failure: BaseException) -> str:
    """The failure's kind: check and first message line, numbers replaced by ``#``."""
    first = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    return re.sub(r"0x[0-9a-f]+|\d+", "#", first)[:200]


def load(path: str | Path) -> tuple[bytes, str | None]:
    """The input and fixed policy of a finding file (JSON or a raw libFuzzer artifact)."""
    p = Path(path)
    raw = p.read_bytes()
    if p.suffix == ".json":
        doc = json.loads(raw)
        return base64.b64decode(doc["input"]), doc.get("policy")
    return raw, None


def replay(path: str | Path) -> None:
    """Run a finding again; raises ``FuzzFailure`` if it still fails."""
    from sim.fuzz.target import fuzz_one

    data, policy = load(path)
    fuzz_one(data, policy)


class FindingStore:
    """Writes findings into ``directory`` (created on the first one)."""

    def __init__(self, directory: str | Path, per_signature: int = 3) -> None:
        self.directory = Path(directory)
        self.per_signature = per_signature
        self.seen: Counter[str] = Counter()
        self.written: list[Path] = []

    def add(self, data: bytes, policy: str | None, failure: BaseException) -> Path | None:
        """Save a failing input unless its signature has enough examples; returns the path."""
        sig = signature(failure)
        self.seen[sig] += 1
        if self.seen[sig] > self.per_signature:
            return None
        path = self.directory / f"finding-{hashlib.sha1(data).hexdigest()[:16]}.json"
        if path.exists():
            return None
        doc: dict[str, Any] = {
            "input": base64.b64encode(data).decode("ascii"),
            "policy": policy,
            "check": getattr(failure, "check", "harness.exception"),
            "signature": sig,
            "message": str(failure),
            "case": _describe(data, policy),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        self.written.append(path)
        return path


def _describe(data: bytes, policy: str | None) -> Any:
    from sim.fuzz.encoding import decode, describe

    try:
        return describe(decode(data, policy))
    except Exception as exc:  # noqa: BLE001 - a description is best effort
        return f"undecodable: {exc!r}"


def is_finding(path: Path) -> bool:
    """Whether ``path`` looks like a finding file (``finding-*.json`` or ``crash-*``)."""
    return path.is_file() and (path.name.startswith("finding-") and path.suffix == ".json"
                               or path.name.startswith("crash-"))

