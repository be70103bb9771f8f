"""Runs in the controller: the handle on one forked worker.

It owns the worker's end of three pipes and a pidfd: the reports the worker
streams (read here), the orders the controller gives it (written here), the
memfd its faulthandler writes fatal stacks into, and the pidfd that says when
it ended. The worker is the zygote's child, and the zygote reaps it when asked
(see ``zygote``). Invariant: a worker's process group is only ever signalled
while the worker is unreaped, so its PID cannot have been reused.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import Literal, overload

import pytest

from isolator import faults, worker
from isolator.beacon import Beacon
from isolator.cgroup import Ending, WorkerCgroup
from isolator.wire import Message, Receiver, Sender
from isolator.zygote import Zygote, ZygoteGone


class WorkerProcess:
    """The controller's handle on one forked worker."""

    def __init__(
        self,
        label: str,
        pid: int,
        read_fd: int,
        go_fd: int,
        fault_fd: int,
        beacon: Beacon,
        zygote: Zygote,
        stillborn_status: int | None = None,
    ) -> None:
        """With ``stillborn_status``, the worker died as it was made, and
        ``pid`` and the status are those of what died in its place (the zygote)."""
        self.label = label
        self.pid = pid
        #: Its parent, which reaps it.
        self.zygote = zygote
        #: The items this worker runs, once it has its orders.
        self.plan: list[pytest.Item] = []
        #: Indices in ``plan`` before which the worker waits for the word to go on.
        self.gaps: frozenset[int] = frozenset()
        #: More items may be fed to the worker after the plan (pytest-xdist).
        self.open_ended = False
        #: Index in ``plan`` of the next item whose reports we expect.
        self.pos = 0
        #: The worker said it is done and is leaving.
        self.done = False
        self.started = False
        self.wait_status: int | None = None
        #: What the worker's faulthandler wrote before it died, once reaped.
        self.fault_stacks = ""
        #: Why the worker said it leaves early (recycled), if it did.
        self.leave_reason: str | None = None
        #: The last test whose reports were replayed.
        self.last_nodeid = ""
        #: The worker's memory cgroup (the cgroup ceiling), and what it saw,
        #: read when the worker is reaped; the cgroup is removed then.
        self.cgroup: WorkerCgroup | None = None
        self.cgroup_ending: Ending | None = None
        #: What the worker said went wrong outside the test phases, if it did.
        self.fault: str | None = None
        #: Why the parent could not read what the worker sent, if it could not.
        self.garbled: str | None = None
        #: The timeout, if the pytest process killed it for running past it.
        self.overdue_s: float | None = None
        self.beacon = beacon
        self.receiver = Receiver(read_fd)
        self.go_fd = go_fd
        self.fault_fd = fault_fd
        if stillborn_status is not None:
            self.pidfd = -1
            self.selector = selectors.DefaultSelector()
            self.wait_status = stillborn_status
            self._close()
            return
        self.pidfd = os.pidfd_open(pid)
        try:
            self.selector = selectors.DefaultSelector()
        except BaseException:
            os.close(self.pidfd)
            raise
        self.selector.register(read_fd, selectors.EVENT_READ, "pipe")
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")

    def __repr__(self) -> str:
        if self.wait_status is None:
            return f"<worker {self.label} running with PID {self.pid}>"
        return f"<worker {self.label} (PID {self.pid}) {faults.describe_status(self.wait_status)}>"

    @property
    def killed_by_ceiling(self) -> bool:
        """The kernel killed it for going over the cgroup ceiling."""
        return (
            self.cgroup_ending is not None
            and self.cgroup_ending.oom_kills > 0
            and faults.killed_by(self.wait_status) == signal.SIGKILL
        )

    @property
    def exited(self) -> bool:
        return self.wait_status is not None

    @property
    def spent(self) -> bool:
        """Nothing more will come from this worker: it exited and we have
        read all it wrote. (A worker runs ahead of the replay, so it may
        well have exited while reports of earlier tests still wait here.)"""
        return self.exited and not self.receiver.pending()

    def ending(self) -> faults.Ending:
        """How this worker ended, once it has (see :func:`faults.how_it_ended`)."""
        cgroup = self.cgroup_ending
        return faults.how_it_ended(
            self.wait_status,
            overdue_s=self.overdue_s,
            stacks=self.fault_stacks,
            fault=self.fault,
            pipe_lost=self.beacon.pipe_lost,
            garbled=self.garbled,
            ceiling=cgroup.describe() if cgroup is not None and self.killed_by_ceiling else None,
            parent=self.zygote_ending(),
        )

    def zygote_ending(self) -> str | None:
        """How the zygote that forked this worker ended (PID and status), if it did."""
        zygote = self.zygote
        if zygote.alive or zygote.status is None:
            return None
        return f"the zygote (PID {zygote.pid}), which {faults.describe_status(zygote.status)}"

    def began(self, position: int | None) -> bool:
        """Whether the worker began the item at ``position`` in ``session.items``
        (it may have died before saying so on the pipe)."""
        return position is not None and self.beacon.position == position

    def expects(self, item: pytest.Item) -> bool:
        return (
            not self.spent
            and not self.done
            and self.pos < len(self.plan)
            and self.plan[self.pos] is item
        )

    def tell(self, *message: object) -> None:
        if self.go_fd < 0:
            return  # reaped: it hears nothing any more (nor did it wait to)
        sender = Sender(self.go_fd)
        sender.send(*message)
        # A worker that died while it waited is found by the replay.
        with contextlib.suppress(BrokenPipeError):
            sender.flush()

    def go(self, orders: worker.Orders, plan: list[pytest.Item]) -> None:
        """Give a waiting worker its unit."""
        self.plan = plan
        self.gaps = orders.gaps
        self.open_ended = orders.open_ended
        self.tell("go", orders)
        self.started = True

    def resume(self, testsfailed: int) -> None:
        """Let a worker waiting at a gap in its plan run on."""
        self.tell("resume", testsfailed)

    @property
    def at_gap(self) -> bool:
        """The worker waits before its next item (other workers run the tests
        in between)."""
        return self.pos in self.gaps and not self.spent and not self.done

    def next_message(
        self, sample_every_s: float | None = None, on_sample: Callable[[], None] | None = None
    ) -> Message | None:
        """The next message from the worker; None once it has exited and
        everything it wrote has been read. While waiting, ``on_sample`` is
        called every ``sample_every_s`` seconds."""
        while True:
            message = self.receiver.pop()
            if message is not None:
                return message
            if self.exited:
                return None
            ready = self.selector.select(sample_every_s)
            if not ready and on_sample is not None:
                on_sample()
            self._handle(ready)

    def _reap(self) -> None:
        """Collect the exit status of a worker known to have ended."""
        self.receiver.drain()
        self._kill_group()
        status = self._wait(block=True)
        self.fault_stacks = self._read_fault_stacks()
        self.reaped(status)

    def try_reap(self) -> bool:
        """Reap the worker if it has exited; never blocks."""
        if self.exited:
            return True
        status = self._wait(block=False)
        if status is None:
            return False
        self.reaped(status)
        return True

    def reaped(self, status: int) -> None:
        """It was reaped (by :meth:`try_reap`, or with others), with ``status``."""
        self.wait_status = status
        self._close()
        self._end_cgroup()

    @overload
    def _wait(self, block: Literal[True]) -> int: ...
    @overload
    def _wait(self, block: bool) -> int | None: ...

    def _wait(self, block: bool) -> int | None:
        """Reap the worker: its wait status, or None if it still runs."""
        if self.zygote.alive or self.zygote.has_reaped(self.pid):
            with contextlib.suppress(ZygoteGone):
                return self.zygote.wait(self.pid, self.pidfd, block)
        # Its zygote died (and the kernel killed the worker: its parent-death
        # signal): it has been made this process's child (a subreaper).
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            # Not ours either (this process is no subreaper): it is gone, and
            # how it ended is known only to whoever reaped it.
            return signal.SIGKILL
        return None if pid == 0 else status

    def _end_cgroup(self) -> None:
        # The worker is reaped; its process group was sent SIGKILL when it
        # was told to stop, and removing the cgroup ends whatever else is
        # still in it.
        if self.cgroup is not None:
            self.cgroup_ending = self.cgroup.finish()
            self.cgroup = None

    def _read_fault_stacks(self) -> str:
        try:
            raw = os.pread(self.fault_fd, 1 << 20, 0)
        except OSError:
            return ""
        return faults.trim_fault_stacks(raw.decode("utf-8", "replace"))

    def _kill_group(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker's process group, and to the worker
        itself if a test moved it to another group (setpgid)."""
        # While the worker is unreaped its PID, and so its process group ID,
        # cannot be reused: this reaches only it and what it left behind.
        if self.zygote.has_reaped(self.pid):
            return
        try:
            moved = os.getpgid(self.pid) != self.pid
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # (Its group may be empty by now, or hold what it left behind.)
            os.killpg(self.pid, signum)
        if moved and self.pidfd >= 0:
            # Only then: sent twice, a SIGINT could be handled twice.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self.pidfd, signum)

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the worker to end; True if it did."""
        if self.exited:
            return True
        deadline = time.monotonic() + timeout_s
        while not self.exited:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._handle(self.selector.select(left))
        return True

    def _handle(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        # The pipe first: reaping closes it (and reads what is left in it).
        for key, _ in sorted(ready, key=lambda event: event[0].data != "pipe"):
            if key.data == "pipe":
                if not self.receiver.fill():
                    # End of file: the worker is leaving. Its exit is what we
                    # wait for now; the pipe has nothing more.
                    self.selector.unregister(key.fd)
            else:
                self._reap()

    def current_nodeid(self) -> str:
        return self.plan[self.pos].nodeid if self.pos < len(self.plan) else "(between tests)"

    def stop(self) -> None:
        """End the worker and everything it started, without waiting for it."""
        if not self.exited:
            self._kill_group()

    def _close(self) -> None:
        self.selector.close()
        for fd in (self.receiver.fd, self.pidfd, self.fault_fd, self.go_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.go_fd = -1
