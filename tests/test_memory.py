"""--worker-mem: the ceiling, the budget, recycling, memory-aware modes and the stats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from conftest import IsolatedRunner

MB = 1000**2

LEAKY = """
    import pytest

    CACHE = []

    @pytest.mark.parametrize("n", range(30))
    def test_leaks_24mb(n):
        # A cache that only grows, and touches what it keeps.
        CACHE.append(b"\\x01" * (24 * 1024 * 1024))
"""


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_leaky_module_passes_whole_with_recycles_and_no_worker_over_budget(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    report_path = pytester.path / "memory.json"
    result = isolated.run("module", "--worker-mem=256MB", f"--isolate-report={report_path}")
    result.assert_outcomes(passed=30)
    result.stdout.fnmatch_lines(
        [
            "*= isolator: memory =*",
            "*recycled: over budget: * own memory + * for the next test > 256MB",
            "* workers, * recycled, 0 crashed; largest peak *",
        ]
    )
    report = _report(report_path)
    assert report["summary"]["recycled"] >= 2
    assert report["summary"]["tests"] == 30
    for worker in report["workers"]:
        assert worker["peak_bytes"] <= 256 * MB, worker
    # Without a budget the same module keeps all 720 MB in one process.
    unbounded = pytester.path / "unbounded.json"
    isolated.run("module", f"--isolate-report={unbounded}").assert_outcomes(passed=30)
    assert _report(unbounded)["summary"]["largest_peak_bytes"] > 700 * MB


def test_hog_fails_with_the_limit_named_and_its_neighbours_pass(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_hog="""
            def test_small_before():
                assert sum(range(1000)) > 0

            def test_hog():
                data = b"x" * (3 * 1024**3)
                assert data

            def test_small_after():
                assert len(b"y" * 1024) == 1024
        """
    )
    result = isolated.run("module", "--worker-mem=512MB", "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_small_before PASSED*",
            "*test_hog FAILED*",
            "*test_small_after PASSED*",
            "E * MemoryError: worker w* is limited to 512MB of address space (RLIMIT_AS) and "
            "test_hog asked for more than the 5*MB left; RLIMIT_AS counts every mapping and "
            "reservation, used or not (*B mapped since the worker started). Ways out: *",
            "*ceiling hit*",
        ]
    )


def test_sixteen_threads_with_small_allocations_fit_under_256mb(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_threads="""
            import threading

            def work(results, index):
                # Small allocations from each thread: enough for glibc to
                # want an arena per thread.
                chunks = [bytes(200) for _ in range(2000)]
                results[index] = len(chunks)

            def test_sixteen_threads():
                results = [0] * 16
                threads = [threading.Thread(target=work, args=(results, i)) for i in range(16)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert results == [2000] * 16
        """
    )
    isolated.run("test", "--worker-mem=256MB").assert_outcomes(passed=1)


PIDS = """
    import os, pathlib, pytest

    def record(name):
        with open(os.environ["PIDS_FILE"], "a") as f:
            f.write(f"{name} {os.getpid()}\\n")

    def test_plain_1():
        record("plain_1")

    @pytest.mark.isolate
    def test_marked():
        record("marked")

    @pytest.mark.memory_intensive
    def test_heavy():
        record("heavy")

    def test_plain_2():
        record("plain_2")
"""


def test_marked_mode_gives_marked_tests_a_worker_of_their_own(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_marks=PIDS,
        test_more="from test_marks import record\n\ndef test_other():\n    record('other')\n",
    )
    pytester.syspathinsert()
    pytester.makeini(
        "[pytest]\nisolate_markers = memory_intensive\nmarkers = memory_intensive: heavy\n"
    )
    pids_file = pytester.path / "pids.txt"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    isolated.run("marked", "--worker-mem=1GB").assert_outcomes(passed=5)
    pids = dict(line.split() for line in pids_file.read_text().splitlines())
    # The unmarked tests share one worker, across the marked ones between
    # them and across modules; each marked test has one of its own.
    assert pids["plain_1"] == pids["plain_2"] == pids["other"]
    assert len({pids["plain_1"], pids["marked"], pids["heavy"]}) == 3


def test_shared_mode_runs_everything_in_workers_recycled_on_budget(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_leaky_a=LEAKY, test_leaky_b=LEAKY)
    report_path = pytester.path / "memory.json"
    result = isolated.run("shared", "--worker-mem=300MB", f"--isolate-report={report_path}")
    result.assert_outcomes(passed=60)
    report = _report(report_path)
    # 60 tests of 24 MB under 300 MB: a handful of workers, never one per test
    # or per module, and none over budget.
    assert 4 <= report["summary"]["workers"] <= 10
    assert all(worker["peak_bytes"] <= 300 * MB for worker in report["workers"])


def test_shared_mode_needs_a_budget(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=shared")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: isolator: --isolate=shared * needs --worker-mem=SIZE *"])


def test_marker_mem_gives_a_test_its_own_budget(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_own="""
            import pytest

            @pytest.mark.isolate(mem="2GB")
            def test_needs_more():
                data = b"x" * (700 * 1024**2)
                assert data

            def test_small():
                data = b"x" * (700 * 1024**2)
                assert data
        """
    )
    result = isolated.run("module", "--worker-mem=300MB")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*MemoryError: worker w* is limited to 300MB*test_small*"])


GROWING = """
    import pytest

    KEEP = []

    def test_keeps_60mb():
        KEEP.append(b"x" * (60 * 1024 * 1024))

    def test_keeps_little():
        KEEP.append(b"x" * 1024)

    @pytest.mark.isolate(max_growth="100MB")
    def test_allowed_more():
        KEEP.append(b"x" * (60 * 1024 * 1024))
"""


@pytest.mark.parametrize("source", ["option", "ini"])
def test_growth_limit_fails_a_test_that_keeps_too_much(
    pytester: pytest.Pytester, isolated: IsolatedRunner, source: str
) -> None:
    pytester.makepyfile(test_growing=GROWING)
    if source == "ini":
        pytester.makeini("[pytest]\nmem_growth_limit = 50MB\n")
        result = isolated.run("module")
    else:
        result = isolated.run("module", "--mem-growth-limit=50MB")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_keeps_60mb*",
            "E   *LeakError: test_keeps_60mb retained 6*MB of memory after its teardown "
            "(limit 50MB, growth of worker w*'s own memory)",
        ]
    )


def test_memory_monitor_fixture(pytester: pytest.Pytester, isolated: IsolatedRunner) -> None:
    pytester.makepyfile(
        test_monitor="""
            def test_sees_its_own_growth(memory_monitor):
                before = memory_monitor.growth_bytes
                data = b"x" * (50 * 1024 * 1024)
                assert memory_monitor.growth_bytes - before >= 50 * 1024 * 1024
                assert memory_monitor.peak_bytes >= memory_monitor.growth_bytes
                assert memory_monitor.current_bytes > 50 * 1024 * 1024
                del data
        """
    )
    isolated.run("test").assert_outcomes(passed=1)
    isolated.plain().assert_outcomes(passed=1)


def test_json_report_schema(pytester: pytest.Pytester, isolated: IsolatedRunner) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    report_path = pytester.path / "memory.json"
    result = isolated.run("module", "--worker-mem=200MB", f"--isolate-report={report_path}")
    result.stdout.fnmatch_lines([f"memory report (JSON): {report_path}"])
    report = _report(report_path)
    assert report["schema_version"] == 2
    assert isinstance(report["t0"], float)
    assert report["measure"].startswith("USS: each worker's own memory")
    assert report["settings"] == {
        "mode": "module",
        "budget_bytes": 200 * MB,
        "ceiling_bytes": 200 * MB,
        "growth_limit_bytes": None,
        "auto_threshold_bytes": None,
    }
    assert set(report["summary"]) == {
        "workers",
        "tests",
        "recycled",
        "crashed",
        "largest_peak_bytes",
        "largest_peak_worker",
        "admission_waits",
        "tests_with_history",
        "peaks_grown",
    }
    assert report["memory_changes"] == []
    worker = report["workers"][0]
    assert set(worker) == {
        "label",
        "node",
        "pid",
        "started_s",
        "start_rss_bytes",
        "start_bytes",
        "ended_s",
        "peak_bytes",
        "end_bytes",
        "tests",
        "ended",
        "crashed",
        "samples",
        "gc",
        "unit",
    }
    assert worker["node"] == "main"
    assert worker["unit"] == "module"
    assert worker["ended"].startswith("recycled: over budget")
    test = report["tests"][0]
    assert set(test) == {"nodeid", "worker", "peak_bytes", "growth_bytes", "at_s", "start_bytes"}
    assert test["nodeid"] == "test_leaky.py::test_leaks_24mb[0]"
    assert 24 * 1024**2 <= test["growth_bytes"] < 30 * 1024**2


@pytest.mark.parametrize("bad", ["lots", "-5MB", "12XB", "0", "nan", "99999999999TB"])
def test_bad_sizes_are_usage_errors(pytester: pytest.Pytester, bad: str) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=module", f"--worker-mem={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: isolator: --worker-mem: '{bad}' *"])
    assert "Traceback" not in result.stderr.str()


def test_bad_marker_argument_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_x="""
            import pytest

            @pytest.mark.isolate(memory="1GB")
            def test_x():
                pass
        """
    )
    result = pytester.runpytest("-p", "isolator", "--isolate=marked", "--worker-mem=1GB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: isolator: @pytest.mark.isolate on test_x.py::test_x: unknown argument 'memory'*"]
    )


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_picture_draws_each_worker_and_renders(
    pytester: pytest.Pytester, isolated: IsolatedRunner, tmp_path: Path
) -> None:
    pytester.makepyfile(
        test_leaky=LEAKY,
        test_crash="import os\n\ndef test_dies():\n    os._exit(9)\n",
    )
    page = pytester.path / "memory.html"
    result = isolated.run("module", "--worker-mem=256MB", f"--isolate-html={page}")
    result.stdout.fnmatch_lines([f"memory report (HTML): {page}"])
    text = page.read_text()
    svg_start = text.index("<svg")
    svg = ET.fromstring(text[svg_start : text.index("</svg>") + len("</svg>")])
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{ns}polyline")
    recycles = [c for c in svg.findall(f"{ns}circle") if c.get("class") == "recycle"]
    crashes = [p for p in svg.findall(f"{ns}path") if p.get("class") == "crash"]
    budget = [line for line in svg.findall(f"{ns}line") if line.get("class") == "budget"]
    assert len(lines) >= 4  # the crashing module's worker and at least three leaky ones
    assert len(recycles) >= 2
    assert len(crashes) == 1
    assert len(budget) == 1

    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1100,800",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG")
    # A blank page compresses to a few kB; lines, labels and text do not.
    assert len(png) > 20_000


def test_parent_samples_a_long_test_between_boundaries(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_long="""
            import time

            def test_holds_memory_for_a_while():
                data = b"x" * (80 * 1024 * 1024)
                time.sleep(0.6)  # the subject of the test: a long test holding memory
                del data
        """
    )
    report_path = pytester.path / "memory.json"
    isolated.run(
        "test", "--isolate-sample-interval=0.1", f"--isolate-report={report_path}"
    ).assert_outcomes(passed=1)
    worker = _report(report_path)["workers"][0]
    # Start, peak and end at the boundaries, and readings in between.
    inside = [own for _, own in worker["samples"][1:-2]]
    assert len(inside) >= 3
    assert max(inside) >= 80 * 1024**2


@pytest.mark.parametrize("ceiling", ["1GB", "none"])
def test_worker_ceiling_apart_from_the_budget(
    pytester: pytest.Pytester, isolated: IsolatedRunner, ceiling: str
) -> None:
    pytester.makepyfile(
        test_big="""
            def test_needs_300mb_once():
                data = b"x" * (300 * 1024**2)
                assert data

            def test_after():
                pass
        """
    )
    # The budget alone would be a 100MB ceiling and fail the first test.
    isolated.run("module", "--worker-mem=100MB").assert_outcomes(passed=1, failed=1)
    result = isolated.run("module", "--worker-mem=100MB", f"--worker-ceiling={ceiling}")
    result.assert_outcomes(passed=2)


def test_a_big_module_fixture_is_not_counted_against_each_test(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_fixture="""
            import pytest

            BUILT = []

            @pytest.fixture(scope="module")
            def big():
                BUILT.append(1)
                return b"x" * (120 * 1000 * 1000)

            @pytest.mark.parametrize("i", range(6))
            def test_uses(big, i):
                assert len(BUILT) == 1
        """
    )
    report_path = pytester.path / "memory.json"
    result = isolated.run("module", "--worker-mem=200MB", f"--isolate-report={report_path}")
    result.assert_outcomes(passed=6)
    report = _report(report_path)
    assert report["summary"]["workers"] == 1
    assert report["summary"]["recycled"] == 0
    # "kept" counts from the end of setup: the fixture is nobody's leak.
    assert all(test["growth_bytes"] < 10 * MB for test in report["tests"])


def test_report_paths_are_made_or_refused_before_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    nested = pytester.path / "reports" / "today" / "memory.json"
    isolated.run("module", f"--isolate-report={nested}").assert_outcomes(passed=1)
    assert nested.exists()
    (pytester.path / "taken").write_text("a file where a directory should be")
    result = pytester.runpytest(
        "-p", "isolator", "--isolate=module", "--isolate-html=taken/memory.html"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: isolator: --isolate-html: cannot write 'taken/memory.html'*"]
    )


INHERITED = {
    # Allocated while pytest collects, so before any worker is forked: every
    # worker starts out sharing these pages with the pytest process.
    "conftest": """
        MiB = 1024 * 1024
        BUFFER = bytearray(200 * MiB)
        BUFFER[::4096] = b"\\x01" * (len(BUFFER) // 4096)  # resident, in the parent
        OBJECTS = [str(i) * 3 for i in range(1_500_000)]
    """,
    "test_inherited": """
        import conftest

        def test_rewrites_inherited_buffer():
            conftest.BUFFER[::4096] = b"\\x02" * (len(conftest.BUFFER) // 4096)

        def test_only_reads_inherited_objects():
            # Reading a Python object writes its reference count: each page
            # holding one is copied into the worker.
            assert sum(len(s) for s in conftest.OBJECTS) > 0

        def test_allocates_and_frees():
            data = bytearray(100 * 1024**2)
            data[::4096] = b"\x03" * (len(data) // 4096)
            del data

        def test_after():
            pass
    """,
}


def test_copies_of_inherited_pages_are_the_worker_s_own_memory(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**INHERITED)
    report_path = pytester.path / "memory.json"
    isolated.run("test", f"--isolate-report={report_path}").assert_outcomes(passed=4)
    tests = {t["nodeid"].split("::")[1]: t for t in _report(report_path)["tests"]}
    rewritten = tests["test_rewrites_inherited_buffer"]
    # 200 MiB rewritten: 200 MiB more of the worker's own memory, within a few %
    # (RSS grows by 0.1 MB: the pages were resident already, as shared pages).
    assert 200 * 1024**2 <= rewritten["growth_bytes"] < 206 * 1024**2
    assert rewritten["peak_bytes"] >= 200 * 1024**2
    read_only = tests["test_only_reads_inherited_objects"]
    # 1.5 million str objects and the list: about 100 MB of pages touched.
    assert read_only["growth_bytes"] > 80 * MB
    # Pages faulted in and freed again are not kept, but were the peak.
    churned = tests["test_allocates_and_frees"]
    assert churned["growth_bytes"] < 5 * MB
    assert churned["peak_bytes"] > 100 * 1024**2
    assert tests["test_after"]["peak_bytes"] < 20 * MB


def test_a_budget_below_the_copies_recycles_the_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**INHERITED)
    pytester.syspathinsert()
    result = isolated.run("shared", "--worker-mem=150MB", "-k", "rewrites or test_after")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*recycled: over budget: 2??MB own memory + 2??MB for the next test > 150MB"]
    )
