"""make bench: what isolation costs, as ratios against plain pytest in the same run.

Each scenario runs its variants in alternation (plain, isolated, plain, ...)
so that drift in the machine's speed hits all of them alike, and reports the
median of each: wall time, and CPU time (user + system of the whole process
tree, workers included), which a machine busy with other work disturbs far
less than wall time. "per test" subtracts the time of ``--collect-only``
(interpreter start, plugin loading, collection: the same with or without
isolation) to show what running the tests costs.

The big-parent case (a conftest that imports torch and numpy, a ~230 MB
pytest process) and the comparison with pytest-forked (which needs a pytest
both support) run in virtualenvs of their own under ``.bench``, made here on
first use; when one cannot be made, its case says it was skipped, and why.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
TORCH = "torch==2.13.0"
#: The newest pytest that pytest-forked still works with.
FORKED_PYTEST = "pytest>=8.4,<8.5"
#: Leaves the controller's memory in small pages: runs as they were before
#: isolator collapsed it into huge pages.
SMALL_PAGES = ["-p", "no:isolator-forking"]


@dataclass
class Variant:
    name: str
    args: list[str]
    times: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    #: Run with pytest's cache (the memory history lives there).
    cache: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    cwd: Path,
    args: list[str],
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    cache: bool = False,
) -> tuple[float, float]:
    """Wall time and CPU time of one pytest run (its workers included: each
    process reaps its children, and getrusage counts what reaped children used)."""
    # Without pytest's cache unless asked: nothing a run writes steers the next.
    # pytest-randomly (a dev dependency) would shuffle the order and, with
    # numpy installed, import numpy, faker and more into every run.
    command = [python, "-m", "pytest", "-q", *([] if cache else ["-p", "no:cacheprovider"])]
    command += ["-p", "no:randomly", *args]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    completed = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, env=env
    )
    elapsed = time.perf_counter() - start
    if completed.returncode not in (0, 1):
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
        raise SystemExit(f"bench: {' '.join(args)} exited {completed.returncode}\n{tail}")
    return elapsed, _children_cpu() - cpu_before


def measure(cwd: Path, variants: list[Variant], rounds: int, python: str = sys.executable) -> None:
    for _ in range(rounds):
        for variant in variants:
            wall, cpu = run_once(cwd, variant.args, python, cache=variant.cache)
            variant.times.append(wall)
            variant.cpus.append(cpu)


def report(title: str, variants: list[Variant], baseline: Variant | None, tests: int) -> None:
    plain = variants[0]
    print(f"\n{title}")
    header = f"  {'variant':<34} {'wall':>8} {'vs plain':>9} {'CPU':>8} {'vs plain':>9}"
    if tests and baseline:
        header += f" {'per test':>10} {'vs plain':>9}"
    print(header)
    base = baseline.median if baseline else 0.0
    for variant in variants:
        line = (
            f"  {variant.name:<34} {variant.median:>7.2f}s {variant.median / plain.median:>8.2f}x"
            f" {variant.cpu:>7.2f}s {variant.cpu / plain.cpu:>8.2f}x"
        )
        if tests and baseline:
            run = variant.median - base
            line += f" {run / tests * 1000:>8.3f}ms {run / (plain.median - base):>8.2f}x"
        print(line)
    if baseline:
        print(f"  ({baseline.name}: {baseline.median:.2f}s wall, subtracted for 'per test')")


_PER_FORK = ("fork_cpu_s", "fork_s", "parent_cpu", "parent_faults", "zygote_cpu", "reap_s")
_PER_UNIT = tuple(
    f"{phase}_{what}" for phase in ("start", "tests", "exit") for what in ("cpu", "faults")
)


def breakdown(cwd: Path, variants: list[Variant], python: str = sys.executable) -> None:
    """Where a unit's cost goes, from one more run of each isolated variant
    with the ``bench.unitcost`` plugin (CPU figures are per worker)."""
    print("  per unit (one more run each; CPU ms, minor page faults):")
    print(
        f"    {'variant':<32} {'units':>5} {'fork':>13} {'parent':>14} {'zygote':>6}"
        f" {'start':>14} {'tests':>14} {'exit':>14} {'reap':>6}"
    )
    for variant in variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_UNITCOST": out.name}
            command = [*variant.args, "-p", "bench.unitcost"]
            run_once(cwd, command, python, env)
            data = json.loads(Path(out.name).read_text() or "{}")
        if not data.get("units"):
            continue
        per_fork = {key: float(data[key]) / data["forks"] for key in _PER_FORK}
        per_unit = {key: float(data[key]) / data["units"] for key in _PER_UNIT}
        print(
            f"    {variant.name:<32} {data['units']:>5}"
            f" {per_fork['fork_cpu_s'] * 1e3:>5.2f} ({per_fork['fork_s'] * 1e3:>5.1f}w)"
            f" {per_fork['parent_cpu'] * 1e3:>5.2f} {per_fork['parent_faults']:>6.0f}f"
            f" {per_fork['zygote_cpu'] * 1e3:>6.2f}"
            + "".join(
                f" {per_unit[f'{phase}_cpu'] * 1e3:>5.2f} {per_unit[f'{phase}_faults']:>6.0f}f"
                for phase in ("start", "tests", "exit")
            )
            + f" {per_fork['reap_s'] * 1e3:>5.2f}"
        )
        print(
            f"    {'':<32} parent RSS {data['parent_rss_first_fork'] / 1e6:.0f} MB at the first "
            f"fork, {data['parent_rss_end'] / 1e6:.0f} MB at the end; huge pages "
            f"{data['parent_huge_kb_first_fork'] / 1024:.0f} MB, then "
            f"{data['parent_huge_kb_end'] / 1024:.0f} MB"
        )
        if data.get("left"):
            left = data["left"]
            print(
                f"    {'':<32} exit of the {left} that reached os._exit: Python "
                f"{data['leave_cpu'] / left * 1e3:.2f} ms, then the kernel "
                f"{data['teardown_cpu'] / left * 1e3:.2f} ms"
            )
    print(
        "    fork: the zygote's CPU in os.fork() (wall in brackets); parent: all the pytest"
        " process's\n    CPU and faults per fork; zygote: all its CPU per fork, fork included;"
        " start: a worker's\n    until its first test; tests: over its tests; exit: after them,"
        " its address space torn\n    down included; reap: the zygote's wall ms in waitpid"
    )


def trivial_suite(count: int) -> Path:
    suite = WORK / f"trivial{count}"
    suite.mkdir(parents=True, exist_ok=True)
    body = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(count))
    (suite / "test_many.py").write_text(body)
    # Its own ini file, so the project's pytest settings stay out of it.
    (suite / "pytest.ini").write_text("[pytest]\n")
    return suite


def bench_trivial(rounds: int, count: int) -> None:
    suite = trivial_suite(count)
    collect = Variant("collect only", ["--collect-only", "-p", "isolator"])
    variants = [
        Variant("plain", ["-p", "isolator"]),
        Variant("--isolate=module", ["-p", "isolator", "--isolate=module"]),
        Variant("--isolate=test", ["-p", "isolator", "--isolate=test"]),
    ]
    measure(suite, [collect, *variants], rounds)
    report(f"{count} trivial tests in one module ({rounds} rounds)", variants, collect, count)
    breakdown(suite, variants[2:])
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


def bench_venv(name: str, packages: list[str]) -> tuple[str | None, str]:
    """A virtualenv under .bench with ``packages`` and this checkout
    installed: (its python, "") or (None, why it could not be made)."""
    venv = WORK / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(packages)
    if stamp.exists() and stamp.read_text() == wanted:
        return str(python), ""
    print(f"\n(making {venv.relative_to(ROOT)}: {wanted})", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *packages, "-e", str(ROOT)],
            capture_output=True,
            text=True,
            check=False,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, str(exc)
    if install.returncode != 0:
        lines = [line for line in install.stderr.splitlines() if line.startswith("ERROR")]
        return None, (lines or install.stderr.splitlines() or ["pip failed"])[-1]
    stamp.write_text(wanted)
    return str(python), ""


BIG_CONFTEST = "import numpy\nimport torch\n"
BIG_MODULE = "import torch\n\n\n" + "".join(
    f"def test_{i}():\n    assert torch.ones(2).sum().item() == 2\n\n\n" for i in range(5)
)


def big_suite(modules: int) -> Path:
    suite = WORK / f"big{modules}"
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(BIG_CONFTEST)
    for index in range(modules):
        (suite / f"test_m{index:03d}.py").write_text(BIG_MODULE)
    return suite


def bench_big(rounds: int) -> None:
    title = "a big pytest process: conftest imports torch and numpy; 100 modules of 5 tests"
    python, why = bench_venv("venv-big", [TORCH, "numpy"])
    if python is None:
        print(f"\n{title}: SKIPPED, torch could not be installed ({TORCH}): {why}")
        return
    suite = big_suite(100)
    base = ["-p", "isolator"]
    small = SMALL_PAGES
    variants = [
        Variant("plain", base),
        Variant("--isolate=module", [*base, "--isolate=module"]),
        Variant("--isolate=module, small pages", [*base, *small, "--isolate=module"]),
        Variant("--isolate=test", [*base, "--isolate=test"]),
        Variant("--isolate=test, small pages", [*base, *small, "--isolate=test"]),
    ]
    measure(suite, variants, rounds, python)
    report(f"{title} ({rounds} rounds)", variants, None, 0)
    breakdown(suite, variants[1:], python)


def bench_forked(rounds: int, count: int) -> None:
    title = f"{count} trivial tests against pytest-forked, on pytest 8.4 (both support it)"
    python, why = bench_venv("venv-forked", [FORKED_PYTEST, "pytest-forked"])
    if python is None:
        print(f"\n{title}: SKIPPED, pytest-forked could not be installed: {why}")
        return
    suite = trivial_suite(count)
    variants = [
        Variant("plain", ["-p", "isolator"]),
        Variant("--isolate=test", ["-p", "isolator", "--isolate=test"]),
        Variant("pytest-forked --forked", ["-p", "isolator", "--forked"]),
    ]
    measure(suite, variants, rounds, python)
    report(f"{title} ({rounds} rounds)", variants, None, 0)
    ours, theirs = variants[1], variants[2]
    print(
        f"  --isolate=test is {theirs.median / ours.median:.2f}x faster than pytest-forked "
        f"(wall), {theirs.cpu / ours.cpu:.2f}x (CPU)"
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
        Variant("--isolate=module, small pages", [*args, *SMALL_PAGES, "--isolate=module"]),
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


CASES = ("trivial", "auto", "big", "forked", "leaky", "networkx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--only", choices=CASES, action="append", default=None)
    options = parser.parse_args()
    os.environ.pop("PYTEST_ADDOPTS", None)
    cases = options.only or CASES
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "trivial" in cases:
        bench_trivial(options.rounds, options.tests)
    if "auto" in cases:
        bench_auto(options.rounds, options.tests)
    if "big" in cases:
        bench_big(max(1, options.rounds * 3 // 5))
    if "forked" in cases:
        bench_forked(max(1, options.rounds * 3 // 5), options.tests)
    if "leaky" in cases:
        bench_leaky()
    if "networkx" in cases:
        bench_networkx(max(1, options.rounds // 3))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
