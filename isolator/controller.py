"""Runs in the process that collected: the pytest process itself, or each
pytest-xdist worker. It never runs a test.

For every item pytest asks it to run, the controller makes sure a forked
worker is running that item's unit, replays what the worker reports through
the ordinary hooks (so the terminal, junit xml, the ``--lf`` cache, ``-x`` and
every other plugin see what they would see without isolation), and reaps the
worker when its unit is done or when it dies. A worker that dies leaves a
failed report for the test it was running; the rest of its unit goes on in a
fresh worker.

Workers are forked by the zygote, a copy of this process made once (see
``zygote``), so that this process's pages are not shared with every worker.
Forking is taken off the critical path: while one worker runs, the next one
is already forked (a *standby*) and waits on a pipe for the word to start, so
the page-table copy and the worker's own start-up happen on the other core.
Workers whose unit is over are killed and reaped later, in the background of
the next one's run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import faulthandler
import functools
import gc
import os
import re
import secrets
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn, overload

import pytest
from pluggy import HookRelay

from isolator import compat, faults, forking, headroom, history, leftovers, worker, zygote
from isolator.beacon import Beacon
from isolator.cgroup import WAYS_OUT, WorkerCgroups
from isolator.memory import uss_bytes
from isolator.process import WorkerProcess
from isolator.schedule import Schedule
from isolator.settings import Settings, overrides_key, overrides_of, read_marker
from isolator.sizes import format_size
from isolator.stats import RunMemory
from isolator.wire import Message, Sender
from isolator.zygote import Zygote, ZygoteGone

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: Fixtures that make the base temp directory.
_TEMP_FIXTURES = frozenset({"tmp_path", "tmpdir", "tmp_path_factory", "tmpdir_factory"})
#: Workers in a row that may die before starting a test before the run stops.
_STILLBORN_LIMIT = 3
#: Ended workers reaped together (see Controller._reap_ended).
_REAP_BATCH = 8
#: How long an interrupted worker gets to tear down before it is killed.
_INTERRUPT_GRACE_S = 5.0
#: Messages about one test, as opposed to the worker as a whole.
_ITEM_MESSAGES = frozenset({"logstart", "report", "logfinish", "finished"})
#: Item messages replayed as pytest's logging hooks.
_LOG_MESSAGES = frozenset({"logstart", "report", "logfinish"})


#: What CPython 3.12+ says, as a DeprecationWarning from ``os.fork()``'s caller, when
#: the process has other threads (gh-100228); 3.15 raises it under ``-W error``
#: (gh-135427), after the child exists.
_FORK_WITH_THREADS = (
    r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
)


def _allow_fork_with_threads() -> None:
    """Silence that warning for the forks in ``zygote``, and nothing else.

    The process that forks has other threads as a rule: an xdist node always
    has execnet's receiver thread, and plugins keep threads (pytest-rerunfailures'
    status server runs in every pytest process once xdist is installed). The
    hazard the warning names is a lock one of them holds at the fork staying
    locked in the child. The worker takes none of theirs: it never talks to
    execnet (its reporting hooks reach only the worker plugin), never returns
    into xdist's loop, and leaves with ``os._exit``; the locks it does need,
    CPython re-creates after fork (GIL, import lock, threading's) and glibc
    those of malloc. The zygote is single-threaded as a rule, but it is itself
    forked from this process, and a fork hook (``os.register_at_fork``) may
    start a thread in it.

    The filter matches only this message from this module, and goes in front
    of the current filters (pytest's ``-W`` and ``filterwarnings`` of the test
    being run included) right before each fork. It is never removed here: a
    save-and-restore (``catch_warnings``) would undo what another thread
    changed meanwhile; pytest drops it with the test's own filters. A test's
    own ``os.fork()`` in a worker still warns.
    """
    warnings.filterwarnings(
        "ignore", _FORK_WITH_THREADS, DeprecationWarning, re.escape(zygote.__name__) + r"\Z"
    )


def _warnings_state() -> tuple[list[Any], object, object]:
    """What ``warnings.catch_warnings`` saves and restores."""
    return (
        list(warnings.filters),
        warnings.showwarning,
        getattr(warnings, "_showwarnmsg_impl", None),
    )


def _restore_warnings_state(state: tuple[list[Any], object, object]) -> None:
    filters, showwarning, showwarnmsg_impl = state
    # As catch_warnings restores them (its attributes, not a public API).
    setattr(warnings, "filters", list(filters))  # noqa: B010
    setattr(warnings, "showwarning", showwarning)  # noqa: B010
    if showwarnmsg_impl is not None:
        setattr(warnings, "_showwarnmsg_impl", showwarnmsg_impl)  # noqa: B010
    # Named so up to 3.13; 3.14 took a lock around it and renamed it.
    for name in ("_filters_mutated", "_filters_mutated_lock_held"):
        mutated = getattr(warnings, name, None)
        if mutated is not None:
            mutated()
            break


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class Controller:
    """Plugin that owns the workers of one pytest process."""

    def __init__(
        self,
        config: pytest.Config,
        settings: Settings,
        plugin: worker.WorkerPlugin,
        cgroups: WorkerCgroups | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.plugin = plugin
        #: Where workers' memory cgroups are made, under the cgroup ceiling.
        self.cgroups = cgroups
        node = getattr(config, "workerinput", {}).get("workerid", "main")
        self.memory = RunMemory(time.time(), node)
        #: The worker whose reports are being replayed.
        self.current: WorkerProcess | None = None
        #: A worker forked in advance for the unit expected next.
        self.standby: Unborn | None = None
        #: A worker waiting at a gap in its plan while others run the tests
        #: in between (the shared worker of ``--isolate=marked``).
        self.parked: WorkerProcess | None = None
        #: Workers told to end, not yet reaped.
        self.ending: list[WorkerProcess] = []
        #: True in a forked worker, where this plugin must step aside.
        self.in_worker = False
        #: The run was interrupted (Ctrl-C, SIGTERM).
        self.interrupted = False
        #: What each test needed last run, and why there is no such history.
        self.history, self.history_note = history.load(config)
        #: One-line notices for the start of the run: what cannot work here.
        self.notes: list[str] = []
        #: Under xdist: each note of the nodes', and the nodes that gave it.
        self.node_notes: dict[str, list[str]] = {}
        #: (test, traceback) for errors of this process's own while a test
        #: was in flight (see _internal_error).
        self.internal_errors: list[tuple[str, str]] = []
        #: The item being replayed, and how far pytest has seen it.
        self._inflight: faults.InFlight | None = None
        #: Which tests share a worker, what it enforces, when it may start.
        self.schedule = Schedule(
            settings, self.memory, feeding=hasattr(config, "workerinput"), history=self.history
        )
        self.session: pytest.Session
        #: (worker, last test, thread names) for units that ended with
        #: non-daemon threads still running.
        self.lingering: list[tuple[str, str, list[str]]] = []
        #: (worker, processes) for units that left processes running.
        self.leftovers: list[tuple[str, list[leftovers.Leftover]]] = []
        #: (worker, what went wrong) for faults no test was charged with.
        self.faults: list[tuple[str, str]] = []
        #: Tags this run's workers (and what they start) in their environment.
        self._token = secrets.token_hex(8)
        #: Where Python forks below workers register (made with the first worker).
        self._forks: leftovers.ForkRegistry | None = None
        #: Workers in a row that died before they started a test.
        self._stillborn = 0
        self._spawned = 0
        self._prctl = _load_prctl()
        #: What forks the workers (started with the first one).
        self._zygote: Zygote | None = None
        #: Workers asked of the zygote and not yet taken.
        self._unborn: set[Unborn] = set()
        #: Workers taken, until known to be reaped (pruned when looked at).
        self._taken: list[WorkerProcess] = []
        #: The warnings filters and hooks as they were before any test ran.
        self._warnings_base: tuple[list[Any], object, object] | None = None
        #: Little room for more processes here: no standby, and ended
        #: workers reaped at once (see ``headroom``).
        self._lean = False
        #: What collection left free of descriptors, if that was little.
        self._descriptors: headroom.DescriptorRoom | None = None
        #: In the zygote and its workers: the zygote's PID.
        self._zygote_pid = -1
        #: This process froze its objects for the run (see _start_zygote).
        self._froze = False
        #: SIGCHLD as the tests set it (the zygote reaps with the default).
        self._tests_sigchld: Any = None
        #: The signal mask workers start with (this process's, before the
        #: zygote blocked the stop signals for good).
        self._worker_sigmask: set[int] = set()

    # -- hooks -----------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if self.in_worker:
            return None  # the worker runs the item with pytest's own protocol
        # pytest's faulthandler_timeout armed its watchdog around this call;
        # the test runs in the worker (where it is armed again), and in this
        # process it would only dump, or with exit_on_timeout kill, the parent.
        faulthandler.cancel_dump_traceback_later()
        self._inflight = None
        try:
            self._run(item, nextitem)
        except pytest.exit.Exception:
            raise
        except Exception:
            self._internal_error(item, traceback.format_exc())
        return True

    def _run(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """Run ``item`` in a worker and replay what it reports."""
        session = item.session
        may_retry = may_settle = True
        while True:
            try:
                proc = self._worker_for(item, nextitem)
            except OSError as exc:
                # fork, pipe or pidfd refused (too many processes or open
                # files, no memory). Often it is this process's own doing:
                # workers ended but not yet reaped, a standby. Those freed,
                # once; if that is not enough, this test's failure, and the
                # next one tries again.
                if may_settle and self._settle():
                    may_settle = False
                    continue
                faults.InFlight(item).fail(
                    f"isolator could not start a worker for {item.nodeid}: {exc}; the machine "
                    "is short of processes, file descriptors or memory",
                )
                return
            if self._replay(proc, item, may_retry):
                break
            # The item never started in that worker (it stopped, or died
            # before the test's setup began): it gets a fresh one, once.
            self._retire(proc)
            may_retry = False
        if proc.spent or proc.pos >= len(proc.plan) or session.shouldfail or session.shouldstop:
            self._finish(proc)

    def _internal_error(self, item: pytest.Item, text: str) -> None:
        """An error of this process's own (a bug in isolator, or a hook of a
        plugin's raising as a report is replayed) while ``item`` was in
        flight: it fails the item, and the run goes on in a fresh worker
        rather than ending every later test's chance of a verdict."""
        self.internal_errors.append((item.nodeid, text))
        # What the workers were doing, and what they would say next, is
        # unknown: every one that was taken ends (one held only in a local
        # variable would otherwise run its tests a second time, unseen).
        self._forget_reaped()
        for proc in list(self._taken):
            if not proc.exited and proc not in self.ending:
                with contextlib.suppress(Exception):
                    self._retire(proc)
        self.current = self.parked = None
        inflight = self._inflight
        if inflight is None or inflight.item is not item:
            inflight = faults.InFlight(item)
        self._inflight = None
        try:
            inflight.fail(
                f"isolator failed while running {item.nodeid}; this is a bug in isolator or "
                "in a plugin's hook, not in the test (the run goes on in a fresh worker):"
                f"\n\n{text}"
            )
        except Exception:
            # A hook that raises on every report: the test keeps what the
            # hooks before it saw, and the rest of the run still goes on.
            self.internal_errors.append((item.nodeid, traceback.format_exc()))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.session = session
        if session.items and not self.config.option.collectonly:
            self._make_descriptor_room()
        # Marker arguments are checked before any test runs, so a typo is a
        # usage error and not a failure halfway through the run.
        markers = self.settings.markers
        for item in session.items:
            item.stash[overrides_key] = read_marker(item, markers)
        self._make_basetemp(session.items)

    def _make_descriptor_room(self) -> None:
        """Before any worker: room for isolator's own descriptors beside
        what collection left open (see ``headroom``)."""
        room = self._descriptors = headroom.make_descriptor_room()
        if room is None:
            return
        self.config.add_cleanup(room.restore)
        if not room.enough:
            self._lean = True
        note = room.note()
        self.notes.append(note)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and not hasattr(self.config, "workerinput"):
            reporter.write_line(f"isolator: {note}")

    def _make_basetemp(self, items: list[pytest.Item]) -> None:
        """Make the run's base temp directory here, before any fork, when a
        test will use it: every worker then numbers its ``tmp_path``
        directories in the same one (as plain pytest does) instead of making
        one each, and a given ``--basetemp`` (pytest-xdist gives every node
        one) is emptied once, not again by every worker. A run whose tests
        ask for none gets none, as without isolation."""
        factory = getattr(self.config, "_tmp_path_factory", None)
        if factory is None or getattr(factory, "_basetemp", None) is not None:
            return
        if not any(_TEMP_FIXTURES.intersection(getattr(it, "fixturenames", ())) for it in items):
            return
        # On OSError the tests that use tmp_path get the error themselves,
        # as they would without isolation.
        with contextlib.suppress(OSError):
            factory.getbasetemp()

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_set_timer(self) -> bool | None:
        """pytest-timeout: time the test in the worker that runs it; a timer
        in this process would fire in the parent, which only waits."""
        return None if self.in_worker else True

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_cancel_timer(self) -> bool | None:
        return None if self.in_worker else True

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._warnings_base = _warnings_state()
        found = headroom.room()
        if found is not None and found[0] < headroom.TIGHT:
            self._lean = True
            self.notes.append(
                f"only {max(found[0], 0)} more processes may start here ({found[1]}): no "
                "worker is forked ahead, and each is reaped as it ends, so that the tests keep "
                "that room"
            )
        if hasattr(self.config, "workerinput"):
            # An xdist node's own output goes where no one looks (an execnet
            # socket server's console, say): its notes go to the pytest the
            # user started, which shows them in its summary.
            return
        notes = list(self.notes)
        if self.history_note and self.settings.mode == "auto":
            # Said up front: without history, auto is shared.
            notes.append(f"{self.history_note}; --isolate=auto runs as --isolate=shared")
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for note in notes:
            if reporter is not None:
                reporter.write_line(f"isolator: {note}")
            else:
                sys.stderr.write(f"isolator: {note}\n")

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: object) -> None:
        """pytest-xdist: each node schedules from the history loaded here."""
        history.ship(node, self.history)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: object, error: object) -> None:
        """pytest-xdist: a node finished; take in its workers' figures."""
        output = getattr(node, "workeroutput", {})
        data = output.get("isolator_memory")
        if data:
            self.memory.merge(data)
        self.lingering.extend(
            (label, nodeid, names) for label, nodeid, names in output.get("isolator_lingering", [])
        )
        # These labels already name their node (RunMemory.name).
        self.leftovers.extend(
            (label, [leftovers.Leftover(*fields) for fields in gone])
            for label, gone in output.get("isolator_leftovers", [])
        )
        self.faults.extend(output.get("isolator_faults", []))
        workerid = getattr(node, "workerinput", {}).get("workerid", "?")
        for note in output.get("isolator_notes", []):
            self.node_notes.setdefault(note, []).append(workerid)
        self.internal_errors.extend(
            (nodeid, text) for nodeid, text in output.get("isolator_internal_errors", [])
        )

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> object:
        try:
            self.shutdown()
        except Exception:
            # Every verdict is in: what could not be ended or cleaned up is
            # said, and pytest's own ending (summary, junit xml) still runs.
            self.internal_errors.append(("", traceback.format_exc()))
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["isolator_internal_errors"] = self.internal_errors
            workeroutput["isolator_notes"] = self.notes
            # An xdist node: its controller reports for all nodes.
            workeroutput["isolator_memory"] = self.memory.to_dict()
            workeroutput["isolator_lingering"] = self.lingering
            workeroutput["isolator_leftovers"] = [
                (label, [dataclasses.astuple(gone) for gone in procs])
                for label, procs in self.leftovers
            ]
            workeroutput["isolator_faults"] = self.faults
            return (yield)
        if self.internal_errors and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.TESTS_FAILED,
        ):
            # Tests failed because of isolator, not of themselves: the run
            # must not read as an ordinary red one.
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        if self.history is not None:
            history.record(
                self.config,
                self.history,
                self.memory,
                self.settings.change_min_bytes,
                self.settings.change_min_percent,
            )
        settings = {
            "mode": self.settings.mode,
            "budget_bytes": self.settings.budget_bytes,
            "ceiling_bytes": self.settings.ceiling_bytes,
            "growth_limit_bytes": self.settings.growth_limit_bytes,
            "auto_threshold_bytes": self.settings.auto_threshold_bytes,
        }
        try:
            if self.settings.report_path:
                self.memory.write_json(self.settings.report_path, **settings)
            if self.settings.html_path:
                from isolator import chart

                chart.write_html(
                    self.settings.html_path,
                    self.memory,
                    self.settings.budget_bytes,
                    self.settings.top,
                )
        except OSError as exc:
            # The run's verdicts matter more than the report: say so, go on.
            warnings.warn(
                pytest.PytestWarning(f"isolator: could not write the memory report: {exc}"),
                stacklevel=1,
            )
        return (yield)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.node_notes:
            terminalreporter.write_sep("=", "isolator: notes from xdist nodes")
            for note, nodes in self.node_notes.items():
                terminalreporter.write_line(f"{', '.join(sorted(nodes))}: {note}")
        if self.internal_errors:
            terminalreporter.write_sep("=", "isolator: internal errors")
            times = len(self.internal_errors)
            terminalreporter.write_line(
                f"isolator failed {times} time{'s' if times > 1 else ''} (a bug in isolator, "
                "or a plugin's hook raising as a report was replayed): a test whose verdict "
                "was not in yet failed with it, the run went on, and the exit code is 3. "
                "Please report it with these tracebacks:"
            )
            for nodeid, text in self.internal_errors:
                terminalreporter.write_line(
                    f"while running {nodeid}:" if nodeid else "at the end of the run:"
                )
                terminalreporter.write_line(text.rstrip())
        if self.leftovers:
            terminalreporter.write_sep("=", "isolator: processes left running")
            for label, procs in self.leftovers:
                count = f"{len(procs)} process{'es' if len(procs) > 1 else ''}"
                terminalreporter.write_line(f"worker {label} left {count} running:")
                for gone in procs:
                    terminalreporter.write_line(f"  {gone.describe()}")
        if self.faults:
            terminalreporter.write_sep("=", "isolator: worker faults outside the test phases")
            for label, text in self.faults:
                terminalreporter.write_line(f"worker {label}: {text.rstrip()}")
        if self.lingering:
            terminalreporter.write_sep("=", "isolator: threads left running")
            for label, nodeid, names in self.lingering:
                terminalreporter.write_line(
                    f"worker {label} ended its unit (last test {nodeid}) with non-daemon "
                    f"threads still running: {', '.join(names)}"
                )
        lines = self.memory.summary_lines(self.settings.top)
        if lines:
            terminalreporter.write_sep("=", "isolator: memory")
            for line in lines:
                terminalreporter.write_line(line)
            for path, what in (
                (self.settings.report_path, "JSON"),
                (self.settings.html_path, "HTML"),
            ):
                if path:
                    terminalreporter.write_line(f"memory report ({what}): {path}")
        changes = self.memory.change_lines(
            self.settings.change_min_bytes, self.settings.change_min_percent, self.settings.top
        )
        if changes:
            terminalreporter.write_sep("=", "isolator: memory changes since the last run")
            for line in changes:
                terminalreporter.write_line(line)

    @pytest.hookimpl
    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def shutdown(self) -> None:
        if self.interrupted and self.current is not None and self.current.started:
            self._interrupt(self.current)
        if self.current is not None:
            self._retire(self.current)
        self._settle()
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        if self._froze:
            self._froze = False
            # Frozen objects are hidden from gc.get_referrers() and
            # gc.get_objects(), which plugins use as the run ends (hypothesis
            # does, when imported at the terminal summary).
            gc.unfreeze()
        if self._forks is not None:
            self._end_orphans(None)
            self._forks.close()
            self._forks = None
            # pytest.main() may return into a program that is no reaper.
            leftovers.set_subreaper(self._prctl, on=False)

    def _end_orphans(self, proc: WorkerProcess | None) -> None:
        """End the processes that workers left to this process (it is their
        subreaper) when they ended without ending them themselves: after
        ``proc`` died, or (None) at the end of the run.

        Only processes that provably came from a worker of this run are
        touched: those tagged in their environment (started with exec) and
        those in the fork registry (Python forks); see ``leftovers``."""
        if self._forks is None:
            return
        blame: dict[int, str] = {}

        def find() -> list[int]:
            workers = self._known_workers()
            roots = [
                pid
                for pid in leftovers.children()
                if pid not in workers and self._worker_that_started(pid, blame)
            ]
            return leftovers.descendants(roots) if roots else []

        self._end_lost_workers()

        ended = leftovers.end(find, lambda pid, process: leftovers.test_from_environ(process))
        by_worker: dict[str, list[leftovers.Leftover]] = {}
        for gone in ended:
            label = blame.get(gone.pid) or (proc.label if proc is not None else "?")
            by_worker.setdefault(self.memory.name(label), []).append(gone)
        self.leftovers.extend(by_worker.items())

    def _known_workers(self) -> set[int]:
        """PIDs of the zygotes and of the workers whose PIDs this process
        knows and has not reaped (whoever forked them: a worker whose zygote
        died is this process's child now)."""
        self._forget_reaped()
        known = {proc.pid for proc in self._taken}
        if self._zygote is not None:
            known.add(self._zygote.pid)
        # Forked, and the answer read, but not yet taken.
        for unborn in self._unborn:
            known.update(unborn.zygote.untaken())
        return known

    def _forget_reaped(self) -> None:
        self._taken = [proc for proc in self._taken if not proc.exited]

    def _end_lost_workers(self) -> None:
        """Kill and reap the workers a zygote forked and died before naming:
        the kernel made them this process's children. They were never given
        a test (their PIDs were not known), so they are not reported."""
        assert self._forks is not None
        known = self._known_workers()
        for pid in leftovers.children():
            if pid in known:
                continue
            # Held by a pidfd opened before it is looked up: were the PID
            # reaped by someone else and reused meanwhile, the lookup (by PID
            # and start time) would not match, and the pidfd reaches only
            # the process looked up.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                found = self._forks.lookup(pid)
                if found is not None and found.worker:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            finally:
                os.close(pidfd)

    def _worker_that_started(self, pid: int, blame: dict[int, str]) -> bool:
        assert self._forks is not None
        found = leftovers.process(pid)
        tag = leftovers.environ_of(found).get(leftovers.TAG, "") if found is not None else ""
        label = tag.split(" ", 1)[1] if tag.startswith(f"{self._token} ") else None
        if label is None:
            registered = self._forks.lookup(pid)
            if registered is None or registered.worker:
                return False
            label = registered.label
        blame[pid] = label
        return True

    # -- workers ---------------------------------------------------------

    def _worker_for(self, item: pytest.Item, nextitem: pytest.Item | None) -> WorkerProcess:
        """The worker that runs ``item``: the current one, the parked one,
        the standby, or a new one."""
        testsfailed = item.session.testsfailed
        proc = self.current
        if proc is not None:
            if proc.expects(item):
                if proc.pos in proc.gaps:
                    proc.resume(testsfailed)
                self._feed(proc, item, nextitem)
                return proc
            self.current = None
            if proc.at_gap:
                if self.parked is not None:
                    self._retire(self.parked)
                self.parked = proc
            else:
                self._retire(proc)
        if self.parked is not None and self.parked.try_reap():
            # Killed while it waited at a gap (the OOM killer, say): no test
            # of its was running, so its remaining tests get a fresh worker.
            self._retire(self.parked)
            self.parked = None
        if self.parked is not None and self.parked.expects(item):
            proc, self.parked = self.parked, None
            proc.resume(testsfailed)
        else:
            standby, self.standby = self.standby, None
            proc = None
            if standby is not None:
                # Only a head start: if the zygote could not fork it, the
                # unit asks for its own worker (and says so if that fails too).
                with contextlib.suppress(OSError):
                    proc = self._born(standby)
            # A standby killed while it waited never ran anything: use another.
            if proc is None or proc.try_reap():
                if proc is not None:
                    self._retire(proc)
                proc = self._born(self._conceive())
            plan = self.schedule.plan_for(item, nextitem)
            orders = self.schedule.orders_for(plan, proc.label, testsfailed)
            self.schedule.admit(plan, orders)
            self.memory.worker_unit(proc.label, self.schedule.unit_of(item))
            proc.go(orders, plan)
        self._feed(proc, item, nextitem)
        self.current = proc
        self._reap_ended()
        if self.standby is None and nextitem is not None and not self._lean:
            # Asked for now, taken when the next unit starts: the zygote forks
            # it while this process replays.
            with contextlib.suppress(OSError):
                self.standby = self._conceive()
        return proc

    def _feed(self, proc: WorkerProcess, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """Under pytest-xdist the run order is known one item at a time: tell
        the worker what follows ``item`` in its unit, or that the unit ends."""
        if not proc.open_ended or proc.plan[-1] is not item:
            return
        position = self.schedule.continues(item, nextitem)
        if nextitem is not None and position is not None:
            proc.plan.append(nextitem)
            proc.tell("next", position, self.schedule.recorded_peak(nextitem))
            return
        proc.open_ended = False
        proc.tell("end")

    def _interrupt(self, proc: WorkerProcess) -> None:
        """Stop a running worker as Ctrl-C stops pytest: KeyboardInterrupt in
        the test, fixtures torn down; killed if it does not end in time.
        Then report what it finished: the worker runs ahead of the replay, so
        tests it completed may not have been reported yet."""
        if not proc.exited:
            proc.signal(signal.SIGINT)
            if not proc.wait_exit(_INTERRUPT_GRACE_S):
                sys.stderr.write(
                    f"isolator: worker {proc.label} (PID {proc.pid}) ignored SIGINT for "
                    f"{_INTERRUPT_GRACE_S:g}s while running {proc.current_nodeid()}; "
                    "killing it\n"
                )
                proc.stop()
                proc.wait_exit(_INTERRUPT_GRACE_S)
        items = {item.nodeid: item for item in proc.plan}
        while (message := proc.receiver.pop()) is not None:
            kind = message[0]
            if kind in _LOG_MESSAGES:
                nodeid = message[1].get("nodeid") if kind == "report" else message[1]
                item = items.get(nodeid)
                self._log(message, item.ihook if item is not None else self.config.hook)
            elif kind == "warning":
                self._dispatch(proc, message)

    def _retire(self, proc: WorkerProcess) -> None:
        crashed = False
        if proc.started:
            reason = "stopped"
            if self.interrupted and proc is self.current:
                reason = "interrupted"
            elif (proc.exited and not proc.done) or proc.garbled is not None:
                reason = proc.ending().short
                crashed = True
            elif proc.done:
                reason = proc.leave_reason or "unit done"
            self.memory.worker_ended(proc.label, reason, time.time(), crashed=crashed)
        proc.stop()
        proc.beacon.close()
        if proc is self.current:
            self.current = None
        if not proc.exited:
            if self._lean:
                proc._reap()  # killed above: it ends at once
            else:
                self.ending.append(proc)
        elif crashed:
            # It could not end what its tests left running; they are ours now.
            self._end_orphans(proc)

    def _reap_ended(self) -> None:
        """Reap the workers told to end that have, a batch at a time: each
        reaping is a question to the zygote, and one question can carry many.
        (Only the exit status waits: the kernel frees a worker's memory when
        it exits, reaped or not.)"""
        if len(self.ending) < _REAP_BATCH:
            return
        by_zygote: dict[Zygote, list[WorkerProcess]] = {}
        for proc in self.ending:
            by_zygote.setdefault(proc.zygote, []).append(proc)
        for forker, procs in by_zygote.items():
            statuses: dict[int, int] = {}
            if forker.alive:
                with contextlib.suppress(ZygoteGone):
                    statuses = forker.reap_ended([(p.pid, p.pidfd) for p in procs])
            for proc in procs:
                if proc.pid in statuses:
                    proc.reaped(statuses[proc.pid])
                elif not forker.alive:
                    proc.try_reap()
        self.ending = [proc for proc in self.ending if not proc.exited]

    def _settle(self) -> bool:
        """Give back what this process holds of the machine's processes,
        descriptors and memory beyond the worker in use: the standby, the
        parked worker (its tests go on in a fresh one, as when one dies
        while parked), and the workers told to end (each still a process,
        and its descriptors still open, until reaped). True if there was any."""
        held = self.standby is not None or self.parked is not None or bool(self.ending)
        if self.parked is not None:
            self._retire(self.parked)
            self.parked = None
        if self.standby is not None:
            standby, self.standby = self.standby, None
            with contextlib.suppress(OSError):
                proc = self._born(standby, again=False)
                if proc is not None:
                    self._retire(proc)
        for proc in self.ending:
            if not proc.exited:
                proc._reap()
        self.ending.clear()
        return held

    def _conceive(self) -> Unborn:
        """Ask the zygote for a worker that will wait for its orders, without
        waiting for the fork (see :meth:`_born`)."""
        self._spawned += 1
        label = f"w{self._spawned}"
        if self._zygote is None or not self._zygote.alive:
            # First, so that it does not inherit this worker's descriptors.
            self._start_zygote()
        fds: list[int] = []
        beacon: Beacon | None = None
        try:
            read_fd, write_fd = os.pipe()
            fds += (read_fd, write_fd)
            go_read, go_write = os.pipe()
            fds += (go_read, go_write)
            fault_fd = os.memfd_create(f"isolator-{label}-faults", os.MFD_CLOEXEC)
            fds.append(fault_fd)
            beacon = Beacon()
            unborn = Unborn(
                self._spawned, label, read_fd, write_fd, go_read, go_write, fault_fd, beacon
            )
            unborn.zygote = self._ask_fork(unborn)
            self._unborn.add(unborn)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if beacon is not None:
                beacon.close()
            raise
        return unborn

    def _ask_fork(self, unborn: Unborn) -> Zygote:
        """Ask a live zygote (started if need be) to fork ``unborn``; the zygote
        asked, or a dead one if it died as it started."""
        zygote = self._zygote
        for _ in range(2):
            if zygote is None or not zygote.alive:
                zygote = self._start_zygote()
            try:
                zygote.ask_fork(unborn.number, unborn.label.encode(), unborn.given)
                return zygote
            except ZygoteGone:
                # It died since the last worker (the OOM killer, say): once more.
                zygote = None
        assert self._zygote is not None
        return self._zygote

    @overload
    def _born(self, unborn: Unborn) -> WorkerProcess: ...
    @overload
    def _born(self, unborn: Unborn, again: bool) -> WorkerProcess | None: ...

    def _born(self, unborn: Unborn, again: bool = True) -> WorkerProcess | None:
        """The worker ``unborn`` once the zygote has forked it. If the zygote
        died before it could, a new zygote is asked (unless not ``again``:
        then None)."""
        self._unborn.discard(unborn)
        stillborn: int | None = None
        try:
            zygote = unborn.zygote
            try:
                pid = zygote.forked(unborn.number)
            except ZygoteGone:
                if not again:
                    unborn.discard()
                    return None
                zygote = self._ask_fork(unborn)
                try:
                    pid = zygote.forked(unborn.number)
                except ZygoteGone:
                    # Died as it started: whatever killed it (a fork hook of
                    # the tests', say) kills every worker as it starts, and
                    # it counts as such a worker (see _STILLBORN_LIMIT).
                    pid = zygote.pid
                    stillborn = signal.SIGKILL if zygote.status is None else zygote.status
            unborn.release()
            proc = WorkerProcess(
                unborn.label,
                pid,
                unborn.read_fd,
                unborn.go_write,
                unborn.fault_fd,
                unborn.beacon,
                zygote,
                stillborn,
            )
        except BaseException:
            unborn.discard()
            raise
        if len(self._taken) >= 64:
            self._forget_reaped()
        self._taken.append(proc)
        if self.cgroups is not None:
            proc.cgroup = self.cgroups.for_worker(unborn.label)
        return proc

    def _start_zygote(self) -> Zygote:
        """Fork the zygote (see ``zygote``) from this process as it is now."""
        # Objects that exist now are shared with the workers page by page;
        # frozen, they are out of every collector's way (bpo-31558): the
        # workers' (which would copy each page it writes to) and this
        # process's, which would otherwise walk all of them again and again
        # as replayed reports pile up. Undone when the run ends (shutdown).
        gc.freeze()
        self._froze = True
        self.plugin.parent_modules = forking.module_names()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self._forks is None:
            # Processes that workers leave behind when they die come here,
            # not to init, so that they can be found and ended.
            leftovers.set_subreaper(self._prctl)
            self._forks = leftovers.ForkRegistry()
        _allow_fork_with_threads()
        # Ctrl-C during fork() would be raised inside an at-fork hook, where
        # Python reports it as unraisable and drops it; held until the fork
        # is done. The zygote holds them for good; workers let them through.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        self._worker_sigmask = set(blocked)
        try:
            self._zygote = Zygote.start(
                become=self._become_worker,
                enrol=self._enrol_worker,
                prepare=self._become_zygote,
                after_fork=lambda: compat.clear_inherited_queues(self.config),
                prctl=self._prctl,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        # What pytest queued in this process (unraisable exceptions, errors
        # in threads) is the first worker's to report, once, not every
        # later worker's again.
        compat.clear_inherited_queues(self.config)
        return self._zygote

    def _become_zygote(self) -> None:
        """In the zygote, once: let go of what it must not hold, and do what
        every worker would otherwise do for itself (see ``worker.prepare``)."""
        self.in_worker = True
        self._zygote_pid = os.getpid()
        # A test that signals its own worker should end that worker only,
        # not (through the parent's handler) the whole run. (The zygote holds
        # both signals blocked: these handlers are its workers'.)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Interrupting a worker means SIGINT; pytest may have been started
        # with SIGINT ignored (a background job of a shell script), and
        # the worker would inherit that.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A conftest may have ignored SIGCHLD, or installed a handler that
        # reaps: the zygote would then lose its workers' exit statuses. It
        # reaps with the default; each worker gets the tests' setting back.
        self._tests_sigchld = signal.getsignal(signal.SIGCHLD)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The zygote is forked while pytest runs the first item, inside its
        # ``filterwarnings`` marks: without this every worker would inherit
        # them, and a later test's warning would be an error, say.
        if self._warnings_base is not None:
            _restore_warnings_state(self._warnings_base)
            _allow_fork_with_threads()
        worker.prepare(self.config, self.plugin)
        # Workers of an earlier zygote: holding their pipes would hide their end.
        # Descriptors of workers not yet forked: the zygote is handed its own.
        for unborn in self._unborn:
            unborn.discard()
        for other in (self.current, self.parked, *self.ending):
            if other is not None:
                other.selector.close()
                for fd in (other.receiver.fd, other.go_fd, other.pidfd, other.fault_fd):
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        if self._zygote is not None:
            self._zygote.forget()

    def _enrol_worker(self, payload: bytes) -> None:
        """In a worker the zygote just forked, first thing: if the zygote
        dies before telling this process the worker's PID, the registry
        tells it (see ``leftovers.ForkRegistry.enrol``)."""
        if self._forks is not None:
            self._forks.enrol(payload.decode())

    def _become_worker(self, payload: bytes, fds: list[int]) -> NoReturn:
        """In a worker the zygote just forked: run the unit it is given."""
        label = payload.decode()
        write_fd, go_fd, fault_fd, beacon_fd = fds

        def lost_pipe() -> None:
            beacon.lost_pipe()
            os._exit(3)

        sender = Sender(write_fd, on_lost=lost_pipe)
        session = self.session
        try:
            beacon = Beacon(beacon_fd)
            beacon.release_fd()
            signal.pthread_sigmask(signal.SIG_SETMASK, self._worker_sigmask)
            if self._tests_sigchld is not None:
                signal.signal(signal.SIGCHLD, self._tests_sigchld)
            os.setpgid(0, 0)
            # Its own process group is never the terminal's foreground one:
            # a test that sets the terminal's modes (getpass, stty) would be
            # stopped by the kernel (and the run with it) where it works
            # plainly, and one that reads it would stop rather than fail.
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
            if self._prctl is not None:
                self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self._zygote_pid:
                os._exit(1)  # the zygote died before we could ask to follow it
            if self.cgroups is not None:
                # Before anything else: memory is charged to the cgroup a
                # process is in when it touches a page.
                assert self.settings.ceiling_bytes is not None
                cgroup = self.cgroups.for_worker(label)
                cgroup.join(self.settings.ceiling_bytes)
                self.plugin.cgroup = cgroup
            leftovers.set_subreaper(self._prctl)
            # Inherited by whatever the tests start with exec, and written by
            # every Python fork below: if this worker dies, the parent can
            # tell its leftovers from anyone else's.
            os.environ[leftovers.TAG] = f"{self._token} {label}"
            if self._forks is not None:
                self._forks.watch_forks()
            self.plugin.beacon = beacon
            faulthandler.enable(file=fault_fd, all_threads=True)
            self.plugin.sender = sender
            self.plugin.ready()
            if self._descriptors is not None:
                self._descriptors.give_back()
            line = worker.Line(go_fd, session)
            orders = line.orders()
            if orders is None:
                os._exit(0)
            # Where its faulthandler writes: the memfd as numbered here.
            self.plugin.start(dataclasses.replace(orders.limits, fault_fd=fault_fd))
        except BaseException:
            worker.fault(sender, None)
            sender.flush()
            os._exit(70)
        worker.run_unit(orders, line, self.plugin, sender)

    def _finish(self, proc: WorkerProcess) -> None:
        """Let a worker whose unit is over say goodbye, then end it.

        Warnings of a test are recorded after its ``logfinish`` (pytest's
        warnings plugin wraps the whole protocol), so the last test's warnings
        arrive here."""
        while not proc.done:
            message = proc.next_message()
            if message is None:
                break
            if message[0] in _ITEM_MESSAGES:
                # The worker ran ahead into a test pytest will not run here
                # (a stop decided only in this process); it is ended below
                # and what it did is not reported.
                continue
            self._dispatch(proc, message)
        self._retire(proc)

    # -- replay ----------------------------------------------------------

    def _replay(self, proc: WorkerProcess, item: pytest.Item, may_retry: bool = False) -> bool:
        """Replay the worker's events for ``item`` until it finishes or dies.

        False if the worker ended without starting the item."""
        ihook = item.ihook
        inflight = self._inflight = faults.InFlight(item)
        every_s = self.settings.sample_interval_s
        period = every_s
        limit_s = overrides_of(item).timeout_s or self.settings.timeout_s
        overdue = _Overdue(proc, self.schedule.position(item), limit_s) if limit_s else None
        if overdue is not None:
            period = min(every_s or _OVERDUE_CHECK_S, _OVERDUE_CHECK_S)
        sampled_at = time.monotonic()

        def on_wait() -> None:
            nonlocal sampled_at
            if every_s is not None and time.monotonic() - sampled_at >= every_s:
                sampled_at = time.monotonic()
                self._sample(proc)
            if overdue is not None:
                overdue.check()

        while True:
            message = proc.next_message(period, on_wait)
            if overdue is not None:
                # Also while messages flow (on_wait runs only when none do).
                overdue.check()
            if message is None:
                # The beacon knows a test began even when the worker died
                # before the word reached the pipe.
                began = inflight.started or proc.began(self.schedule.position(item))
                if proc.done and not began:
                    return False
                # Died before this test began: between two tests, or before
                # its first one (killed while it waited, as the OOM killer
                # kills idle processes too, or a broken startup). The test did
                # not run; it gets a fresh worker, unless workers keep dying
                # before their first test (_report_lost counts the death that
                # reaches the limit).
                if (
                    not began
                    and may_retry
                    and (proc.pos > 0 or self._stillborn + 1 < _STILLBORN_LIMIT)
                ):
                    if proc.pos == 0:
                        self._stillborn += 1
                    elif proc.fault is None:
                        self.faults.append(
                            (
                                self.memory.name(proc.label),
                                f"{proc.ending().sentence} after {proc.last_nodeid} ended "
                                f"and before {item.nodeid} began (it runs in a fresh worker)",
                            )
                        )
                    self._captured_by_lost_worker()
                    return False
                self._report_lost(proc, inflight, began)
                return True
            kind = message[0]
            if kind in _LOG_MESSAGES:
                self._log(message, ihook, inflight)
            elif kind == "finished":
                self._stillborn = 0
                proc.pos += 1
                proc.last_nodeid = message[1]
                self.memory.test_done(proc.label, message[1], message[2])
                # A stop a test or a hook decided in the worker (session.
                # shouldstop, shouldfail) is the run's, as it is plainly.
                session = item.session
                shouldstop, shouldfail = message[3], message[4]
                if shouldstop and not session.shouldstop:
                    session.shouldstop = shouldstop
                if shouldfail and not session.shouldfail:
                    session.shouldfail = shouldfail
                return True
            else:
                self._dispatch(proc, message)

    def _log(
        self, message: Message, ihook: HookRelay, inflight: faults.InFlight | None = None
    ) -> None:
        """Replay one logstart, report or logfinish through ``ihook`` (the
        item's hook relay, which leaves out conftests the item is not under),
        noting it in ``inflight``."""
        kind = message[0]
        if kind == "report":
            report: pytest.TestReport = self.config.hook.pytest_report_from_serializable(
                config=self.config, data=message[1]
            )
            compat.after_unserialize(self.config, report, message[1])
            if inflight is not None and report.nodeid == inflight.item.nodeid:
                inflight.outcomes[report.when] = report.outcome
            nodeid = report.nodeid
            call: Callable[[], object] = functools.partial(
                ihook.pytest_runtest_logreport, report=report
            )
        elif kind == "logstart":
            if inflight is not None:
                inflight.started = True
                # A plugin that runs the item again (pytest-rerunfailures)
                # logs it again: the phases of the last attempt are what count.
                inflight.outcomes.clear()
            nodeid = message[1]
            call = functools.partial(
                ihook.pytest_runtest_logstart, nodeid=message[1], location=message[2]
            )
        else:
            if inflight is not None:
                inflight.outcomes["logfinish"] = "done"
            nodeid = message[1]
            call = functools.partial(
                ihook.pytest_runtest_logfinish, nodeid=message[1], location=message[2]
            )
        try:
            call()
        except Exception:
            # A plugin's hook raised (plain pytest would end the run with
            # INTERNALERROR). The hooks before it saw the message, so the
            # replay goes on as it was: the test keeps its own verdict.
            self.internal_errors.append((nodeid, traceback.format_exc()))

    def _dispatch(self, proc: WorkerProcess, message: Message) -> None:
        """Messages that are not about the item being replayed."""
        kind = message[0]
        if kind == "warning":
            payload, when, nodeid, location = message[1:]
            self._replay_warning(self.config.hook, payload, when, nodeid, location)
        elif kind == "gc":
            self.memory.gc_stats(proc.label, message[1])
        elif kind == "started":
            self.memory.worker_started(proc.label, proc.pid, message[1], message[2])
        elif kind == "done":
            proc.done = True
            if message[2]:
                self.lingering.append((self.memory.name(proc.label), proc.last_nodeid, message[2]))
            if message[1]:
                proc.leave_reason = (
                    message[1] if message[1] == "ceiling hit" else f"recycled: {message[1]}"
                )
        elif kind == "exit":
            self._retire(proc)
            raise pytest.exit.Exception(message[1], message[2])
        elif kind == "interrupt":
            self._retire(proc)
            raise KeyboardInterrupt
        elif kind == "leftovers":
            self.leftovers.append(
                (
                    self.memory.name(proc.label),
                    [leftovers.Leftover(*fields) for fields in message[1]],
                )
            )
        elif kind == "fault":
            # The worker leaves now; the item in flight (if any) fails with
            # this when the worker's end is noticed (_report_lost).
            proc.fault = message[2]
            if message[1] is None or message[1] == proc.last_nodeid:
                # No test is in flight to be charged with it (none yet, or
                # the one it names has finished): shown in the summary.
                after = f"after {message[1]} finished:\n" if message[1] else ""
                self.faults.append((self.memory.name(proc.label), after + message[2]))
        elif kind == "undecodable":
            self.faults.append(
                (self.memory.name(proc.label), f"a message could not be read: {message[1]}")
            )
        elif kind == "garbled":
            # What follows in the pipe cannot be trusted to be what it seems.
            proc.garbled = message[1]
            proc.stop()
        else:
            raise RuntimeError(f"isolator: unexpected message {kind!r} from {proc!r}")

    def _replay_warning(
        self,
        ihook: HookRelay,
        payload: dict[str, object],
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        category = payload["category"]
        name = payload.get("category_name")
        # pytest-xdist sends a category to its controller by module and name,
        # where a stand-in class would not be found (it fails the same way on
        # a category defined in a function without isolation).
        if isinstance(name, str) and isinstance(category, type) and not self.schedule.feeding:
            category = type(name, (category,), {})
        message = payload["message"]
        if message is None:
            try:
                message = category(payload["text"])  # type: ignore[operator]
            except Exception:
                message = UserWarning(payload["text"])
        record = warnings.WarningMessage(
            message,  # type: ignore[arg-type]
            category,  # type: ignore[arg-type]
            payload["filename"],  # type: ignore[arg-type]
            payload["lineno"],  # type: ignore[arg-type]
            None,
            payload["line"],  # type: ignore[arg-type]
        )
        ihook.pytest_warning_recorded.call_historic(
            kwargs={"warning_message": record, "when": when, "nodeid": nodeid, "location": location}
        )

    def _sample(self, proc: WorkerProcess) -> None:
        """Between test boundaries: the running worker's own memory now (its
        USS, read from /proc by this process, so the worker pays nothing)."""
        own = uss_bytes(proc.pid)
        if own is not None:
            self.memory.sampled(proc.label, own, time.time())

    def _captured_by_lost_worker(self) -> list[tuple[str, str]]:
        """What a dead worker's test had written to the capture files.

        Workers capture into the parent's own capture files, so what a dead
        one left there is read here, both to show it and so that it does not
        turn up in the next worker's first test."""
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is None or not capman.is_globally_capturing():
            return []
        try:
            out, err = capman.read_global_capture()
        except Exception:
            return []
        tail = 10_000
        return [
            (f"Captured {name}", text[-tail:])
            for name, text in (("stdout", out), ("stderr", err))
            if text
        ]

    def _report_lost(self, proc: WorkerProcess, inflight: faults.InFlight, began: bool) -> None:
        """The worker died while running the item in flight: fail the phase it was in."""
        item = inflight.item
        # A fault's traceback says more than faulthandler's stacks would.
        stacks = proc.fault or proc.fault_stacks
        how = proc.ending().sentence
        cause = f"worker {proc.label} (PID {proc.pid}) {how} while running {item.nodeid}"
        hint = ""
        if proc.killed_by_ceiling:
            hint = f"\n{WAYS_OUT}"
        elif (
            faults.killed_by(proc.wait_status) == signal.SIGKILL
            and not proc.zygote_ending()
            and proc.overdue_s is None
        ):
            worker_memory = self.memory.workers.get(proc.label)
            if worker_memory is not None:
                hint = (
                    "\nSIGKILL from outside is often the kernel's OOM killer; the worker's "
                    f"own memory was last measured at {format_size(worker_memory.end_bytes)} "
                    f"(peak {format_size(worker_memory.peak_bytes)})"
                )
        sections = self._captured_by_lost_worker()
        if not began and proc.pos == 0:
            # Died before its first test: a broken conftest or startup does
            # this to every worker, and starting more would loop forever.
            self._stillborn += 1
            if self._stillborn >= _STILLBORN_LIMIT:
                item.session.shouldstop = (
                    f"isolator: {self._stillborn} workers in a row died before starting a test "
                    f"(the last {how}); stopping instead of starting more"
                )
        else:
            self._stillborn = 0
        phase = inflight.unreported_phase()
        longrepr = f"{cause} ({phase}){hint}"
        if stacks:
            longrepr += f"\n\n{stacks}"
        if not inflight.fail(longrepr, sections) and proc.fault is not None:
            # Every phase had its report: the verdict stands, the fault is
            # shown in the summary.
            self.faults.append(
                (self.memory.name(proc.label), f"after {item.nodeid} reported:\n{proc.fault}")
            )
        proc.pos += 1


#: How long past its timeout a test's worker may run before the pytest
#: process kills it (its own watchdog fires at the timeout), and how often
#: that is checked while waiting for it.
_OVERDUE_GRACE_S = 5.0
_OVERDUE_CHECK_S = 0.5


class _Overdue:
    """The pytest process's own deadline for a test under a timeout, in case
    the worker's watchdog never fires: a test that cancelled or re-armed it
    (faulthandler), replaced the process (exec), or stopped it (SIGSTOP)."""

    def __init__(self, proc: WorkerProcess, position: int | None, limit_s: float) -> None:
        self.proc = proc
        self.position = position
        self.limit_s = limit_s
        self.began_at: float | None = None
        self.armings = -1

    def check(self) -> None:
        now = time.monotonic()
        if not self.proc.began(self.position):
            return
        armings = self.proc.beacon.armings
        if armings != self.armings:
            # The item began, or another attempt at it did (the worker's
            # watchdog times each one): so does this deadline.
            self.armings, self.began_at = armings, now
            return
        assert self.began_at is not None
        if now - self.began_at > self.limit_s + _OVERDUE_GRACE_S and not self.proc.exited:
            self.proc.overdue_s = self.limit_s
            self.proc.signal(signal.SIGKILL)


@dataclasses.dataclass(eq=False)
class Unborn:
    """A worker asked of the zygote, before its fork is known to be done:
    the descriptors made for it, the worker's ends among them."""

    number: int
    label: str
    read_fd: int
    write_fd: int
    go_read: int
    go_write: int
    fault_fd: int
    beacon: Beacon
    zygote: Zygote = dataclasses.field(init=False)

    @property
    def given(self) -> list[int]:
        """What the worker gets: its ends of the pipes, and the memfds."""
        return [self.write_fd, self.go_read, self.fault_fd, self.beacon.fd]

    def release(self) -> None:
        """Forked: close this process's copies of the worker's ends."""
        for fd in (self.write_fd, self.go_read):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.write_fd = self.go_read = -1
        self.beacon.release_fd()

    def discard(self) -> None:
        """Never to be a worker (here): close everything made for it."""
        for fd in (self.read_fd, self.write_fd, self.go_read, self.go_write, self.fault_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self.write_fd = self.go_read = self.go_write = self.fault_fd = -1
        self.beacon.close()
