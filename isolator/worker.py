"""Runs inside a forked worker process, and nowhere else.

The pytest process forks a worker after collection, hands it a *plan* (the
consecutive items of one unit, already in memory because fork copied them)
and goes back to reading. The worker runs each item through the ordinary
``pytest_runtest_protocol`` hook, so fixtures, capture, logging, warnings,
skipping, xfail and every other plugin behave exactly as they do without
isolation, and streams what pytest would have reported back over a pipe.

Invariant: every reporting hook implementation runs exactly once per event,
in the parent, when the event is replayed there. In the worker the reporting
hooks reach only :class:`WorkerPlugin` and the two built-in plugins that
steer the run from reports (the session's ``--maxfail`` counter and
``--stepwise``), so a worker never prints progress, writes junit xml or
touches the cache.

The worker also keeps its memory in check: an RLIMIT_AS ceiling set when it
starts, and at every test boundary a look at its own memory (USS, see
:class:`isolator.memory.Meter`); when the next test would likely take it over
budget (by what that test needed last run, or else by the largest step a test
took here so far) it tears down everything it set up, within that test's
teardown, and leaves.

The worker never returns into pytest: it leaves with ``os._exit`` so that
nothing the parent set up (session finish hooks, atexit handlers, a
non-daemon thread a test left running) runs or waits a second time. Before it
leaves, it ends the processes its tests left running (see ``leftovers``).

Whatever goes wrong in the worker outside the test phases pytest protects
(a plugin's hook raising, MemoryError while pytest formats a failure) is sent
to the parent as a *fault* of the item in flight, which the parent reports as
that test's failure; the worker then leaves and the unit goes on in a fresh
one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import gc
import os
import pickle
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from isolator import leftovers, memory
from isolator.beacon import Beacon
from isolator.cgroup import WorkerCgroup
from isolator.settings import overrides_of
from isolator.sizes import format_size
from isolator.wire import Receiver, Sender

if TYPE_CHECKING:
    import psutil

#: Hooks whose implementations report or record results; in a worker these
#: reach only the worker plugin (see the invariant above).
REPORT_HOOKS = (
    "pytest_runtest_logstart",
    "pytest_runtest_logreport",
    "pytest_runtest_logfinish",
    "pytest_warning_recorded",
)

#: What an error needs, at most, to leave a test through pytest's own code.
_HEADROOM_BYTES = 1 << 20

#: Built-in plugins that read reports to decide whether the run goes on.
_STEERING_PLUGINS = ("session", "stepwiseplugin")

#: Names of the junit xml properties that carry a test's memory figures.
PEAK_PROPERTY = "isolator_peak_bytes"
GROWTH_PROPERTY = "isolator_growth_bytes"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one worker enforces, decided by the parent for its plan."""

    label: str
    #: Recycle when the worker's own memory would pass this.
    budget_bytes: int | None
    #: RLIMIT_AS headroom above the worker's starting address space.
    ceiling_bytes: int | None
    #: Fail a test that retains more than this (unless its marker says otherwise).
    growth_limit_bytes: int | None
    #: Kill the worker when one test runs longer than this (unless its marker says otherwise).
    timeout_s: float | None = None
    #: Where faulthandler writes stacks (a memfd the parent reads).
    fault_fd: int = -1


class LeakError(AssertionError):
    """A test kept more memory after its teardown than it was allowed."""


class WorkerPlugin:
    """The worker's side of isolator: forwards reports, watches memory.

    Registered in the parent at configure time, where it stays idle; it goes
    live in a worker once the worker has a pipe to write to.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.sender = Sender(-1)
        # Registering a plugin replays historic hooks (warnings recorded during
        # collection); those belong to the parent, and the plugin is idle there.
        self.live = False
        self.limits = Limits("", None, None, None)
        self.probe: memory.Probe | None = None
        self.meter: memory.Meter | None = None
        self.base = memory.Sample(0, 0)
        self._test_start = memory.Sample(0, 0)
        self._after_setup = memory.Sample(0, 0)
        #: Own memory at the test's start, after its setup, at its peak and end; when it ended.
        self._test_stats: tuple[int, int, int, int, float] = (0, 0, 0, 0, 0.0)
        #: Largest growth one test has caused in this worker, own memory and address space.
        self._step_own = 0
        self._step_vm = 0
        #: The running test's growth limit, if it has one.
        self._growth_limit: int | None = None
        #: Own peak each test of the unit had last run (by node ID), where known.
        self.recorded_peaks: dict[str, int] = {}
        #: Why this worker ends early, once it knows it will.
        self.recycle_reason: str | None = None
        #: The running test's time limit, if it has one.
        self._timeout_s: float | None = None
        #: Where to save what coverage.py measured here, if it is measuring.
        self.coverage_file: str | None = None
        #: The garbage collector's counters when the unit started.
        self.gc_at_start: list[dict[str, int]] = []
        #: The worker's memory cgroup, under the cgroup ceiling (set in the worker).
        self.cgroup: WorkerCgroup | None = None
        #: Where the parent reads which item this worker began last.
        self.beacon: Beacon | None = None
        #: (CLOCK_BOOTTIME, nodeid) of each test's start: which test a
        #: left-over process was started during.
        self.test_starts: list[tuple[float, str]] = []
        self._reserve_opened = False
        #: Building a report again, after the first try ran out of memory.
        self._rebuilding = False
        self._leftovers_ended = False
        #: Modules the parent had when this worker was forked: a class from
        #: any other would be imported in the parent by unpickling it.
        self.parent_modules: frozenset[str] = frozenset()

    def ready(self) -> None:
        """Open the memory probe: done while the worker waits for its orders
        (a standby, as a rule), off the run's critical path."""
        self.probe = memory.Probe()
        self.meter = memory.Meter(self.probe)

    def start(self, limits: Limits) -> None:
        """Begin measuring, and set the ceiling; called once the unit starts."""
        self.limits = limits
        self.coverage_file = coverage_data_file()
        self.gc_at_start = gc.get_stats()
        if self.meter is None:
            self.ready()
        assert self.meter is not None
        self.base = self.meter.read()
        if limits.ceiling_bytes is not None and self.cgroup is not None:
            self.cgroup.set_limit(limits.ceiling_bytes)
        elif limits.ceiling_bytes is not None:
            memory.limit_malloc_arenas()
            memory.set_ceiling(limits.ceiling_bytes, self.base.vm_bytes)
        self.sender.send("started", (self.base.rss_bytes, self.base.own_bytes), time.time())
        # Flushed now, so that a worker that dies in its first test still
        # shows in the figures.
        self.sender.flush()

    # -- reporting -------------------------------------------------------

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        if not self.live:
            return
        assert self.probe is not None
        assert self.meter is not None
        if self._timeout_s and self.limits.fault_fd >= 0:
            # faulthandler's watchdog is a C thread: it fires even when the
            # test is stuck in C code that no Python signal handler would
            # interrupt, writes every thread's stack where the parent reads
            # it, and exits. Armed here, inside the protocol, because
            # faulthandler keeps one timer and pytest's faulthandler_timeout
            # arms its own when the protocol starts; ours must be the last.
            faulthandler.dump_traceback_later(self._timeout_s, exit=True, file=self.limits.fault_fd)
            if self.beacon is not None:
                # The pytest process times each attempt from here too.
                self.beacon.armed()
        self._test_start = self._after_setup = self.meter.start_test(self._growth_limit)
        self.test_starts.append((time.clock_gettime(time.CLOCK_BOOTTIME), nodeid))
        self.sender.send("logstart", nodeid, location)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.live:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        # Whatever a test or plugin put in the report crosses, as text if need be.
        try:
            self.sender.send_builtins("report", data)
        except MemoryError:
            # A report of megabytes (captured output) past the ceiling.
            if not self.open_reserve():
                raise
            self.sender.send_builtins("report", data)
        # Flushed per report so a crash in the next phase still leaves the
        # parent knowing which phases finished.
        self.sender.flush()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        if not self.live:
            return
        self.sender.send("logfinish", nodeid, location)

    @pytest.hookimpl
    def pytest_warning_recorded(
        self,
        warning_message: warnings.WarningMessage,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        if self.live:
            self.sender.send(
                "warning",
                encode_warning(warning_message, self.parent_modules),
                when,
                nodeid,
                location,
            )

    # -- time ------------------------------------------------------------

    # The outermost wrapper: an error raised by any other plugin's part of
    # the protocol reaches it, and is the item's fault (see run_unit).
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        if not self.live:
            return (yield)
        overrides = overrides_of(item)
        self._timeout_s = overrides.timeout_s or self.limits.timeout_s
        self._growth_limit = overrides.growth_limit_bytes or self.limits.growth_limit_bytes
        try:
            result = yield
        finally:
            if self._timeout_s:
                faulthandler.cancel_dump_traceback_later()
        # The item is over only now: a plugin may log it more than once
        # (pytest-rerunfailures logs each attempt from logstart to
        # logfinish), and its warnings are recorded after its logfinish.
        session = item.session
        self.sender.send(
            "finished", item.nodeid, self._test_stats, session.shouldstop, session.shouldfail
        )
        self.sender.flush()
        return result

    # -- memory ----------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None]:
        try:
            return (yield)
        finally:
            if self.live and self.meter is not None:
                self._after_setup = self.meter.read(self._growth_limit)

    # The innermost wrappers of the three phases: an error that leaves a test
    # or a fixture while the worker is at its ceiling still has to pass
    # through pytest's own context managers (capture, logging) before any
    # report is built, and on some pytest and Python versions that takes
    # memory (pytest before 9.2 on Python 3.13): the reserve opens here when
    # not even a megabyte is left. (pytest registers only methods named
    # pytest_*, hence the names; specname says which hook each one is.)
    @pytest.hookimpl(wrapper=True, trylast=True, specname="pytest_runtest_setup")
    def pytest_runtest_setup_headroom(self, item: pytest.Item) -> Generator[None]:
        return (yield from self._with_headroom())

    @pytest.hookimpl(wrapper=True, trylast=True, specname="pytest_runtest_call")
    def pytest_runtest_call_headroom(self, item: pytest.Item) -> Generator[None]:
        return (yield from self._with_headroom())

    @pytest.hookimpl(wrapper=True, trylast=True, specname="pytest_runtest_teardown")
    def pytest_runtest_teardown_headroom(self, item: pytest.Item) -> Generator[None]:
        return (yield from self._with_headroom())

    def _with_headroom(self) -> Generator[None]:
        try:
            return (yield)
        except BaseException:
            self._reserve_if_exhausted()
            raise

    def _reserve_if_exhausted(self) -> None:
        if not self.live or self._reserve_opened or self.limits.ceiling_bytes is None:
            return
        try:
            bytearray(_HEADROOM_BYTES)
        except MemoryError:
            self.open_reserve()

    # The outermost wrapper: a report that cannot be built is caught here,
    # whichever plugin's part of the building failed.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        if self._rebuilding:
            return (yield)
        if self.live and call.excinfo is not None:
            self._explain_memory_error(item, call.excinfo.value)
        try:
            report = yield
        except MemoryError:
            if not self.live or not self.open_reserve():
                raise
            # The ceiling was reached while pytest or a plugin built the
            # report (formatting a traceback takes memory; the test may have
            # caught its own MemoryErrors and failed otherwise). With the
            # reserve open, every plugin builds it again, so that none is
            # left with half its state for this test.
            self._rebuilding = True
            try:
                report = item.ihook.pytest_runtest_makereport(item=item, call=call)
            finally:
                self._rebuilding = False
            report.sections.append(
                (
                    "isolator",
                    f"worker {self.limits.label} reached its RLIMIT_AS ceiling "
                    f"({format_size(self.limits.ceiling_bytes or 0)}) while pytest built this "
                    "report; it was built from the worker's reserve, and the worker is "
                    "replaced after this test",
                )
            )
        if self.live and call.when == "teardown":
            start, after_setup, peak, end, _ = self._test_stats
            report.user_properties.append((PEAK_PROPERTY, max(peak - start, 0)))
            report.user_properties.append((GROWTH_PROPERTY, end - after_setup))
        return report

    def _explain_memory_error(self, item: pytest.Item, error: BaseException) -> None:
        ceiling = self.limits.ceiling_bytes
        if ceiling is None or self.probe is None or self.cgroup is not None:
            return  # no RLIMIT_AS here
        mapped = self.probe.sample().vm_bytes - self.base.vm_bytes
        if memory.explain_ceiling_failure(error, self.limits.label, item.name, ceiling, mapped):
            # pytest needs memory to format this failure.
            self.open_reserve()

    def open_reserve(self) -> bool:
        """Let this worker map a little past its ceiling, to report that it
        hit it; it leaves at the next test boundary. False if there is no
        ceiling, or the reserve was used already."""
        if self._reserve_opened or self.limits.ceiling_bytes is None or self.cgroup is not None:
            return False
        self._reserve_opened = True
        self.recycle_reason = "ceiling hit"
        return memory.open_reserve()

    def test_of(self, pid: int, process: psutil.Process) -> str:
        """The test that was running in this worker when process ``pid`` started."""
        named = leftovers.test_from_environ(process)
        if named:
            return named
        # A fork that never called exec has this process's environment block.
        started = leftovers.started_at(pid)
        if started is None or not self.test_starts:
            return ""
        # The start time has a resolution of a clock tick (10 ms): the test
        # whose start is the last one before it is the best guess there is.
        candidates = [nodeid for at, nodeid in self.test_starts if at <= started + 0.01]
        return candidates[-1] if candidates else self.test_starts[0][1]

    def end_leftovers(self) -> None:
        """End what the unit's tests left running, and tell the parent (once)."""
        if self._leftovers_ended or not leftovers.children():
            return
        self._leftovers_ended = True
        _stop_multiprocessing_helpers()
        ended = leftovers.end(lambda: leftovers.descendants(leftovers.children()), self.test_of)
        if ended:
            self.sender.send("leftovers", [dataclasses.astuple(gone) for gone in ended])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None]:
        result = yield
        if not self.live or self.meter is None:
            return result
        meter = self.meter
        start = self._test_start
        # A test's own growth is counted from the end of its setup: a module
        # or session fixture that setup built once is no test's doing, and
        # counting it would predict it again for every next test.
        after_setup = self._after_setup
        end = meter.read(self._growth_limit)
        # The figures are read exactly where a decision could go either way
        # within how far they may have drifted.
        if self._growth_limit is not None:
            retained = end.own_bytes - after_setup.own_bytes
            end = meter.settle(end, retained - self._growth_limit, after_setup.drift_bytes)
        budget = self.limits.budget_bytes
        if budget is not None and nextitem is not None:
            step = max(self._step_own, end.own_bytes - after_setup.own_bytes)
            step = self.recorded_peaks.get(nextitem.nodeid, step)
            end = meter.settle(end, end.own_bytes + step - budget)
        peak = max(meter.peak_bytes(start, end), after_setup.own_bytes, end.own_bytes)
        self._test_stats = (
            start.own_bytes,
            after_setup.own_bytes,
            peak,
            end.own_bytes,
            time.time(),
        )
        self._step_own = max(self._step_own, end.own_bytes - after_setup.own_bytes)
        self._step_vm = max(self._step_vm, end.vm_bytes - after_setup.vm_bytes)
        if nextitem is not None and self.recycle_reason is None:
            self.recycle_reason = self._over_budget(end, nextitem)
        if self.recycle_reason is not None and nextitem is not None:
            # Leave at this boundary: tear down what this worker set up
            # (module and session fixtures too) inside this test's teardown,
            # where pytest reports any error it raises.
            item.session._setupstate.teardown_exact(None)
        self._check_growth(item, end)
        return result

    def _over_budget(self, now: memory.Sample, nextitem: pytest.Item) -> str | None:
        """Why ``nextitem`` would likely take this worker over its limits.

        The next test is expected to need what it needed last run (its
        recorded own peak) or, when that is not known, to grow the worker as
        much as the largest test so far did, so a suite that leaks a little
        per test is recycled before the ceiling fails one of its tests.
        """
        recorded = self.recorded_peaks.get(nextitem.nodeid)
        if recorded is None:
            step_own, step_vm = self._step_own, self._step_vm
            why = "for the next test"
        else:
            # Address space grows at least as much as resident memory does.
            step_own, step_vm = recorded, max(self._step_vm, recorded)
            why = f"that {nextitem.name} needed last run"
        budget = self.limits.budget_bytes
        if budget is not None:
            own = now.own_bytes
            if own + step_own > budget:
                return (
                    f"over budget: {format_size(own)} own memory + {format_size(step_own)} "
                    f"{why} > {format_size(budget)}"
                )
        ceiling = self.limits.ceiling_bytes
        if ceiling is not None and self.cgroup is None:  # RLIMIT_AS, address space
            mapped = now.vm_bytes - self.base.vm_bytes
            if mapped + step_vm > ceiling:
                return (
                    f"near ceiling: {format_size(mapped)} mapped + {format_size(step_vm)} "
                    f"{why} > {format_size(ceiling)}"
                )
        return None

    def _check_growth(self, item: pytest.Item, end: memory.Sample) -> None:
        limit = self._growth_limit
        if limit is None:
            return
        # Measured from the end of setup: what fixtures of wider scope set up
        # on this test's watch is theirs, not this test's.
        retained = end.own_bytes - self._after_setup.own_bytes
        if retained > limit:
            raise LeakError(
                f"{item.name} retained {format_size(retained)} of memory after its teardown "
                f"(limit {format_size(limit)}, growth of worker {self.limits.label}'s own memory)"
            )


def encode_warning(
    message: warnings.WarningMessage, parent_modules: frozenset[str]
) -> dict[str, Any]:
    """A recorded warning as the parent can rebuild it without importing
    anything: its category crosses as a class only if the parent has that
    class's module already (else as its name and nearest such base), and
    the warning itself only if it pickles and its class is such a class."""

    def known(cls: type) -> bool:
        return cls.__module__ in parent_modules and _picklable(cls)

    category = message.category
    payload: dict[str, Any] = {
        "category": category,
        "filename": message.filename,
        "lineno": message.lineno,
        "line": message.line,
        "text": str(message.message),
        "message": None,
    }
    if not known(category):
        payload["category"] = next(
            (base for base in category.__mro__[1:] if known(base)), UserWarning
        )
        payload["category_name"] = category.__name__
    warning = message.message
    if known(type(warning)):
        try:
            # Warnings with custom constructors may not survive a round
            # trip; those fall back to their text.
            pickle.loads(pickle.dumps(warning))
            payload["message"] = warning
        except Exception:
            pass
    return payload


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


def _stop_multiprocessing_helpers() -> None:
    """Let multiprocessing's resource tracker and fork server, if this worker
    started them, leave as they do at interpreter exit: they ignore SIGTERM
    and leave when their pipe closes, and the tracker first removes the shared
    memory tests leaked (as it would without isolation)."""
    mine = set(leftovers.children())
    for module, name, pid_attr in (
        ("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
        ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid"),
    ):
        helper = getattr(sys.modules.get(module), name, None)
        if helper is not None and getattr(helper, pid_attr, None) in mine:
            with contextlib.suppress(Exception):
                helper._stop()


def _route_report_hooks(config: pytest.Config, plugin: WorkerPlugin) -> None:
    pm = config.pluginmanager
    keep: set[object] = {plugin}
    for name in _STEERING_PLUGINS:
        steering = pm.get_plugin(name)
        if steering is not None:
            keep.add(steering)
    for name in REPORT_HOOKS:
        caller = getattr(pm.hook, name)
        # pluggy has no public way to silence one hook of a plugin while
        # keeping its others (the logging plugin, for one, must still wrap
        # setup/call/teardown); this process is thrown away after the unit.
        caller._hookimpls[:] = [impl for impl in caller._hookimpls if impl.plugin in keep]


def prepare(config: pytest.Config, plugin: WorkerPlugin) -> None:
    """Ready the zygote (and so every worker it forks) to run tests.

    Kept to the least that works: every page this touches is copied out of
    the pytest process's memory (copy-on-write), once, in the zygote, instead
    of once in every worker. So the plugin is registered in the pytest process
    (idle there) rather than here, and the capture files are the parent's own:
    only one worker is ever inside a test phase, and each phase leaves the
    files read and truncated for the next. A worker adds only its own pipe
    (``plugin.sender``).
    """
    _route_report_hooks(config, plugin)
    plugin.live = True


@dataclasses.dataclass(frozen=True)
class Orders:
    """What the parent tells a worker when its unit starts."""

    #: Positions in ``session.items`` of the unit's items, as far as known.
    plan: list[int]
    #: Indices in ``plan`` before which to wait for the word to go on.
    gaps: frozenset[int]
    #: More items may follow the plan; ask the parent before the last one.
    open_ended: bool
    limits: Limits
    #: Failures the parent has counted, so that --maxfail stops here exactly
    #: where it stops there.
    testsfailed: int
    #: Report the garbage collector's work over the unit.
    gc_stats: bool = False
    #: Own peak of the plan's tests last run (by position), where known.
    recorded_peaks: dict[int, int] = dataclasses.field(default_factory=dict)


class Line:
    """The pipe on which a worker hears from its parent: the orders that
    start its unit, the word to go on at a gap in its plan, and (when the
    run order is not known in advance, under pytest-xdist) the next item."""

    def __init__(self, fd: int, session: pytest.Session) -> None:
        self.receiver = Receiver(fd)
        self.session = session

    def _next(self) -> tuple[Any, ...] | None:
        while True:
            message = self.receiver.pop()
            if message is not None:
                return message
            if not self.receiver.fill():
                return None  # the parent closed the pipe: not needed any more

    def orders(self) -> Orders | None:
        message = self._next()
        if message is None:
            return None
        orders: Orders = message[1]
        self.session.testsfailed = orders.testsfailed
        return orders

    def resume(self) -> bool:
        message = self._next()
        if message is None:
            return False
        self.session.testsfailed = message[1]
        return True

    def following(self) -> tuple[int, int | None] | None:
        """The position of the item after the current one and its own peak
        last run (if known); None if the unit ends."""
        message = self._next()
        if message is None or message[0] == "end":
            return None
        index: int = message[1]
        recorded: int | None = message[2]
        return index, recorded


def run_unit(orders: Orders, line: Line, plugin: WorkerPlugin, sender: Sender) -> NoReturn:
    """Run the unit's items in order, report, and leave the process."""
    code = 0
    session = line.session
    items = session.items
    positions = list(orders.plan)
    plan = [items[index] for index in positions]
    open_ended = orders.open_ended
    for position, peak in orders.recorded_peaks.items():
        plugin.recorded_peaks[items[position].nodeid] = peak
    try:
        index = 0
        while index < len(plan):
            if index in orders.gaps:
                sender.flush()
                if not line.resume() or session.shouldfail or session.shouldstop:
                    break
            item = plan[index]
            if index + 1 == len(plan) and open_ended:
                sender.flush()
                following = line.following()
                if following is None:
                    open_ended = False
                else:
                    position, recorded = following
                    positions.append(position)
                    plan.append(items[position])
                    if recorded is not None:
                        plugin.recorded_peaks[items[position].nodeid] = recorded
            nextitem = plan[index + 1] if index + 1 < len(plan) else None
            if plugin.beacon is not None:
                plugin.beacon.began(positions[index])
            try:
                item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            except (pytest.exit.Exception, KeyboardInterrupt):
                raise
            except BaseException:
                # Outside the phases pytest protects: this item's failure, and
                # this worker's end (its state is whatever the error left).
                plugin.open_reserve()
                fault(sender, item.nodeid)
                _teardown_quietly(session)
                code = 3
                break
            if session.shouldfail or session.shouldstop or plugin.recycle_reason:
                break
            index += 1
        if not code:
            # A stop decided in the last teardown's report left fixtures standing.
            session._setupstate.teardown_exact(None)
            save_coverage(plugin.coverage_file)
            if orders.gc_stats:
                sender.send("gc", gc_delta(plugin.gc_at_start))
            plugin.end_leftovers()
            sender.send("done", plugin.recycle_reason, lingering_threads())
    except pytest.exit.Exception as exc:
        _teardown_quietly(session)
        _end_leftovers_quietly(plugin)
        sender.send("exit", exc.msg, exc.returncode)
    except KeyboardInterrupt:
        _teardown_quietly(session)
        _end_leftovers_quietly(plugin)
        sender.send("interrupt")
    except BaseException:
        plugin.open_reserve()
        fault(sender, None)
        code = 3
    finally:
        _end_leftovers_quietly(plugin)
        _leave(sender, code)


def fault(sender: Sender, nodeid: str | None) -> None:
    """Tell the parent what went wrong, for the item in flight (``nodeid``)
    or for the worker as a whole (None)."""
    try:
        text = traceback.format_exc()
    except BaseException:
        exc = sys.exc_info()[1]
        text = f"{type(exc).__name__} (its traceback could not be formatted)"
    sender.send("fault", nodeid, text)


def coverage_data_file() -> str | None:
    """The data file of the coverage.py run measuring this process, if any
    (pytest-cov starts one in the pytest process; the fork inherited it)."""
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is None:
        return None
    # Absolute now: a test may change directory before the unit ends.
    path: str = os.path.abspath(cov.config.data_file)
    return path


def save_coverage(data_file: str | None) -> None:
    """Save what coverage.py measured in this worker as a parallel data file
    (``.coverage.<host>.<pid>.<random>``), which pytest-cov combines with
    the others at the end of the run. The worker's data includes what the
    parent measured before the fork; coverage data are sets of lines and
    arcs, so counting those twice changes nothing."""
    if data_file is None:
        return
    import coverage

    cov = coverage.Coverage.current()
    if cov is None:
        return
    cov.stop()
    measured = cov.get_data()
    out = coverage.CoverageData(basename=data_file, suffix=True)
    out.update(measured)
    out.write()


def gc_delta(start: list[dict[str, int]]) -> list[dict[str, int]]:
    """What the garbage collector did since ``start``, per generation."""
    return [
        {key: now[key] - before.get(key, 0) for key in now}
        for now, before in zip(gc.get_stats(), start or [{}] * 3, strict=False)
    ]


def lingering_threads() -> list[str]:
    """Names of non-daemon threads still running: they would keep a normal
    interpreter from exiting (this worker leaves anyway)."""
    main = threading.main_thread()
    return [
        thread.name
        for thread in threading.enumerate()
        if thread is not main and not thread.daemon and thread.is_alive()
    ]


def _end_leftovers_quietly(plugin: WorkerPlugin) -> None:
    with contextlib.suppress(BaseException):
        plugin.end_leftovers()


def _teardown_quietly(session: pytest.Session) -> None:
    with contextlib.suppress(BaseException):
        session._setupstate.teardown_exact(None)


def _leave(sender: Sender, code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        sender.flush()
    finally:
        os._exit(code)
