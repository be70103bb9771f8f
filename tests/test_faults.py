"""A worker that dies fails the test it was running, and nothing else is lost."""

from __future__ import annotations

import pytest

from conftest import IsolatedRunner

CRASHY = {
    "test_crashy": """
        import os, signal, ctypes

        def test_before():
            pass

        def test_segfault():
            ctypes.string_at(0)

        def test_abort():
            os.abort()

        def test_exit_code():
            os._exit(7)

        def test_sigkill():
            os.kill(os.getpid(), signal.SIGKILL)

        def test_after():
            pass
    """
}


@pytest.mark.parametrize("mode", ["module", "test"])
def test_each_crash_fails_its_test_with_the_cause_and_the_rest_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(**CRASHY)
    xml = pytester.path / "out.xml"
    result = isolated.run(mode, f"--junitxml={xml}")
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines_random(
        [
            "worker w* (PID *) was killed by signal 11 (SIGSEGV) while running "
            "test_crashy.py::test_segfault (call)",
            "worker w* (PID *) was killed by signal 6 (SIGABRT) while running "
            "test_crashy.py::test_abort (call)",
            "worker w* (PID *) exited with code 7 while running "
            "test_crashy.py::test_exit_code (call)",
            "worker w* (PID *) was killed by signal 9 (SIGKILL) while running "
            "test_crashy.py::test_sigkill (call)",
        ]
    )
    # faulthandler's stack points at the test's own line.
    result.stdout.fnmatch_lines(["*File*test_crashy.py*, line 7 in test_segfault"])
    cases = xml.read_text().count("<testcase ")
    assert cases == 6


def test_worker_that_dies_ahead_of_the_replay_loses_nothing(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """The worker runs ahead of the parent's replay; here it has already
    died in the third test while the parent still replays the first."""
    pytester.makeconftest(
        """
        import os, pathlib, time

        FLAG = pathlib.Path("crashing.pid")

        def gone(pid):
            try:
                state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            except FileNotFoundError:
                return True
            return state in ("Z", "X")

        def pytest_runtest_logreport(report):
            # Runs only in the parent (reporting hooks are replayed there).
            if report.nodeid.endswith("test_first") and report.when == "teardown":
                while not FLAG.exists() or not FLAG.read_text():
                    time.sleep(0.001)
                pid = int(FLAG.read_text())
                while not gone(pid):
                    time.sleep(0.001)
        """
    )
    pytester.makepyfile(
        test_ahead="""
            import os, pathlib

            def test_first():
                pass

            def test_second():
                pass

            def test_third():
                pathlib.Path("crashing.pid").write_text(str(os.getpid()))
                os._exit(3)

            def test_fourth():
                pass
        """
    )
    result = isolated.run("module", "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_first PASSED*",
            "*test_second PASSED*",
            "*test_third FAILED*",
            "*test_fourth PASSED*",
        ]
    )
