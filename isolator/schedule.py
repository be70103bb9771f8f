"""Runs in the controller: which tests share a worker, and why.

A *unit* is a run of items that share one worker: a test module under
``--isolate=module``, one test under ``--isolate=test`` (or when its marker
asks for a budget of its own), and under ``marked``, ``shared`` and ``auto``
one worker for every test that does not get its own, recycled on its budget.
A test gets its own worker under ``marked`` and ``auto`` when it is marked,
and under ``auto`` also when its own peak last run (history.py) was over
``isolate_auto_threshold``. Items with equal :meth:`Schedule.unit_key` that
follow one another in the run order go to the same worker; its *plan* is
those items, as far as the run order is known in advance, with *gaps* where
tests of other units run in between.

The schedule also decides what a worker enforces (its :class:`~isolator.worker.Limits`),
what the worker is told each of its tests needed last time (so it can be
recycled before a test that would take it over budget), and when it may start
at all: a unit with a budget waits for the machine to have the memory it is
known to need free, or its whole budget when that is not known (*admission*).

The controller asks; it forks, feeds, replays and reaps.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Literal

import pytest

from isolator import worker
from isolator.history import History, Recorded, unit_need
from isolator.memory import available_bytes, total_bytes
from isolator.settings import Settings, overrides_of
from isolator.stats import RunMemory

#: How often a unit waiting for memory looks again.
_ADMISSION_POLL_S = 0.05

#: Why a worker runs what it runs (the ``unit`` of each worker in the JSON report):
#: ``module``, ``test`` (--isolate=test), ``marker`` (a worker of its own
#: because of its marker), ``history`` (a worker of its own because of its
#: recorded peak, under --isolate=auto) or ``shared``.
Unit = Literal["module", "test", "marker", "history", "shared"]


class Schedule:
    """Units, plans, limits and admission for one pytest process."""

    def __init__(
        self,
        settings: Settings,
        memory: RunMemory,
        *,
        feeding: bool,
        history: History | None = None,
    ) -> None:
        self.settings = settings
        #: What each test needed last time (empty on a first run; None when
        #: pytest's cache is off).
        self.history = history
        #: Where admission waits are counted.
        self.memory = memory
        #: Under pytest-xdist the run order is known one item at a time, so
        #: workers are fed their unit item by item instead of planned ahead.
        self.feeding = feeding
        self._positions: dict[int, int] | None = None
        self._admission_gave_up = False

    # -- units and plans -------------------------------------------------

    def unit_of(self, item: pytest.Item) -> Unit:
        """Why ``item`` runs where it runs."""
        mode = self.settings.mode
        overrides = overrides_of(item)
        if mode == "test":
            return "test"
        if overrides.needs_own_worker:
            return "marker"
        if mode == "module":
            return "module"
        if mode in ("marked", "auto") and overrides.marked:
            return "marker"
        threshold = self.settings.auto_threshold_bytes
        if mode == "auto" and threshold is not None:
            peak = self.recorded_peak(item)
            if peak is not None and peak > threshold:
                return "history"
        return "shared"

    def unit_key(self, item: pytest.Item) -> Hashable:
        """Items with equal keys, next to each other, share a worker."""
        unit = self.unit_of(item)
        if unit == "module":
            return item.getparent(pytest.File) or item.parent  # type: ignore[type-abstract]
        if unit == "shared":
            return "shared"
        return item

    def recorded_peak(self, item: pytest.Item) -> int | None:
        """The test's own peak last time it ran, if known."""
        return None if self.history is None else self.history.peak_of(item.nodeid)

    def position(self, item: pytest.Item) -> int | None:
        """Where ``item`` is in ``session.items`` (the worker's copy has the same)."""
        if self._positions is None:
            self._positions = {id(it): i for i, it in enumerate(item.session.items)}
        return self._positions.get(id(item))

    def plan_for(self, item: pytest.Item, nextitem: pytest.Item | None) -> list[pytest.Item]:
        """The items a new worker runs: ``item`` and the ones after it in the
        same unit, as long as the run order is the collection order.

        A module's items are consecutive; the shared unit of ``marked`` and
        ``shared`` may have gaps, where tests of their own run in between."""
        plan = [item]
        if self.feeding:
            return plan
        start = self.position(item)
        items = item.session.items
        if start is None or nextitem is None:
            return plan
        following = start + 1
        if following >= len(items) or items[following] is not nextitem:
            return plan
        key = self.unit_key(item)
        if key != "shared":
            return self._run_of(item)
        plan.extend(it for it in items[following:] if self.unit_key(it) == key)
        return plan

    def _run_of(self, item: pytest.Item) -> list[pytest.Item]:
        """``item`` and the items right after it in the collection order that
        share its unit (all of a module's, from ``item`` on)."""
        run = [item]
        start = self.position(item)
        if start is None:
            return run
        items = item.session.items
        key = self.unit_key(item)
        following = start + 1
        while following < len(items) and self.unit_key(items[following]) == key:
            run.append(items[following])
            following += 1
        return run

    def gaps_in(self, plan: list[pytest.Item]) -> frozenset[int]:
        positions = [self.position(item) for item in plan]
        return frozenset(
            i
            for i in range(1, len(plan))
            if positions[i] is None or positions[i] != (positions[i - 1] or 0) + 1
        )

    def continues(self, item: pytest.Item, nextitem: pytest.Item | None) -> int | None:
        """Under pytest-xdist: the position of ``nextitem`` if it belongs to
        ``item``'s unit (the worker running ``item`` runs it next), else None."""
        if nextitem is None or self.unit_key(nextitem) != self.unit_key(item):
            return None
        return self.position(nextitem)

    # -- what a worker enforces ----------------------------------------------

    def limits_for(self, label: str, plan: list[pytest.Item]) -> worker.Limits:
        settings = self.settings
        budget, ceiling = settings.budget_bytes, settings.ceiling_bytes
        if len(plan) == 1:
            own = overrides_of(plan[0]).budget_bytes
            if own is not None:
                budget = ceiling = own
        return worker.Limits(
            label, budget, ceiling, settings.growth_limit_bytes, settings.timeout_s
        )

    def orders_for(self, plan: list[pytest.Item], label: str, testsfailed: int) -> worker.Orders:
        """What worker ``label`` is told when it starts ``plan``."""
        positions = [self.position(it) or 0 for it in plan]
        recorded = {}
        for position, item in zip(positions, plan, strict=True):
            peak = self.recorded_peak(item)
            if peak is not None:
                recorded[position] = peak
        return worker.Orders(
            plan=positions,
            gaps=self.gaps_in(plan),
            open_ended=self.feeding,
            limits=self.limits_for(label, plan),
            testsfailed=testsfailed,
            gc_stats=self.settings.gc_stats,
            recorded_peaks=recorded,
        )

    def need_of(self, plan: list[pytest.Item], budget: int) -> int:
        """The memory a worker starting ``plan`` is known to need: what its
        tests needed last time (the largest own peak plus what they all
        keep), at most its budget; the whole budget when any is unknown."""
        history = self.history
        if history is None:
            return budget
        unit = self.unit_of(plan[0])
        if self.feeding and unit == "shared":
            # Fed item by item: which tests this worker will run is not known.
            return budget
        if self.feeding and unit == "module":
            # Fed item by item: the node may get the rest of the module.
            plan = self._run_of(plan[0])
        figures: list[Recorded] = []
        for item in plan:
            recorded = history.tests.get(item.nodeid)
            if recorded is None:
                return budget
            figures.append(recorded)
        return min(unit_need(figures), budget)

    # -- admission -------------------------------------------------------

    def admit(self, plan: list[pytest.Item], orders: worker.Orders) -> None:
        """Start a unit only when the machine has the memory it needs free:
        what its tests needed last time, or its whole budget if not known.

        Other processes (pytest-xdist's other workers, other jobs on the CI
        box) may hold it; their units end, so waiting is usually short. After
        ``isolate_admission_wait`` seconds the unit starts anyway: a stuck
        run would help no one.
        """
        budget = orders.limits.budget_bytes
        if budget is None or self._admission_gave_up:
            return
        need = self.need_of(plan, budget)
        if available_bytes() >= need:
            return
        if need > total_bytes():
            # Never satisfiable here: waiting would only slow every unit down.
            self._admission_gave_up = True
            return
        self.memory.admission_waits += 1
        deadline = time.monotonic() + self.settings.admission_wait_s
        while time.monotonic() < deadline:
            # Memory freed elsewhere sends no event we could wait on.
            time.sleep(_ADMISSION_POLL_S)
            if available_bytes() >= need:
                return
        # Waited the whole time and nothing was freed: whatever holds the
        # memory is not ending, and waiting again for every unit would only
        # turn a tight machine into a stalled run.
        self._admission_gave_up = True
