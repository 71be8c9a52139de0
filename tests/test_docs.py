"""The docs cannot rot: every command and code block in docs/tutorial.md (and every command in
README.md) runs here and must show what the page says it shows.

- ```` ```console ```` blocks: lines starting with ``$ `` are commands; the lines after each one
  are excerpts of its output, each of which must appear in it (trailing spaces ignored); the
  command must exit 0. ``vballoon`` is this checkout's CLI (``python -m sim.cli``); commands
  run in a temporary directory with ``COLUMNS=100``.
- ```` ```sh ```` blocks: every line is a command, run the same way (in README.md only the
  ``vballoon`` ones: its other shell lines install packages or run inside a guest).
- ```` ```pycon ```` blocks: doctests, one namespace per file, in page order.

A command that is too slow or needs a real peer must be listed in :data:`SKIP` with the reason
and the test that covers it instead, so skipping is a decision, never an accident.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from virtqueue import events as vq_events

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "docs" / "tutorial.md", ROOT / "README.md")
SKIP = {
    "pip install -e .": "installs the package; these tests run from the installed checkout",
    "pip install -e . && vballoon run": "the 4 GiB default scenario; tests/sim/"
                                        "test_run_scenario.py runs it on small guests",
    "pip install -e '.[test]' && python -m pytest -q": "the test suite itself",
    "apt-get install -y --no-install-recommends qemu-system-x86": "installs a peer",
    "vballoon qemu all": "needs QEMU; tests/sim/test_qemu_scenarios.py (marked peer)",
    "vballoon trace malformed --peer qemu": "needs QEMU; tests/sim/test_trace.py (marked peer)",
    "vballoon trace reporting --peer uml": "needs User-Mode Linux; tests/sim/test_trace_uml.py "
                                           "(marked peer)",
    "vballoon serve --socket /tmp/vb.sock": "a server that waits for a real guest; "
                                            "tests/sim/test_serve.py",
    "vballoon conform driver --uml": "needs User-Mode Linux; tests/sim/test_conform_uml.py "
                                     "(marked peer)",
    "vballoon conform device --qemu": "needs QEMU; tests/sim/test_conform_qemu.py (marked peer)",
    "vballoon fuzz --seconds 600": "a 10-minute campaign; tests/sim/test_fuzz_cli.py runs a "
                                   "3-second one",
    "vballoon fuzz --differential --layouts 10000": "needs QEMU and a minute; "
                                                    "tests/sim/test_fuzz_differential.py",
}
"""Command -> why it is not run here (and what runs it instead)."""
_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_OUTPUTS: dict[str, subprocess.CompletedProcess[str]] = {}


def _blocks(page: Path) -> list[tuple[str, str, int]]:
    text = page.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def _commands(lang: str, body: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` of a console or sh block."""
    if lang == "sh":
        return [(line.strip(), []) for line in body.splitlines() if line.strip()]
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:].strip(), []))
        elif out and line.strip():
            out[-1][1].append(line.rstrip())
    return out


def _page_commands(page: Path) -> list[tuple[str, list[str], int]]:
    """The commands of a page: all of the tutorial's, the README's ``vballoon`` ones (its
    other shell lines run in a guest or install packages)."""
    out = []
    for lang, body, lineno in _blocks(page):
        if lang not in ("console", "sh"):
            continue
        for command, expected in _commands(lang, body):
            if page.name == "README.md" and not (command.startswith("vballoon")
                                                  or command in SKIP):
                continue
            out.append((command, expected, lineno))
    return out


def _cases() -> list[pytest.param]:
    cases = []
    for page in PAGES:
        for command, expected, lineno in _page_commands(page):
            cases.append(pytest.param(command, expected,
                                      id=f"{page.name}:{lineno}:{command[:40]}"))
    return cases


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if command not in _OUTPUTS:
        argv = shlex.split(command)
        assert argv[0] == "vballoon", f"only vballoon commands run here, not {command!r}"
        env = {**os.environ, "COLUMNS": "100",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        _OUTPUTS[command] = subprocess.run([sys.executable, "-m", "sim.cli", *argv[1:]],
                                           cwd=cwd, env=env, capture_output=True, text=True,
                                           timeout=120)
    return _OUTPUTS[command]


@pytest.mark.parametrize(("command", "expected"), _cases())
def test_command_shows_what_the_page_says(command, expected, tmp_path_factory):
    if command in SKIP:
        pytest.skip(SKIP[command])
    proc = _run(command, tmp_path_factory.mktemp("docs"))
    assert proc.returncode == 0, f"{command} exited {proc.returncode}: {proc.stderr[-2000:]}"
    missing = [line for line in expected if line.strip() not in proc.stdout]
    assert not missing, f"{command}: these lines are not in its output: {missing}"


def test_every_skipped_command_is_still_on_a_page():
    on_pages = {c for page in PAGES for c, _, _ in _page_commands(page)}
    assert set(SKIP) <= on_pages, f"stale SKIP entries: {set(SKIP) - on_pages}"


@pytest.fixture
def _quiet_logging_restored():
    config = structlog.get_config()
    processors = list(config["processors"])
    enabled = vq_events.ENABLED
    yield
    structlog.configure(**{**config, "processors": processors})
    vq_events.set_enabled(enabled)


@pytest.mark.usefixtures("_quiet_logging_restored")
def test_tutorial_python_sessions(tmp_path, monkeypatch):
    page = ROOT / "docs" / "tutorial.md"
    monkeypatch.chdir(tmp_path)
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs: dict[str, object] = {"__name__": "tutorial"}
    sessions = 0
    for lang, body, lineno in _blocks(page):
        if lang != "pycon":
            continue
        sessions += 1
        test = parser.get_doctest(body, globs, f"tutorial.md:{lineno}", str(page), lineno)
        runner.run(test, clear_globs=False)
        globs = test.globs  # DocTest copies its globs: carry names on to the next session
    assert sessions >= 5
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} tutorial example(s) failed (see output above)"
