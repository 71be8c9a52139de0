"""What a QEMU scenario found: checks that held or failed, and the evidence behind them.

A :class:`ScenarioResult` carries, besides its :class:`Check` list, everything a reader needs to
believe them: the used buffers per queue (the driver's avail index, QEMU's used index, what the
driver reaped), the chains the driver published (from :class:`~sim.qemu.observe.ChainTap`), the
QMP commands sent and QEMU's answers (:class:`QmpExchange`), QEMU's resident anonymous memory
at named moments, and other measured facts. :meth:`ScenarioResult.to_dict` is the JSON form
``vballoon qemu --json`` prints.

:class:`Recorder` is how scenarios fill one in: ``await rec.qmp(qemu, "query-balloon")`` runs
the command and keeps the answer, ``rec.rss(qemu, "after inflate")`` reads ``RssAnon``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sim.qemu.process import QemuProcess

__all__ = ["Check", "QmpExchange", "Recorder", "ScenarioResult"]


@dataclass(frozen=True, slots=True)
class Check:
    """One claim about QEMU's device or our driver, and whether it held."""

    name: str
    held: bool
    detail: str
    """Expected and seen values, in words."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "held": self.held, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class QmpExchange:
    """One QMP command a scenario sent and QEMU's answer (``return`` value)."""

    variant: str
    command: str
    arguments: dict[str, Any]
    answer: Any
    at: float
    """Seconds since the scenario started."""

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "command": self.command, "arguments": self.arguments,
                "answer": self.answer, "at": round(self.at, 3)}


@dataclass(slots=True)
class ScenarioResult:
    """Checks and evidence of one scenario run (see module docstring)."""

    scenario: str
    checks: list[Check] = field(default_factory=list)
    queues: list[dict[str, Any]] = field(default_factory=list)
    """Per variant and queue: ``avail_idx``, ``used_idx`` (QEMU), ``reaped``, ``in_flight``,
    ``kicks``."""
    chains: list[dict[str, Any]] = field(default_factory=list)
    """Chains the driver published on tapped queues (entries, bytes, indirect)."""
    qmp: list[QmpExchange] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)
    """QEMU's ``RssAnon`` in bytes at named moments."""
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every check held (and there was at least one)."""
        return bool(self.checks) and all(c.held for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.held]

    def check(self, name: str, held: bool, detail: str) -> bool:
        """Record a check; returns ``held``."""
        self.checks.append(Check(name, bool(held), detail))
        return bool(held)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "ok": self.ok, "seconds": round(self.seconds, 3),
            "checks": [c.to_dict() for c in self.checks], "queues": self.queues,
            "chains": self.chains, "qmp": [q.to_dict() for q in self.qmp], "rss": self.rss,
            "facts": self.facts,
        }


class Recorder:
    """Fills a :class:`ScenarioResult` while a scenario runs (QMP answers, RSS, queues)."""

    def __init__(self, result: ScenarioResult) -> None:
        self.result = result
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    async def qmp(self, qemu: QemuProcess, command: str, arguments: dict[str, Any] | None = None,
                  *, variant: str = "", timeout: float = 30.0) -> Any:
        """Run a QMP command on ``qemu``, keep the exchange, return QEMU's answer."""
        answer = await qemu.qmp.execute(command, arguments, timeout=timeout)
        self.result.qmp.append(QmpExchange(variant, command, dict(arguments or {}), answer,
                                           self.elapsed()))
        return answer

    def rss(self, qemu: QemuProcess, label: str) -> int:
        """Read QEMU's ``RssAnon`` now and keep it under ``label``."""
        value = qemu.memory.allocated_bytes()
        self.result.rss[label] = value
        return value

    def queues(self, guest: Any, variant: str = "") -> None:
        """Keep the guest's per-queue used-buffer summary (``QemuGuest.queue_summary``)."""
        for row in guest.queue_summary():
            self.result.queues.append({"variant": variant, **row})

    def chains(self, guest: Any, variant: str = "") -> None:
        """Keep the chains the guest's tap recorded."""
        for chain in guest.tap.chains:
            self.result.chains.append({"variant": variant, **chain.to_dict()})
