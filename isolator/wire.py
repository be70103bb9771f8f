"""Framing for the pipe between a worker and the process that forked it.

Each message is a pickled tuple ``(kind, *fields)`` behind a 4-byte length.
Both ends are the same interpreter image (one is a fork of the other), so
pickle is safe and the fastest codec we have; reports themselves are turned
into plain dicts by pytest's ``pytest_report_to_serializable`` hook first, so
plugins that extend reports (subtests, xdist) keep working.

The worker batches messages and writes them in one ``os.write`` per flush; the
parent reads whatever is there and splits frames, so a test that produces
megabytes of captured output costs a few large writes, not many small ones.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
from typing import Any

_HEADER = struct.Struct("<I")
_READ_CHUNK = 1 << 16

Message = tuple[Any, ...]


class Sender:
    """Worker side: buffer messages, write them out on ``flush``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending: list[bytes] = []

    def send(self, *message: Any) -> None:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._pending.append(_HEADER.pack(len(body)))
        self._pending.append(body)

    def flush(self) -> None:
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            data = data[written:]


class Receiver:
    """Parent side: accumulate bytes from the pipe and yield whole messages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()
        self._messages: list[Message] = []
        self._pos = 0
        self.eof = False

    def fill(self) -> bool:
        """Read what the pipe holds (the fd must be readable); False at end of file."""
        try:
            chunk = os.read(self.fd, _READ_CHUNK)
        except InterruptedError:
            return True
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return True
            raise
        if not chunk:
            self.eof = True
            return False
        self._buffer += chunk
        self._split()
        return True

    def _split(self) -> None:
        buf = self._buffer
        offset = 0
        size = len(buf)
        while size - offset >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buf, offset)
            end = offset + _HEADER.size + length
            if end > size:
                break
            self._messages.append(pickle.loads(buf[offset + _HEADER.size : end]))
            offset = end
        if offset:
            del buf[:offset]

    def pop(self) -> Message | None:
        """The next complete message already read, if any."""
        if self._pos < len(self._messages):
            message = self._messages[self._pos]
            self._pos += 1
            if self._pos == len(self._messages):
                self._messages.clear()
                self._pos = 0
            return message
        return None

    def drain(self) -> None:
        """Take in everything the pipe holds now, without blocking.

        Used once the worker is gone: a grandchild it forked may still hold the
        write end open, so end of file may never come.
        """
        os.set_blocking(self.fd, False)
        while not self.eof:
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
        self._split()

    def pending(self) -> bool:
        """Whether whole messages are waiting to be popped."""
        return self._pos < len(self._messages)
