"""Memory figures of a run: per test, per worker, and in total.

Every figure is a worker's *own* memory: its USS, the pages no other process
maps (what it allocated, and its copies of pages it shared with the process
it was forked from); see :class:`isolator.memory.Meter` for how it is read.
The controller feeds this from the workers' messages; the terminal summary,
the JSON report and the HTML picture all read from it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from isolator.sizes import format_size

#: Bump when a field changes meaning or goes away; adding fields keeps it.
SCHEMA_VERSION = 2
MEASURE = (
    "USS: each worker's own memory (pages it allocated, and its copies of pages it shared "
    "with its parent); read from smaps_rollup, carried forward by page faults and RSS between "
    "readings"
)


@dataclasses.dataclass
class TestMemory:
    nodeid: str
    worker: str
    #: Highest own memory while the test ran (setup to teardown).
    peak_bytes: int
    #: Memory the test kept after its teardown, counted from the end of its
    #: setup (what wider fixtures built is not its own; negative if it freed).
    growth_bytes: int
    #: When the test finished, seconds since the run started.
    at_s: float
    #: Own memory of the worker when the test began (what earlier tests and
    #: the worker's start left); ``peak_bytes - start_bytes`` is what the
    #: test itself needed on top of that.
    start_bytes: int = 0

    @property
    def own_peak_bytes(self) -> int:
        """The most memory the test needed on top of what its worker held."""
        return max(self.peak_bytes - self.start_bytes, 0)


@dataclasses.dataclass(frozen=True)
class PeakChange:
    """A test whose peak grew since the last run (see history.py)."""

    nodeid: str
    before_bytes: int
    now_bytes: int


@dataclasses.dataclass
class WorkerMemory:
    label: str
    #: The pytest-xdist worker it ran under ("gw0"), or "main".
    node: str
    pid: int
    started_s: float
    start_rss_bytes: int = 0
    #: Own memory when its unit started (pages it made its own since the fork).
    start_bytes: int = 0
    ended_s: float | None = None
    peak_bytes: int = 0
    end_bytes: int = 0
    tests: int = 0
    #: unit done, recycled: ..., ceiling hit, stopped, interrupted, or how it
    #: died: timed out after 5s, lost its pipe, killed by SIGKILL (OOM killer?), ...
    ended: str = "running"
    #: It died before finishing its unit (``ended`` says how).
    crashed: bool = False
    #: (seconds since run start, own memory) at the start and after each test,
    #: and every sample interval while a test runs.
    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    #: The worker's garbage collector per generation (collections, collected,
    #: uncollectable) over its unit, with --isolate-gc-stats.
    gc: list[dict[str, int]] = dataclasses.field(default_factory=list)
    #: Why the worker runs the tests it runs (see schedule.UNITS).
    unit: str = ""

    @property
    def abnormal(self) -> bool:
        return self.ended not in ("unit done", "running")


class RunMemory:
    """Everything measured in one pytest process (or gathered from xdist nodes)."""

    def __init__(self, t0: float, node: str = "main") -> None:
        self.t0 = t0
        self.node = node
        self.workers: dict[str, WorkerMemory] = {}
        self.tests: list[TestMemory] = []
        #: Times a worker waited for the machine to have its budget available.
        self.admission_waits = 0
        #: Highest sample the parent took of a worker while its current test ran.
        self._sampled_peak: dict[str, int] = {}
        #: The unit each worker was given, until it says it started.
        self._units: dict[str, str] = {}
        #: Tests that ran and had figures from the last run; those whose peak grew.
        self.tests_with_history = 0
        self.changes: list[PeakChange] = []

    def worker_unit(self, label: str, unit: str) -> None:
        self._units[label] = unit

    def worker_started(self, label: str, pid: int, start: tuple[int, int], at: float) -> None:
        """A worker began its unit with ``start`` = (RSS, own memory)."""
        start_rss, start_own = start
        worker = WorkerMemory(
            label,
            self.node,
            pid,
            at - self.t0,
            start_rss,
            start_own,
            unit=self._units.pop(label, ""),
        )
        worker.peak_bytes = worker.end_bytes = start_own
        worker.samples.append((worker.started_s, start_own))
        self.workers[label] = worker

    def _display(self, worker: WorkerMemory) -> str:
        return worker.label if worker.node == "main" else f"{worker.node}/{worker.label}"

    def name(self, label: str) -> str:
        return label if self.node == "main" else f"{self.node}/{label}"

    def test_done(self, label: str, nodeid: str, stats: tuple[int, int, int, int, float]) -> None:
        worker = self.workers.get(label)
        if worker is None:
            return
        start, after_setup, peak, end, at = stats
        at_s = at - self.t0
        peak = max(peak, end, start, self._sampled_peak.pop(label, 0))
        self.tests.append(
            TestMemory(nodeid, self.name(label), peak, end - after_setup, at_s, start)
        )
        worker.tests += 1
        worker.peak_bytes = max(worker.peak_bytes, peak)
        worker.end_bytes = end
        worker.samples.append((at_s, peak))
        worker.samples.append((at_s, worker.end_bytes))

    def sampled(self, label: str, own_bytes: int, at: float) -> None:
        """A reading the parent took of a worker's own memory while it ran a
        test: the test whose figures arrive next (a silent worker has sent
        everything before it)."""
        worker = self.workers.get(label)
        if worker is None:
            return
        own = own_bytes
        self._sampled_peak[label] = max(self._sampled_peak.get(label, 0), own)
        worker.peak_bytes = max(worker.peak_bytes, own)
        worker.samples.append((at - self.t0, own))

    def gc_stats(self, label: str, stats: list[dict[str, int]]) -> None:
        worker = self.workers.get(label)
        if worker is not None:
            worker.gc = stats

    def worker_ended(self, label: str, reason: str, at: float, *, crashed: bool = False) -> None:
        worker = self.workers.get(label)
        if worker is None or worker.ended_s is not None:
            return
        worker.ended = reason
        worker.crashed = crashed
        worker.ended_s = at - self.t0

    def merge(self, other: dict[str, Any]) -> None:
        """Take in the figures a pytest-xdist node sent (the dict of
        :meth:`to_dict`), on this process's clock."""
        shift = float(other.get("t0", self.t0)) - self.t0
        for raw in other.get("workers", []):
            raw = dict(raw)
            raw["started_s"] += shift
            if raw.get("ended_s") is not None:
                raw["ended_s"] += shift
            raw["samples"] = [(t + shift, b) for t, b in raw.get("samples", [])]
            worker = WorkerMemory(**raw)
            self.workers[f"{worker.node}/{worker.label}"] = worker
        for raw in other.get("tests", []):
            test = TestMemory(**raw)
            test.at_s += shift
            self.tests.append(test)
        self.admission_waits += int(other.get("summary", {}).get("admission_waits", 0))

    # -- output ----------------------------------------------------------

    @property
    def recycled(self) -> list[WorkerMemory]:
        return [w for w in self.workers.values() if w.ended.startswith(("recycled", "ceiling"))]

    def to_dict(self, **settings: Any) -> dict[str, Any]:
        largest = max(self.workers.values(), key=lambda w: w.peak_bytes, default=None)
        return {
            "schema_version": SCHEMA_VERSION,
            "measure": MEASURE,
            "t0": self.t0,
            "settings": settings,
            "summary": {
                "workers": len(self.workers),
                "tests": len(self.tests),
                "recycled": len(self.recycled),
                "crashed": sum(w.crashed for w in self.workers.values()),
                "largest_peak_bytes": largest.peak_bytes if largest else 0,
                "largest_peak_worker": self._display(largest) if largest else None,
                "admission_waits": self.admission_waits,
                "tests_with_history": self.tests_with_history,
                "peaks_grown": len(self.changes),
            },
            "workers": [dataclasses.asdict(w) for w in self.workers.values()],
            "tests": [dataclasses.asdict(t) for t in self.tests],
            "memory_changes": [dataclasses.asdict(c) for c in self.changes],
        }

    def write_json(self, path: str, **settings: Any) -> None:
        Path(path).write_text(json.dumps(self.to_dict(**settings), indent=1) + "\n")

    def change_lines(self, min_bytes: int, min_percent: float, top: int) -> list[str]:
        """The "memory changes since the last run" section: the ``top`` tests
        whose peak grew the most."""
        if not self.changes:
            return []
        lines = [
            f"{len(self.changes)} of {self.tests_with_history} tests measured last run need "
            f"more memory now (peak up by more than {format_size(min_bytes)} and "
            f"{min_percent:g}%)" + (":" if top else "")
        ]
        if not top:
            return lines
        lines.append(f"  {'before':>8} {'now':>8}  test")
        grown = sorted(self.changes, key=lambda c: c.now_bytes - c.before_bytes, reverse=True)
        for change in grown[:top]:
            lines.append(
                f"  {format_size(change.before_bytes):>8} {format_size(change.now_bytes):>8}  "
                f"{change.nodeid}"
            )
        if len(grown) > top:
            lines.append(f"  ... and {len(grown) - top} more")
        return lines

    def summary_lines(self, top: int) -> list[str]:
        lines: list[str] = []
        workers = list(self.workers.values())
        if not workers:
            return lines
        if top and self.tests:
            lines.append(f"highest memory peaks ({MEASURE.split(' (')[0]}):")
            lines.append(f"  {'peak':>8} {'kept':>8}  {'worker':<8}  test")
            for test in sorted(self.tests, key=lambda t: t.peak_bytes, reverse=True)[:top]:
                lines.append(
                    f"  {format_size(test.peak_bytes):>8} {format_size(test.growth_bytes):>8}  "
                    f"{test.worker:<8}  {test.nodeid}"
                )
        shown = sorted(workers, key=lambda w: w.peak_bytes, reverse=True)[:top]
        shown += [w for w in workers if w.abnormal and w not in shown]
        if shown and top:
            lines.append("workers:")
            lines.append(f"  {'worker':<8} {'tests':>5} {'peak':>8} {'end':>8}  ended")
            for worker in sorted(shown, key=lambda w: w.started_s):
                name = worker.label if worker.node == "main" else f"{worker.node}/{worker.label}"
                lines.append(
                    f"  {name:<8} {worker.tests:>5} {format_size(worker.peak_bytes):>8} "
                    f"{format_size(worker.end_bytes):>8}  {worker.ended}"
                )
        largest = max(workers, key=lambda w: w.peak_bytes)
        crashed = sum(w.crashed for w in workers)
        largest_name = (
            largest.label if largest.node == "main" else f"{largest.node}/{largest.label}"
        )
        lines.append(
            f"{len(workers)} workers, {len(self.recycled)} recycled, {crashed} crashed; "
            f"largest peak {format_size(largest.peak_bytes)} ({largest_name})"
        )
        own = sum(w.unit == "history" for w in workers)
        if own:
            lines.append(
                f"{own} {'test' if own == 1 else 'tests'} had a worker of their own for the "
                "memory they needed last run (--isolate=auto)"
            )
        with_gc = [w for w in workers if w.gc]
        if with_gc:
            lines.append("garbage collector per worker (collections/collected/uncollectable):")
            lines.append(f"  {'worker':<8} {'gen 0':>14} {'gen 1':>14} {'gen 2':>14}")
            for worker in sorted(with_gc, key=lambda w: w.started_s)[: max(top, 1) * 5]:
                cells = [
                    f"{g['collections']}/{g['collected']}/{g['uncollectable']}" for g in worker.gc
                ]
                name = worker.label if worker.node == "main" else f"{worker.node}/{worker.label}"
                lines.append(f"  {name:<8} " + " ".join(f"{c:>14}" for c in cells))
        if self.admission_waits:
            lines.append(
                f"{self.admission_waits} times a worker waited for the machine to have its "
                "budget of memory available"
            )
        return lines
