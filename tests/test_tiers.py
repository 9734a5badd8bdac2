"""The fast tier guards itself: a test outside `slow` that starts a process or a server
fails and names the mark; marked, the same test runs."""

from __future__ import annotations

import pytest


STARTS_A_PROCESS = """
import subprocess, sys
{mark}
def test_it():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""

STARTS_A_SERVER = """
import socket
{mark}
def test_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
"""


@pytest.mark.parametrize("body", [STARTS_A_PROCESS, STARTS_A_SERVER], ids=["process", "server"])
def test_unmarked_fails_naming_the_mark(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_probe=body.format(mark=""))
    result = pytester.runpytest_inprocess("-p", "tests.support.tiers", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_probe.py::test_it starts a *: mark it pytest.mark.slow*"])


@pytest.mark.slow
@pytest.mark.parametrize("body", [STARTS_A_PROCESS, STARTS_A_SERVER], ids=["process", "server"])
def test_marked_slow_runs(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_probe=body.format(mark="import pytest\n@pytest.mark.slow"))
    result = pytester.runpytest_inprocess("-p", "tests.support.tiers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_slow_fixture_marks_its_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_probe="""
import pytest
@pytest.fixture
def fake_kimi():
    yield None
def test_uses_it(fake_kimi):
    pass
def test_does_not():
    pass
""")
    result = pytester.runpytest_inprocess("-p", "tests.support.tiers", "-p", "no:cacheprovider", "-m", "not slow",
                                          "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1, deselected=1)
