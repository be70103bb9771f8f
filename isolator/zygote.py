"""The zygote: a still copy of the controller that forks the workers.

Forking the controller itself costs it on every worker. After each fork its
pages are shared with that worker, and with a standby always waiting there is
always a worker sharing them, so every page the controller writes while it
replays a test (reference counts of pytest's hooks, the terminal reporter,
the items) is copied first: measured on 2000 trivial tests, 855 copied pages
and 4.8 ms of the controller's CPU per worker, and a fifth of the whole run's
CPU. The fork itself (copying the page tables) was also the controller's.

So the controller forks once, after collection, and the copy (the zygote)
does nothing but fork workers on request and collect their exit status. It
writes almost nothing, so its pages stay shared and its huge pages whole, and
the controller pays each of its pages once, not once per worker. The fork
happens in the zygote, on the other core, while the controller replays.

The workers are the zygote's children. The controller still holds a pidfd on
each (readable once it ends) and signals its process group as before; the
zygote reaps a worker only when the controller asks, so a worker's PID (and
process group ID) cannot be reused while the controller may still signal it.
A worker's parent-death signal ties it to the zygote, and the zygote's to the
controller: if the controller dies, everything below it goes.

Used in both processes: :class:`Zygote` in the controller, :func:`_serve` in
the zygote.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NoReturn, overload

_PR_SET_PDEATHSIG = 1
#: Requests: fork (with the worker's descriptors attached), wait, wait without blocking.
_FORK = b"F"
_WAIT = b"W"
_POLL = b"P"
_REQUEST = struct.Struct("<cq")
#: Replies: the request's kind, the PID (of the worker forked, or waited
#: for), a wait status (-1: still running) and an errno.
_REPLY = struct.Struct("<cqqq")
_MAX_FDS = 16
#: How long a worker forked just before its zygote died may take to enrol
#: (see :meth:`Zygote._wait_readable`).
ENROL_WAIT_S = 5
_MAX_PAYLOAD = 1 << 16


class ZygoteGone(OSError):
    """The zygote is no longer there to ask (it died, or could not start)."""


#: In a worker: ``become(payload, fds)``, which never returns.
Become = Callable[[bytes, list[int]], NoReturn]
#: In a worker, first: ``enrol(payload)`` (see :meth:`Zygote.start`).
Enrol = Callable[[bytes], None]


class Zygote:
    """The controller's handle on its zygote."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self.alive = True
        #: Readable once the zygote has ended (None where pidfds are not to be had).
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)
        #: How it ended, once it has and was reaped.
        self.status: int | None = None
        #: Answers to forks not yet taken, by the number they were asked
        #: with: (PID, errno).
        self._forks: dict[int, tuple[int, int]] = {}
        #: Workers asked about whose answer has not been read.
        self._asked: set[int] = set()
        #: Wait statuses read and not yet taken, by PID (the zygote reaped them).
        self._statuses: dict[int, int] = {}

    @classmethod
    def start(
        cls,
        become: Become,
        enrol: Enrol,
        prepare: Callable[[], None],
        after_fork: Callable[[], None],
        prctl: Callable[..., int] | None,
    ) -> Zygote:
        """Fork the zygote from this process. In the zygote, ``prepare``
        runs once; after each fork ``after_fork`` runs in the zygote and
        ``enrol``, then ``become``, in the worker. ``enrol`` runs while the
        worker still holds the zygote's socket: the controller learns that
        the zygote died (end of file) only once every worker it forked has
        enrolled. The caller blocks SIGINT and SIGTERM around this call (the
        zygote keeps them blocked for life: a Ctrl-C is the controller's to
        handle)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        controller = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = 70
            try:
                ours.close()
                # Out of the terminal's process group: Ctrl-C is for the
                # controller, which then ends the workers itself.
                os.setpgid(0, 0)
                if prctl is not None:
                    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != controller:
                    os._exit(1)  # the controller died before we could follow it
                prepare()
                _serve(theirs, become, enrol, after_fork)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        return cls(pid, ours)

    # Every answer names what it answers and is recorded as soon as it is
    # read, whoever asked: a KeyboardInterrupt anywhere in a question
    # (delivered to any thread, so no signal mask keeps it out) leaves no
    # answer to be taken for another's. Workers asked for by a question that
    # was interrupted are ended by the zygote when it leaves.

    def ask_fork(self, number: int, payload: bytes, fds: Sequence[int]) -> None:
        """Ask for new worker ``number``, without waiting: :meth:`forked`
        gives its PID. ``fds`` are handed to it (they stay open here until then)."""
        self._send(_REQUEST.pack(_FORK, number) + payload, fds)

    def forked(self, number: int) -> int:
        """The PID of worker ``number`` (blocks until the zygote has forked
        it); OSError with the zygote's errno if its fork failed; ZygoteGone
        if the zygote died before answering."""
        while number not in self._forks:
            self._read()
        pid, error = self._forks.pop(number)
        if error:
            raise OSError(error, os.strerror(error))
        # A status kept for an earlier process with this PID is stale now.
        self._statuses.pop(pid, None)
        return pid

    def untaken(self) -> set[int]:
        """PIDs of the workers it forked whose answers were read but not yet taken."""
        return {pid for pid, error in self._forks.values() if not error}

    def has_reaped(self, pid: int) -> bool:
        """The zygote reaped worker ``pid``: its PID may belong to another process now."""
        return pid in self._statuses

    @overload
    def wait(self, pid: int, pidfd: int, block: Literal[True]) -> int: ...
    @overload
    def wait(self, pid: int, pidfd: int, block: bool) -> int | None: ...

    def wait(self, pid: int, pidfd: int, block: bool) -> int | None:
        """The wait status of worker ``pid``, reaping it; None if it is still
        running and ``block`` is False. ``pidfd`` says whether it ended
        without asking the zygote."""
        if pid in self._statuses:
            return self._statuses.pop(pid)
        if not block and not _readable([pidfd]):
            return None
        kind = _WAIT if block else _POLL
        while True:
            if pid not in self._asked:
                self._send(_REQUEST.pack(kind, pid), ())
                self._asked.add(pid)
            while pid in self._asked:
                self._read()
            if pid in self._statuses:
                return self._statuses.pop(pid)
            if not block:
                return None
            # What came was the answer to an earlier question (interrupted)
            # that asked without blocking: ask again, blocking.
            kind = _WAIT

    def reap_ended(self, workers: Sequence[tuple[int, int]]) -> dict[int, int]:
        """The wait status of each of ``workers`` (PID, pidfd) that has ended,
        reaping it: one wake-up of the zygote for all of them."""
        ready = _readable([pidfd for _, pidfd in workers])
        pids = [pid for pid, pidfd in workers if pidfd in ready or pid in self._statuses]
        for pid in pids:
            if pid not in self._asked and pid not in self._statuses:
                self._send(_REQUEST.pack(_POLL, pid), ())
                self._asked.add(pid)
        while self._asked.intersection(pids):
            self._read()
        return {pid: self._statuses.pop(pid) for pid in pids if pid in self._statuses}

    def _send(self, request: bytes, fds: Sequence[int]) -> None:
        if not self.alive:
            raise ZygoteGone("the zygote is gone")
        try:
            if fds:
                socket.send_fds(self._sock, [request], list(fds))
            else:
                self._sock.send(request)
        except OSError as exc:
            self._gone()
            raise ZygoteGone(f"the zygote is gone: {exc}") from exc

    def _read(self, flags: int = 0) -> bool:
        """Read one answer and record it; False if none was waiting (with
        MSG_DONTWAIT in ``flags``)."""
        if not self.alive:
            raise ZygoteGone("the zygote is gone")
        if not flags & socket.MSG_DONTWAIT:
            self._wait_readable()
        # An answer read and then lost to a KeyboardInterrupt raised before
        # it was recorded would leave the next question waiting for ever.
        with _stop_signals_deferred():
            try:
                reply = self._sock.recv(_REPLY.size, flags)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._gone()
                raise ZygoteGone(f"the zygote is gone: {exc}") from exc
            if len(reply) != _REPLY.size:
                self._gone()
                raise ZygoteGone("the zygote is gone")
            self._record(reply)
        return True

    def _wait_readable(self) -> None:
        """Wait until an answer (or the end of file) can be read. The end of
        file comes once no process holds the zygote's end of the socket, and
        a worker it just forked holds it until it has enrolled: if the zygote
        died, such a worker gets :data:`ENROL_WAIT_S` to let go, and if it
        does not (stuck in a fork hook of the tests'), the zygote counts as
        gone without it, rather than the run waiting for ever."""
        if self._pidfd is None:
            return
        sock = self._sock.fileno()
        if sock in _readable([sock, self._pidfd], timeout_s=None):
            return
        try:
            waited = _readable([sock], timeout_s=ENROL_WAIT_S)
        except BaseException:
            # Ctrl-C: the zygote is dead all the same, and shutting down
            # must not ask it (and wait) again.
            self._gone()
            raise
        if not waited:
            self._gone()
            raise ZygoteGone(
                "the zygote is gone, and a worker it forked is stuck before it could start"
            )

    def _record(self, reply: bytes) -> None:
        kind, pid, status, error = _REPLY.unpack(reply)
        if kind == _FORK:
            self._forks[status] = (pid, error)  # ``status`` carries the number
            return
        self._asked.discard(pid)
        if error:
            # Not the zygote's child (any more: a question asked twice, the
            # first interrupted, was answered the first time).
            self._statuses.setdefault(pid, signal.SIGKILL)
        elif status >= 0:
            self._statuses[pid] = status

    def _gone(self) -> None:
        """The zygote died: keep the answers it sent before it did, then wait
        until it is reaped, which is when the kernel has made its children
        (workers, killed with it) ours, to be waited for here."""
        if self.alive:
            with contextlib.suppress(OSError, ValueError, struct.error):
                while True:
                    reply = self._sock.recv(_REPLY.size, socket.MSG_DONTWAIT)
                    if len(reply) != _REPLY.size:
                        break
                    self._record(reply)
        self.alive = False
        self._asked.clear()
        self._sock.close()
        self._close_pidfd()
        with contextlib.suppress(ChildProcessError):
            self.status = os.waitpid(self.pid, 0)[1]

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        """Let the zygote leave (it ends and reaps any worker it still has) and reap it."""
        if self.alive:
            self.alive = False
            self._sock.close()  # end of file: the zygote leaves
            self._close_pidfd()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def forget(self) -> None:
        """In a process forked from this one: let go of the socket."""
        self.alive = False
        self._sock.close()
        self._close_pidfd()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as they
    would have. (A signal mask would not do: the kernel may hand the signal
    to another thread, and Python runs its handler in the main thread
    anyway. Handlers can be swapped only in the main thread; elsewhere
    nothing is deferred.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # None: a handler not set from Python, which cannot be put back; left alone.
    saved = {
        stop: handler for stop in _STOP_SIGNALS if (handler := signal.getsignal(stop)) is not None
    }
    for stop in saved:
        signal.signal(stop, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for stop, handler in saved.items():
            signal.signal(stop, handler)
        for signum in caught:
            # Called here rather than raised again: a signal raised again is
            # handled at the caller's next check, which may be an instruction
            # with no line number, and pytest cannot show such a traceback.
            handler = saved[signal.Signals(signum)]
            if callable(handler):
                handler(signum, sys._getframe())
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _readable(fds: Sequence[int], timeout_s: float | None = 0) -> set[int]:
    """Those of ``fds`` that are readable (a pidfd: its process ended) now,
    or once one is, waiting up to ``timeout_s`` (None: for as long as it takes)."""
    poller = select.poll()  # not select(): descriptors may pass 1024
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(None if timeout_s is None else timeout_s * 1000)}


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """A request and the descriptors that came with it (close-on-exec: a
    test's subprocess must not inherit the worker's pipes)."""
    fds = array.array("i")
    message, ancillary, _, _ = sock.recvmsg(
        _MAX_PAYLOAD, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return message, list(fds)


def _serve(
    sock: socket.socket, become: Become, enrol: Enrol, after_fork: Callable[[], None]
) -> None:
    """The zygote's loop, until the controller closes the socket."""
    children: set[int] = set()
    while True:
        message, fds = _receive(sock)
        if not message:
            _end_children(children)
            return
        kind, pid = _REQUEST.unpack_from(message)
        status = error = 0
        if kind == _FORK:
            status = pid  # the number the worker was asked with, echoed
            try:
                pid = os.fork()
            except OSError as exc:
                error = exc.errno or 1
            if pid == 0 and not error:
                enrol(message[_REQUEST.size :])
                sock.close()
                become(message[_REQUEST.size :], fds)
            for fd in fds:
                os.close(fd)
            if not error:
                children.add(pid)
                # Also done in the worker; whichever runs first wins the race
                # with a kill of the group.
                with contextlib.suppress(OSError):
                    os.setpgid(pid, pid)
                after_fork()
        else:
            try:
                got, status = os.waitpid(pid, os.WNOHANG if kind == _POLL else 0)
                if got == 0:
                    status = -1
                else:
                    children.discard(pid)
            except ChildProcessError as exc:
                error = exc.errno or 1
        sock.send(_REPLY.pack(kind, pid, status, error))


def _end_children(children: set[int]) -> None:
    """At the end: workers the controller never took (its question was
    interrupted) are killed and reaped here, not left to it as zombies."""
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
