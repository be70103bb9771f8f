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
import collections
import contextlib
import os
import select
import signal
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: Requests: fork (with the worker's descriptors attached), wait, wait without blocking.
_FORK = b"F"
_WAIT = b"W"
_POLL = b"P"
_REQUEST = struct.Struct("<cq")
#: Replies: a value (PID, wait status, or -1: still running) and an errno.
_REPLY = struct.Struct("<qq")
_MAX_FDS = 16
_MAX_PAYLOAD = 1 << 16


class ZygoteGone(OSError):
    """The zygote is no longer there to ask (it died, or could not start)."""


#: In a worker: ``become(payload, fds)``, which never returns.
Become = Callable[[bytes, list[int]], NoReturn]


class Zygote:
    """The controller's handle on its zygote."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self.alive = True
        #: How it ended, once it has and was reaped.
        self.status: int | None = None
        #: Forks asked for whose answer has not been read.
        self._owed = 0
        #: Answers to forks, read while waiting for another answer.
        self._forks: collections.deque[tuple[int, int]] = collections.deque()

    @classmethod
    def start(
        cls,
        become: Become,
        prepare: Callable[[], None],
        after_fork: Callable[[], None],
        prctl: Callable[..., int] | None,
    ) -> Zygote:
        """Fork the zygote from this process. In the zygote, ``prepare``
        runs once; after each fork ``after_fork`` runs in the zygote and
        ``become`` in the worker. The caller blocks SIGINT and SIGTERM
        around this call (the zygote keeps them blocked for life: a Ctrl-C
        is the controller's to handle)."""
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
                _serve(theirs, become, after_fork)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        return cls(pid, ours)

    def ask_fork(self, payload: bytes, fds: Sequence[int]) -> None:
        """Ask for a new worker, without waiting: :meth:`forked` gives its
        PID. ``fds`` are handed to it (they stay open here until then)."""
        with _stop_signals_held():
            self._send(_REQUEST.pack(_FORK, 0) + payload, fds)
            self._owed += 1

    def forked(self) -> int:
        """The PID of the worker asked for first and not yet taken (blocks
        until the zygote has forked it); OSError with the zygote's errno if
        its fork failed."""
        with _stop_signals_held():
            if self._forks:
                value, error = self._forks.popleft()
            else:
                value, error = self._reply()
                self._owed -= 1
        if error:
            raise OSError(error, os.strerror(error))
        return value

    def wait(self, pid: int, pidfd: int, block: bool) -> int | None:
        """The wait status of worker ``pid``, reaping it; None if it is still
        running and ``block`` is False. ``pidfd`` says whether it ended
        without asking the zygote."""
        if not block:
            poller = select.poll()  # not select(): descriptors may pass 1024
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(0):
                return None
        with _stop_signals_held():
            self._send(_REQUEST.pack(_WAIT if block else _POLL, pid), ())
            # Answers come in order: those to forks asked for before, first.
            while self._owed:
                self._forks.append(self._reply())
                self._owed -= 1
            value, error = self._reply()
        if error:
            raise OSError(error, os.strerror(error))
        return None if value < 0 else value

    def reap_ended(self, workers: Sequence[tuple[int, int]]) -> dict[int, int]:
        """The wait status of each of ``workers`` (PID, pidfd) that has ended,
        reaping it: one wake-up of the zygote for all of them."""
        poller = select.poll()
        for _, pidfd in workers:
            poller.register(pidfd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(0)}
        pids = [pid for pid, pidfd in workers if pidfd in ready]
        statuses: dict[int, int] = {}
        if not pids:
            return statuses
        with _stop_signals_held():
            for pid in pids:
                self._send(_REQUEST.pack(_POLL, pid), ())
            while self._owed:
                self._forks.append(self._reply())
                self._owed -= 1
            for pid in pids:
                value, error = self._reply()
                if not error and value >= 0:
                    statuses[pid] = value
        return statuses

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

    def _reply(self) -> tuple[int, int]:
        if not self.alive:
            raise ZygoteGone("the zygote is gone")
        try:
            reply = self._sock.recv(_REPLY.size)
        except OSError as exc:
            self._gone()
            raise ZygoteGone(f"the zygote is gone: {exc}") from exc
        if len(reply) != _REPLY.size:
            self._gone()
            raise ZygoteGone("the zygote is gone")
        value, error = _REPLY.unpack(reply)
        return value, error

    def _gone(self) -> None:
        """The zygote died: wait until it is reaped, which is when the kernel
        has made its children (workers) ours, to be waited for here."""
        self.alive = False
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            self.status = os.waitpid(self.pid, 0)[1]

    def close(self) -> None:
        """Let the zygote leave (it has no workers left to wait for) and reap it."""
        if self.alive:
            self.alive = False
            self._sock.close()  # end of file: the zygote leaves
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def forget(self) -> None:
        """In a process forked from this one: let go of the socket."""
        self.alive = False
        self._sock.close()

    def stop(self) -> None:
        """End the zygote now, without waiting (this process is leaving)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.close()


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Ctrl-C between a question and the reading of its answer would leave
    the answer unread, and every later question would read the one before's."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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


def _serve(sock: socket.socket, become: Become, after_fork: Callable[[], None]) -> None:
    """The zygote's loop, until the controller closes the socket."""
    while True:
        message, fds = _receive(sock)
        if not message:
            return
        kind, pid = _REQUEST.unpack_from(message)
        value = error = 0
        if kind == _FORK:
            try:
                value = os.fork()
            except OSError as exc:
                error = exc.errno or 1
            if value == 0 and not error:
                sock.close()
                become(message[_REQUEST.size :], fds)
            for fd in fds:
                os.close(fd)
            if not error:
                # Also done in the worker; whichever runs first wins the race
                # with a kill of the group.
                with contextlib.suppress(OSError):
                    os.setpgid(value, value)
                after_fork()
        else:
            try:
                got, value = os.waitpid(pid, os.WNOHANG if kind == _POLL else 0)
                if got == 0:
                    value = -1
            except ChildProcessError as exc:
                error = exc.errno or 1
        sock.send(_REPLY.pack(value, error))
