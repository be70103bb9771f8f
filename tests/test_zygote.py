"""The zygote, which forks the workers: what a test does to it costs that
test alone, and nothing the run made outlives it."""

from __future__ import annotations

import psutil
import pytest

from conftest import IsolatedRunner

#: The first test kills the process that forked its worker.
KILLS_ITS_PARENT = """
    import os, signal, time

    def test_kills_its_parent():
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)  # the worker dies with its parent

    def test_after():
        pass
"""


@pytest.mark.parametrize("mode", ["module", "test"])
def test_a_test_that_kills_the_zygote_fails_alone(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(test_parent=KILLS_ITS_PARENT, test_other="def test_other(): pass\n")
    result = isolated.run(mode, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*worker w* was killed by signal 9 (SIGKILL) while running "
            "test_parent.py::test_kills_its_parent (call)*"
        ]
    )


@pytest.mark.parametrize("mode", ["module", "test", "shared --worker-mem=1GB"])
def test_nothing_the_run_made_is_left_when_pytest_main_returns(
    pytester: pytest.Pytester, mode: str
) -> None:
    pytester.makepyfile(
        test_some="".join(f"def test_{i}():\n    pass\n\n" for i in range(5)),
        test_fails="def test_fails():\n    assert False\n",
    )
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    result = pytester.runpytest_inprocess("-p", "isolator", *f"--isolate={mode}".split())
    result.assert_outcomes(passed=5, failed=1)
    left = [
        child
        for child in psutil.Process().children(recursive=True)
        if child.pid not in before and child.status() != psutil.STATUS_ZOMBIE
    ]
    assert left == []
    zombies = [child for child in psutil.Process().children() if child.pid not in before]
    assert zombies == []
