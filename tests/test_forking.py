"""Forking a big pytest process: its memory is collapsed into huge pages
before the first worker is forked, a worker's write to a shared huge page
costs it 4 KB and not 2 MB, and a machine without huge pages says so."""

from __future__ import annotations

import _thread
import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import IsolatedRunner
from isolator import forking

MB = 1024 * 1024

#: A pytest process holding 96 MB more than usual, all of it resident, in
#: one anonymous mapping (glibc gives an allocation this large its own).
BIG_CONFTEST = """
    DATA = bytearray(b"\\x01") * ({mb} * 1024 * 1024)
"""

#: The first test measures its own worker: huge pages at its start, then
#: its private memory before and after one write in each of 40 extents.
MEASURES = """
    import json, os
    import pytest
    from conftest import DATA

    EXTENTS = 40

    def rollup():
        with open("/proc/self/smaps_rollup") as f:
            return {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in f
                if line.rstrip().endswith("kB")
            }

    @pytest.mark.parametrize("n", range(50))
    def test_writes(n):
        if n:
            return
        before = rollup()
        for extent in range(EXTENTS):
            DATA[extent * 2 * 1024 * 1024 + 4096 + 17] = 2
        after = rollup()
        with open(os.environ["FIGURES"], "w") as f:
            json.dump({
                "huge_at_start": before["AnonHugePages"],
                "huge_after": after["AnonHugePages"],
                "private_dirty_growth": after["Private_Dirty"] - before["Private_Dirty"],
            }, f)
"""


def _skip_without_huge_pages() -> None:
    reason = forking.huge_pages_unavailable()
    if reason is not None:
        pytest.skip(f"huge pages are not to be had here: {reason}")


def test_workers_start_from_huge_pages_and_a_write_copies_4kb(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    _skip_without_huge_pages()
    pytester.makeconftest(BIG_CONFTEST.format(mb=96))
    pytester.makepyfile(test_measures=MEASURES)
    figures_path = pytester.path / "figures.json"
    monkeypatch.setenv("FIGURES", str(figures_path))
    isolated.run("test").assert_outcomes(passed=50)
    figures = json.loads(figures_path.read_text())
    # The worker inherited the parent's 96 MB of data as huge pages (the
    # THP setting here is "madvise", so nothing else would have made them).
    assert figures["huge_at_start"] >= 64 * MB, figures
    # Each write split one huge page in the worker ...
    assert figures["huge_at_start"] - figures["huge_after"] >= 30 * 2 * MB, figures
    # ... and made the worker 4 KB its own, not 2 MB: 40 writes, 160 KB,
    # plus what Python itself writes meanwhile (80 MB if whole pages were copied).
    assert figures["private_dirty_growth"] < 2 * MB, figures


#: Writes down, as the run ends, what the ForkPrep plugin did.
TELLS_WHAT_FORKPREP_DID = """

def pytest_unconfigure(config):
    import json, os
    prep = config.pluginmanager.get_plugin("isolator-forking")
    with open(os.environ["PREP"], "w") as f:
        json.dump({
            "second_pass": prep.collapse is not None,
            "first_pass_told_to_stop": prep.early_stop is not None and prep.early_stop.is_set(),
            "first_pass_running": prep.early_thread is not None,
        }, f)
"""


def test_a_small_run_does_not_wait_for_a_collapse(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below MIN_FORKS workers the collapse would cost more than it saves:
    the pass before the first worker is not made, and the one made while
    pytest collected (which could not know yet) is told to stop and is over
    before any worker is forked."""
    _skip_without_huge_pages()
    pytester.makeconftest(BIG_CONFTEST.format(mb=96) + TELLS_WHAT_FORKPREP_DID)
    pytester.makepyfile(test_measures=MEASURES.replace("range(50)", "range(3)"))
    monkeypatch.setenv("FIGURES", str(pytester.path / "figures.json"))
    monkeypatch.setenv("PREP", str(pytester.path / "prep.json"))
    isolated.run("test").assert_outcomes(passed=3)
    assert json.loads((pytester.path / "prep.json").read_text()) == {
        "second_pass": False,
        "first_pass_told_to_stop": True,
        "first_pass_running": False,
    }


#: Runs pytest with transparent huge pages disabled for it, as a machine
#: or container without them would.
WITHOUT_THP = """
import ctypes, os, sys
PR_SET_THP_DISABLE = 41
ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]])
"""


@pytest.mark.parametrize(("mb", "says_so"), [(160, True), (8, False)])
def test_no_huge_pages_is_one_line_at_start_up_for_a_big_process(
    pytester: pytest.Pytester, mb: int, says_so: bool
) -> None:
    _skip_without_huge_pages()
    pytester.makeconftest(BIG_CONFTEST.format(mb=mb))
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.run(
        sys.executable,
        "-c",
        WITHOUT_THP,
        "-p",
        "isolator",
        "--isolate=module",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1)
    line = (
        "isolator: workers are forked without huge pages, so each costs more CPU "
        "(README: Cost): the kernel refuses MADV_COLLAPSE*"
    )
    if says_so:
        result.stdout.fnmatch_lines([line])
        assert sum("without huge pages" in out for out in result.outlines) == 1
    else:
        result.stdout.no_fnmatch_line(line)
    # The same big process with huge pages says nothing.
    if says_so:
        plain = pytester.runpytest("-p", "isolator", "--isolate=module")
        plain.assert_outcomes(passed=1)
        plain.stdout.no_fnmatch_line("*without huge pages*")


#: Maps 80 MB, touches 19 pages in 20 of its first half and every other page
#: of its second half, collapses, and reports what became huge and how much
#: the process grew.
PARTLY_RESIDENT = """
import json, mmap, sys
from isolator import forking

def smaps_of(address):
    found = False
    figures = {}
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and ":" not in line.split()[0]:
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                found = low <= address < high
            elif found and line.rstrip().endswith("kB"):
                figures[line.split(":")[0]] = int(line.split()[1]) * 1024
    return figures

size = 80 * 1024 * 1024
area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
for page in range(0, size // 2, 4096):
    if page // 4096 % 20:
        area[page] = 1
for page in range(size // 2, size, 8192):
    area[page] = 1
import ctypes
view = ctypes.c_char.from_buffer(area)
address = ctypes.addressof(view)
del view
before = smaps_of(address)
collapse = forking.collapse_anonymous_memory()
after = smaps_of(address)
json.dump({
    "huge": after["AnonHugePages"],
    "growth": after["Rss"] - before["Rss"],
    "collapsed": collapse.collapsed_bytes,
}, sys.stdout)
"""


def test_only_nearly_whole_extents_are_collapsed_so_the_process_hardly_grows(
    pytester: pytest.Pytester,
) -> None:
    _skip_without_huge_pages()
    result = pytester.run(sys.executable, "-c", PARTLY_RESIDENT)
    assert result.ret == 0, result.stderr.str()
    figures = json.loads(result.stdout.str())
    # The first half (95% resident) is collapsed, less an extent at each end
    # of the mapping that is not 2 MB aligned; the second half (50%) is not.
    assert 36 * MB <= figures["huge"] <= 40 * MB, figures
    # Filling the holes of what was collapsed: 5% of it.
    assert figures["growth"] <= figures["huge"] // 20 + 64 * 1024, figures


#: Imported while pytest collects: waits (up to 20 s) until the pytest
#: process holds the conftest's data in huge pages, and says whether it did.
WAITS_DURING_COLLECTION = """
    import json, os, time

    def huge_bytes():
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
        return 0

    deadline = time.monotonic() + float(os.environ.get("WAIT_S", "20"))
    while huge_bytes() < 64 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(os.environ["FIGURES"], "w") as f:
        json.dump({"huge_during_collection": huge_bytes()}, f)

    def test_one(): pass
"""


def _suite_that_watches_collection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """96 MB held by the conftest, a module that watches for huge pages while
    it is imported, and 60 more tests: where the figures will be."""
    _skip_without_huge_pages()
    pytester.makeconftest(BIG_CONFTEST.format(mb=96))
    pytester.makepyfile(test_a=WAITS_DURING_COLLECTION)
    pytester.makepyfile(
        test_b="import pytest\n\n@pytest.mark.parametrize('n', range(60))\ndef test_b(n): pass\n"
    )
    figures_path = pytester.path / "figures.json"
    monkeypatch.setenv("FIGURES", str(figures_path))
    return figures_path


def test_memory_is_collapsed_while_pytest_collects(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collapse is not in the first test's way: it runs on a thread while
    the test modules are imported (here, one that waits to see it happen),
    and only what collection added is left for after it."""
    figures_path = _suite_that_watches_collection(pytester, monkeypatch)
    # A process of its own: huge pages an earlier test left in this one
    # would be seen too.
    result = pytester.runpytest_subprocess("-p", "isolator", "--isolate=test")
    result.assert_outcomes(passed=61)
    figures = json.loads(figures_path.read_text())
    assert figures["huge_during_collection"] >= 64 * MB, figures


def test_with_one_cpu_the_collapse_waits_for_collection_to_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one CPU a thread would only slow collection down: the collapse is
    made after collection, as it always was."""
    figures_path = _suite_that_watches_collection(pytester, monkeypatch)
    monkeypatch.setenv("WAIT_S", "2")
    cpu = min(os.sched_getaffinity(0))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "isolator", "--isolate=test", "-q"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "61 passed" in result.stdout
    figures = json.loads(figures_path.read_text())
    assert figures["huge_during_collection"] < 64 * MB, figures


class _FakeMincore:
    """mincore(2) over extents of which the first ``resident`` pages are in
    memory; sets ``stop`` once it has been asked ``stop_after`` times."""

    def __init__(self, resident: dict[int, int], stop: threading.Event, stop_after: int) -> None:
        self.resident = resident
        self.stop = stop
        self.stop_after = stop_after
        self.asked = 0

    def mincore(self, address: int, length: int, vec: ctypes.Array[ctypes.c_ubyte]) -> int:
        self.asked += 1
        if self.asked >= self.stop_after:
            self.stop.set()
        for page in range(len(vec)):
            vec[page] = 1 if page < self.resident[address] else 0
        return 0


def test_resident_extents_counts_pages_and_stops_when_told() -> None:
    """The first pass looks at every extent of the process's anonymous
    mappings, gigabytes of them where a process reserved and never touched
    them; a run that needs no collapse tells it to stop, and it does."""
    stop = threading.Event()
    extents = [n * 2 * MB for n in range(1, 9)]
    # 9/10 of 512 pages is 460: the first two are collapsed, the third not.
    resident = dict.fromkeys(extents, 0) | {extents[0]: 512, extents[1]: 461, extents[2]: 459}
    kernel = _FakeMincore(resident, stop, stop_after=4)
    found = forking.resident_extents(kernel, iter(extents), stop)  # type: ignore[arg-type]
    assert found == extents[:2]
    assert kernel.asked == 4  # not the other 4


def test_ctrl_c_while_a_fork_waits_for_the_first_pass_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork during collection first ends the first pass; a Ctrl-C while it
    waits would be dropped by CPython (an exception in an at-fork hook is
    only reported as unraisable). The pass is ended all the same, and the
    Ctrl-C raised again, to arrive once the fork is over."""

    class Pass:
        thread = threading.Thread(target=lambda: None)
        finished = 0
        gone = False

        def finish(self, wanted: bool) -> None:
            self.finished += 1
            if self.finished == 1:
                raise KeyboardInterrupt

        def wait_gone(self) -> None:
            self.gone = True

    interrupted: list[bool] = []
    early = Pass()
    monkeypatch.setattr(forking, "_running", early)
    monkeypatch.setattr(_thread, "interrupt_main", lambda: interrupted.append(True))
    forking._before_fork()
    assert (early.finished, early.gone, interrupted) == (2, True, [True])
