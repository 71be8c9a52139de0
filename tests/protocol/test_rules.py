"""The rule catalogue: IDs are keys, every rule has a section and says whom it binds."""

from __future__ import annotations

import re

import pytest

from protocol import rules
from protocol.rules import RULES, Rule, rule

_SECTION = re.compile(r"\d+(\.\d+)*")


@pytest.mark.parametrize("key", sorted(RULES))
def test_rule_entry(key: str) -> None:
    r = RULES[key]
    assert isinstance(r, Rule)
    assert r.id == key
    assert re.fullmatch(r"[A-Z]+-\d{2}", r.id), r.id
    assert r.section, f"{key} has no section"
    if r.section[0].isdigit():
        assert _SECTION.fullmatch(r.section), f"{key}: malformed section {r.section!r}"
    assert r.side in ("driver", "device")
    assert r.summary.strip()


def test_ids_are_unique() -> None:
    ids = [r.id for r in rules._TABLE]
    assert len(ids) == len(set(ids)) == len(RULES)


def test_rule_lookup() -> None:
    assert rule("DC-01") is RULES["DC-01"]
    with pytest.raises(KeyError):
        rule("XX-99")
