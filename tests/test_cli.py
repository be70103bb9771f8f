"""python -m isolator: pytest with isolation on and the memory report shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_runner_passes_selection_and_prints_the_report_paths(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sel="""
            import pytest

            @pytest.mark.slow
            def test_slow_one():
                pass

            def test_alpha():
                pass

            def test_beta():
                pass
        """
    )
    pytester.makeini("[pytest]\nmarkers = slow: slow\n")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "isolator",
            "--mem",
            "300MB",
            "--gc-debug",
            "--sample-interval",
            "0.2",
            "-m",
            "not slow",
            "-k",
            "alpha or slow_one",
            "-p",
            "no:randomly",
            "-v",
        ],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = completed.stdout
    assert completed.returncode == 0, out + completed.stderr
    assert "test_sel.py::test_alpha PASSED" in out
    assert "test_beta" not in out.split("= isolator: memory =")[0]
    assert "garbage collector per worker" in out
    report = pytester.path / ".isolator" / "memory.json"
    assert f"isolator: {report}" in out
    assert f"isolator: {report.with_suffix('.html')}" in out
    data = json.loads(report.read_text())
    assert data["settings"]["mode"] == "module"
    assert data["settings"]["budget_bytes"] == 300 * 1000**2
    assert [test["nodeid"] for test in data["tests"]] == ["test_sel.py::test_alpha"]


def test_runner_returns_pytests_exit_code(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fail="def test_fail():\n    assert False\n")
    completed = subprocess.run(
        [sys.executable, "-m", "isolator", "-q", "-p", "no:randomly"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == pytest.ExitCode.TESTS_FAILED


def test_runner_announces_only_this_runs_reports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    command = [sys.executable, "-m", "isolator", "-q", "-p", "no:randomly"]
    first = subprocess.run(command, cwd=pytester.path, capture_output=True, text=True, check=False)
    assert "memory.json" in first.stdout
    second = subprocess.run(
        [*command, "--mode", "sometimes"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert second.returncode == pytest.ExitCode.USAGE_ERROR
    assert "memory.json" not in second.stdout


def test_runner_works_with_warnings_as_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    completed = subprocess.run(
        [sys.executable, "-m", "isolator", "-q", "-p", "no:randomly"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
