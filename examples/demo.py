"""make demo: the bundled example suite, plain and isolated, side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).parent / "demo_suite"


def run(title: str, *args: str) -> None:
    command = [sys.executable, "-m", "pytest", str(SUITE), "-p", "isolator", "-q", "-rfE", *args]
    print(f"\n=== {title}\n$ pytest {' '.join(args) or '(plain)'}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = (completed.stdout + completed.stderr).rstrip().splitlines()
    for line in lines[-12:]:
        print("   ", line)
    print(f"    (exit code {completed.returncode})")


def main() -> None:
    run("plain pytest: global state leaks, and a segfault ends the run", "-p", "no:faulthandler")
    run("each module in a fresh worker", "--isolate=module")
    run("each test in a fresh worker", "--isolate=test")


if __name__ == "__main__":
    main()
