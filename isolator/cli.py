"""``python -m isolator`` (and the ``isolator`` command): pytest with isolation on
and the memory report shown, for runs whose point is to look at memory.

Everything it does not know is passed to pytest as it is, so
``isolator -n 2 tests/`` works like ``pytest -n 2 tests/`` with isolation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pytest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isolator",
        description="Run pytest with each unit in a fresh worker process and report memory.",
        epilog="Other arguments go to pytest unchanged.",
    )
    parser.add_argument(
        "--mode",
        default="module",
        help="module (default), test, marked, shared or auto: which unit gets a fresh worker",
    )
    parser.add_argument("--mem", metavar="SIZE", help="budget and ceiling per worker (512MB)")
    parser.add_argument("-m", dest="markexpr", metavar="MARKEXPR", help="pytest's -m")
    parser.add_argument("-k", dest="keyword", metavar="EXPRESSION", help="pytest's -k")
    parser.add_argument(
        "--gc-debug",
        action="store_true",
        help="show what each worker's garbage collector did",
    )
    parser.add_argument(
        "--sample-interval",
        type=_seconds,
        default=0.5,
        metavar="SECONDS",
        help="memory sampling period while a test runs (default 0.5)",
    )
    parser.add_argument(
        "--report-dir",
        default=".isolator",
        metavar="DIR",
        help="where to write memory.json and memory.html (default .isolator)",
    )
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def pytest_args(options: argparse.Namespace, rest: list[str]) -> list[str]:
    report_dir = Path(options.report_dir)
    # The pytest11 entry point loads the plugin; naming it again with -p
    # would only make pytest warn that it cannot rewrite asserts in it.
    args = ["-p", "isolator"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    args += [
        f"--isolate={options.mode}",
        f"--isolate-sample-interval={options.sample_interval}",
        f"--isolate-report={report_dir / 'memory.json'}",
        f"--isolate-html={report_dir / 'memory.html'}",
    ]
    if options.mem:
        args.append(f"--worker-mem={options.mem}")
    if options.markexpr:
        args += ["-m", options.markexpr]
    if options.keyword:
        args += ["-k", options.keyword]
    if options.gc_debug:
        args.append("--isolate-gc-stats")
    return args + rest


def main(argv: list[str] | None = None) -> int:
    options, rest = build_parser().parse_known_args(argv)
    report_dir = Path(options.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in ("memory.json", "memory.html"):
        # Only this run's reports get announced at the end.
        (report_dir / name).unlink(missing_ok=True)
    code = int(pytest.main(pytest_args(options, rest)))
    for name in ("memory.json", "memory.html"):
        path = report_dir / name
        if path.exists():
            print(f"isolator: {path.resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
