"""Other plugins under isolation: pytest-cov, pytest-timeout, pytest-rerunfailures,
pytest-randomly; and the debugger options, which isolation refuses."""

from __future__ import annotations

import re

import pytest

from conftest import IsolatedRunner

PACKAGE = {
    "pkg/__init__": """
        def used(x):
            if x > 0:
                return "pos"
            return "neg"

        def unused():
            return 1
    """,
    "test_pos": "import pkg\n\ndef test_pos():\n    assert pkg.used(1) == 'pos'\n",
    "test_neg": "import pkg\n\ndef test_neg():\n    assert pkg.used(-1) == 'neg'\n",
}


def _coverage_line(result: pytest.RunResult) -> str:
    return next(line for line in result.outlines if line.startswith("pkg/__init__.py"))


@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["single", "xdist"])
def test_coverage_counts_what_forked_workers_ran(
    pytester: pytest.Pytester, isolated: IsolatedRunner, extra: list[str]
) -> None:
    pytester.makepyfile(**PACKAGE)
    args = ["--cov=pkg", "--cov-report=term-missing", *extra]
    plain = isolated.plain(*args)
    plain.assert_outcomes(passed=2)
    for mode in ("module", "test"):
        result = isolated.run(mode, *args)
        result.assert_outcomes(passed=2)
        # Same statements, same misses (only line 7, the unused function).
        assert re.split(r"\s+", _coverage_line(result)) == re.split(r"\s+", _coverage_line(plain))
        assert _coverage_line(result).endswith(" 7")


def test_pytest_timeout_fails_the_slow_test_in_its_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_slow="""
            import time

            def test_slow():
                time.sleep(30)

            def test_quick():
                pass
        """
    )
    result = isolated.run("module", "-p", "timeout", "--timeout=1", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_slow FAILED*", "*test_quick PASSED*", "*Timeout*"])


#: Fails its first try, passes the next.
FLAKY = """
import pathlib

def test_flaky():
    marker = pathlib.Path("tried")
    if not marker.exists():
        marker.write_text("once")
        assert False, "first try fails"
"""


def test_rerunfailures_reruns_inside_the_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_flaky=FLAKY)
    plain = isolated.plain("-p", "rerunfailures", "--reruns=2", "-v")
    (pytester.path / "tried").unlink()
    result = isolated.run("test", "-p", "rerunfailures", "--reruns=2", "-v")
    assert result.parseoutcomes() == plain.parseoutcomes() == {"passed": 1, "rerun": 1}
    result.stdout.fnmatch_lines(["*test_flaky RERUN*", "*test_flaky PASSED*"])


def test_a_hook_that_raises_between_reruns_costs_the_test_nothing(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """A plugin's hook in the pytest process that raises as the first
    attempt's logfinish is replayed: the rerun still gives the verdict."""
    pytester.makeconftest(
        """
        import os

        raised = []

        def pytest_runtest_logfinish(nodeid):
            if "ISOLATOR_WORKER" not in os.environ and not raised:
                raised.append(nodeid)
                raise RuntimeError("a plugin's bug")
        """
    )
    pytester.makepyfile(test_flaky=FLAKY + "\n\ndef test_after():\n    pass\n")
    result = isolated.run("module", "-p", "rerunfailures", "--reruns=1", "-v")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert result.parseoutcomes() == {"passed": 2, "rerun": 1}
    result.stdout.fnmatch_lines(["*test_flaky RERUN*", "*test_flaky PASSED*"])
    result.stdout.fnmatch_lines(["while running test_flaky.py::test_flaky:", "*a plugin's bug"])


def test_reruns_are_each_given_the_whole_timeout(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """The worker's watchdog times each attempt; so must the pytest process's
    own deadline, though together the attempts run far past it."""
    pytester.makepyfile(
        test_slow_flaky="""
            import pathlib, time

            def test_slow_flaky():
                tries = pathlib.Path("tries")
                tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
                time.sleep(0.9)  # the attempt's work, under the 1 s timeout
                assert len(tries.read_text()) == 8
        """
    )
    result = isolated.run(
        "module", "-p", "rerunfailures", "--reruns=7", "--isolate-timeout=1", "-p", "no:randomly"
    )
    assert result.parseoutcomes() == {"passed": 1, "rerun": 7}


def test_randomly_orders_and_seeds_as_without_isolation(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_ADDOPTS")
    pytester.makepyfile(
        **{
            f"test_r{m}": "\n".join(
                f"import random\n\ndef test_{i}():\n    print(random.random())\n" for i in range(5)
            )
            for m in range(3)
        }
    )
    args = ["-p", "randomly", "-v", "-rA", "-p", "no:cacheprovider", "--randomly-seed=1234"]
    plain = isolated.plain(*args)
    isolated_run = isolated.run("module", *args)

    def order_and_numbers(result: pytest.RunResult) -> list[str]:
        # Test order, and what random.random() gave each test (randomly
        # reseeds at every test's setup, which now happens in the worker).
        return [line for line in result.outlines if "PASSED" in line or line.startswith("0.")]

    assert order_and_numbers(isolated_run) == order_and_numbers(plain)
    # 15 verbose lines and 15 in the -rA summary.
    assert len([line for line in order_and_numbers(plain) if "PASSED" in line]) == 30


@pytest.mark.parametrize("flag", ["--pdb", "--trace"])
def test_debugger_is_refused_with_a_clear_message(pytester: pytest.Pytester, flag: str) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=module", flag)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: isolator: --pdb and --trace need the test to run in *"])


def test_capture_off_prints_straight_to_the_terminal(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_loud="def test_loud():\n    print('straight out')\n")
    result = isolated.run("test", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*straight out*"])


@pytest.mark.parametrize("mode", ["module", "test"])
def test_the_collector_hides_nothing_from_plugins_in_the_pytest_process(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    """gc.get_referrers() sees every object in the pytest process, as without
    isolation (hypothesis asks it whether anything holds the Random given to
    register_random, and warns if nothing does). In a worker, what existed
    when it was forked is frozen (README, Cost) until gc.unfreeze()."""
    pytester.makeconftest(
        """
        import gc

        HOLDER = {"held": [1, 2]}
        HELD = HOLDER["held"]

        def seen():
            return any(referrer is HOLDER for referrer in gc.get_referrers(HELD))

        def pytest_terminal_summary(terminalreporter):
            terminalreporter.write_line(f"held seen in the pytest process: {seen()}")
        """
    )
    pytester.makepyfile(
        test_gc="""
            import gc
            import conftest

            def test_frozen_until_unfrozen():
                assert not conftest.seen()
                gc.unfreeze()
                assert conftest.seen()
        """
    )
    result = isolated.run(mode, "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["held seen in the pytest process: True"])
