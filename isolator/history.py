"""Runs in the pytest process that reports (pytest alone, or the
pytest-xdist controller): what each test needed last time.

At the end of every isolated run each test's figures are kept in pytest's
cache (``config.cache``, key :data:`CACHE_KEY`) so that the next run can
schedule from them (schedule.py): ``--isolate=auto`` gives a worker of its
own to a test that needed a lot, a worker is recycled before a test that
would take it over its budget, and a unit waits for the memory it is known to
need rather than for a whole budget. Under pytest-xdist the controller loads
the history once and hands it to every node with its start-up input, and
takes the nodes' figures back when they finish (``RunMemory.merge``), so
remote hosts need no cache of their own.

What is kept per test:

- ``peak_bytes``, the test's *own peak*: the highest own memory of its worker
  while it ran, less the worker's own memory when it began (what earlier tests
  left in a shared worker is theirs, not this test's; counting it would
  isolate every test late in a leaky worker, which would then record a small
  peak in its own worker and go back to sharing: a schedule that flips every
  run). What "own memory" is, is stats.py's to say.
- ``growth_bytes``, what it kept after its teardown.

Per module: the largest own peak among its tests, the sum of what they kept,
and how many they were. A test that did not run keeps its last figures; a test
whose file is gone is forgotten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from isolator.stats import MEASURE, PeakChange, RunMemory, TestMemory

#: Where the figures live in pytest's cache (``.pytest_cache/v/isolator/history``).
CACHE_KEY = "isolator/history"
#: Bump when the stored layout changes; a history of another format is dropped.
FORMAT = 1
#: Where a pytest-xdist node finds the history the controller loaded.
WORKERINPUT_KEY = "isolator_history"


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One test's figures from the last run it ran in."""

    #: Own peak: the most memory the test needed on top of what its worker held.
    peak_bytes: int
    #: What it kept after its teardown (negative if it freed).
    growth_bytes: int


def unit_need(figures: Iterable[Recorded]) -> int:
    """Memory a worker running these tests one after another is known to
    need: the largest own peak among them, plus what they all keep."""
    peak = kept = 0
    for recorded in figures:
        peak = max(peak, recorded.peak_bytes)
        kept += max(recorded.growth_bytes, 0)
    return peak + kept


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


class History:
    """Per-test figures of earlier runs, and per-module totals."""

    def __init__(self, tests: dict[str, Recorded] | None = None) -> None:
        self.tests: dict[str, Recorded] = dict(tests or {})

    def module_totals(self) -> dict[str, tuple[int, int, int]]:
        """Per module: the largest own peak of its tests, what they keep in
        all, and how many they are (for readers of the cache; scheduling
        reads the tests, which are current where these may not be)."""
        totals: dict[str, tuple[int, int, int]] = {}
        for nodeid, recorded in self.tests.items():
            peak, kept, count = totals.get(module_of(nodeid), (0, 0, 0))
            totals[module_of(nodeid)] = (
                max(peak, recorded.peak_bytes),
                kept + max(recorded.growth_bytes, 0),
                count + 1,
            )
        return totals

    def __len__(self) -> int:
        return len(self.tests)

    def peak_of(self, nodeid: str) -> int | None:
        recorded = self.tests.get(nodeid)
        return None if recorded is None else recorded.peak_bytes

    # -- stored form -----------------------------------------------------

    def to_dict(self, *, modules: bool = True) -> dict[str, Any]:
        """The stored form (without ``modules``, what pytest-xdist nodes are
        sent): plain JSON, ``tests`` as ``nodeid: [peak_bytes, growth_bytes]``."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "measure": MEASURE,
            "tests": {
                nodeid: [recorded.peak_bytes, recorded.growth_bytes]
                for nodeid, recorded in sorted(self.tests.items())
            },
        }
        if modules:
            data["modules"] = {
                module: {"peak_bytes": peak, "growth_bytes": kept, "tests": count}
                for module, (peak, kept, count) in sorted(self.module_totals().items())
            }
        return data

    @classmethod
    def from_dict(cls, data: object) -> History | None:
        """The history stored as ``data``; None if it is not one this version
        can use (another format, another measure, or damaged)."""
        if not isinstance(data, dict):
            return None
        if data.get("format") != FORMAT or data.get("measure") != MEASURE:
            return None
        raw = data.get("tests")
        if not isinstance(raw, dict):
            return None
        tests: dict[str, Recorded] = {}
        for nodeid, figures in raw.items():
            if (
                isinstance(nodeid, str)
                and isinstance(figures, list)
                and len(figures) == 2
                and all(isinstance(f, int) and not isinstance(f, bool) for f in figures)
            ):
                tests[nodeid] = Recorded(max(figures[0], 0), figures[1])
        return cls(tests)

    # -- one run's end ---------------------------------------------------

    def updated(self, ran: Iterable[TestMemory], rootpath: Path) -> History:
        """This history with the figures of the tests that ran (a test
        measured twice, say in two xdist nodes, keeps its larger peak);
        tests whose file no longer exists are dropped."""
        now: dict[str, Recorded] = {}
        for test in ran:
            recorded = Recorded(test.own_peak_bytes, test.growth_bytes)
            before = now.get(test.nodeid)
            if before is None or recorded.peak_bytes > before.peak_bytes:
                now[test.nodeid] = recorded
        exists: dict[str, bool] = {}
        kept = {}
        for nodeid, recorded in self.tests.items():
            module = module_of(nodeid)
            if module not in exists:
                exists[module] = (rootpath / module).exists()
            if exists[module]:
                kept[nodeid] = recorded
        kept.update(now)
        return History(kept)

    def changes(
        self, ran: Iterable[TestMemory], min_bytes: int, min_percent: float
    ) -> tuple[int, list[PeakChange]]:
        """How many of the tests that ran were measured before, and those
        whose own peak grew by more than ``min_bytes`` and ``min_percent``."""
        compared: set[str] = set()
        grown: dict[str, PeakChange] = {}
        for test in ran:
            before = self.peak_of(test.nodeid)
            if before is None:
                continue
            compared.add(test.nodeid)
            now = test.own_peak_bytes
            if now - before > min_bytes and now > before * (1 + min_percent / 100):
                previous = grown.get(test.nodeid)
                if previous is None or now > previous.now_bytes:
                    grown[test.nodeid] = PeakChange(test.nodeid, before, now)
        return len(compared), sorted(grown.values(), key=lambda change: change.nodeid)


def cache_of(config: pytest.Config) -> pytest.Cache | None:
    """pytest's cache, or None when the cacheprovider plugin is off."""
    cache: pytest.Cache | None = getattr(config, "cache", None)
    return cache


def load(config: pytest.Config) -> tuple[History | None, str]:
    """The history this process schedules from (empty on a first run), or
    None; and why there is none, or why it starts afresh.

    A pytest-xdist node takes what the controller sent it: the controller
    alone reads and writes the cache, which may be on another host."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        shipped = workerinput.get(WORKERINPUT_KEY)
        return (None if shipped is None else History.from_dict(shipped)), ""
    cache = cache_of(config)
    if cache is None:
        return None, "pytest's cache is off (-p no:cacheprovider), so there is no memory history"
    stored = cache.get(CACHE_KEY, None)
    if stored is None:
        return History(), ""
    history = History.from_dict(stored)
    if history is None:
        return History(), (
            f"the memory history in pytest's cache ({CACHE_KEY}) was recorded by another "
            "version or with another measure; starting afresh"
        )
    return history, ""


def ship(node: object, history: History | None) -> None:
    """pytest-xdist: send a node the history, with its start-up input."""
    workerinput = getattr(node, "workerinput", None)
    if history is not None and isinstance(workerinput, dict):
        workerinput[WORKERINPUT_KEY] = history.to_dict(modules=False)


def record(
    config: pytest.Config,
    history: History,
    memory: RunMemory,
    min_bytes: int,
    min_percent: float,
) -> None:
    """At the end of a run: compare with the last one (into ``memory``, for
    the summary and the JSON report), then keep this run's figures."""
    memory.tests_with_history, memory.changes = history.changes(
        memory.tests, min_bytes, min_percent
    )
    cache = cache_of(config)
    if cache is not None and memory.tests:
        cache.set(CACHE_KEY, history.updated(memory.tests, config.rootpath).to_dict())
