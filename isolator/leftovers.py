"""Processes that tests started and left running: found, named and ended.

A process a test starts may leave its worker's process group (a new session,
a daemon's double fork), so ending the group misses it. Two things catch it:

- Each worker is a *child subreaper*: an orphan among its descendants is
  given to the worker rather than to init, so when the unit ends every
  process its tests started, however detached, is still below the worker,
  which ends them all (SIGTERM, then SIGKILL after a grace) before it leaves.
- A worker that dies without doing that (a crash, a timeout, killed by its
  parent) leaves its orphans to the pytest process, which is a subreaper
  too. Among its own children it ends only those it can prove came from a
  worker of this run: a process started with exec inherits the worker's tag
  in its environment, and a Python fork in a worker (or below it) writes its
  PID and start time into the run's fork registry. Anything else, such as a
  process a plugin of the pytest process forked, is never touched.

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
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    # Imported where used: it costs ~15 ms, and a run that isolates nothing
    # never needs it.
    import psutil

#: Environment variable every worker sets: "<run token> <worker label>".
TAG = "ISOLATOR_WORKER"
#: How long a left-over process gets between SIGTERM and SIGKILL.
GRACE_S = 2.0
_KILL_WAIT_S = 5.0
#: Rounds of looking again for processes that appeared while others were ended.
_ROUNDS = 20
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


def set_subreaper(prctl: Callable[..., int] | None, on: bool = True) -> bool:
    """Make orphaned descendants of this process its children (or stop); True if it worked."""
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


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


# Bound once: a test that forks may have patched these (see ``wire``).
_getpid = os.getpid
_write = os.write

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


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def started_at(pid: int) -> float | None:
    """When ``pid`` started, seconds on CLOCK_BOOTTIME (10 ms resolution)."""
    stat = _stat(pid)
    return None if stat is None else stat[1] / _CLOCK_TICKS


_WORKER = "worker"
_BELOW = "below"


class Registered(NamedTuple):
    """A process in the fork registry."""

    #: The worker it is, or was forked below.
    label: str
    #: It is that worker itself, not a process forked below it.
    worker: bool


class ForkRegistry:
    """Where Python forks below the workers write who they are.

    A memfd opened for appending, inherited by every worker: a line of a few
    bytes written with O_APPEND lands whole, whichever process writes it.
    """

    def __init__(self) -> None:
        # Close-on-exec: a process that execs carries the environment tag
        # instead; forks keep the descriptor whatever the flag says.
        self.fd = os.memfd_create("isolator-forks", os.MFD_CLOEXEC)
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_APPEND)
        self.label = ""
        #: What was read of the registry so far (every worker adds a line:
        #: each lookup reads only what was added since), by (PID, start time).
        self._read: dict[tuple[int, int], Registered] = {}
        self._offset = 0

    def enrol(self, label: str) -> None:
        """In worker ``label``, first thing after its fork: register the
        worker itself. If the zygote dies before it can tell the controller
        this worker's PID, the worker (killed with it) is the controller's
        child, and this is how the controller tells it from anyone else's."""
        self.label = label
        self._register(_WORKER)

    def watch_forks(self) -> None:
        """In a worker (enrolled): have every Python fork below it register itself."""
        os.register_at_fork(after_in_child=self._register)

    def _register(self, kind: str = _BELOW) -> None:
        pid = _getpid()
        stat = _stat(pid)
        if stat is not None:
            with contextlib.suppress(OSError):
                _write(self.fd, f"{pid} {stat[1]} {kind} {self.label}\n".encode())

    def lookup(self, pid: int) -> Registered | None:
        """What ``pid`` registered as, if it did (and is not another process
        that reused its PID)."""
        stat = _stat(pid)
        if stat is None:
            return None
        self._read_new()
        return self._read.get((pid, stat[1]))

    def _read_new(self) -> None:
        try:
            size = os.fstat(self.fd).st_size
            text = os.pread(self.fd, size - self._offset, self._offset) if size else b""
        except OSError:
            return
        # Only whole lines: one being written may show only in part.
        text = text[: text.rfind(b"\n") + 1]
        self._offset += len(text)
        for line in text.decode(errors="replace").splitlines():
            fields = line.split(" ", 3)
            if len(fields) == 4 and fields[0].isdigit() and fields[1].isdigit():
                pid, start, kind, label = fields
                self._read[int(pid), int(start)] = Registered(label, kind == _WORKER)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _command(process: psutil.Process) -> str:
    import psutil

    try:
        line = " ".join(process.cmdline()).replace("\n", " ") or process.name()
    except psutil.Error:
        return "(gone)"
    return line if len(line) <= 200 else line[:197] + "..."


class _Target:
    """A process being ended, held by a pidfd where one could be opened (so a
    PID reused meanwhile is never signalled) and by its start time otherwise."""

    def __init__(self, pid: int, start: int) -> None:
        self.pid = pid
        self.start = start
        self.pidfd: int | None = None
        with contextlib.suppress(OSError):
            self.pidfd = os.pidfd_open(pid)

    def signal(self, signum: int) -> str | None:
        """Send ``signum``; the reason it could not be sent, if it could not."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            elif self.alive():
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            return "could not be ended: not permitted to signal it"
        return None

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[0] not in ("Z", "X")

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _wait_all(targets: list[_Target], timeout_s: float) -> None:
    """Wait until every target has exited, or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        waiting = [target for target in targets if target.alive()]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return
        with_fd = [target.pidfd for target in waiting if target.pidfd is not None]
        if len(with_fd) == len(waiting):
            # poll, not select: descriptors may be numbered past 1024.
            poller = select.poll()
            for fd in with_fd:
                poller.register(fd, select.POLLIN)
            with contextlib.suppress(InterruptedError):
                poller.poll(left * 1000)
        else:
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.1)


def _reap(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def end(
    find: Callable[[], list[int]], test_of: Callable[[int, psutil.Process], str]
) -> list[Leftover]:
    """End the processes ``find`` lists: SIGTERM, then SIGKILL for those still
    running after :data:`GRACE_S`. Then look again, as many times as it
    takes: whatever appeared meanwhile (forks of a process that ignored
    SIGTERM) is killed at once. Zombies are only reaped."""
    import psutil

    handled: dict[int, Leftover] = {}
    everyone: list[int] = []
    for round_ in range(_ROUNDS):
        targets: list[_Target] = []
        described: dict[int, tuple[str, str]] = {}
        for pid in find():
            everyone.append(pid)
            stat = _stat(pid)
            if pid in handled or stat is None or stat[0] in ("Z", "X"):
                continue
            target = _Target(pid, stat[1])
            try:
                process = psutil.Process(pid)
                described[pid] = (_command(process), test_of(pid, process))
            except psutil.Error:
                target.close()
                continue
            targets.append(target)
        if not targets:
            break
        refused: dict[int, str] = {}
        first = signal.SIGTERM if round_ == 0 else signal.SIGKILL
        try:
            for target in targets:
                why = target.signal(first)
                if why is not None:
                    refused[target.pid] = why
            stubborn: set[int] = set()
            if first == signal.SIGTERM:
                _wait_all(targets, GRACE_S)
                for target in targets:
                    if target.alive() and target.pid not in refused:
                        stubborn.add(target.pid)
                        target.signal(signal.SIGKILL)
            _wait_all(targets, _KILL_WAIT_S)
        finally:
            for target in targets:
                target.close()
        for pid, (command, test) in described.items():
            if pid in refused:
                how = refused[pid]
            elif first == signal.SIGKILL:
                how = "killed with SIGKILL (it appeared while others were being ended)"
            elif pid in stubborn:
                how = f"killed with SIGKILL after ignoring SIGTERM for {GRACE_S:g}s"
            else:
                how = "ended with SIGTERM"
            handled[pid] = Leftover(pid, command, test, how)
        _reap(everyone)
    _reap(everyone)
    return list(handled.values())


def environ_of(process: psutil.Process) -> dict[str, str]:
    import psutil

    try:
        environ: dict[str, str] = process.environ()
    except psutil.Error:
        return {}
    return environ


def process(pid: int) -> psutil.Process | None:
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


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
