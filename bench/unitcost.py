"""A bench-only pytest plugin: where the cost of a fresh worker goes.

Loaded with ``-p bench.unitcost`` next to isolator, in the pytest process
only. It wraps ``os.fork`` and ``os.waitpid`` of that process (isolator's own
code is untouched; the zygote inherits the wrappers and forks and reaps the
workers with them) and, in each forked worker, records the worker's CPU time
and minor page faults when its first test begins and when each test ends,
into a shared memory slot the pytest process reads at the end (``os.wait4``
in the zygote gives the worker's totals). Per unit, then:

- fork: the zygote's CPU and wall time inside ``os.fork()``;
- worker start: the worker's CPU and faults from its fork to its first setup;
- tests: the same, over the unit's tests;
- exit: the same, after its last test (teardown of the unit, leaving, and
  the kernel's teardown of its address space, whether it left or was killed);
- reap: the zygote's wall time inside ``waitpid``;
- parent: the pytest process's CPU and minor faults over the run, per fork;
- zygote: the zygote's own CPU over the run, per fork (fork included).

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

#: Per fork: pid, then (CPU, faults) when the worker's first test began, when
#: its last test ended and when it reached os._exit, its totals at reaping,
#: and the forking process's wall and CPU time in fork() and wall time in
#: waitpid.
_SLOT = struct.Struct("<q" + "d" * 11)
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
    """Installed in the pytest process; its wrappers are inherited by the
    zygote (which forks and reaps the workers) and by the workers."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.shared = mmap.mmap(-1, _SLOT.size * _SLOTS + 8)
        self.slot = -1  # in a worker: its slot
        self.controller = os.getpid()
        #: In the process that forks workers: slot by PID.
        self.slots: dict[int, int] = {}
        self.first_fork: tuple[float, float, int, int] | None = None
        #: The controller's own forks (the zygote) and what reaping them told.
        self.own_forks: dict[int, tuple[float, float]] = {}
        self.started_test = False
        self._fork = os.fork
        self._waitpid = os.waitpid
        self._exit = os._exit
        os.fork = self.fork
        os.waitpid = self.waitpid
        os._exit = self.exit

    def _next_slot(self) -> int:
        # The slot count lives in the shared page's tail: any process may fork.
        (count,) = struct.unpack_from("<q", self.shared, _SLOT.size * _SLOTS)
        struct.pack_into("<q", self.shared, _SLOT.size * _SLOTS, count + 1)
        return int(count)

    def _put(self, slot: int, index: int, *values: float) -> None:
        offset = slot * _SLOT.size + 8 + 8 * index
        struct.pack_into(f"<{len(values)}d", self.shared, offset, *values)

    def fork(self) -> int:
        if os.getpid() == self.controller:
            if self.first_fork is None:
                cpu, faults = _cpu_and_faults()
                self.first_fork = (cpu, faults, _rss_bytes(), _anon_huge_kb())
            pid = self._fork()
            if pid:
                self.own_forks[pid] = (0.0, 0.0)
            return pid
        slot = self._next_slot()
        if slot >= _SLOTS:
            return self._fork()
        start = time.perf_counter()
        start_cpu = time.thread_time()
        pid = self._fork()
        if pid == 0:
            self.slot = slot
            self.started_test = False
            return 0
        struct.pack_into("<q", self.shared, slot * _SLOT.size, pid)
        self._put(slot, 8, time.perf_counter() - start, time.thread_time() - start_cpu)
        self.slots[pid] = slot
        return pid

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        start = time.perf_counter()
        got, status, usage = os.wait4(pid, options)
        if got:
            totals = (usage.ru_utime + usage.ru_stime, float(usage.ru_minflt))
            if got in self.own_forks:
                self.own_forks[got] = totals
            slot = self.slots.get(got)
            if slot is not None:
                self._put(slot, 6, *totals)
                self._put(slot, 10, time.perf_counter() - start)
        return got, status

    def exit(self, status: int) -> NoReturn:
        if self.slot >= 0:
            self._put(self.slot, 4, *_cpu_and_faults())
        self._exit(status)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self) -> Generator[None, None, None]:
        if self.slot >= 0 and not self.started_test:
            self.started_test = True
            self._put(self.slot, 0, *_cpu_and_faults())
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            if self.slot >= 0:
                self._put(self.slot, 2, *_cpu_and_faults())

    def pytest_unconfigure(self) -> None:
        if os.getpid() != self.controller or self.first_fork is None:
            return
        os.fork, os.waitpid, os._exit = self._fork, self._waitpid, self._exit
        cpu, faults = _cpu_and_faults()
        start_cpu, start_faults, start_rss, start_huge = self.first_fork
        (count,) = struct.unpack_from("<q", self.shared, _SLOT.size * _SLOTS)
        units = []
        leaving: list[tuple[float, float, float]] = []
        forks = fork_s = fork_cpu_s = reap_s = workers_cpu = 0.0
        for slot in range(min(int(count), _SLOTS)):
            fields = _SLOT.unpack_from(self.shared, slot * _SLOT.size)
            pid, begin_cpu, begin_faults, end_cpu, end_faults, left_cpu, left_faults = fields[:7]
            total_cpu, total_faults, slot_fork_s, slot_fork_cpu_s, slot_reap_s = fields[7:]
            if not pid:
                continue
            forks += 1
            fork_s += slot_fork_s
            fork_cpu_s += slot_fork_cpu_s
            reap_s += slot_reap_s
            workers_cpu += total_cpu
            if not begin_cpu or not end_cpu or not total_cpu:
                continue  # a standby that never ran a test, or not reaped
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
        # The zygote's own CPU: what reaping it reported, less its workers'.
        zygote_cpu = sum(total for total, _ in self.own_forks.values()) - workers_cpu
        summary: dict[str, Any] = {
            "forks": int(forks),
            "units": len(units),
            "fork_s": fork_s,
            "fork_cpu_s": fork_cpu_s,
            "reap_s": reap_s,
            "parent_cpu": cpu - start_cpu,
            "parent_faults": faults - start_faults,
            "zygote_cpu": max(zygote_cpu, 0.0),
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
