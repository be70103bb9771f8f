"""Every collected test ends with exactly one verdict, whatever it does to its
worker, and nothing it started outlives the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import IsolatedRunner
from isolator import cgroup

MODES = ["module", "test", "marked", "shared"]
#: The same, plus module mode spread over two pytest-xdist nodes.
MODES_AND_XDIST = [*MODES, "module-n2"]


def mode_args(mode: str, *args: str) -> list[str]:
    """Options for ``mode`` ("module-n2": module mode under ``-n 2``)."""
    extra: list[str] = []
    if mode == "module-n2":
        mode, extra = "module", ["-n", "2", "--dist", "loadfile"]
    if mode == "shared" and not any(arg.startswith("--worker-mem") for arg in args):
        extra.append("--worker-mem=1GB")
    return [f"--isolate={mode}", *extra]


def run(isolated: IsolatedRunner, mode: str, *args: str) -> pytest.RunResult:
    return isolated.pytester.runpytest("-p", "isolator", *mode_args(mode, *args), *args)


def without_basetemp(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """A run in a subprocess without the ``--basetemp`` pytester always gives."""
    return pytester.run(sys.executable, "-m", "pytest", "-p", "isolator", *args)


def no_internal_error(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text, text[-3000:]


def count_testcases(xml: Path) -> int:
    return xml.read_text().count("<testcase ")


# -- faults that used to end the run -----------------------------------------

HOG = """
    import pytest

    def hoard():
        # Take every byte of address space the ceiling allows, down to the
        # smallest pieces, and keep it: pytest then has nothing left to
        # format the failure with.
        kept = []
        size = 1 << 24
        while size >= 16:
            try:
                kept.append(bytearray(size))
            except MemoryError:
                size //= 2
        return kept

    @pytest.fixture
    def exhausted():
        kept = hoard()
        raise ValueError(f"setup gave up after {len(kept)} pieces")

    @pytest.fixture
    def exhausted_at_teardown():
        yield
        kept = hoard()
        raise ValueError(f"teardown gave up after {len(kept)} pieces")

    def test_before():
        pass

    def test_exhausts_then_fails():
        kept = hoard()
        assert len(kept) == -1

    def test_exhausts_in_setup(exhausted):
        pass

    def test_exhausts_in_teardown(exhausted_at_teardown):
        pass

    def test_after():
        pass
"""


@pytest.mark.parametrize("mode", MODES_AND_XDIST)
def test_memory_error_while_pytest_builds_the_report_fails_only_that_test(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(test_hog=HOG, test_other="def test_other():\n    pass\n")
    xml = pytester.path / "out.xml"
    result = run(isolated, mode, "--worker-mem=96MB", f"--junitxml={xml}")
    no_internal_error(result)
    result.assert_outcomes(passed=4, failed=1, errors=2)
    # Each reports its own failure, not a worker that died. On Python 3.10,
    # explaining a failed assert takes memory inside the test itself, so the
    # test fails with the MemoryError that names the ceiling; and pytest's own
    # finalizer hook runs out next to the fixture's error, which it shows in
    # an exception group.
    own_failure = (
        "E       assert * == -1"
        if sys.version_info >= (3, 11)
        else "E       MemoryError: worker w* is limited to 96MB * test_exhausts_then_fails asked*"
    )
    result.stdout.fnmatch_lines_random(
        [
            own_failure,
            "E       ValueError: setup gave up after * pieces",
            "*ValueError: teardown gave up after * pieces",
        ]
    )
    assert "while running" not in result.stdout.str()
    assert count_testcases(xml) == 6


UNPICKLABLE_CONFTEST = """
    import pytest

    class Picky(Exception):
        # Pickles, but unpickling calls Picky(message) and fails: the
        # classic exception whose __init__ differs from its args.
        def __init__(self, a, b):
            super().__init__(f"{a}-{b}")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if item.name == "test_plugin_attribute":
            report.picky = Picky(1, 2)
        return report
"""

UNPICKLABLE = """
    import threading, warnings

    def test_lambda(record_property):
        record_property("callback", lambda: 1)

    def test_lock(record_property):
        record_property("lock", threading.Lock())

    def test_local_class(record_property):
        class Local:
            def __str__(self):
                return "local-thing"
        record_property("local", Local())

    def test_plugin_attribute():
        pass

    def test_fails_with_one(record_property):
        record_property("late", lambda: 2)
        assert 0, "failing on purpose"

    def test_warns_with_one():
        class LocalWarning(UserWarning):
            pass
        warnings.warn(LocalWarning(threading.Lock()))

    def test_fine():
        pass
"""


@pytest.mark.parametrize("mode", MODES_AND_XDIST)
def test_what_cannot_be_pickled_crosses_as_text(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makeconftest(UNPICKLABLE_CONFTEST)
    pytester.makepyfile(test_props=UNPICKLABLE)
    xml = pytester.path / "out.xml"
    # xunit1: record_property warns under junit's default family.
    result = run(isolated, mode, f"--junitxml={xml}", "-o", "junit_family=xunit1", "-W", "always")
    no_internal_error(result)
    result.assert_outcomes(passed=6, failed=1, warnings=1)
    # pytest-xdist cannot send a category defined in a function to its
    # controller, so the category's first importable base stands in for it.
    category = "UserWarning" if mode == "module-n2" else "LocalWarning"
    result.stdout.fnmatch_lines(["*failing on purpose*", f"*: {category}: <unlocked*lock*"])
    text = xml.read_text()
    assert count_testcases(xml) == 7
    # junit xml writes str() of a property's value, as it does without isolation.
    assert 'name="local" value="local-thing"' in text
    assert re.search(r'name="callback" value="&lt;function test_lambda', text)
    assert re.search(r'name="lock" value="&lt;unlocked _thread.lock object', text)


FAULTY_PLUGIN = """
    import os
    import pytest

    COLLECTOR = os.getpid()

    def in_worker(item, name):
        return os.getpid() != COLLECTOR and item.name == name

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item):
        if in_worker(item, "test_fault_before"):
            raise RuntimeError("plugin broke before the test")
        result = yield
        if in_worker(item, "test_fault_after"):
            raise RuntimeError("plugin broke after the test")
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if call.when == "call" and in_worker(item, "test_fault_in_report"):
            raise KeyError("plugin broke while reporting")
        return report
"""


@pytest.mark.parametrize("mode", MODES_AND_XDIST)
def test_an_error_outside_the_test_phases_is_that_tests_failure(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makeconftest(FAULTY_PLUGIN)
    names = ["first", "fault_before", "middle", "fault_in_report", "fault_after", "last"]
    pytester.makepyfile(test_faults="\n".join(f"def test_{n}():\n    pass\n" for n in names))
    xml = pytester.path / "out.xml"
    result = run(isolated, mode, "-v", f"--junitxml={xml}")
    no_internal_error(result)
    # Before the test: its setup fails; while reporting its call: the call
    # fails; after all its phases reported: it keeps its verdict, and the
    # fault is shown in the summary.
    result.assert_outcomes(passed=4, failed=1, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*failed outside the test's phases (RuntimeError: plugin broke before the test)"
            " while running test_faults.py::test_fault_before (setup)*",
            "*failed outside the test's phases (KeyError: 'plugin broke while reporting')"
            " while running test_faults.py::test_fault_in_report (call)*",
            "*isolator: worker faults outside the test phases*",
            "*after test_faults.py::test_fault_after reported:*",
            "*RuntimeError: plugin broke after the test*",
        ]
    )
    assert count_testcases(xml) == 6


@pytest.mark.parametrize("mode", MODES)
def test_a_test_that_closes_the_pipe_fails_and_the_rest_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(
        test_pipe="""
            import os

            def test_before():
                pass

            def test_closes_everything():
                os.closerange(3, 65536)

            def test_after():
                pass
        """
    )
    report = pytester.path / "mem.json"
    result = run(isolated, mode, "-s", f"--isolate-report={report}")
    no_internal_error(result)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*lost its pipe to the parent*while running test_pipe.py::test_closes_everything*"]
    )
    ended = [w["ended"] for w in json.loads(report.read_text())["workers"]]
    assert "lost its pipe" in ended


@pytest.mark.parametrize("mode", ["module", "test"])
def test_a_forked_child_that_returns_into_pytest_runs_nothing(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(
        test_fork="""
            import os, pathlib

            def test_forks_and_returns():
                pid = os.fork()
                if pid == 0:
                    return  # the child goes back into pytest's code
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0

            def test_after():
                with open("ran.txt", "a") as f:
                    f.write(f"{os.getpid()}\\n")
        """
    )
    result = run(isolated, mode, "-v")
    no_internal_error(result)
    result.assert_outcomes(passed=2)
    assert result.stdout.str().count("test_forks_and_returns PASSED") == 1
    assert len((pytester.path / "ran.txt").read_text().split()) == 1


def test_a_crash_in_each_modules_first_setup_does_not_stop_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """The test began, so its worker's death is its failure, not a worker
    that died before its first test (three of which stop the run)."""
    pytester.makeconftest(
        """
        import os, pytest

        @pytest.fixture
        def dies():
            os._exit(4)
        """
    )
    for i in range(4):
        pytester.makepyfile(**{f"test_m{i}": "def test_first(dies):\n    pass\n"})
    result = isolated.run("module")
    result.assert_outcomes(errors=4)
    assert "stopping" not in result.stdout.str()


def test_a_worker_that_cannot_be_forked_fails_its_test_only(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        import errno, os, pathlib

        real_fork = os.fork
        calls = 0
        freed = pathlib.Path("freed").resolve()

        def fork():
            # The first fork makes the zygote, the second test_1's worker;
            # every later one is refused, as under a process limit that
            # nothing frees (whether test_2's start is tried once or again),
            # until test_2's verdict is in.
            global calls
            calls += 1
            if calls >= 3 and not freed.exists():
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            return real_fork()

        def pytest_runtest_logreport(report):
            if report.nodeid.endswith("::test_2") and report.when == "teardown":
                freed.touch()

        os.fork = fork
        """
    )
    pytester.makepyfile(test_f="".join(f"def test_{i}():\n    pass\n\n" for i in range(1, 5)))
    result = isolated.run("test", "-v")
    no_internal_error(result)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*isolator could not start a worker for test_f.py::test_2: [[]Errno 11[]]*"]
    )


BUGGY_PYTEST_PROCESS = """
    import os

    import isolator.controller as controller

    # A bug of isolator's own, in the pytest process, at a point chosen by
    # the test: as the worker is chosen, as a report is replayed, as a
    # unit's worker says goodbye, or as the run ends.
    WHERE = os.environ["ISOLATOR_TEST_BUG"]
    real_worker_for = controller.Controller._worker_for
    real_log = controller.Controller._log
    real_dispatch = controller.Controller._dispatch

    def worker_for(self, item, nextitem):
        if WHERE == "start" and item.name == "test_b":
            raise RuntimeError("injected bug: start")
        return real_worker_for(self, item, nextitem)

    def log(self, message, ihook, inflight=None):
        data = message[1] if message[0] == "report" else {}
        test_b_call = str(data.get("nodeid")).endswith("::test_b") and data.get("when") == "call"
        if WHERE == "replay" and test_b_call:
            raise RuntimeError("injected bug: replay")
        return real_log(self, message, ihook, inflight)

    def dispatch(self, proc, message):
        if WHERE == "goodbye" and message[0] == "done":
            raise RuntimeError("injected bug: goodbye")
        return real_dispatch(self, proc, message)

    real_feed = controller.Controller._feed

    def feed(self, proc, item, nextitem):
        real_feed(self, proc, item, nextitem)
        if WHERE == "fed" and item.name == "test_b":
            raise RuntimeError("injected bug: fed")

    controller.Controller._feed = feed

    # A hook of a plugin's in the pytest process (not in the workers, which
    # run the same conftest) that raises as test_b's call report passes.
    raised = []

    def pytest_runtest_logreport(report):
        if WHERE not in ("hook", "hook-always") or "ISOLATOR_WORKER" in os.environ:
            return
        if report.nodeid.endswith("::test_b") and report.when == "call":
            if WHERE == "hook-always" or not raised:
                raised.append(1)
                raise RuntimeError(f"injected bug: {WHERE}")

    real_end_orphans = controller.Controller._end_orphans

    def end_orphans(self, proc):
        if WHERE == "end" and proc is None:
            raise RuntimeError("injected bug: end")
        return real_end_orphans(self, proc)

    controller.Controller._end_orphans = end_orphans
    controller.Controller._worker_for = worker_for
    controller.Controller._log = log
    controller.Controller._dispatch = dispatch
"""


@pytest.mark.parametrize(
    ("where", "args"),
    [
        ("start", ["--isolate=module"]),
        ("start", ["--isolate=test"]),
        ("replay", ["--isolate=module"]),
        ("replay", ["--isolate=test"]),
        ("replay", ["--isolate=module", "-n", "2"]),
        ("goodbye", ["--isolate=module"]),
        ("end", ["--isolate=module"]),
        ("fed", ["--isolate=module"]),
        ("fed", ["--isolate=test"]),
        ("hook", ["--isolate=module"]),
        ("hook-always", ["--isolate=module"]),
    ],
)
def test_a_bug_in_the_pytest_process_fails_the_test_in_flight_only(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str, args: list[str]
) -> None:
    pytester.makeconftest(BUGGY_PYTEST_PROCESS)
    record = (
        "    with open('ran', 'a') as f:\n"
        "        f.write(__import__('os').environ['PYTEST_CURRENT_TEST'].split()[0] + ' ')\n"
    )
    pytester.makepyfile(
        test_one="".join(f"def test_{name}():\n{record}\n" for name in "abc"),
        test_two=f"def test_d():\n{record}",
    )
    monkeypatch.setenv("ISOLATOR_TEST_BUG", where)
    result = pytester.runpytest("-p", "isolator", "-rA", "--junitxml=junit.xml", *args)
    no_internal_error(result)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(
        [
            "*= isolator: internal errors =*",
            "isolator failed * time* (a bug in isolator, or a plugin's hook raising as a*",
            "at the end of the run:" if where == "end" else "while running test_one.py::test_*",
            f"RuntimeError: injected bug: {where}",
        ]
    )
    assert count_testcases(pytester.path / "junit.xml") == 4
    if where in ("goodbye", "end", "hook", "hook-always"):
        # Every test had its verdict when the bug struck: they stand (the
        # hooks before the one that raised saw test_b's report).
        result.assert_outcomes(passed=4)
        return
    # Before the worker was chosen it fails in setup, as an error; in the
    # middle of the replay, in the phase being replayed.
    verdict = "ERROR" if where in ("start", "fed") else "FAILED"
    result.assert_outcomes(passed=3, **{"errors" if verdict == "ERROR" else "failed": 1})
    ran = pytester.path.joinpath("ran").read_text().split()
    if "--isolate=test" in args:
        # None ran twice: no worker was left behind to run its test unseen.
        assert len(ran) == len(set(ran)), ran
    # (Under --isolate=module the worker runs ahead of the replay, so one
    # ended mid-unit may have run a test that then runs again in a fresh one.)
    assert {"test_one.py::test_a", "test_one.py::test_c", "test_two.py::test_d"} <= set(ran)
    result.stdout.fnmatch_lines(
        [
            "isolator failed while running test_one.py::test_b; this is a bug in isolator or "
            "in a plugin's hook, not in the test (the run goes on in a fresh worker):",
            f"{verdict} test_one.py::test_b*",
        ]
    )


@pytest.mark.parametrize("mode", ["module", "test"])
def test_a_test_that_patches_what_reports_are_sent_with_keeps_its_verdict(
    pytester: pytest.Pytester, mode: str
) -> None:
    """A patch made through monkeypatch or mock.patch is undone at teardown,
    after the call's report is sent: the worker must not send it with the
    patched functions (os.write returning 0 hung the run; os.getpid patched
    made the worker take itself for a fork of a test's and leave)."""
    pytester.makepyfile(
        test_patches="""
            import io, os, pickle, resource, time
            from unittest import mock
            import pytest

            @pytest.fixture
            def patched(monkeypatch, module, name, fake):
                # From the test's setup to its teardown.
                monkeypatch.setattr(module, name, fake)

            @pytest.mark.parametrize(
                ("module", "name", "fake"),
                [
                    (os, "write", lambda fd, data: 0),
                    (os, "write", mock.Mock(side_effect=OSError(5, "EIO"))),
                    (os, "getpid", lambda: 12345),
                    (os, "_exit", mock.Mock()),
                    (os, "pread", mock.Mock(side_effect=OSError(5, "EIO"))),
                    (pickle, "dumps", mock.Mock(side_effect=TypeError("no"))),
                    (io, "BytesIO", mock.Mock(side_effect=TypeError("no"))),
                    (resource, "getrusage", mock.Mock(side_effect=OSError(5, "EIO"))),
                    (time, "process_time", mock.Mock(return_value="never")),
                ],
            )
            def test_patched(patched):
                pass

            def test_after():
                pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "isolator", f"--isolate={mode}", timeout=60)
    result.assert_outcomes(passed=10)


def _pids_cgroup_or_skip(name: str) -> Path:
    """A new cgroup of the pids controller (v1, or the root of v2), or skip."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a cgroup with a process limit")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields[fields.index("-") + 1 :]
        mount = Path(fields[4])
        if after[0] == "cgroup" and "pids" in after[2].split(","):
            break
        controllers = mount / "cgroup.subtree_control"
        if after[0] == "cgroup2" and "pids" in cgroup.words(controllers):
            break
    else:
        pytest.skip("no cgroup hierarchy with the pids controller is mounted here")
    group = mount / name
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc}")
    return group


def _pytest_under_a_process_limit(
    pytester: pytest.Pytester, mode: str, hook: str, room: int, more_conftest: str = ""
) -> subprocess.CompletedProcess[str]:
    """pytest run in a pids cgroup whose limit is set, in the pytest process's
    ``hook``, to what it holds then (its threads too) and ``room`` more."""
    group = _pids_cgroup_or_skip(f"isolator-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    pytester.makeconftest(
        textwrap.dedent(
            f"""
            from pathlib import Path
            import pytest

            @pytest.hookimpl(tryfirst=True)
            def {hook}(session):
                group = Path({str(group)!r})
                current = int((group / "pids.current").read_text())
                (group / "pids.max").write_text(str(current + {room}))
            """
        )
        + textwrap.dedent(more_conftest)
    )

    def join() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "isolator", f"--isolate={mode}", "-q"],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=join,
        )
    finally:
        (group / "pids.max").write_text("max")
        group.rmdir()


@pytest.mark.parametrize("mode", ["module", "test", "marked"])
def test_a_process_limit_with_room_for_one_worker_loses_no_test(
    pytester: pytest.Pytester, mode: str
) -> None:
    """Under a limit on processes (docker --pids-limit, a pids cgroup), set
    once the run began, with room for the zygote and one worker only: the
    next worker can start only once the last one is reaped, and with no
    standby; every test still runs."""
    # Under --isolate=marked the unmarked tests share a worker, parked while
    # the marked one runs in a worker of its own.
    tests = "import pytest\n\ndef test_0():\n    pass\n\n@pytest.mark.isolate\n"
    tests += "def test_1():\n    pass\n\ndef test_2():\n    pass\n"
    pytester.makepyfile(test_a=tests, test_b=tests)
    proc = _pytest_under_a_process_limit(pytester, mode, "pytest_collection_finish", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed" in proc.stdout
    assert "could not start a worker" not in proc.stdout


@pytest.mark.parametrize("mode", ["module", "test"])
def test_a_tight_process_limit_leaves_the_tests_their_room(
    pytester: pytest.Pytester, mode: str
) -> None:
    """With room for the zygote, one worker and one process of a test's own,
    found at start-up, isolator keeps nothing more (no standby, no ended
    worker awaiting its reaping), and says so."""
    test = "import subprocess\n\ndef test_{}():\n    subprocess.run(['true'], check=True)\n"
    pytester.makepyfile(
        test_a=test.format(0) + "\n" + test.format(1), test_b=test.format(2) + "\n" + test.format(3)
    )
    proc = _pytest_under_a_process_limit(pytester, mode, "pytest_sessionstart", 3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout
    assert re.search(
        r"isolator: only 3 more processes may start here \(pids cgroup .*: pids.max \d+\): "
        r"no worker is forked ahead, and each is reaped as it ends",
        proc.stdout,
    ), proc.stdout


def test_no_room_for_a_thread_while_pytest_collects_loses_nothing(
    pytester: pytest.Pytester,
) -> None:
    """isolator collapses memory on a thread while pytest collects (see
    ``forking``). With a pids limit that a conftest's own helpers use up by
    then, that thread cannot start: the run does without it (before, an
    INTERNALERROR: "can't start new thread", and no test ran)."""
    pytester.makepyfile(test_a="def test_a(): pass\n\ndef test_b(): pass\n")
    proc = _pytest_under_a_process_limit(
        pytester,
        "test",
        "pytest_sessionstart",
        2,
        more_conftest="""
        import subprocess

        HELPERS = []

        def pytest_collection(session):
            HELPERS.extend(subprocess.Popen(["sleep", "0.2"]) for _ in range(2))

        def pytest_collection_modifyitems(items):
            for helper in HELPERS:
                helper.wait()
        """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    assert "INTERNALERROR" not in proc.stdout + proc.stderr


#: Leaves the pytest process ``spare`` descriptors free, as a conftest that
#: holds many open files (or lowers the limit) may.
FEW_DESCRIPTORS_CONFTEST = """
import os, resource
_open = len(os.listdir("/proc/self/fd")) - 1
_, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_open + {spare}, {hard}))
"""

#: Each test opens descriptors until it may open no more, and writes down how many it got.
COUNTS_ITS_DESCRIPTORS = """
import os, pytest

@pytest.mark.parametrize("n", range(3))
def test_room(n):
    opened = []
    try:
        while True:
            opened.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for fd in opened:
        os.close(fd)
    with open(os.path.join(os.environ["ROOM"], f"{n}-{os.getpid()}"), "w") as f:
        f.write(str(len(opened)))
"""


def _descriptors_each_test_could_open(pytester: pytest.Pytester, *args: str) -> list[int]:
    room = pytester.path / "room"
    shutil.rmtree(room, ignore_errors=True)
    room.mkdir()
    pytester.makepyfile(test_room=COUNTS_ITS_DESCRIPTORS)
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=3)
    return sorted(int(path.read_text()) for path in room.iterdir())


@pytest.mark.parametrize(
    ("mode", "spare"), [("module", 6), ("test", 6), ("marked", 6), ("module", 5)]
)
def test_few_free_descriptors_leave_the_tests_the_same_room(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str, spare: int
) -> None:
    """A conftest leaves 6 (or 5) descriptors free: without isolation every test
    runs; with it, every test errored ("could not start a worker"). Now the
    pytest process raises its own limit for its pipes, and each worker's is
    set to leave its tests what was free when collection ended: at least
    what they have without isolation (pytest opens a few more for itself
    after that), not the 64 or so raised for isolator."""
    pytester.makeconftest(FEW_DESCRIPTORS_CONFTEST.format(spare=spare, hard="_hard"))
    monkeypatch.setenv("ROOM", str(pytester.path / "room"))
    plain = _descriptors_each_test_could_open(pytester, "-p", "no:isolator")
    isolated = _descriptors_each_test_could_open(pytester, "-p", "isolator", f"--isolate={mode}")
    assert 1 <= plain[0] <= spare
    assert plain[0] <= isolated[0], (plain, isolated)
    assert isolated[-1] <= spare, (plain, isolated)


#: Opens files once collection is over until it may open no more, and keeps
#: them (under a soft limit of 256, as after ``ulimit -Sn 256``).
USES_UP_DESCRIPTORS = """
import os, resource

resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
KEPT = []

def pytest_collection_modifyitems(items):
    try:
        while True:
            KEPT.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
"""


@pytest.mark.parametrize("mode", ["module", "test"])
def test_no_free_descriptor_at_all_loses_no_verdict(pytester: pytest.Pytester, mode: str) -> None:
    """Not even one descriptor free to count the open ones with: isolator
    raises the limit by one to count them, then as before (before, every
    test errored, "could not start a worker")."""
    pytester.makeconftest(USES_UP_DESCRIPTORS)
    pytester.makepyfile(test_a="def test_a(): pass\n\ndef test_b(): pass\n")
    # (The cache could not be written either, which would be a warning.)
    plain = pytester.runpytest_subprocess("-p", "no:isolator", "-p", "no:cacheprovider")
    plain.assert_outcomes(passed=2)
    result = pytester.runpytest_subprocess(
        "-p", "isolator", f"--isolate={mode}", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(
        ["isolator: only * free here (RLIMIT_NOFILE 256); isolator raised*"]
    )
    result.assert_outcomes(passed=2)


def test_a_hard_descriptor_limit_is_said_and_loses_no_verdict(
    pytester: pytest.Pytester,
) -> None:
    """With the hard limit where the soft one is, nothing can be raised:
    isolator says so at start-up, keeps no worker ahead, and a test whose
    worker cannot start fails saying why; every test has a verdict."""
    pytester.makeconftest(FEW_DESCRIPTORS_CONFTEST.format(spare=6, hard="_open + 6"))
    pytester.makepyfile(test_a="def test_a(): pass\n\ndef test_b(): pass\n")
    result = pytester.runpytest_subprocess("-p", "isolator", "--isolate=test")
    result.stdout.fnmatch_lines(
        [
            "isolator: only * file descriptors were free here (RLIMIT_NOFILE *); the hard limit "
            "allows no more, so no worker is forked ahead and each is reaped as it ends*",
        ]
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("errors", 0) == 2, outcomes


# -- how each worker ended ----------------------------------------------------


def test_the_worker_table_says_how_each_worker_ended(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_ends="""
            import os, signal, time

            def test_hangs():
                time.sleep(60)

            def test_killed():
                os.kill(os.getpid(), signal.SIGKILL)

            def test_closes_its_pipe():
                os.closerange(3, 65536)

            def test_exits():
                os._exit(7)
        """
    )
    report = pytester.path / "mem.json"
    result = isolated.run("test", "-s", "--isolate-timeout=1", f"--isolate-report={report}")
    result.assert_outcomes(failed=4)
    workers = json.loads(report.read_text())["workers"]
    ended = sorted(w["ended"] for w in workers)
    assert ended == [
        "exited with code 7",
        "killed by SIGKILL (OOM killer?)",
        "lost its pipe",
        "timed out after 1s",
    ]
    assert all(w["crashed"] for w in workers)
    result.stdout.fnmatch_lines_random(
        ["*timed out after 1s", "*killed by SIGKILL (OOM killer?)", "*lost its pipe"]
    )


# -- processes left behind ----------------------------------------------------

ESCAPING = """
    import os, pathlib, subprocess, sys, time

    TOKEN = {token!r}
    SLEEP = "import time; time.sleep(300)"

    def test_new_session():
        subprocess.Popen([sys.executable, "-c", SLEEP, TOKEN + "-setsid"], start_new_session=True)

    def test_daemon():
        # The classic double fork: the daemon's parent exits at once.
        ready = pathlib.Path(TOKEN + ".daemon")
        daemon = f"open({{str(ready)!r}}, 'w').close(); {{SLEEP}}"
        code = (
            "import os, sys\\n"
            "if os.fork(): os._exit(0)\\n"
            "os.setsid()\\n"
            "if os.fork(): os._exit(0)\\n"
            "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], sys.argv[2]])"
        )
        subprocess.run([sys.executable, "-c", code, daemon, TOKEN + "-daemon"], check=True)
        while not ready.exists():
            time.sleep(0.01)

    def test_forked_without_exec():
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork():
                os._exit(0)
            pathlib.Path(TOKEN + ".pid").write_text(str(os.getpid()))
            time.sleep(300)
            os._exit(0)
        os.waitpid(pid, 0)
        while not pathlib.Path(TOKEN + ".pid").exists():
            time.sleep(0.01)

    def test_orphan_in_the_group():
        subprocess.run(["bash", "-c", f"exec -a {{TOKEN}}-orphan sleep 300 &"], check=True)

    def test_fine():
        pass
"""

CRASHES_AFTER_ESCAPING = """
    import os, subprocess, sys

    TOKEN = {token!r}

    def test_escapes_then_crashes():
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", TOKEN + "-crash"],
            start_new_session=True,
        )
        os._exit(9)

    def test_after():
        pass
"""


def processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("mode", MODES_AND_XDIST)
def test_no_process_a_test_started_outlives_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    token = f"isolator-escape-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(
        test_escaping=ESCAPING.format(token=token),
        test_crashing=CRASHES_AFTER_ESCAPING.format(token=token),
    )
    try:
        result = run(isolated, mode)
        no_internal_error(result)
        result.assert_outcomes(passed=6, failed=1)
        result.stdout.fnmatch_lines_random(
            [
                "*isolator: processes left running*",
                f"*{token}-setsid, started during test_escaping.py::test_new_session*",
                f"*{token}-daemon, started during test_escaping.py::test_daemon*",
                f"*{token}-orphan*",
                f"*{token}-crash, started during test_crashing.py::test_escapes_then_crashes*",
            ]
        )
        assert processes_with(token) == []
        forked = int((pytester.path / f"{token}.pid").read_text())
        assert not alive(forked)
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    token = f"isolator-stubborn-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(
        test_stubborn=f"""
            import subprocess, sys

            CODE = (
                "import signal as s, time; s.signal(s.SIGTERM, s.SIG_IGN); "
                "print(1, flush=True); time.sleep(300)"
            )

            def test_stubborn():
                proc = subprocess.Popen(
                    [sys.executable, "-c", CODE, {token!r}],
                    start_new_session=True, stdout=subprocess.PIPE,
                )
                assert proc.stdout.readline() == b"1\\n"
        """
    )
    try:
        start = time.monotonic()
        result = isolated.run("test")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(
            [f"*{token}, started during*: killed with SIGKILL after ignoring SIGTERM for 2s"]
        )
        assert time.monotonic() - start < 60
        assert processes_with(token) == []
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


# -- temporary directories ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES_AND_XDIST)
def test_one_base_temp_directory_per_run(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = pytester.path / "temproot"
    root.mkdir()
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(root))
    body = "".join(
        f"def test_{i}(tmp_path):\n    (tmp_path / 'f').write_text('x')\n\n" for i in range(12)
    )
    # One failure keeps the base directory (pytest's default retention).
    pytester.makepyfile(test_tmp=body + "def test_fails(tmp_path):\n    assert 0\n")
    result = without_basetemp(pytester, *mode_args(mode))
    result.assert_outcomes(passed=12, failed=1)
    (user_root,) = root.iterdir()
    bases = sorted(p.name for p in user_root.iterdir() if p.name != "pytest-current")
    assert bases == ["pytest-0"]
    if mode == "module-n2":
        # pytest-xdist gives each node a directory of its own inside it.
        assert {p.name for p in (user_root / "pytest-0").iterdir()} <= {"popen-gw0", "popen-gw1"}


@pytest.mark.parametrize("extra", [[], ["-n", "1"]], ids=["alone", "xdist"])
def test_a_given_basetemp_is_emptied_once_not_by_every_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner, extra: list[str]
) -> None:
    pytester.makepyfile(
        test_a="def test_a(tmp_path_factory):\n"
        "    (tmp_path_factory.getbasetemp() / 'a.txt').write_text('a')\n",
        test_b="def test_b(tmp_path_factory):\n"
        "    assert (tmp_path_factory.getbasetemp() / 'a.txt').exists()\n",
    )
    basetemp = pytester.path / "bt"
    result = isolated.run("module", f"--basetemp={basetemp}", *extra)
    result.assert_outcomes(passed=2)


def test_a_run_that_uses_no_temp_directory_leaves_none(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = pytester.path / "temproot"
    root.mkdir()
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(root))
    pytester.makepyfile(test_x="def test_x():\n    assert 0\n")
    without_basetemp(pytester, "--isolate=test").assert_outcomes(failed=1)
    leftover = [p.name for p in root.rglob("pytest-[0-9]*")]
    assert leftover == []


# -- found in review: what the first version got wrong ------------------------


def test_a_process_a_plugin_forked_in_the_pytest_process_is_left_alone(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        import multiprocessing, os, time

        def idle():
            time.sleep(60)

        def pytest_sessionstart(session):
            # Forked (not exec'd) by the pytest process itself, before any worker.
            ctx = multiprocessing.get_context("fork")
            session.config._helper = ctx.Process(target=idle, daemon=True)
            session.config._helper.start()

        def pytest_sessionfinish(session):
            # Runs after isolator's shutdown (its sessionfinish wraps this one).
            print(f"\\nHELPER ALIVE={session.config._helper.is_alive()}")
            session.config._helper.kill()
        """
    )
    pytester.makepyfile(test_x="import os\n\ndef test_crash():\n    os._exit(1)\n")
    result = isolated.run("test", "-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*HELPER ALIVE=True*"])
    assert "processes left running" not in result.stdout.str()


def test_leftovers_are_ended_with_descriptors_past_1024_open(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    token = f"isolator-fds-{uuid.uuid4().hex[:12]}"
    pytester.makeconftest(
        """
        import os

        def pytest_configure(config):
            config._held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        """
    )
    pytester.makepyfile(
        test_fds=f"""
            import os, subprocess, sys

            def test_escapes_then_crashes():
                subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(300)", {token!r}],
                    start_new_session=True,
                )
                os._exit(1)

            def test_escapes():
                subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(300)", {token!r}],
                    start_new_session=True,
                )
        """
    )
    try:
        result = isolated.run("test")
        no_internal_error(result)
        result.assert_outcomes(passed=1, failed=1)
        assert processes_with(token) == []
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_processes_forked_while_others_are_ended_are_ended_too(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    token = f"isolator-hydra-{uuid.uuid4().hex[:12]}"
    pytester.makepyfile(
        test_hydra=f"""
            import os, signal, subprocess, sys

            # Ignores SIGTERM and keeps starting new sessions of sleepers.
            CODE = (
                "import os, signal, subprocess, sys, time\\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                "print(1, flush=True)\\n"
                "while True:\\n"
                "    subprocess.Popen(['sleep', '300'], start_new_session=True)\\n"
                "    time.sleep(0.05)\\n"
            )

            def test_hydra():
                proc = subprocess.Popen(
                    [sys.executable, "-c", CODE, {token!r}],
                    start_new_session=True, stdout=subprocess.PIPE,
                )
                assert proc.stdout.readline() == b"1\\n"
        """
    )
    try:
        before = set(_sleepers())
        result = isolated.run("test")
        result.assert_outcomes(passed=1)
        assert processes_with(token) == []
        assert set(_sleepers()) - before == set()
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def _sleepers() -> list[int]:
    return [
        pid
        for pid in processes_with("sleep\x00300")
        if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00300\x00"
    ]


@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_leftovers_are_ended_when_the_run_stops(
    pytester: pytest.Pytester, isolated: IsolatedRunner, how: str
) -> None:
    token = f"isolator-stop-{uuid.uuid4().hex[:12]}"
    stop = 'pytest.exit("stop")' if how == "exit" else "raise KeyboardInterrupt"
    pytester.makepyfile(
        test_stop=f"""
            import os, pytest, subprocess, sys

            def test_escapes_then_stops():
                subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(300)", {token!r}],
                    start_new_session=True,
                )
                {stop}
        """
    )
    try:
        result = isolated.run("module")
        no_internal_error(result)
        assert processes_with(token) == []
    finally:
        for pid in processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_multiprocessing_helpers_leave_as_at_exit_and_clean_up(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    name = f"isolator-shm-{uuid.uuid4().hex[:10]}"
    pytester.makepyfile(
        test_shm=f"""
            from multiprocessing import shared_memory

            def test_tidy():
                segment = shared_memory.SharedMemory(create=True, size=4096)
                segment.close()
                segment.unlink()

            def test_leaks():
                # Never unlinked: the resource tracker removes it at exit.
                shared_memory.SharedMemory(name={name!r}, create=True, size=4096).close()
        """
    )
    result = isolated.run("test")
    result.assert_outcomes(passed=2)
    assert "processes left running" not in result.stdout.str()
    assert not Path(f"/dev/shm/{name}").exists()


def test_a_fault_after_the_last_report_is_shown_even_from_an_outer_wrapper(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    # A conftest in a subdirectory registers after isolator's own plugin, so
    # its tryfirst wrapper sits outside isolator's.
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text(
        "import os, pytest\n"
        "COLLECTOR = os.getpid()\n"
        "@pytest.hookimpl(wrapper=True, tryfirst=True)\n"
        "def pytest_runtest_protocol(item):\n"
        "    result = yield\n"
        "    if os.getpid() != COLLECTOR and item.name == 'test_one':\n"
        "        raise RuntimeError('outer wrapper broke')\n"
        "    return result\n"
    )
    (sub / "test_sub.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    result = isolated.run("module")
    no_internal_error(result)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*isolator: worker faults outside the test phases*",
            "*RuntimeError: outer wrapper broke*",
        ]
    )


def test_a_warning_class_the_pytest_process_never_imported_stays_out_of_it(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_warnmod="""
            import sys, warnings

            def test_warns(tmp_path, monkeypatch):
                (tmp_path / "helpermod.py").write_text(
                    "class HelperWarning(UserWarning):\\n    pass\\n"
                )
                monkeypatch.syspath_prepend(tmp_path)
                import helpermod
                warnings.warn(helpermod.HelperWarning("from a module of the test's"))

            def test_later_workers_never_saw_it():
                assert "helpermod" not in sys.modules
        """
    )
    result = isolated.run("test")
    no_internal_error(result)
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*HelperWarning: from a module of the test's*"])
    assert "sent garbage" not in result.stdout.str()


def test_odd_objects_in_a_report_cross_as_text(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_odd="""
            class BadStr(str):
                def __str__(self):
                    raise RuntimeError("no str for you")

            class BadInt(int):
                def __int__(self):
                    raise RuntimeError("no int for you")

            def test_bad_str(record_property):
                record_property("s", BadStr("x"))

            def test_bad_int(record_property):
                record_property("i", BadInt(3))

            def test_deep(record_property):
                deep = []
                for _ in range(5000):
                    deep = [deep]
                record_property("deep", deep)
        """
    )
    result = isolated.run("module")
    no_internal_error(result)
    result.assert_outcomes(passed=3)


def test_a_run_that_uses_no_temp_directory_touches_none(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = pytester.path / "temproot"
    monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(root))
    user_root = root / "pytest-of-someone"
    kept = [user_root / f"pytest-{n}" for n in range(3)]
    for path in kept:
        path.mkdir(parents=True)
    given = pytester.path / "given"
    given.mkdir()
    (given / "keep.txt").write_text("x")
    pytester.makepyfile(test_x="def test_x():\n    assert 0\n")
    without_basetemp(pytester, "--isolate=test").assert_outcomes(failed=1)
    without_basetemp(pytester, "--isolate=test", f"--basetemp={given}").assert_outcomes(failed=1)
    assert all(path.is_dir() for path in kept)
    assert (given / "keep.txt").exists()


def test_an_unraisable_exception_in_the_pytest_process_is_reported_once(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makeconftest(
        """
        class Broken:
            def __del__(self):
                raise ValueError("raised in __del__ in the pytest process")

        def pytest_collection_finish(session):
            Broken()
        """
    )
    pytester.makepyfile(test_x="".join(f"def test_{i}():\n    pass\n\n" for i in range(5)))
    plain = pytester.runpytest("-p", "isolator")
    result = isolated.run("test")
    plain_warnings = plain.parseoutcomes().get("warnings", 0)
    assert result.parseoutcomes().get("warnings", 0) == plain_warnings
