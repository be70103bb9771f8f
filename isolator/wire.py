"""Framing for the pipe between a worker and the process that forked it.

Each message is a pickled tuple ``(kind, *fields)`` behind a 4-byte length.
Both ends are the same interpreter image (one is a fork of the other), so
pickle is safe and the fastest codec we have; reports themselves are turned
into plain dicts by pytest's ``pytest_report_to_serializable`` hook first, so
plugins that extend reports (subtests, xdist) keep working.

The worker batches messages and writes them in one ``os.write`` per flush; the
parent reads whatever is there and splits frames, so a test that produces
megabytes of captured output costs a few large writes, not many small ones.

What a test puts into a report is not always picklable (``record_property``
with a lambda), and what pickles does not always unpickle (an exception whose
``__init__`` takes other arguments than its ``args``). Reports therefore cross
as builtins only: anything else in them becomes the text pytest would have
printed or junit xml would have written for it, ``str()``. The parent never
trusts a frame either: one it cannot read becomes a ``garbled`` message, not an
exception.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

#: 8 bytes: a test may capture more than 4 GiB of output, and plain pytest
#: reports it.
_HEADER = struct.Struct("<Q")
_READ_CHUNK = 1 << 16
#: Larger than any message a worker sends (1 TiB); a header saying more is garbage.
_MAX_FRAME = 1 << 40

Message = tuple[Any, ...]


def _as_text(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        try:
            return repr(obj)
        except Exception:
            return f"<unprintable {type(obj).__name__}>"


# Bound once, here: a test may patch these (monkeypatch, mock.patch), and its
# patch is still in place when its call report is sent, before its teardown.
_write = os.write
_getpid = os.getpid
_exit = os._exit
_dumps = pickle.dumps
_BytesIO = io.BytesIO


class _BuiltinsPickler(pickle.Pickler):
    """Pickles builtins as they are and everything else as its text.

    The C pickler asks ``reducer_override`` only about objects that are not
    exact None, bool, int, float, str, bytes, list, tuple, dict, set or
    frozenset, so a report made of those (nearly all are) costs about 1 µs
    more than ``pickle.dumps``.
    """

    def reducer_override(self, obj: object) -> Any:
        if obj is str or obj is int or obj is float:
            return NotImplemented  # the constructors named below
        for base in (str, int, float):
            if isinstance(obj, base) and not isinstance(obj, bool):
                # An IntEnum or a str subclass keeps its value.
                try:
                    return base, (base(obj),)
                except Exception:
                    break
        return str, (_as_text(obj),)


#: How deep a message may nest before what is deeper crosses as text (the
#: pickler recurses, and a list nested thousands deep would overflow it).
_MAX_DEPTH = 100


def _shallow(obj: object, depth: int = 0) -> object:
    if depth >= _MAX_DEPTH:
        return _as_text(obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {_shallow(k, depth + 1): _shallow(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)) and type(obj) in (
        list,
        tuple,
        set,
        frozenset,
    ):
        return type(obj)(_shallow(part, depth + 1) for part in obj)
    return obj


def dumps_builtins(message: Message) -> bytes:
    buffer = _BytesIO()
    try:
        _BuiltinsPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    except RecursionError:
        buffer = _BytesIO()
        _BuiltinsPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(_shallow(message))
    return buffer.getvalue()


class Sender:
    """Worker side: buffer messages, write them out on ``flush``.

    ``on_lost`` is called when the pipe is gone (a test closed descriptors it
    did not open, or the parent went away); it does not return.
    """

    def __init__(self, fd: int, on_lost: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self._pending: list[bytes] = []
        self._on_lost = on_lost
        #: A process forked by a test that returns into pytest is not this
        #: worker, and must not write into its pipe.
        self.owner = _getpid()

    def send(self, *message: Any) -> None:
        self._frame(_dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def send_builtins(self, *message: Any) -> None:
        """Send a message whose parts may be of any type: see the module."""
        self._frame(dumps_builtins(message))

    def _frame(self, body: bytes) -> None:
        self._pending.append(_HEADER.pack(len(body)))
        self._pending.append(body)

    def flush(self) -> None:
        if not self._pending:
            return
        if _getpid() != self.owner:
            # A test forked and the child came back into pytest's code: it
            # would run the rest of the unit a second time. It ends here.
            _exit(0)
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        while data:
            try:
                written = _write(self.fd, data)
            except InterruptedError:
                continue
            except BlockingIOError:
                # A test set O_NONBLOCK on descriptors it did not open, this
                # pipe among them: block, as the write was meant to.
                os.set_blocking(self.fd, True)
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EPIPE) and self._on_lost is not None:
                    self._on_lost()
                raise
            data = data[written:]


class Receiver:
    """Parent side: accumulate bytes from the pipe and yield whole messages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()
        self._messages: list[Message] = []
        self._pos = 0
        self.eof = False
        #: A frame could not be read; nothing after it is.
        self.garbled = False

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
        while size - offset >= _HEADER.size and not self.garbled:
            (length,) = _HEADER.unpack_from(buf, offset)
            if length > _MAX_FRAME:
                self._garble(f"a frame header announced {length} bytes")
                break
            end = offset + _HEADER.size + length
            if end > size:
                break
            offset, body = end, buf[offset + _HEADER.size : end]
            try:
                message = pickle.loads(body)
            except Exception as exc:
                # The frame was whole; only its content could not be read
                # (a class the parent cannot import, say). The next frame
                # starts where this one ends.
                self._messages.append(("undecodable", f"{type(exc).__name__}: {exc}"))
                continue
            if not isinstance(message, tuple) or not message:
                self._garble(f"a frame held {type(message).__name__}, not a message")
                break
            self._messages.append(message)
        if self.garbled:
            buf.clear()
        elif offset:
            del buf[:offset]

    def _garble(self, why: str) -> None:
        """Frames after a bad one cannot be trusted to start where they seem
        to: everything from here on is dropped."""
        self.garbled = True
        self._messages.append(("garbled", why))

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
