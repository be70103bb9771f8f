"""Memory history: --isolate=auto, recycling and admission from what each test
needed last run, and the changes since the last run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import IsolatedRunner

MB = 1000**2

#: A few unmarked tests that need a lot, most that need nothing; a failure, a
#: skip and a marked test so that "the same verdicts" means something.
SUITE = {
    "test_alpha": """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_light(n):
            assert n >= 0

        def test_heavy_200mb():
            data = b"x" * (200 * 1000**2)
            assert len(data) == 200 * 1000**2

        def test_medium_40mb():
            data = b"x" * (40 * 1000**2)
            assert data

        def test_fails():
            assert 1 + 1 == 3

        @pytest.mark.isolate
        def test_marked_light():
            pass
    """,
    "test_beta": """
        import pytest

        def test_heavy_150mb():
            data = b"y" * (150 * 1000**2)
            assert data

        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass

        @pytest.mark.parametrize("n", range(4))
        def test_light(n):
            pass
    """,
}

_VERDICT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _verdicts(result: pytest.RunResult) -> dict[str, str]:
    found = {}
    for line in result.outlines:
        match = _VERDICT.match(line)
        if match:
            found[match[1]] = match[2]
    return found


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _name(worker: dict[str, Any]) -> str:
    """A worker as tests name it."""
    return worker["label"] if worker["node"] == "main" else f"{worker['node']}/{worker['label']}"


def _units(report: dict[str, Any]) -> dict[str, str]:
    """Each test's worker's unit."""
    unit_of = {_name(worker): worker["unit"] for worker in report["workers"]}
    return {test["nodeid"]: unit_of[test["worker"]] for test in report["tests"]}


def _own_workers(report: dict[str, Any], unit: str) -> set[str]:
    """Tests that ran in a worker of their own for ``unit``'s reason."""
    tests_of: dict[str, list[str]] = {}
    for test in report["tests"]:
        tests_of.setdefault(test["worker"], []).append(test["nodeid"])
    found = set()
    for worker in report["workers"]:
        if worker["unit"] == unit:
            assert len(tests_of[_name(worker)]) == 1, worker
            found.add(tests_of[_name(worker)][0])
    return found


def _stored(pytester: pytest.Pytester) -> dict[str, Any]:
    path = pytester.path / ".pytest_cache" / "v" / "isolator" / "history"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_auto_isolates_exactly_the_tests_that_needed_a_lot_last_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**SUITE)
    plain = _verdicts(isolated.plain("-v"))
    assert len(plain) == 14
    report_path = pytester.path / "memory.json"
    auto = ("auto", "--worker-mem=400MB", "-v", f"--isolate-report={report_path}")

    # Run 1: no history yet, so auto is shared (the marked test aside), and records.
    first = isolated.run(*auto)
    assert _verdicts(first) == plain
    report = _report(report_path)
    assert _own_workers(report, "history") == set()
    assert _own_workers(report, "marker") == {"test_alpha.py::test_marked_light"}
    assert set(_units(report).values()) == {"shared", "marker"}
    stored = _stored(pytester)["tests"]
    assert stored["test_alpha.py::test_heavy_200mb"][0] >= 190 * MB
    assert 140 * MB <= stored["test_beta.py::test_heavy_150mb"][0] < 190 * MB

    # Run 2: the two tests whose peak was over a quarter of the budget (100MB)
    # get a worker of their own; the 40MB one and the light ones share.
    second = isolated.run(*auto)
    assert _verdicts(second) == plain
    second.stdout.fnmatch_lines(
        ["2 tests had a worker of their own for the memory they needed last run (--isolate=auto)"]
    )
    report = _report(report_path)
    assert report["settings"]["auto_threshold_bytes"] == 100 * MB
    assert _own_workers(report, "history") == {
        "test_alpha.py::test_heavy_200mb",
        "test_beta.py::test_heavy_150mb",
    }
    assert _own_workers(report, "marker") == {"test_alpha.py::test_marked_light"}
    units = _units(report)
    assert units["test_alpha.py::test_medium_40mb"] == "shared"
    # 14 tests, less 3 with a worker of their own
    assert sum(unit == "shared" for unit in units.values()) == 11

    # A test that did not run keeps its figures: deselected now, isolated again next time.
    isolated.run(*auto, "-k", "not heavy_200mb").assert_outcomes(passed=11, failed=1, skipped=1)
    assert "test_alpha.py::test_heavy_200mb" in _stored(pytester)["tests"]
    isolated.run(*auto)
    assert "test_alpha.py::test_heavy_200mb" in _own_workers(_report(report_path), "history")

    # --cache-clear forgets it all: shared again.
    isolated.run(*auto, "--cache-clear")
    assert _own_workers(_report(report_path), "history") == set()


def test_history_stores_per_test_and_per_module_figures_and_forgets_deleted_files(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_keep="""
            KEPT = []

            def test_keeps_30mb():
                KEPT.append(b"k" * (30 * 1000**2))

            def test_peaks_60mb():
                data = b"p" * (60 * 1000**2)
                assert data
        """,
        test_gone="def test_soon_gone():\n    pass\n",
    )
    isolated.run("module").assert_outcomes(passed=3)
    stored = _stored(pytester)
    assert stored["format"] == 1
    assert stored["measure"].startswith("USS")
    peak, growth = stored["tests"]["test_keep.py::test_keeps_30mb"]
    assert 28 * MB <= peak < 40 * MB
    assert 28 * MB <= growth < 40 * MB
    peak, growth = stored["tests"]["test_keep.py::test_peaks_60mb"]
    assert 55 * MB <= peak < 70 * MB
    assert growth < 5 * MB
    module = stored["modules"]["test_keep.py"]
    assert module["tests"] == 2
    assert 55 * MB <= module["peak_bytes"] < 70 * MB
    assert 28 * MB <= module["growth_bytes"] < 45 * MB
    assert "test_gone.py" in stored["modules"]
    (pytester.path / "test_gone.py").unlink()
    isolated.run("module").assert_outcomes(passed=2)
    assert "test_gone.py::test_soon_gone" not in _stored(pytester)["tests"]


def test_a_leaky_shared_worker_does_not_make_its_late_tests_look_heavy(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    """The recorded peak is what a test needed on top of what its worker
    held: late tests in a worker that earlier tests filled are not heavy."""
    pytester.makepyfile(
        test_leaky="""
            import pytest

            CACHE = []

            @pytest.mark.parametrize("n", range(8))
            def test_keeps_24mb(n):
                CACHE.append(b"\\x01" * (24 * 1000**2))
        """
    )
    report_path = pytester.path / "memory.json"
    args = ("auto", "--worker-mem=400MB", f"--isolate-report={report_path}")
    isolated.run(*args).assert_outcomes(passed=8)
    # The worker held well over the 100MB threshold by the last tests...
    assert max(test["peak_bytes"] for test in _report(report_path)["tests"]) > 150 * MB
    isolated.run(*args).assert_outcomes(passed=8)
    # ...but none of them needed more than its 24MB.
    assert set(_units(_report(report_path)).values()) == {"shared"}


@pytest.mark.parametrize("xdist", [False, True], ids=["alone", "xdist"])
def test_history_recycles_before_a_test_that_would_go_over_budget(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    xdist: bool,
) -> None:
    pytester.makepyfile(
        test_order="""
            import os

            KEPT = []

            def record():
                with open(os.environ["PIDS_FILE"], "a") as f:
                    f.write(f"{os.getpid()}\\n")

            def test_keeps_100mb():
                KEPT.append(b"k" * (100 * 1000**2))
                record()

            def test_peaks_200mb():
                data = b"p" * (200 * 1000**2)
                assert data
                record()
        """
    )
    pids = pytester.path / "pids.txt"
    monkeypatch.setenv("PIDS_FILE", str(pids))
    # Under pytest-xdist the worker is fed item by item, each with its figure.
    args = ["shared", "--worker-mem=250MB", *(["-n", "2", "--dist", "loadfile"] if xdist else [])]
    # Run 1 records (no ceiling): test_peaks_200mb needed 200MB on top of the
    # 100MB its worker held, over the 250MB budget.
    isolated.run(*args, "--worker-ceiling=none").assert_outcomes(passed=2)
    # Run 2: the worker is recycled before that test, which then fits.
    pids.unlink()
    result = isolated.run(*args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*recycled: over budget: 10?MB own memory + 20?MB that test_peaks_200mb needed "
            "last run > 250MB"
        ]
    )
    first, second = pids.read_text().split()
    assert first != second
    # Without the history the worker guesses from the last step (100MB), runs
    # the test where it is, and the ceiling fails it.
    forgotten = isolated.run(*args, "--cache-clear")
    forgotten.assert_outcomes(passed=1, failed=1)
    forgotten.stdout.fnmatch_lines(["*MemoryError: worker w1 is limited to 250MB*"])


@pytest.mark.parametrize("xdist", [False, True], ids=["alone", "xdist"])
def test_admission_waits_for_what_the_unit_needed_last_run(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    xdist: bool,
) -> None:
    pytester.makepyfile(
        test_light="def test_one():\n    pass\n\ndef test_two():\n    pass\n",
        test_mixed="""
            def test_first():
                pass

            def test_second_needs_120mb():
                data = b"x" * (120 * 1000**2)
                assert data
        """,
    )
    available = pytester.path / "available"
    monkeypatch.setenv("ISOLATOR_AVAILABLE_MEMORY_FILE", str(available))
    pytester.makeini("[pytest]\nisolate_admission_wait = 0.2\n")
    args = ["module", "--worker-mem=512MB"]
    if xdist:
        # Fed item by item: what the module needs comes from all its tests,
        # not only the first one the node was given.
        args += ["-n", "2", "--dist", "loadfile"]
    available.write_text(str(100 * 1000**3))
    isolated.run(*args).assert_outcomes(passed=4)
    waited = "* times a worker waited for the machine to have its budget*"
    # 100MB free: less than the budget, more than the light module needed...
    available.write_text(str(100 * MB))
    light = isolated.run(*args, "test_light.py")
    light.assert_outcomes(passed=2)
    assert "waited for the machine" not in light.stdout.str()
    # ...and less than the mixed one did.
    mixed = isolated.run(*args, "test_mixed.py")
    mixed.assert_outcomes(passed=2)
    mixed.stdout.fnmatch_lines([waited])
    # Not known: the whole budget.
    forgotten = isolated.run(*args, "test_light.py", "--cache-clear")
    forgotten.assert_outcomes(passed=2)
    forgotten.stdout.fnmatch_lines([waited])


def test_xdist_nodes_histories_are_merged_and_shipped_back(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    heavy = """
        def test_heavy():
            data = b"h" * (120 * 1000**2)
            assert data

        def test_light():
            pass
    """
    pytester.makepyfile(test_north=heavy, test_south=heavy)
    report_path = pytester.path / "memory.json"
    args = (
        "auto",
        "--worker-mem=300MB",
        "-n",
        "2",
        "--dist",
        "loadfile",
        f"--isolate-report={report_path}",
    )
    isolated.run(*args).assert_outcomes(passed=4)
    report = _report(report_path)
    nodes = {test["nodeid"]: test["worker"].split("/")[0] for test in report["tests"]}
    assert nodes["test_north.py::test_heavy"] != nodes["test_south.py::test_heavy"]
    stored = _stored(pytester)["tests"]
    for module in ("test_north", "test_south"):
        assert stored[f"{module}.py::test_heavy"][0] >= 110 * MB
        assert stored[f"{module}.py::test_light"][0] < 10 * MB
    # Each node schedules from the history the controller sent it.
    isolated.run(*args).assert_outcomes(passed=4)
    assert _own_workers(_report(report_path), "history") == {
        "test_north.py::test_heavy",
        "test_south.py::test_heavy",
    }


def test_memory_changes_since_the_last_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_grow="""
            import os

            def test_grows():
                data = b"g" * (int(os.environ["GROWS_MB"]) * 1000**2)
                assert data

            def test_grows_a_little():
                data = b"l" * (int(os.environ["LITTLE_MB"]) * 1000**2)
                assert data

            def test_steady():
                data = b"s" * (30 * 1000**2)
                assert data
        """
    )
    report_path = pytester.path / "memory.json"
    args = ("module", f"--isolate-report={report_path}")
    monkeypatch.setenv("GROWS_MB", "30")
    monkeypatch.setenv("LITTLE_MB", "2")
    first = isolated.run(*args)
    first.assert_outcomes(passed=3)
    assert "memory changes since the last run" not in first.stdout.str()
    # 30MB -> 80MB is a change; 2MB -> 6MB is 200% but only 4MB.
    monkeypatch.setenv("GROWS_MB", "80")
    monkeypatch.setenv("LITTLE_MB", "6")
    second = isolated.run(*args)
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(
        [
            "*= isolator: memory changes since the last run =*",
            "1 of 3 tests measured last run need more memory now (peak up by more than 10MB "
            "and 20%):",
            "    before      now  test",
            "*MB *MB  test_grow.py::test_grows",
        ]
    )
    report = _report(report_path)
    assert report["summary"]["tests_with_history"] == 3
    assert report["summary"]["peaks_grown"] == 1
    (change,) = report["memory_changes"]
    assert change["nodeid"] == "test_grow.py::test_grows"
    assert 28 * MB <= change["before_bytes"] < 40 * MB
    assert 76 * MB <= change["now_bytes"] < 90 * MB
    # Thresholds from ini: 3MB and 100% make the little one count too; the
    # figures compared are now this run's, so grow both once more.
    pytester.makeini("[pytest]\nisolate_change_bytes = 3MB\nisolate_change_percent = 100%\n")
    monkeypatch.setenv("GROWS_MB", "90")
    monkeypatch.setenv("LITTLE_MB", "14")
    third = isolated.run(*args)
    third.stdout.fnmatch_lines(["1 of 3 tests * (peak up by more than 3MB and 100%):"])
    assert [c["nodeid"] for c in _report(report_path)["memory_changes"]] == [
        "test_grow.py::test_grows_a_little"
    ]


def test_auto_without_pytest_cache_says_so_and_runs_as_shared(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**SUITE)
    report_path = pytester.path / "memory.json"
    args = ("auto", "--worker-mem=400MB", f"--isolate-report={report_path}")
    isolated.run(*args).assert_outcomes(passed=12, failed=1, skipped=1)
    result = isolated.run(*args, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=12, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "isolator: pytest's cache is off (-p no:cacheprovider), so there is no memory "
            "history; --isolate=auto runs as --isolate=shared"
        ]
    )
    assert _own_workers(_report(report_path), "history") == set()
    # Other modes have nothing to say about it.
    other = isolated.run("module", "-p", "no:cacheprovider")
    assert "no memory history" not in other.stdout.str()


def test_a_history_of_another_measure_is_dropped_with_a_word(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(test_x="def test_x():\n    data = b'x' * (150 * 1000**2)\n")
    cache = pytester.path / ".pytest_cache" / "v" / "isolator"
    cache.mkdir(parents=True)
    (cache / "history").write_text(
        json.dumps(
            {"format": 1, "measure": "something else", "tests": {"test_x.py::test_x": [1, 1]}}
        )
    )
    result = isolated.run("auto", "--worker-mem=400MB")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "isolator: the memory history in pytest's cache (isolator/history) was recorded by "
            "another version or with another measure; starting afresh; *"
        ]
    )
    assert _stored(pytester)["tests"]["test_x.py::test_x"][0] >= 140 * MB


def test_auto_threshold_as_a_size_or_a_share(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_t="""
            def test_needs_80mb():
                data = b"x" * (80 * 1000**2)
                assert data

            def test_light():
                pass
        """
    )
    report_path = pytester.path / "memory.json"
    args = ("auto", "--worker-mem=400MB", f"--isolate-report={report_path}")
    isolated.run(*args).assert_outcomes(passed=2)
    isolated.run(*args).assert_outcomes(passed=2)
    assert _own_workers(_report(report_path), "history") == set()  # 80MB < 100MB
    for threshold in ("60MB", "15%"):
        pytester.makeini(f"[pytest]\nisolate_auto_threshold = {threshold}\n")
        isolated.run(*args).assert_outcomes(passed=2)
        assert _own_workers(_report(report_path), "history") == {"test_t.py::test_needs_80mb"}


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("isolate_auto_threshold = lots", "'lots' is not a memory size*"),
        ("isolate_auto_threshold = 150%", "'150%' is more than the whole budget*"),
        ("isolate_auto_threshold = -5%", "'-5%' is not a percentage*"),
        ("isolate_change_bytes = 0", "'0' is not a positive memory size"),
        ("isolate_change_percent = some", "'some' is not a percentage*"),
    ],
)
def test_bad_history_settings_are_usage_errors(
    pytester: pytest.Pytester, ini: str, message: str
) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=auto", "--worker-mem=1GB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: isolator: ini option '{ini.split()[0]}'*: {message}"])
    assert "Traceback" not in result.stderr.str()


def test_auto_needs_a_budget(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: isolator: --isolate=auto * needs --worker-mem=SIZE *"])
