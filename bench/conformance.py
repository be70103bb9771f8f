"""make conformance: suites no one here wrote must give the same verdict for
every test with and without isolation.

Runs ``pytest --pyargs networkx`` and the toolz sdist's tests plain and under
every ``--isolate`` mode (module, test, marked, shared, auto), records the verdict of every
test id (passed, failed, error, skipped, xfailed, xpassed) with the
``bench.verdicts`` plugin, and prints how many differ (must be 0) and the
time ratio against plain. Exits 1 if any verdict differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".conformance"
PIP = [sys.executable, "-m", "pip", "install", "-q"]


def ensure_networkx() -> list[str]:
    subprocess.run([*PIP, "networkx", "numpy", "scipy"], check=True)
    return ["--pyargs", "networkx"]


def ensure_toolz() -> list[str]:
    source = WORK / "toolz-src"
    if not any(source.glob("toolz-*/toolz/tests")):
        source.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(source),
                "toolz",
            ],
            check=True,
        )
        archive = next(source.glob("toolz-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
    tests = next(source.glob("toolz-*/toolz/tests"))
    return [str(tests), "--rootdir", str(tests.parent.parent), "-c", str(WORK / "pytest.ini")]


def run(name: str, target: list[str], extra: list[str]) -> tuple[dict[str, str], float, str]:
    out = WORK / f"{name}.json"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "VERDICTS_FILE": str(out)}
    env.pop("PYTEST_ADDOPTS", None)
    # Without pytest's cache, except where the mode schedules from the memory
    # history kept there: that one gets a cache of its own, filled by a first
    # run that is not timed.
    history = "--isolate=auto" in extra
    cache = (
        ["-o", f"cache_dir={WORK / (name + '-cache')}"] if history else ["-p", "no:cacheprovider"]
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "bench.verdicts",
        "-p",
        "isolator",
        *cache,
        *target,
        *extra,
    ]
    if history:
        subprocess.run([*command, "--cache-clear"], cwd=WORK, env=env, capture_output=True)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=WORK, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    last = (completed.stdout.strip().splitlines() or ["(no output)"])[-1]
    if not out.exists():
        raise SystemExit(f"conformance: {name} wrote no verdicts\n{completed.stdout[-3000:]}")
    verdicts: dict[str, str] = json.loads(out.read_text())
    return verdicts, elapsed, last


def compare(suite: str, target: list[str], modes: list[list[str]]) -> int:
    print(f"\n{suite}")
    plain, plain_s, summary = run(f"{suite}-plain", target, [])
    print(f"  {'plain':<60} {plain_s:7.1f}s  1.00x  {len(plain)} tests  {summary}")
    differing = 0
    for extra in modes:
        label = " ".join(extra)
        name = f"{suite}-{label.replace(' ', '_').replace('-', '').replace('=', '_')}"
        verdicts, seconds, summary = run(name, target, extra)
        diff = sorted(
            nodeid
            for nodeid in plain.keys() | verdicts.keys()
            if plain.get(nodeid) != verdicts.get(nodeid)
        )
        differing += len(diff)
        print(
            f"  {label:<60} {seconds:7.1f}s {seconds / plain_s:5.2f}x  {len(verdicts)} tests  "
            f"differ: {len(diff)}"
        )
        for nodeid in diff[:20]:
            print(f"      {nodeid}: plain {plain.get(nodeid)}, isolated {verdicts.get(nodeid)}")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=["networkx", "toolz"], action="append")
    parser.add_argument("--no-suites", action="store_true", help="only the -n 2 comparison")
    parser.add_argument("--xdist", action="store_true", help="also compare -n 2 runs")
    options = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    (WORK / "pytest.ini").write_text("[pytest]\n")
    suites = options.suite if options.suite is not None else ["toolz", "networkx"]
    if options.no_suites:
        suites = []
    modes = [
        ["--isolate=module"],
        ["--isolate=test"],
        ["--isolate=marked"],
        ["--isolate=shared", "--worker-mem=1GB"],
        # A low threshold, so that the run has tests isolated for their history.
        ["--isolate=auto", "--worker-mem=1GB", "-o", "isolate_auto_threshold=300kB"],
    ]
    differing = 0
    for suite in suites:
        target = ensure_networkx() if suite == "networkx" else ensure_toolz()
        differing += compare(suite, target, modes)
    if options.xdist:
        differing += compare("networkx-n2", ensure_networkx(), [["-n", "2", "--isolate=module"]])
    print(f"\nverdicts that differ: {differing}")
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
