"""The zygote, which forks the workers: what a test does to it costs that
test alone, and nothing the run made outlives it."""

from __future__ import annotations

import re
import textwrap

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


#: A thread of the pytest process (as pytest-rerunfailures' server, or
#: execnet's receiver under xdist, are) presses Ctrl-C while the main thread
#: is in its Nth exchange with the zygote: a signal mask cannot keep it out.
CTRL_C_IN_EXCHANGE = """
    import os, signal, sys, threading, time

    NTH = {nth}
    EXCHANGE = {{"_send", "_read", "forked", "wait", "reap_ended", "ask_fork"}}

    def in_exchange(main):
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name in EXCHANGE and "zygote" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def press_ctrl_c():
        main = threading.main_thread().ident
        seen = 0
        while True:
            if in_exchange(main):
                seen += 1
                if seen == NTH:
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                while in_exchange(main):
                    pass
            time.sleep(0.0001)

    def pytest_sessionstart(session):
        threading.Thread(target=press_ctrl_c, daemon=True).start()
"""


@pytest.mark.parametrize("nth", [3, 10, 25, 40])
def test_ctrl_c_during_an_exchange_with_the_zygote_stops_the_run_cleanly(
    pytester: pytest.Pytester, nth: int
) -> None:
    pytester.makeconftest(CTRL_C_IN_EXCHANGE.format(nth=nth))
    pytester.makepyfile(
        test_many="import time\n\n"
        + "".join(f"def test_{i}():\n    time.sleep(0.005)\n\n" for i in range(150))
    )
    result = pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=test", "-p", "no:cacheprovider", timeout=60
    )
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    assert "Traceback" not in output
    # Interrupted, or (if the Nth exchange came after the last test) done.
    assert result.ret in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.OK), output


FIRST_MARKED_ERROR = """
    import warnings
    import pytest

    @pytest.mark.filterwarnings("error")
    def test_first():
        pass

    def test_second():
        pass

    def test_third():
        warnings.warn("harmless", UserWarning)
"""


@pytest.mark.parametrize("mode", ["module", "test"])
def test_the_first_tests_warning_filters_are_its_own(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    """The zygote is forked while pytest runs the first test, inside its
    ``filterwarnings`` marks; its workers must not inherit them."""
    pytester.makepyfile(test_w=FIRST_MARKED_ERROR)
    result = isolated.run(mode, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, warnings=1)


def test_nothing_is_left_after_the_zygote_died(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_parent=KILLS_ITS_PARENT, test_z="def test_z(): pass\n")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    result = pytester.runpytest_inprocess("-p", "isolator", "--isolate=test")
    result.assert_outcomes(passed=2, failed=1)
    left = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    assert left == []


#: The zygote dies right after forking the second worker, before it can say
#: which PID that worker has (a fork hook of the tests' runs in the zygote).
DIES_AFTER_ITS_SECOND_FORK = """
    import os, signal

    CONTROLLER = os.getpid()
    MARK = os.path.join(os.path.dirname(__file__), "zygote-killed")
    forks = []

    def after_in_parent():
        if os.getpid() == CONTROLLER:
            return
        forks.append(None)
        if len(forks) == 2 and not os.path.exists(MARK):
            open(MARK, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    os.register_at_fork(after_in_parent=after_in_parent)
"""

#: ... and that worker is slow to write itself into the fork registry (a
#: loaded machine), which must not let the run end before it did.
SLOW_TO_ENROL = """
    import time
    from isolator import leftovers

    enrol = leftovers.ForkRegistry.enrol

    def slow_enrol(self, label):
        if len(forks) == 1 and not os.path.exists(MARK + "-slow"):
            open(MARK + "-slow", "w").close()
            time.sleep(0.3)
        enrol(self, label)

    leftovers.ForkRegistry.enrol = slow_enrol
"""


@pytest.mark.parametrize("slow", [False, True], ids=["", "slow to enrol"])
@pytest.mark.parametrize("args", [[], ["-x"]], ids=["", "-x"])
def test_a_worker_forked_as_the_zygote_died_is_not_left(
    pytester: pytest.Pytester, slow: bool, args: list[str]
) -> None:
    """Its PID never reached the controller, which the kernel made its parent:
    it must still be told from other processes, and reaped."""
    conftest = textwrap.dedent(DIES_AFTER_ITS_SECOND_FORK)
    if slow:
        conftest += textwrap.dedent(SLOW_TO_ENROL)
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_few="".join(f"def test_{i}():\n    pass\n\n" for i in range(3)))
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    result = pytester.runpytest_inprocess("-p", "isolator", "--isolate=test", *args)
    assert (pytester.path / "zygote-killed").exists()
    # The test running when the zygote died may have died with it (and
    # then -x stops the run).
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    ran = {report.nodeid for report in reports}
    assert len(ran) == 3 or (args and result.ret == pytest.ExitCode.TESTS_FAILED)
    # The lost worker is no process a test left running.
    assert "left running" not in result.stdout.str()
    left = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    assert left == []


#: As DIES_AFTER_ITS_SECOND_FORK, and that second worker is stuck in a fork
#: hook of the tests' (so it still holds the zygote's socket) until the
#: outer test lets it go.
STUCK_IN_A_FORK_HOOK = """
    import time

    RELEASE = os.path.join(os.path.dirname(__file__), "release")

    def after_in_child():
        # The zygote's second child (the zygote counts its forks; the
        # pytest process does not).
        if len(forks) == 1 and not os.path.exists(MARK + "-stuck"):
            open(MARK + "-stuck", "w").close()
            while not os.path.exists(RELEASE):
                time.sleep(0.05)

    os.register_at_fork(after_in_child=after_in_child)
"""


def test_a_worker_stuck_as_its_zygote_died_does_not_hang_the_run(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        textwrap.dedent(DIES_AFTER_ITS_SECOND_FORK) + textwrap.dedent(STUCK_IN_A_FORK_HOOK)
    )
    pytester.makepyfile(test_few="".join(f"def test_{i}():\n    pass\n\n" for i in range(3)))
    try:
        result = pytester.runpytest_subprocess(
            "-p", "isolator", "--isolate=test", "-rA", timeout=60
        )
    finally:
        (pytester.path / "release").touch()
    assert (pytester.path / "zygote-killed-stuck").exists()
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    # The test running when the zygote died may have died with it.
    for i in range(3):
        assert re.search(rf"^(PASSED|FAILED|ERROR) test_few.py::test_{i}\b", output, re.M), output
