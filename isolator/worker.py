"""Runs inside a forked worker process, and nowhere else.

The pytest process forks a worker after collection, hands it a *plan* (the
consecutive items of one unit, already in memory because fork copied them)
and goes back to reading. The worker runs each item through the ordinary
``pytest_runtest_protocol`` hook, so fixtures, capture, logging, warnings,
skipping, xfail and every other plugin behave exactly as they do without
isolation, and streams what pytest would have reported back over a pipe.

Invariant: every reporting hook implementation runs exactly once per event,
in the parent, when the event is replayed there. In the worker the reporting
hooks reach only :class:`WorkerReporter` and the two built-in plugins that
steer the run from reports (the session's ``--maxfail`` counter and
``--stepwise``), so a worker never prints progress, writes junit xml or
touches the cache.

The worker never returns into pytest: it leaves with ``os._exit`` so that
nothing the parent set up (session finish hooks, atexit handlers, a
non-daemon thread a test left running) runs or waits a second time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from typing import Any, NoReturn

import pytest

from isolator.wire import Sender

#: Hooks whose implementations report or record results; in a worker these
#: reach only the worker's reporter (see the invariant above).
REPORT_HOOKS = (
    "pytest_runtest_logstart",
    "pytest_runtest_logreport",
    "pytest_runtest_logfinish",
    "pytest_warning_recorded",
)

#: Built-in plugins that read reports to decide whether the run goes on.
_STEERING_PLUGINS = ("session", "stepwiseplugin")


class WorkerReporter:
    """Forwards the reporting hooks of a worker to its parent."""

    def __init__(self, config: pytest.Config, sender: Sender) -> None:
        self.config = config
        self.sender = sender
        # Registering a plugin replays historic hooks (warnings recorded during
        # collection, in the parent); those were reported there already.
        self.live = False

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.sender.send("logstart", nodeid, location)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.sender.send("report", data)
        # Flushed per report so a crash in the next phase still leaves the
        # parent knowing which phases finished.
        self.sender.flush()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.sender.send("logfinish", nodeid, location)
        self.sender.flush()

    @pytest.hookimpl
    def pytest_warning_recorded(
        self,
        warning_message: warnings.WarningMessage,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        if self.live:
            self.sender.send("warning", encode_warning(warning_message), when, nodeid, location)


def encode_warning(message: warnings.WarningMessage) -> dict[str, Any]:
    import pickle

    payload: dict[str, Any] = {
        "category": message.category,
        "filename": message.filename,
        "lineno": message.lineno,
        "line": message.line,
        "text": str(message.message),
        "message": None,
    }
    try:
        # Warnings with custom constructors may not survive a round trip;
        # those fall back to their text.
        pickle.loads(pickle.dumps(message.message))
        payload["message"] = message.message
    except Exception:
        pass
    try:
        pickle.dumps(message.category)
    except Exception:
        payload["category"] = UserWarning
    return payload


def _route_report_hooks(config: pytest.Config, reporter: WorkerReporter) -> None:
    pm = config.pluginmanager
    keep: set[object] = {reporter}
    for name in _STEERING_PLUGINS:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            keep.add(plugin)
    for name in REPORT_HOOKS:
        caller = getattr(pm.hook, name)
        # pluggy has no public way to silence one hook of a plugin while
        # keeping its others (the logging plugin, for one, must still wrap
        # setup/call/teardown); this process is thrown away after the unit.
        caller._hookimpls[:] = [impl for impl in caller._hookimpls if impl.plugin in keep]


def _restart_capture(config: pytest.Config) -> None:
    """Give this worker capture files of its own.

    The fd-level capture files are inherited from the parent and share their
    file offset with it and with every other worker; a worker that wrote into
    them while another one read would mix their output.
    """
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return
    capman.stop_global_capturing()
    capman.start_global_capturing()
    capman.suspend_global_capture()


def prepare(config: pytest.Config, sender: Sender, controller: object) -> WorkerReporter:
    """Turn the freshly forked copy of the parent into a worker."""
    pm = config.pluginmanager
    pm.unregister(controller)
    _restart_capture(config)
    reporter = WorkerReporter(config, sender)
    pm.register(reporter, "isolator-worker")
    _route_report_hooks(config, reporter)
    reporter.live = True
    return reporter


def run_plan(plan: list[pytest.Item], sender: Sender) -> NoReturn:
    """Run the plan's items in order, report, and leave the process."""
    code = 0
    session = plan[0].session
    try:
        for index, item in enumerate(plan):
            nextitem = plan[index + 1] if index + 1 < len(plan) else None
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if session.shouldfail or session.shouldstop:
                break
        # A stop decided in the last teardown's report left fixtures standing.
        session._setupstate.teardown_exact(None)
        sender.send("done", None)
    except pytest.exit.Exception as exc:
        _teardown_quietly(session)
        sender.send("exit", exc.msg, exc.returncode)
    except KeyboardInterrupt:
        _teardown_quietly(session)
        sender.send("interrupt")
    except BaseException:
        sender.send("internal", traceback.format_exc())
        code = 3
    finally:
        _leave(sender, code)


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
