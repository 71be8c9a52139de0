"""The requirement catalogue: every spec.md requirement is there, once, with a well-formed entry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.requirements import (
    CHECK_FAMILIES,
    REQUIREMENTS,
    Level,
    Requirement,
    check_family,
    coverage,
    requirement,
)
from protocol.rules import RULES

SPEC_MD = Path("/work/shared/research/spec.md")
_SPEC_ID = re.compile(r"\b(?:(?:GEN|SPL|PKD|BAL|MMIO)-[DV]-\d+|LEG-(?:BAL-)?\d+)\b")
_SECTION = re.compile(r"\d+(\.\d+)*")
_CHECK = re.compile(r"[a-z]+(\.[a-z_]+)*(:[A-Z]+(-[A-Z]+)*-\d+)?")


@pytest.fixture(scope="module")
def spec_text() -> str:
    if not SPEC_MD.is_file():
        pytest.skip(f"{SPEC_MD} is not on this machine")
    return SPEC_MD.read_text()


def test_every_spec_md_requirement_is_catalogued(spec_text: str) -> None:
    in_spec = set(_SPEC_ID.findall(spec_text))
    assert len(in_spec) > 150  # the parse itself works
    missing = in_spec - set(REQUIREMENTS)
    assert not missing, f"spec.md requirements missing from the catalogue: {sorted(missing)}"


def test_no_invented_spec_ids(spec_text: str) -> None:
    in_spec = set(_SPEC_ID.findall(spec_text))
    ours = {r for r in REQUIREMENTS if _SPEC_ID.fullmatch(r)}
    assert ours <= in_spec, sorted(ours - in_spec)


def test_sections_match_spec_md_where_it_gives_one(spec_text: str) -> None:
    """``**SPL-D-2** (2.7.4.2) ...``: the number in parentheses after a bullet's ID."""
    cited = dict(re.findall(r"\*\*([A-Z-]+-\d+)\*\* \((\d+(?:\.\d+)+)", spec_text))
    assert len(cited) > 30
    wrong = {i: (REQUIREMENTS[i].section, s) for i, s in cited.items()
             if REQUIREMENTS[i].section != s}
    assert not wrong, wrong


@pytest.mark.parametrize("key", sorted(REQUIREMENTS))
def test_entry_is_well_formed(key: str) -> None:
    r = REQUIREMENTS[key]
    assert isinstance(r, Requirement) and r.id == key
    assert _SECTION.fullmatch(r.section), f"{key}: section {r.section!r}"
    assert isinstance(r.level, Level)
    assert r.side in ("driver", "device", "both")
    assert r.summary.strip() and len(r.summary) <= 140 and "\n" not in r.summary
    assert (r.check is None) != (r.unobservable is None), key
    for name in (r.check, *r.also):
        if name is None:
            continue
        assert _CHECK.fullmatch(name), f"{key}: check name {name!r}"
        assert check_family(name) in CHECK_FAMILIES
        if ":" in name:
            assert name.split(":", 1)[1] in REQUIREMENTS, f"{key}: {name} names no requirement"


def test_sides_follow_the_ids() -> None:
    for r in REQUIREMENTS.values():
        if "-D-" in r.id:
            assert r.side == "driver", r.id
        elif "-V-" in r.id:
            assert r.side == "device", r.id


def test_rules_are_included_not_copied() -> None:
    for rule in RULES.values():
        req = REQUIREMENTS[rule.id]
        assert (req.section, req.summary, req.side) == (rule.section, rule.summary, rule.side)
        assert req.level is Level.CHECK and not req.normative
        assert req.check is not None and req.check.endswith(f":{rule.id}"), req.check


def test_every_labelled_mutation_has_a_villain_check() -> None:
    from virtqueue.cases import MUTATIONS

    for kind, rule in MUTATIONS.items():
        assert f"villain:{rule}" in REQUIREMENTS[rule].also, (kind, rule)


def test_levels_of_known_statements() -> None:
    assert requirement("SPL-D-9").level is Level.MUST_NOT
    assert requirement("BAL-D-4").level is Level.SHOULD
    assert requirement("BAL-D-5").level is Level.MAY
    assert requirement("SPL-D-19").check is None  # a barrier cannot be seen
    assert requirement("SPL-D-2").check == "ring.validate:DC-06"
    with pytest.raises(KeyError):
        requirement("GEN-D-999")


def test_coverage_adds_up() -> None:
    cov = coverage()
    reqs = list(REQUIREMENTS.values())
    assert cov["total"] == len(reqs)
    assert cov["checked"] == sum(r.check is not None for r in reqs)
    assert cov["checked"] + cov["unchecked"] == cov["total"]
    assert sum(sum(sides.values()) for sides in cov["by_family"].values()) == cov["checked"]
    for key in ("by_side", "by_level", "by_group"):
        assert sum(v["total"] for v in cov[key].values()) == cov["total"]
        assert sum(v["checked"] for v in cov[key].values()) == cov["checked"]
    assert cov["by_group"]["PKD"]["checked"] == 0  # split ring only
    assert cov["by_group"]["DC"] == {"total": 8, "checked": 8}
