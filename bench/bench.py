"""make bench: what isolation costs, as ratios against plain pytest in the same run.

Each scenario runs its variants in alternation (plain, isolated, plain, ...)
so that drift in the machine's speed hits all of them alike, and reports the
median wall time of each. "per test" subtracts the time of ``--collect-only``
(interpreter start, plugin loading, collection: the same with or without
isolation) to show what running the tests costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"


@dataclass
class Variant:
    name: str
    args: list[str]
    times: list[float] = field(default_factory=list)
    #: Run with pytest's cache (the memory history lives there).
    cache: bool = False
    #: CPU time (user + system) of the run and every process it waited for.
    cpu: list[float] = field(default_factory=list)
    #: Extra environment (PYTHONPATH, to run another version of isolator).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def run_once(
    cwd: Path, args: list[str], env: dict[str, str] | None = None, cache: bool = False
) -> tuple[float, float]:
    """Wall time and CPU time of one pytest run (the CPU time counts workers
    too: each is waited for by the process that forked it)."""
    # Without pytest's cache unless asked: nothing a run writes steers the next.
    command = [sys.executable, "-m", "pytest", "-q", *([] if cache else ["-p", "no:cacheprovider"])]
    command += args
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    elapsed = time.perf_counter() - start
    if completed.returncode not in (0, 1):
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
        raise SystemExit(f"bench: {' '.join(args)} exited {completed.returncode}\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu


def measure(cwd: Path, variants: list[Variant], rounds: int) -> None:
    for _ in range(rounds):
        for variant in variants:
            elapsed, cpu = run_once(cwd, variant.args, variant.env, variant.cache)
            variant.times.append(elapsed)
            variant.cpu.append(cpu)


def report(title: str, variants: list[Variant], baseline: Variant | None, tests: int) -> None:
    plain = variants[0]
    print(f"\n{title}")
    if not tests:
        print(f"  {'variant':<36} {'median':>9} {'vs plain':>9}")
        for variant in variants:
            ratio = variant.median / plain.median
            print(f"  {variant.name:<36} {variant.median:>8.2f}s {ratio:>8.2f}x")
        return
    print(
        f"  {'variant':<36} {'median':>9} {'vs plain':>9} {'per test':>10} {'vs plain':>9}"
        f" {'CPU/test':>10} {'vs plain':>9}"
    )
    base = baseline.median if baseline else 0.0
    base_cpu = baseline.cpu_median if baseline else 0.0
    plain_run = plain.median - base
    plain_cpu = plain.cpu_median - base_cpu
    for variant in variants:
        run = variant.median - base
        cpu = variant.cpu_median - base_cpu
        print(
            f"  {variant.name:<36} {variant.median:>8.2f}s {variant.median / plain.median:>8.2f}x"
            f" {run / tests * 1000:>8.3f}ms {run / plain_run:>8.2f}x"
            f" {cpu / tests * 1000:>8.3f}ms {cpu / plain_cpu:>8.2f}x"
        )
    if baseline:
        print(
            f"  ({baseline.name}: {baseline.median:.2f}s, {baseline.cpu_median:.2f}s CPU, "
            "subtracted for 'per test')"
        )


def trivial_suite(count: int) -> Path:
    suite = WORK / f"trivial{count}"
    suite.mkdir(parents=True, exist_ok=True)
    body = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(count))
    (suite / "test_many.py").write_text(body)
    # Its own ini file, so the project's pytest settings stay out of it.
    (suite / "pytest.ini").write_text("[pytest]\n")
    return suite


def checkout(ref: str) -> dict[str, str]:
    """The environment that runs isolator as of git ``ref`` (exported, not checked out)."""
    tree = WORK / f"ref-{ref.replace('/', '-')}"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", ref, "isolator"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    # PYTHONPATH comes before the editable install's finder.
    return {"PYTHONPATH": str(tree)}


def bench_trivial(rounds: int, count: int, against: list[str]) -> None:
    suite = trivial_suite(count)
    collect = Variant("collect only", ["--collect-only", "-p", "isolator"])
    variants = [Variant("plain", ["-p", "isolator"])]
    others = [(ref, checkout(ref)) for ref in against]
    for mode in ("module", "test"):
        args = ["-p", "isolator", f"--isolate={mode}"]
        for ref, env in others:
            variants.append(Variant(f"--isolate={mode} ({ref})", args, env=env))
        variants.append(Variant(f"--isolate={mode}", args))
    measure(suite, [collect, *variants], rounds)
    report(f"{count} trivial tests in one module ({rounds} rounds)", variants, collect, count)
    floor = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py")],
        cwd=suite,
        capture_output=True,
        text=True,
        check=True,
    )
    print("  the floor here, one process after another, from the collected pytest process:")
    for line in floor.stdout.splitlines():
        variant, ms = line.rsplit(" ", 1)
        print(f"    {variant:<26} {float(ms):.3f}ms per test")


HEAVY = """
def test_heavy_{n}():
    data = b"x" * (150 * 1000**2)
    assert data
"""


def bench_auto(rounds: int, count: int) -> None:
    """--isolate=auto on a mostly light suite: a few tests need 150MB, which
    the history (recorded by a first run) gives workers of their own."""
    suite = WORK / f"auto{count}"
    if suite.exists():
        shutil.rmtree(suite)
    suite.mkdir(parents=True)
    modules = 20
    per_module = count // modules
    for m in range(modules):
        body = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(per_module))
        if m % 7 == 0:
            body += HEAVY.format(n=m)
        (suite / f"test_m{m}.py").write_text(body)
    (suite / "pytest.ini").write_text("[pytest]\n")
    auto = ["-p", "isolator", "--isolate=auto", "--worker-mem=512MB"]
    run_once(suite, auto, cache=True)  # records the history the measured runs use
    collect = Variant("collect only", ["--collect-only", "-p", "isolator"], cache=True)
    variants = [
        Variant("plain", ["-p", "isolator"], cache=True),
        Variant("--isolate=auto --worker-mem=512MB", auto, cache=True),
        Variant("--isolate=module", ["-p", "isolator", "--isolate=module"], cache=True),
    ]
    measure(suite, [collect, *variants], rounds)
    heavy = len(range(0, modules, 7))
    report(
        f"{per_module * modules + heavy} tests in {modules} modules, {heavy} of them needing "
        f"150MB, pytest's cache on ({rounds} rounds)",
        variants,
        collect,
        per_module * modules + heavy,
    )


LEAKY = """
import pytest

CACHE = []


@pytest.mark.parametrize("n", range(30))
def test_leaks_24mb(n):
    CACHE.append(b"\\x01" * (24 * 1024 * 1024))
"""

_PEAK = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], capture_output=True, check=False); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def largest_process_peak(cwd: Path, args: list[str]) -> int:
    """The peak RSS of the largest process in the run's process tree."""
    command = [sys.executable, "-c", _PEAK, sys.executable, "-m", "pytest", "-q", *args]
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return int(completed.stdout.split()[-1])


def bench_leaky() -> None:
    suite = WORK / "leaky"
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "test_leaky.py").write_text(LEAKY)
    (suite / "pytest.ini").write_text("[pytest]\n")
    print("\na module whose 30 tests keep 24 MB each: largest process peak RSS")
    for name, args in (
        ("plain", ["-p", "isolator"]),
        ("--isolate=module", ["-p", "isolator", "--isolate=module"]),
        (
            "--isolate=module --worker-mem=256MB",
            ["-p", "isolator", "--isolate=module", "--worker-mem=256MB"],
        ),
        (
            "--isolate=shared --worker-mem=256MB",
            ["-p", "isolator", "--isolate=shared", "--worker-mem=256MB"],
        ),
    ):
        peak = largest_process_peak(suite, args)
        print(f"  {name:<38} {peak / 1e6:8.0f} MB")


def bench_networkx(rounds: int) -> None:
    try:
        import networkx  # noqa: F401
    except ImportError:
        print("\nnetworkx: not installed, skipped (make conformance installs it)")
        return
    cwd = WORK
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "pytest.ini").write_text("[pytest]\n")
    args = ["--pyargs", "networkx", "-p", "isolator"]
    variants = [
        Variant("plain", args),
        Variant("--isolate=module", [*args, "--isolate=module"]),
    ]
    measure(cwd, variants, rounds)
    report(f"pytest --pyargs networkx ({rounds} rounds)", variants, None, 0)
    parallel = [*args, "-n", "2", "--dist", "loadfile"]
    variants = [
        Variant("plain -n 2 --dist loadfile", parallel),
        Variant("--isolate=module, same", [*parallel, "--isolate=module"]),
    ]
    measure(cwd, variants, rounds)
    report(f"pytest --pyargs networkx -n 2 --dist loadfile ({rounds} rounds)", variants, None, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--only", choices=["trivial", "auto", "leaky", "networkx"], default=None)
    parser.add_argument(
        "--against",
        metavar="GIT_REF",
        action="append",
        default=[],
        help="also time the isolated variants of the trivial suite as of this git ref (main, "
        "say), alternating; may be given more than once",
    )
    options = parser.parse_args()
    os.environ.pop("PYTEST_ADDOPTS", None)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if options.only in (None, "trivial"):
        bench_trivial(options.rounds, options.tests, options.against)
    if options.only in (None, "auto"):
        bench_auto(options.rounds, options.tests)
    if options.only in (None, "leaky"):
        bench_leaky()
    if options.only in (None, "networkx"):
        bench_networkx(max(1, options.rounds // 3))


if __name__ == "__main__":
    main()
