"""Processes that tests started and left running: found, named and ended.

A process a test starts may leave its worker's process group (a new session,
a daemon's double fork), so ending the group misses it. Two things catch it:

- Each worker is a *child subreaper*: an orphan among its descendants is
  given to the worker rather than to init, so when the unit ends every
  process its tests started, however detached, is still below the worker,
  which ends them all (SIGTERM, then SIGKILL after a grace) before it leaves.
- A worker that dies without doing that (a crash, a timeout, killed by its
  parent) leaves its orphans to the pytest process, which is a subreaper
  too. Among its own children it ends only the ones it can prove came from a
  worker: those that carry the worker's tag in their environment (anything
  started with exec inherits it), and forks that never called exec (they
  run the pytest process's own command line). A process a plugin of the
  pytest process started is never touched.

Used in the worker and in the controller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: it costs ~15 ms, and a run that isolates nothing
    # never needs it.
    import psutil

#: Environment variable every worker sets: "<run token> <worker label>".
TAG = "ISOLATOR_WORKER"
#: How long a left-over process gets between SIGTERM and SIGKILL.
GRACE_S = 2.0
_KILL_WAIT_S = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36


@dataclasses.dataclass(frozen=True)
class Leftover:
    """One process that was still running when its worker's unit ended."""

    pid: int
    #: Its command line, shortened.
    command: str
    #: The test during which it was started, as far as can be told ("" if not).
    test: str
    #: How it was ended.
    ended: str

    def describe(self) -> str:
        during = f", started during {self.test}" if self.test else ""
        return f"PID {self.pid} {self.command}{during}: {self.ended}"


def become_subreaper(prctl: Callable[..., int] | None) -> bool:
    """Make orphaned descendants of this process its children; True if it worked."""
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children_of(pid: int) -> list[int]:
    """Direct children of process ``pid``, read from /proc (every thread's list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(field) for field in f.read().split())
        except (OSError, ValueError):
            continue
    return found


_HAVE_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def children(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    if _HAVE_CHILDREN_FILES:
        return _children_of(pid)
    # Kernels built without CONFIG_PROC_CHILDREN: psutil walks all of /proc.
    import psutil

    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children()]
    return []


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` and everything below them, parents before children."""
    order: list[int] = []
    seen: set[int] = set()
    pending = list(roots)
    while pending:
        pid = pending.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        pending.extend(children(pid))
    return order


def started_at(pid: int) -> float | None:
    """When ``pid`` started, seconds on CLOCK_BOOTTIME (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19]) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # gone
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


def _command(process: psutil.Process) -> str:
    import psutil

    try:
        line = " ".join(process.cmdline()).replace("\n", " ") or process.name()
    except psutil.Error:
        return "(gone)"
    return line if len(line) <= 200 else line[:197] + "..."


def _wait_all(pidfds: dict[int, int], timeout_s: float) -> set[int]:
    """Wait until the processes behind ``pidfds`` exit; the pids that did."""
    exited: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(exited) < len(pidfds):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        waiting = {fd: pid for pid, fd in pidfds.items() if pid not in exited}
        ready, _, _ = select.select(list(waiting), [], [], left)
        exited.update(waiting[fd] for fd in ready)
    return exited


def _reap(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def end(pids: list[int], test_of: Callable[[int, psutil.Process], str]) -> list[Leftover]:
    """End ``pids``: SIGTERM, then SIGKILL those still running after
    :data:`GRACE_S`. Zombies are only reaped (they run nothing). Signals go
    through pidfds, so a PID reused meanwhile is never hit."""
    import psutil

    pidfds: dict[int, int] = {}
    described: dict[int, tuple[str, str]] = {}
    zombies: list[int] = []
    for pid in pids:
        if _is_zombie(pid):
            zombies.append(pid)
            continue
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except OSError:
            continue
        process = psutil.Process(pid)
        described[pid] = (_command(process), test_of(pid, process))
    try:
        for fd in pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
        on_term = _wait_all(pidfds, GRACE_S)
        stubborn = {pid: fd for pid, fd in pidfds.items() if pid not in on_term}
        for fd in stubborn.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        _wait_all(stubborn, _KILL_WAIT_S)
    finally:
        for fd in pidfds.values():
            os.close(fd)
    _reap([*zombies, *pidfds])
    return [
        Leftover(
            pid,
            command,
            test,
            f"killed with SIGKILL after ignoring SIGTERM for {GRACE_S:g}s"
            if pid in stubborn
            else "ended with SIGTERM",
        )
        for pid, (command, test) in described.items()
    ]


def process(pid: int) -> psutil.Process:
    import psutil

    return psutil.Process(pid)


def environ_of(process: psutil.Process) -> dict[str, str]:
    import psutil

    try:
        environ: dict[str, str] = process.environ()
    except psutil.Error:
        return {}
    return environ


def _inherited_current_test() -> str:
    """PYTEST_CURRENT_TEST as this process was started with: set when pytest
    itself runs inside a test (pytester), and then it names that outer test."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return ""
    for entry in block.split(b"\0"):
        if entry.startswith(b"PYTEST_CURRENT_TEST="):
            return entry.split(b"=", 1)[1].decode("utf-8", "replace")
    return ""


def test_from_environ(process: psutil.Process) -> str:
    """The test during which ``process`` was started with exec, read from the
    PYTEST_CURRENT_TEST it inherited ("" if it did not inherit one of ours)."""
    test = environ_of(process).get("PYTEST_CURRENT_TEST", "")
    return "" if test == _inherited_current_test() else test
