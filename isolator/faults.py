"""Words for how a worker ended, and the reports that stand in for lost ones."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from typing import Literal

import _pytest
import pluggy
import pytest

Phase = Literal["setup", "call", "teardown"]


def describe_status(wait_status: int | None) -> str:
    """``exited with code 3`` or ``was killed by signal 11 (SIGSEGV)``."""
    if wait_status is None:
        return "ended for an unknown reason"
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        dumped = " (core dumped)" if os.WCOREDUMP(wait_status) else ""
        return f"was killed by signal {number} ({name}){dumped}"
    if os.WIFEXITED(wait_status):
        return f"exited with code {os.WEXITSTATUS(wait_status)}"
    return f"ended with wait status {wait_status}"


@dataclasses.dataclass(frozen=True)
class Ending:
    """How a worker that did not finish its unit ended."""

    #: For the worker table: "timed out after 5s", "lost its pipe".
    short: str
    #: For the failed test: "worker w3 (PID 12) <sentence> while running ...".
    sentence: str


_TIMEOUT = re.compile(r"Timeout \((\d+):(\d\d):(\d\d)(?:\.(\d+))?\)!")


def timed_out_after(stacks: str) -> float | None:
    """The timeout faulthandler's watchdog reported, in seconds, if it fired."""
    match = _TIMEOUT.match(stacks)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + float(f"0.{fraction or 0}")


def how_it_ended(
    wait_status: int | None,
    *,
    stacks: str = "",
    fault: str | None = None,
    pipe_lost: bool = False,
    garbled: str | None = None,
    ceiling: str | None = None,
    parent: str | None = None,
    overdue_s: float | None = None,
) -> Ending:
    """The one account of an abnormal end that both the failed test and the
    worker table give, most telling cause first. ``parent``: how the zygote
    ended, if it did (it takes its workers with it)."""
    if garbled is not None:
        return Ending(
            "sent garbage",
            f"sent a message the parent could not read ({garbled}) and was killed",
        )
    if fault is not None:
        last = fault.strip().splitlines()[-1] if fault.strip() else "an error"
        return Ending(f"fault: {last}", f"failed outside the test's phases ({last})")
    if pipe_lost:
        return Ending(
            "lost its pipe",
            "lost its pipe to the parent (did the test close file descriptors it did not "
            "open?) and could not report",
        )
    timeout = timed_out_after(stacks)
    if timeout is None and overdue_s is not None:
        return Ending(
            f"timed out after {overdue_s:g}s",
            f"timed out after {overdue_s:g}s and was killed by the pytest process (its "
            "watchdog did not fire: the test cancelled it, replaced the process or stopped it)",
        )
    if timeout is not None:
        return Ending(
            f"timed out after {timeout:g}s", f"timed out after {timeout:g}s and was killed"
        )
    if ceiling is not None:
        # What the worker's memory cgroup saw (--worker-ceiling-kind=cgroup).
        return Ending("killed by the memory ceiling (cgroup)", ceiling)
    if killed_by(wait_status) == signal.SIGKILL and parent is not None:
        return Ending("died with the zygote", f"died with its parent, {parent}")
    if killed_by(wait_status) == signal.SIGKILL:
        return Ending("killed by SIGKILL (OOM killer?)", describe_status(wait_status))
    status = describe_status(wait_status)
    return Ending(status.removeprefix("was "), status)


def killed_by(wait_status: int | None) -> int | None:
    if wait_status is not None and os.WIFSIGNALED(wait_status):
        return os.WTERMSIG(wait_status)
    return None


#: How faulthandler starts a frame of pytest's machinery: a file in pytest's,
#: pluggy's or isolator's own package directory. (A test whose path merely
#: contains ``/isolator/``, such as a Python installed under /var/cache/isolator,
#: is the user's.)
_RUNNER_FRAMES = tuple(
    f'File "{os.path.dirname(path)}{os.sep}'
    for path in (_pytest.__file__, pluggy.__file__, __file__)
    if path is not None
)


def trim_fault_stacks(text: str) -> str:
    """faulthandler's dump, cut where the test's own frames give way to
    pytest's machinery (most recent call comes first)."""
    kept: list[str] = []
    in_runner = False
    for line in text.rstrip().splitlines():
        stripped = line.strip()
        if stripped.startswith("File "):
            if in_runner:
                continue
            if stripped.startswith(_RUNNER_FRAMES):
                in_runner = True
                kept.append("  ...")
                continue
        else:
            in_runner = False
        kept.append(line)
    return "\n".join(kept)


def stand_in_report(
    item: pytest.Item,
    when: Phase,
    longrepr: str | None,
    sections: list[tuple[str, str]] | None = None,
) -> pytest.TestReport:
    """A report for a phase the worker did not live to report.

    ``longrepr`` None means the phase is reported as passed (the teardown
    that follows a crash in call, so that junit xml closes the test case).
    """
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords=dict.fromkeys(item.keywords, 1),
        outcome="passed" if longrepr is None else "failed",
        longrepr=longrepr,
        when=when,
        sections=sections or [],
        user_properties=list(item.user_properties),
    )


@dataclasses.dataclass(eq=False)
class InFlight:
    """How far pytest has seen one item's replay: whether its logstart was
    logged, and the outcome of each phase reported (``logfinish``: "done")."""

    item: pytest.Item
    started: bool = False
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)

    def unreported_phase(self) -> Phase | None:
        """The phase a failure in flight belongs to; None if every phase that
        runs has been reported."""
        if "rerun" in self.outcomes.values():
            # pytest-rerunfailures reported an attempt, not the verdict.
            return "setup" if self.outcomes.get("setup") == "rerun" else "call"
        if "setup" not in self.outcomes:
            return "setup"
        if self.outcomes["setup"] == "passed" and "call" not in self.outcomes:
            return "call"
        if "teardown" not in self.outcomes:
            return "teardown"
        return None

    def fail(self, longrepr: str, sections: list[tuple[str, str]] | None = None) -> bool:
        """Fail the phase in flight with ``longrepr`` and close the item as
        pytest would, so that it ends with exactly one verdict. False if every
        phase had been reported (the verdict stands; nothing is logged but
        what closes the item)."""
        item = self.item
        ihook = item.ihook
        if not self.started:
            ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            self.started = True
        phase = self.unreported_phase()
        if phase is not None:
            report = stand_in_report(
                item, phase, longrepr, [(f"{name} {phase}", text) for name, text in sections or []]
            )
            ihook.pytest_runtest_logreport(report=report)
            self.outcomes[phase] = report.outcome
            if phase != "teardown":
                ihook.pytest_runtest_logreport(report=stand_in_report(item, "teardown", None))
                self.outcomes["teardown"] = "passed"
        if "logfinish" not in self.outcomes:
            ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            self.outcomes["logfinish"] = "done"
        return phase is not None
