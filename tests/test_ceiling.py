"""The ceiling: what the RLIMIT_AS one says when a test runs into it, and the
cgroup one, which counts memory used instead of address space."""

from __future__ import annotations

import pytest

from conftest import IsolatedRunner

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
