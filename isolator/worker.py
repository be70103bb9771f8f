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

from isolator.wire import Receiver, Sender

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
    """Forwards the reporting hooks of a worker to its parent.

    Registered in the parent at configure time, where it stays idle; it goes
    live in a worker once the worker has a pipe to write to.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.sender = Sender(-1)
        # Registering a plugin replays historic hooks (warnings recorded during
        # collection); those belong to the parent, and the reporter is idle there.
        self.live = False

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        if self.live:
            self.sender.send("logstart", nodeid, location)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.live:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.sender.send("report", data)
        # Flushed per report so a crash in the next phase still leaves the
        # parent knowing which phases finished.
        self.sender.flush()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        if not self.live:
            return
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


def prepare(config: pytest.Config, reporter: WorkerReporter, sender: Sender) -> None:
    """Turn the freshly forked copy of the parent into a worker.

    Kept to the least that works: every page this touches is copied out of
    the parent's memory (copy-on-write), and under ``--isolate=test`` that
    happens once per test. So the reporter is registered in the parent (idle
    there) rather than here, and the capture files are the parent's own: only
    one worker is ever inside a test phase, and each phase leaves the files
    read and truncated for the next.
    """
    _route_report_hooks(config, reporter)
    reporter.sender = sender
    reporter.live = True


def wait_for_go(go_fd: int, session: pytest.Session) -> bool:
    """Block until the parent says this worker's unit starts; False if the
    parent closed the pipe instead (the worker was forked in advance and is
    not needed)."""
    receiver = Receiver(go_fd)
    while True:
        message = receiver.pop()
        if message is not None:
            break
        if not receiver.fill():
            return False
    _, testsfailed = message
    # Failures counted by the parent since this worker was forked, so that
    # --maxfail stops here exactly where it stops there.
    session.testsfailed = testsfailed
    os.close(go_fd)
    return True


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
