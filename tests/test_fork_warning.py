"""Workers are forked from a process that has other threads: an xdist node always
has execnet's receiver thread, and plugins keep threads of their own. CPython
3.12+ warns about that on every ``os.fork()`` (gh-100228) and 3.15 raises the
warning under ``-W error`` (gh-135427). Neither may reach the user."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

from conftest import IsolatedRunner

#: Tests in the inner run; with ``--isolate=test`` each is a fork, and the
#: standby fork happens while another worker runs.
SUITE = {
    f"test_m{m}": "\n".join(f"def test_{i}():\n    pass\n" for i in range(3)) for m in range(2)
}
TESTS = 6

#: How many threads the pytest process (or each xdist node) has when
#: collection is over, just before the first fork: the tests below mean
#: something only if it is more than one.
COUNTS_THREADS = """
    import os

    def pytest_collection_finish(session):
        threads = len(os.listdir("/proc/self/task"))
        with open(os.environ["THREADS_FILE"], "a") as f:
            f.write(f"{threads}\\n")
"""

#: A plugin that keeps a thread in the pytest process, as pytest-rerunfailures
#: does (its status server runs whenever pytest-xdist is installed).
KEEPS_A_THREAD = """
    import threading

    _stop = threading.Event()

    def pytest_configure(config):
        threading.Thread(target=_stop.wait, name="plugin-thread", daemon=True).start()
"""

#: os.fork() as CPython 3.15 has it, on any version: once the child exists, the
#: parent warns if it has other threads, through the warning filters, so an
#: ``error`` filter makes os.fork() raise. Attributed to os.fork()'s caller
#: (stacklevel 2 here is CPython's stacklevel 1 from C).
FORK_AS_ON_315 = """
    import os
    import warnings

    _real_fork = os.fork

    def _fork_as_on_315():
        with warnings.catch_warnings():
            # This interpreter's own warning (3.12 to 3.14) is what is emulated here.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = _real_fork()
        if pid and len(os.listdir("/proc/self/task")) > 1:
            warnings.warn(
                f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead "
                "to deadlocks in the child.",
                DeprecationWarning,
                stacklevel=2,
            )
        return pid

    os.fork = _fork_as_on_315
"""

THREADS = {"xdist": ["-n", "2"], "plugin-thread": []}


def _inner_project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, threads: str, *extra: str
) -> Path:
    conftest = COUNTS_THREADS + "".join(extra)
    if threads == "plugin-thread":
        conftest += KEEPS_A_THREAD
    pytester.makeconftest(conftest)
    pytester.makepyfile(**SUITE)
    counts = pytester.path / "threads.txt"
    monkeypatch.setenv("THREADS_FILE", str(counts))
    return counts


def _assert_threads_were_there(counts: Path, threads: str) -> None:
    # One line per process that collected and forks: the pytest process, or
    # each of the two xdist nodes (the xdist controller does not collect).
    per_process = [int(line) for line in counts.read_text().split()]
    assert len(per_process) == (2 if threads == "xdist" else 1)
    assert all(count > 1 for count in per_process), per_process


def _assert_no_fork_warning(result: pytest.RunResult) -> None:
    output = "\n".join(result.outlines + result.errlines)
    assert "multi-threaded" not in output
    assert "INTERNALERROR" not in output
    result.assert_outcomes(passed=TESTS, warnings=0)
    assert result.ret == pytest.ExitCode.OK


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason=f"needs CPython 3.12+, which warns when forking with threads; this is "
    f"{platform.python_implementation()} {platform.python_version()} "
    "(.ci/run runs the suite on 3.13 too)",
)
@pytest.mark.parametrize("threads", THREADS)
def test_no_fork_warning_reaches_the_user(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    threads: str,
) -> None:
    counts = _inner_project(pytester, monkeypatch, threads)
    # Warnings show as pytest shows them by default (DeprecationWarning included).
    result = isolated.run("test", *THREADS[threads])
    _assert_threads_were_there(counts, threads)
    _assert_no_fork_warning(result)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("how", ["cmdline", "ini"])
def test_fork_warning_as_error_does_not_break_isolation(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    threads: str,
    how: str,
) -> None:
    """On 3.15 the warning raises from os.fork() under an error filter, after the
    child exists; emulated here so that every interpreter checks it."""
    counts = _inner_project(pytester, monkeypatch, threads, FORK_AS_ON_315)
    if how == "ini":
        pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
        args = THREADS[threads]
    else:
        args = ["-W", "error", *THREADS[threads]]
    result = isolated.run("test", *args)
    _assert_threads_were_there(counts, threads)
    _assert_no_fork_warning(result)


#: A test module that forks as it is imported (as one that starts a
#: multiprocessing pool at import does), while the conftest's 96 MB are
#: being collapsed into huge pages on a thread.
FORKS_WHILE_COLLECTED = {
    "conftest": """
        DATA = bytearray(b"\\x01") * (96 * 1024 * 1024)
    """,
    "test_forks": """
        import os

        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

        def test_imported():
            pass
    """,
}


def test_a_fork_while_pytest_collects_finds_no_thread_of_ours(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """isolator collapses memory on a thread while pytest collects (see
    ``forking``); a fork by the tests' own code then ends that thread first,
    so the fork warns about nothing a plain run would not."""
    pytester.makeconftest(FORKS_WHILE_COLLECTED["conftest"] + FORK_AS_ON_315)
    pytester.makepyfile(test_forks=FORKS_WHILE_COLLECTED["test_forks"], **SUITE)
    # pytest-rerunfailures (installed here) keeps a thread of its own.
    result = isolated.run("test", "-W", "error", "-p", "no:rerunfailures")
    output = "\n".join(result.outlines + result.errlines)
    assert "multi-threaded" not in output
    result.assert_outcomes(passed=TESTS + 1)
