"""The ceiling: what the RLIMIT_AS one says when a test runs into it, and the
cgroup one, which counts memory used instead of address space."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import IsolatedRunner, memory_cgroup_or_skip
from isolator import cgroup

#: Each test fails for want of address space in its own way under a 512MB
#: ceiling, while using next to no memory.
ADDRESS_SPACE = {
    "test_address_space": """
        import errno, mmap, os, threading

        import pytest

        @pytest.fixture
        def sparse(tmp_path):
            path = tmp_path / "sparse.bin"
            with open(path, "wb") as f:
                f.truncate(2 * 1024**3)  # 2 GB of holes: no disk, no memory
            return path

        def test_maps_sparse_file(sparse):
            with open(sparse, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                assert m[:4096] == bytes(4096)

        def test_grows_a_mapping():
            with mmap.mmap(-1, 64 * 1024**2) as m:
                m.resize(2 * 1024**3)  # mremap

        def test_starts_threads():
            stop = threading.Event()
            threads = [threading.Thread(target=stop.wait) for _ in range(200)]
            try:
                for thread in threads:
                    thread.start()  # 8 MB of stack reserved for each
            finally:
                stop.set()

        def test_big_bytearray():
            assert bytearray(1024**3)

        def test_library_wraps_the_error(sparse):
            try:
                with open(sparse, "rb") as f:
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise ValueError("could not open the store") from exc

        def test_after():
            assert bytearray(10 * 1024**2)
    """
}

_WAYS_OUT = (
    "Ways out: a bigger ceiling (--worker-mem, --worker-ceiling or "
    "@pytest.mark.isolate(mem=...)), none (--worker-ceiling=none), or one that counts memory "
    "used (--worker-ceiling-kind=cgroup)"
)


_ENOMEM = "E * OSError: *Errno 12* Cannot allocate memory: "


def _explained(test: str) -> str:
    return (
        f"*worker w* is limited to 512MB of address space (RLIMIT_AS) and {test} asked for more "
        "than the * left; RLIMIT_AS counts every mapping and reservation, used or not (* mapped "
        f"since the worker started). {_WAYS_OUT}*"
    )


def test_every_failure_the_address_space_ceiling_causes_explains_itself(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**ADDRESS_SPACE)
    result = isolated.run("module", "--worker-mem=512MB", "-rf")
    result.assert_outcomes(passed=1, failed=5)
    result.stdout.fnmatch_lines_random(
        [
            _ENOMEM + _explained("test_maps_sparse_file"),
            _ENOMEM + _explained("test_grows_a_mapping"),
            "E * RuntimeError: can't start new thread: " + _explained("test_starts_threads"),
            "E * MemoryError: " + _explained("test_big_bytearray"),
            # The library's own error on top, the explained cause below it.
            "E * ValueError: could not open the store",
            _ENOMEM + _explained("test_library_wraps_the_error"),
        ]
    )
    # Each failure recycled its worker ("ceiling hit"); the last test ran fresh.
    result.stdout.fnmatch_lines(["*5 recycled, 0 crashed*"])


def test_without_a_ceiling_the_same_tests_pass(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**ADDRESS_SPACE)
    # (Leaving out the one test that does want 1 GB of memory.)
    result = isolated.run(
        "module", "--worker-mem=512MB", "--worker-ceiling=none", "-k", "not big_bytearray"
    )
    result.assert_outcomes(passed=5)


# -- the cgroup ceiling -------------------------------------------------------

HOG = {
    "test_hog": """
        import mmap

        def test_before():
            pass

        def test_maps_sparse_file(tmp_path):
            path = tmp_path / "sparse.bin"
            with open(path, "wb") as f:
                f.truncate(2 * 1024**3)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                assert m[:4096] == bytes(4096)

        def test_hog():
            data = b"x" * 1024**3  # written, so charged to the cgroup page by page
            assert data

        def test_after():
            assert bytearray(10 * 1024**2)
    """
}


def _ours(hierarchy: cgroup.Hierarchy) -> set[str]:
    return {path.name for path in hierarchy.own.glob("isolator-*")}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["module", "test"])
def test_cgroup_ceiling_kills_a_hog_names_it_and_the_run_goes_on(
    pytester: pytest.Pytester, isolated: IsolatedRunner, version: int, mode: str
) -> None:
    hierarchy = memory_cgroup_or_skip(version)
    before = _ours(hierarchy)
    pytester.makepyfile(**HOG)
    result = isolated.run(mode, "--worker-mem=256MB", "--worker-ceiling-kind=cgroup", "-v")
    # The sparse file that RLIMIT_AS refuses maps fine: it uses no memory.
    result.assert_outcomes(passed=3, failed=1)
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    result.stdout.fnmatch_lines(
        [
            "*test_maps_sparse_file PASSED*",
            "*test_hog FAILED*",
            "*test_after PASSED*",
            f"worker w* (PID *) was killed by the memory ceiling (cgroup {hierarchy.own}/"
            f"isolator-*-w*: {limit_file} 256MB, peak 2*MB) while running test_hog.py::test_hog "
            "(call)",
            "The cgroup ceiling counts memory the worker used (pages it wrote, its copies of pages "
            "it shared, page cache it read in); raise it with --worker-ceiling, --worker-mem or "
            "@pytest.mark.isolate(mem=...)",
            "  w* * killed by the memory ceiling (cgroup)",
        ]
    )
    assert _ours(hierarchy) <= before, "worker cgroups were left behind"


LEFT_RUNNING = {
    "test_escapes": """
        import os, subprocess

        def test_leaves_a_process_no_one_can_tell_is_its_own():
            # A session of its own (out of the worker's process group) and an
            # empty environment (no tag saying which worker started it): once
            # the worker dies, only its cgroup knows the process was its.
            subprocess.Popen(["setsid", "env", "-i", "sleep", "987654"])
            os._exit(3)
    """
}


def test_cgroups_are_removed_with_whatever_is_left_in_them(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    hierarchy = memory_cgroup_or_skip()
    before = _ours(hierarchy)
    pytester.makepyfile(**LEFT_RUNNING)
    result = isolated.run("module", "--worker-mem=256MB", "--worker-ceiling-kind=cgroup")
    result.assert_outcomes(failed=1)
    assert _ours(hierarchy) <= before
    left = subprocess.run(["pgrep", "-f", "sleep 987654"], capture_output=True, text=True)
    assert left.stdout == "", "the process the test started outlived its worker's cgroup"


def _run_elsewhere(wrapper: list[str]) -> subprocess.CompletedProcess[str]:
    """A pytest run under the cgroup ceiling, started through ``wrapper``
    (another user, another mount namespace), in a directory anyone may read."""
    with tempfile.TemporaryDirectory(prefix="isolator-elsewhere-") as where:
        os.chmod(where, 0o755)
        Path(where, "test_x.py").write_text("def test_x(): pass\n")
        return subprocess.run(
            [
                *wrapper,
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "isolator",
                "-p",
                "no:cacheprovider",
                "--isolate=module",
                "--worker-mem=256MB",
                "--worker-ceiling-kind=cgroup",
            ],
            cwd=where,
            capture_output=True,
            text=True,
            check=False,
        )


def test_cgroup_ceiling_where_cgroups_are_read_only_is_a_usage_error() -> None:
    hierarchy = cgroup.memory_hierarchy()
    if hierarchy is None or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root, unshare and a memory cgroup hierarchy to make one read-only")
    # A container that sees its cgroups but may not change them.
    remount = f'mount -o remount,bind,ro {hierarchy.mount} && exec "$@"'
    result = _run_elsewhere(["unshare", "--mount", "sh", "-c", remount, "sh"])
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR: isolator: --worker-ceiling-kind=cgroup: cannot be enforced here: cannot create "
        f"cgroups under {hierarchy.own}: the cgroup filesystem is mounted read-only (a container "
        "without write access to its cgroups)"
    ]


def test_cgroup_ceiling_for_a_user_without_a_delegated_cgroup_is_a_usage_error() -> None:
    hierarchy = cgroup.memory_hierarchy()
    if hierarchy is None or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run pytest as another user")
    wrapper = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    result = _run_elsewhere(wrapper)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR: isolator: --worker-ceiling-kind=cgroup: cannot be enforced here: cannot create "
        f"cgroups under {hierarchy.own} (Permission denied); run as root, or in a cgroup "
        "delegated to you, for example systemd-run --user --scope -p Delegate=yes pytest ..."
    ]


def test_what_a_v2_cgroup_saw_is_read_from_its_files(tmp_path: Path) -> None:
    """The files only (the real v2 run above needs a machine whose memory
    controller is bound to cgroup v2)."""
    worker = tmp_path / "isolator-1-w3"
    worker.mkdir()
    (worker / "memory.events").write_text("low 0\nhigh 0\nmax 57\noom 1\noom_kill 1\n")
    (worker / "memory.max").write_text("268435456\n")
    (worker / "memory.peak").write_text("268435456\n")
    hierarchy = cgroup.Hierarchy(2, tmp_path, tmp_path)
    ending = cgroup.WorkerCgroup(hierarchy, worker).finish()
    assert ending.oom_kills == 1
    assert ending.describe() == (
        f"was killed by the memory ceiling (cgroup {worker}: memory.max 268MB, peak 268MB)"
    )
