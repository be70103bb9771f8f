"""A worker that dies fails the test it was running, and nothing else is lost."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IsolatedRunner
from isolator import wire

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


def test_crash_stack_keeps_the_tests_frames_wherever_the_project_lives(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """Only pytest's, pluggy's and isolator's own frames are cut from the stack,
    not every file whose path has one of those names in it (a checkout called
    isolator, a Python installed under /var/cache/isolator)."""
    # Not at the top level, where the directory would shadow the plugin's import.
    project = pytester.mkdir("checkouts") / "isolator"
    project.mkdir()
    (project / "test_deep.py").write_text(
        "import ctypes\n\ndef helper():\n    ctypes.string_at(0)\n\n"
        "def test_segfault():\n    helper()\n"
    )
    result = isolated.run("module", "checkouts")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*File*isolator/test_deep.py*, line 4 in helper",
            "*File*isolator/test_deep.py*, line 7 in test_segfault",
            "  ...",
        ]
    )
    assert "_pytest" not in result.stdout.str()


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


def test_crash_in_setup_or_teardown_is_reported_in_that_phase(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_phases="""
            import os, sys
            import pytest

            @pytest.fixture
            def dies_in_setup():
                os._exit(5)

            @pytest.fixture
            def dies_in_teardown():
                yield
                print("about to go", flush=True)
                sys.stderr.write("last words\\n")
                os._exit(6)

            def test_setup_crash(dies_in_setup):
                pass

            def test_teardown_crash(dies_in_teardown):
                pass

            def test_fine():
                pass
        """
    )
    xml = pytester.path / "out.xml"
    result = isolated.run("module", "-v", f"--junitxml={xml}")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_setup_crash ERROR*",
            "*test_teardown_crash PASSED*",
            "*test_teardown_crash ERROR*",
            "*test_fine PASSED*",
            "*ERROR at setup of test_setup_crash*",
            "worker w* exited with code 5 while running test_phases.py::test_setup_crash (setup)",
            "*ERROR at teardown of test_teardown_crash*",
            "worker w* exited with code 6 while running test_phases.py::test_teardown_crash "
            "(teardown)",
            "*Captured stdout teardown*",
            "about to go",
            "*Captured stderr teardown*",
            "last words",
        ]
    )
    assert xml.read_text().count("<testcase ") == 3


def test_sigkill_names_the_oom_killer_and_the_last_memory(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_killed="""
            import os, signal

            KEEP = []

            def test_grows():
                KEEP.append(b"x" * (40 * 1024 * 1024))

            def test_killed():
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = isolated.run("module")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "worker w* was killed by signal 9 (SIGKILL) while running test_killed.py::test_killed "
            "(call)",
            "SIGKILL from outside is often the kernel's OOM killer; the worker's own memory was "
            "last measured at [45]*MB (peak [45]*MB)",
        ]
    )


def test_workers_that_die_before_any_test_stop_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        import os

        # Every worker dies as it starts, before its first test begins.
        os.register_at_fork(after_in_child=lambda: os._exit(42))
        """
    )
    pytester.makepyfile(test_many="\n".join(f"def test_{i}(): pass" for i in range(10)))
    result = isolated.run("test")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    # test_0 is tried in a second worker, then fails; test_1's worker is the
    # third in a row to die, and the run stops.
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*isolator: 3 workers in a row died before starting a test (the last exited with "
            "code 42); stopping instead of starting more*"
        ]
    )


HANGS = """
    import ctypes, time
    import pytest

    def test_stuck_in_c():
        # Blocked in C: no Python signal handler runs until it returns.
        ctypes.CDLL(None).sleep(60)

    @pytest.mark.isolate(timeout=0.5)
    def test_marker_timeout():
        time.sleep(60)

    def test_after():
        pass
"""


def test_timeout_kills_a_hung_test_and_the_unit_goes_on(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_hangs=HANGS)
    result = isolated.pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=module", "--isolate-timeout=1", timeout=120
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "worker w* timed out after 1s and was killed while running "
            "test_hangs.py::test_stuck_in_c (call)",
            "worker w* timed out after 0.5s and was killed while running "
            "test_hangs.py::test_marker_timeout (call)",
            "*File*test_hangs.py*, line 6 in test_stuck_in_c",
        ]
    )


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.01)  # polling /proc: there is no event for another process's end
    return False


def test_processes_a_test_leaves_behind_are_ended_with_its_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_spawns="""
            import pathlib, subprocess

            def test_leaves_a_sleeper():
                proc = subprocess.Popen(["sleep", "1000"])
                pathlib.Path("sleeper.pid").write_text(str(proc.pid))
        """
    )
    isolated.run("test").assert_outcomes(passed=1)
    sleeper = int((pytester.path / "sleeper.pid").read_text())
    assert _wait_until_gone(sleeper, 10)


def test_workers_end_when_pytest_is_killed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_blocks="""
            import os, pathlib, time

            def test_waits():
                pathlib.Path("worker.pid").write_text(str(os.getpid()))
                time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "isolator", "--isolate=test", "-q"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = pytester.path / "worker.pid"
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.01)
        worker_pid = int(pid_file.read_text())
        proc.kill()
        proc.wait()
        assert _wait_until_gone(worker_pid, 5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("signum", "ignore_sigint", "moved"),
    [
        (signal.SIGINT, False, False),
        (signal.SIGTERM, False, False),
        (signal.SIGTERM, True, False),
        (signal.SIGINT, False, True),
    ],
    ids=[
        "sigint",
        "sigterm",
        "sigterm-started-with-sigint-ignored",
        "sigint-worker-left-its-group",
    ],
)
def test_interrupt_stops_workers_reports_what_finished_and_tears_down(
    pytester: pytest.Pytester, signum: int, ignore_sigint: bool, moved: bool
) -> None:
    pytester.makepyfile(
        test_interrupted=f"""
            import os, pathlib, time
            import pytest

            @pytest.fixture(scope="module")
            def resource():
                yield
                pathlib.Path("torn-down").write_text("yes")

            def test_done(resource):
                pass

            def test_waits(resource):
                if {moved}:
                    # Into its parent's process group, out of its own.
                    os.setpgid(0, os.getpgid(os.getppid()))
                pathlib.Path("worker.pid").write_text(str(os.getpid()))
                time.sleep(120)

            def test_never(resource):
                pass
        """
    )

    def ignore() -> None:
        # What a shell does to a background job: SIGINT ignored, inherited.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "isolator", "--isolate=module", "-v"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore if ignore_sigint else None,
    )
    pid_file = pytester.path / "worker.pid"
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.01)
        worker_pid = int(pid_file.read_text())
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "test_interrupted.py::test_done PASSED" in output
    assert "KeyboardInterrupt" in output
    assert "test_never" not in output
    assert (pytester.path / "torn-down").read_text() == "yes"
    assert "ignored SIGINT" not in output
    assert _wait_until_gone(worker_pid, 5)


@pytest.mark.parametrize(
    "args", [["--isolate=module"], ["--isolate=test"], ["--isolate=test", "-n", "2"]]
)
def test_pytest_started_outside_the_main_thread_runs_and_says_what_is_off(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    """pytest.main() called from a thread (an execnet socket server, an IDE):
    Python handles signals only in the main thread, so SIGTERM cannot be
    caught there; the run goes on and says so once."""
    pytester.makepyfile(
        test_threaded="""
            import time

            def test_passes():
                pass

            def test_fails():
                assert False

            def test_times_out():
                time.sleep(60)
        """
    )
    script = pytester.makepyfile(
        run_in_thread="""
            import sys, threading
            import pytest

            codes = []
            thread = threading.Thread(target=lambda: codes.append(pytest.main(sys.argv[1:])))
            thread.start()
            thread.join()
            sys.exit(int(codes[0]))
        """
    )
    result = pytester.run(
        sys.executable,
        str(script),
        "-p",
        "isolator",
        "--isolate-timeout=2",
        "-rA",
        "test_threaded.py",
        *args,
        timeout=120,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "isolator: pytest runs outside the main thread here, where Python cannot catch*",
            "*PASSED test_threaded.py::test_passes*",
            "*FAILED test_threaded.py::test_fails*",
            "*FAILED test_threaded.py::test_times_out*",
            "*2 failed, 1 passed*",
        ],
        consecutive=False,
    )
    assert result.stdout.str().count("outside the main thread") == 1
    assert "INTERNALERROR" not in result.stdout.str()


@pytest.mark.parametrize("args", [["--isolate=marked", "-x"], ["--isolate=module", "-x"]])
def test_a_worker_that_left_its_process_group_is_still_ended(
    pytester: pytest.Pytester, args: list[str]
) -> None:
    """Workers are ended through their process group; one a test moved to
    another group (its parent's) must be ended all the same, not waited for."""
    pytester.makepyfile(
        test_moved="""
            import os
            import pytest

            def test_moves():
                os.setpgid(0, os.getpgid(os.getppid()))

            @pytest.mark.isolate
            def test_fails():
                assert False

            def test_never():
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "isolator", *args, timeout=60)
    result.assert_outcomes(passed=1, failed=1)


@pytest.mark.parametrize("setting", ["ignored", "reaping-handler"])
def test_sigchld_set_at_collection_keeps_crash_causes_and_reaches_the_tests(
    pytester: pytest.Pytester, setting: str
) -> None:
    """A conftest that ignores SIGCHLD, or reaps in a handler of its own, must
    not take the workers' exit statuses from the zygote; tests still see it."""
    pytester.makeconftest(
        f"""
        import os, signal

        def reap(signum, frame):
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass

        IGNORED = {setting == "ignored"}
        signal.signal(signal.SIGCHLD, signal.SIG_IGN if IGNORED else reap)
        """
    )
    pytester.makepyfile(
        test_sigchld="""
            import os, signal

            def test_abort():
                os.abort()

            def test_exit_code():
                os._exit(7)

            def test_setting_is_the_tests():
                assert signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL
        """
    )
    result = pytester.runpytest_subprocess("-p", "isolator", "--isolate=test")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*was killed by signal 6 (SIGABRT) while running test_sigchld.py::test_abort*",
            "*exited with code 7 while running test_sigchld.py::test_exit_code*",
        ],
        consecutive=False,
    )
    assert "SIGKILL" not in result.stdout.str()


def test_a_test_that_makes_every_descriptor_non_blocking_keeps_its_verdict(
    pytester: pytest.Pytester,
) -> None:
    """The report pipe among them: the worker's writes must still block."""
    pytester.makepyfile(
        test_nonblocking="""
            import os

            def test_loud():
                for fd in range(3, 256):
                    try:
                        os.set_blocking(fd, False)
                    except OSError:
                        pass
                print("x" * (2 << 20))

            def test_after():
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "isolator", "--isolate=module", "-rP")
    result.assert_outcomes(passed=2)


#: Runs pytest as the foreground job of a terminal of its own (a pty) and
#: prints what it wrote. A fresh, single-threaded process forks the pty: the
#: test process may have threads, and forkpty() there could deadlock.
ON_A_TERMINAL = """
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]])
while True:
    try:
        chunk = os.read(fd, 1 << 16)
    except OSError:  # EIO: the terminal's other side closed
        break
    if not chunk:
        break
    sys.stdout.buffer.write(chunk)
os.waitpid(pid, 0)
"""


def _pytest_on_a_terminal(cwd: Path, *args: str) -> str:
    """pytest's output, run as the foreground job of a terminal of its own."""
    done = subprocess.run(
        [sys.executable, "-c", ON_A_TERMINAL, *args],
        cwd=cwd,
        capture_output=True,
        timeout=60,
    )
    return done.stdout.decode(errors="replace")


def test_a_test_that_sets_the_terminals_modes_is_not_stopped(pytester: pytest.Pytester) -> None:
    """A worker is in a process group of its own, never the terminal's
    foreground one: the kernel would stop it (SIGTTOU) as it sets the
    terminal's modes, as getpass and stty do, and the run would hang."""
    pytester.makepyfile(
        test_terminal="""
            import os, termios

            def test_modes():
                fd = os.open("/dev/tty", os.O_RDWR)
                try:
                    termios.tcsetattr(fd, termios.TCSANOW, termios.tcgetattr(fd))
                finally:
                    os.close(fd)

            def test_after():
                pass
        """
    )
    output = _pytest_on_a_terminal(
        pytester.path, "-p", "isolator", "--isolate=test", "-p", "no:randomly", "--color=no"
    )
    assert "2 passed" in output, output


@pytest.mark.parametrize(
    "body",
    [
        "faulthandler.cancel_dump_traceback_later()\n    time.sleep(60)",
        "faulthandler.dump_traceback_later(1000)\n    time.sleep(60)",
        "os.execvp('sleep', ['sleep', '60'])",
        "os.kill(os.getpid(), signal.SIGSTOP)",
    ],
    ids=["cancelled", "re-armed", "exec", "stopped"],
)
def test_a_test_that_defeats_its_workers_watchdog_still_times_out(
    pytester: pytest.Pytester, body: str
) -> None:
    """The worker's watchdog is a thread in the worker; the pytest process
    keeps a deadline of its own, a little later, for when it never fires."""
    pytester.makepyfile(
        test_defeats=f"""
import faulthandler, os, signal, time

def test_defeats():
    {body}

def test_after():
    pass
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=module", "--isolate-timeout=1", timeout=60
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*timed out after 1s and was killed by the pytest process (its watchdog did not "
            "fire: the test cancelled it, replaced the process or stopped it) while running "
            "test_defeats.py::test_defeats (call)*"
        ]
    )


def test_lingering_threads_are_named_in_the_summary(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_threads="""
            import threading

            def test_leaves_a_thread():
                threading.Thread(target=threading.Event().wait, name="pool-refresher").start()
        """
    )
    result = isolated.run("module")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*= isolator: threads left running =*",
            "worker w1 ended its unit (last test test_threads.py::test_leaves_a_thread) with "
            "non-daemon threads still running: pool-refresher",
        ]
    )


def test_megabytes_of_output_do_not_block_the_pipe(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_loud="""
            import sys

            def test_loud():
                for _ in range(200):
                    print("x" * 50_000)
                    sys.stderr.write("y" * 50_000 + "\\n")
                assert False, "show the output"
        """
    )
    xml = pytester.path / "out.xml"
    result = isolated.pytester.runpytest_subprocess(
        "-p",
        "isolator",
        "--isolate=test",
        f"--junitxml={xml}",
        "-o",
        "junit_logging=all",
        timeout=120,
    )
    result.assert_outcomes(failed=1)
    assert xml.stat().st_size > 20_000_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--isolate-timeout=-1"],
            "ERROR: isolator: --isolate-timeout: '-1' is not a number of seconds (more than 0)",
        ),
        (["--isolate-timeout=soon"], "ERROR: isolator: --isolate-timeout: 'soon' is not a *"),
        (["--mem-top=many"], "ERROR: isolator: --mem-top: 'many' is not a count *"),
        (["--isolate-timeout=inf"], "ERROR: isolator: --isolate-timeout: 'inf' is not a number *"),
        (
            ["--isolate-sample-interval=nan"],
            "ERROR: isolator: --isolate-sample-interval: 'nan' is not a number *",
        ),
        (["--worker-ceiling=12XB"], "ERROR: isolator: --worker-ceiling: '12XB' has an unknown *"),
        (
            ["--worker-ceiling-kind=cgroup"],
            "ERROR: isolator: --worker-ceiling-kind: 'cgroup' needs a ceiling to enforce: "
            "--worker-mem=SIZE or --worker-ceiling=SIZE",
        ),
        (
            ["--worker-mem=1GB", "--worker-ceiling-kind=memory"],
            "ERROR: isolator: --worker-ceiling-kind: 'memory' is not a kind of ceiling "
            "(choose from rlimit, cgroup)",
        ),
    ],
)
def test_bad_values_are_one_line_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=module", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_a_plugin_that_also_defines_isolate_gets_a_clear_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        other_isolate="""
            def pytest_addoption(parser):
                parser.addoption("--isolate", action="store_true")
        """
    )
    pytester.makepyfile(test_x="def test_x(): pass\n")
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "other_isolate", "-p", "isolator")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: isolator: cannot add its options (*--isolate*); another installed plugin, *"]
    )
    assert "Traceback" not in result.stderr.str()


def test_soak_2000_units_leave_no_fds_and_no_zombies(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        import os
        import pytest

        def state():
            fds = len(os.listdir("/proc/self/fd"))
            children = []
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as f:
                    children += f.read().split()
            return fds, children

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(session):
            session.config._before = state()

        def pytest_sessionfinish(session):
            # Runs after isolator's shutdown (its sessionfinish wraps this one).
            fds, children = state()
            before_fds, _ = session.config._before
            print(f"\\nSOAK fds before={before_fds} after={fds} children={children}")
        """
    )
    pytester.makepyfile(test_soak="\n".join(f"def test_{i}(): pass" for i in range(2000)))
    result = isolated.pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=test", "-q", "-s", timeout=300
    )
    result.assert_outcomes(passed=2000)
    line = next(line for line in result.outlines if "SOAK" in line)
    line = line[line.index("SOAK") :]
    before, after = (int(part.split("=")[1]) for part in line.split()[2:4])
    assert after == before, line
    assert line.endswith("children=[]"), line


def test_without_fork_support_isolation_says_so_once(pytester: pytest.Pytester) -> None:
    # A plugin loaded before isolator configures takes away what isolation
    # needs, as on a platform without it.
    pytester.makepyfile(
        no_memfd="import os\n\ndel os.memfd_create\n",
        test_x="def test_x(): pass\n",
    )
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "no_memfd", "-p", "isolator", "--isolate=module")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: isolator: --isolate: isolation needs Linux 5.3+ (os.memfd_create is missing "
            "here); run without --isolate, or use pytest-xdist for parallel runs"
        ]
    )
    assert "Traceback" not in result.stderr.str()
    # Without --isolate the same run works.
    pytester.runpytest("-p", "no_memfd", "-p", "isolator").assert_outcomes(passed=1)


def test_faulthandler_timeout_does_not_disarm_isolate_timeout(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeini("[pytest]\nfaulthandler_timeout = 60\n")
    pytester.makepyfile(test_hang="import time\n\ndef test_hang():\n    time.sleep(60)\n")
    result = isolated.pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=module", "--isolate-timeout=1", timeout=50
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["worker w* timed out after 1s and was killed while running *"])


def test_a_stop_decided_only_in_the_parent_stops_cleanly(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        SESSION = {}

        def pytest_sessionstart(session):
            SESSION["s"] = session

        def pytest_runtest_logreport(report):
            # Reporting hooks run in the parent only.
            if report.failed:
                SESSION["s"].shouldstop = "a conftest said stop"
        """
    )
    pytester.makepyfile(
        test_stop="def test_1():\n    assert 0\n\ndef test_2(): pass\n\ndef test_3(): pass\n"
    )
    result = isolated.run("module")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Interrupted: a conftest said stop*"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_workers_dying_now_and_then_do_not_stop_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        import os
        import pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_protocol(item):
            if item.name.startswith("test_die"):
                os._exit(3)
        """
    )
    names = ["die1", "ok1", "ok2", "die2", "ok3", "die3", "ok4", "ok5"]
    pytester.makepyfile(test_mix="\n".join(f"def test_{name}(): pass" for name in names))
    result = isolated.run("test")
    result.assert_outcomes(passed=5, errors=3)
    assert "in a row" not in result.stdout.str()


def test_a_standby_killed_while_it_waits_costs_no_test(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_a="""
            import os, signal

            def test_kills_its_siblings():
                # Like the OOM killer picking the idle standby worker.
                parent = os.getppid()
                for task in os.listdir(f"/proc/{parent}/task"):
                    with open(f"/proc/{parent}/task/{task}/children") as f:
                        for pid in map(int, f.read().split()):
                            if pid != os.getpid():
                                os.kill(pid, signal.SIGKILL)
        """,
        test_b="def test_b():\n    pass\n",
    )
    result = isolated.run("module", "-v")
    result.assert_outcomes(passed=2)


def test_empty_mode_is_an_error_not_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: isolator: --isolate: '' is not an isolation mode *"])


def test_a_report_of_over_4_gib_is_announced_not_refused() -> None:
    """A test may capture more output than 4 GiB (plain pytest reports it);
    only a header beyond any real message reads as garbage."""
    read_fd, write_fd = os.pipe()
    try:
        receiver = wire.Receiver(read_fd)
        os.write(write_fd, struct.pack("<Q", 5 << 30))
        assert receiver.fill()
        assert not receiver.garbled
        os.write(write_fd, struct.pack("<Q", 1 << 62))
        receiver = wire.Receiver(read_fd)
        assert receiver.fill()
        assert receiver.garbled
    finally:
        os.close(read_fd)
        os.close(write_fd)
