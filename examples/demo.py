"""make demo: the bundled example suite, plain and isolated, side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).parent / "demo_suite"


def run(title: str, *args: str, tail: int = 12) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(SUITE),
        "-p",
        "isolator",
        "-p",
        "no:randomly",
        "-q",
        "-rfE",
        *args,
    ]
    print(f"\n=== {title}\n$ pytest {' '.join(args) or '(plain)'}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = (completed.stdout + completed.stderr).rstrip().splitlines()
    for line in lines[-tail:]:
        print("   ", line)
    print(f"    (exit code {completed.returncode})")


def main() -> None:
    run("plain pytest: global state leaks, and a segfault ends the run", "-p", "no:faulthandler")
    run("each module in a fresh worker", "--isolate=module")
    run("each test in a fresh worker", "--isolate=test")
    run(
        "a 256MB budget: the leaking module is recycled, no worker grows past it",
        "--isolate=module",
        "--worker-mem=256MB",
        "--mem-top=3",
        tail=18,
    )


if __name__ == "__main__":
    main()
