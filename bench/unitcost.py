"""A bench-only pytest plugin: where the cost of a fresh worker goes.

Loaded with ``-p bench.unitcost`` next to isolator, in the pytest process
only. It wraps ``os.fork`` and ``os.waitpid`` of that process (isolator's own
code is untouched) and, in each forked worker, records the worker's CPU time
and minor page faults when its first test begins and when each test ends,
into a shared memory slot the parent reads when it reaps the worker
(``os.wait4`` gives the worker's totals). Per unit, then:

- fork: the parent's wall time inside ``os.fork()``;
- worker start: the worker's CPU and faults from its fork to its first setup;
- tests: the same, over the unit's tests;
- exit: the same, after its last test (teardown of the unit, leaving, and
  the kernel's teardown of its address space, whether it left or was killed);
- reap: the parent's wall time inside ``waitpid``;
- parent faults: minor faults the parent took over the run, per fork (its
  pages are shared with a worker after every fork, so its writes copy them).

At the end it writes a JSON summary to the path in ``BENCH_UNITCOST``.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import struct
import time
from collections.abc import Generator
from typing import Any, NoReturn

import pytest

_SLOT = struct.Struct("<dddddd")
_SLOTS = 20_000


def _cpu_and_faults() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, float(usage.ru_minflt)


def _anon_huge_kb() -> int:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class UnitCost:
    def __init__(self, out: str) -> None:
        self.out = out
        self.shared = mmap.mmap(-1, _SLOT.size * _SLOTS)
        self.slot = -1  # in a worker: its slot; in the parent: -1
        self.forks = 0
        self.slots: dict[int, int] = {}
        self.fork_s: list[float] = []
        self.fork_cpu_s: list[float] = []
        self.reap_s: list[float] = []
        self.totals: dict[int, tuple[float, float]] = {}
        self.first_fork: tuple[float, float, int, int] | None = None
        self.started_test = False
        self._fork = os.fork
        self._waitpid = os.waitpid
        self._exit = os._exit
        os.fork = self.fork
        os.waitpid = self.waitpid
        os._exit = self.exit

    def fork(self) -> int:
        if self.forks >= _SLOTS:
            return self._fork()
        slot = self.forks
        self.forks += 1
        if self.first_fork is None:
            cpu, faults = _cpu_and_faults()
            self.first_fork = (cpu, faults, _rss_bytes(), _anon_huge_kb())
        start = time.perf_counter()
        start_cpu = time.thread_time()
        pid = self._fork()
        if pid == 0:
            self.slot = slot
            return 0
        self.fork_cpu_s.append(time.thread_time() - start_cpu)
        self.fork_s.append(time.perf_counter() - start)
        self.slots[pid] = slot
        return pid

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        start = time.perf_counter()
        got, status, usage = os.wait4(pid, options)
        if got:
            self.reap_s.append(time.perf_counter() - start)
            self.totals[got] = (usage.ru_utime + usage.ru_stime, float(usage.ru_minflt))
        return got, status

    def exit(self, status: int) -> NoReturn:
        if self.slot >= 0:
            self._record(32)
        self._exit(status)

    def _record(self, offset: int) -> None:
        cpu, faults = _cpu_and_faults()
        struct.pack_into("<dd", self.shared, self.slot * _SLOT.size + offset, cpu, faults)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self) -> Generator[None, None, None]:
        if self.slot >= 0 and not self.started_test:
            self.started_test = True
            self._record(0)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            if self.slot >= 0:
                self._record(16)

    def pytest_unconfigure(self) -> None:
        if self.slot >= 0 or self.first_fork is None:
            return
        os.fork, os.waitpid, os._exit = self._fork, self._waitpid, self._exit
        cpu, faults = _cpu_and_faults()
        start_cpu, start_faults, start_rss, start_huge = self.first_fork
        units = []
        leaving: list[tuple[float, float, float]] = []
        for pid, (total_cpu, total_faults) in self.totals.items():
            slot = self.slots.get(pid)
            if slot is None:
                continue
            begin_cpu, begin_faults, end_cpu, end_faults, left_cpu, left_faults = _SLOT.unpack_from(
                self.shared, slot * _SLOT.size
            )
            if not begin_cpu or not end_cpu:
                continue  # a standby that never ran a test
            if left_cpu:
                # It reached os._exit (it was not killed first): what came
                # after is the kernel tearing its address space down.
                leaving.append(
                    (left_cpu - end_cpu, total_cpu - left_cpu, total_faults - left_faults)
                )
            units.append(
                {
                    "start_cpu": begin_cpu,
                    "start_faults": begin_faults,
                    "tests_cpu": end_cpu - begin_cpu,
                    "tests_faults": end_faults - begin_faults,
                    "exit_cpu": total_cpu - end_cpu,
                    "exit_faults": total_faults - end_faults,
                }
            )
        summary: dict[str, Any] = {
            "forks": len(self.fork_s),
            "units": len(units),
            "fork_s": sum(self.fork_s),
            "fork_cpu_s": sum(self.fork_cpu_s),
            "reap_s": sum(self.reap_s),
            "parent_cpu": cpu - start_cpu,
            "parent_faults": faults - start_faults,
            "parent_rss_first_fork": start_rss,
            "parent_rss_end": _rss_bytes(),
            "parent_huge_kb_first_fork": start_huge,
            "parent_huge_kb_end": _anon_huge_kb(),
        }
        for key in ("start_cpu", "start_faults", "tests_cpu", "tests_faults"):
            summary[key] = sum(unit[key] for unit in units)
        summary["exit_cpu"] = sum(unit["exit_cpu"] for unit in units)
        summary["exit_faults"] = sum(unit["exit_faults"] for unit in units)
        summary["left"] = len(leaving)
        summary["leave_cpu"] = sum(python for python, _, _ in leaving)
        summary["teardown_cpu"] = sum(kernel for _, kernel, _ in leaving)
        summary["teardown_faults"] = sum(faults for _, _, faults in leaving)
        with open(self.out, "w") as f:
            json.dump(summary, f)


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get("BENCH_UNITCOST")
    if out and not hasattr(config, "workerinput"):
        config.pluginmanager.register(UnitCost(out), "bench-unitcost")
