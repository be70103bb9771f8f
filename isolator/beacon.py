"""A page of memory a worker shares with the process that forked it.

The worker writes on it where it is; the parent reads it after the worker
died without a word. Messages on the pipe cannot do this job: the worker
writes them in batches, so the one that says a test began may still sit in
the worker's buffer when the worker dies, and a test may close the pipe.
Writing the page costs no system call.

Used in both processes: created by the controller, handed to the worker (by
the zygote, which forks it) as a memfd, written by the worker, read by the
controller.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct

# Position + 1 in session.items of the item whose protocol began last (0:
# none yet); flags; how many times the worker armed its watchdog.
_LAYOUT = struct.Struct("<qqq")
_LOST_PIPE = 1


class Beacon:
    def __init__(self, fd: int | None = None) -> None:
        """A new beacon, or (in the worker) the one whose memfd is ``fd``."""
        if fd is None:
            fd = os.memfd_create("isolator-beacon", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, mmap.PAGESIZE)
            except BaseException:
                os.close(fd)
                raise
        #: The memfd, to hand to the worker; closed once it has it.
        self.fd = fd
        # MAP_SHARED: the worker writes the very page this process reads.
        try:
            self._page = mmap.mmap(fd, mmap.PAGESIZE)
        except BaseException:
            self.release_fd()
            raise

    def release_fd(self) -> None:
        """Close the memfd (the mapping stays)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def began(self, position: int) -> None:
        """The worker starts the item at ``position`` in ``session.items``."""
        _, flags, armings = _LAYOUT.unpack_from(self._page, 0)
        _LAYOUT.pack_into(self._page, 0, position + 1, flags, armings)

    def lost_pipe(self) -> None:
        """The worker can no longer write to its parent."""
        position, flags, armings = _LAYOUT.unpack_from(self._page, 0)
        _LAYOUT.pack_into(self._page, 0, position, flags | _LOST_PIPE, armings)

    def armed(self) -> None:
        """The worker armed its watchdog for an attempt at a test (there may
        be several per item: pytest-rerunfailures)."""
        position, flags, armings = _LAYOUT.unpack_from(self._page, 0)
        _LAYOUT.pack_into(self._page, 0, position, flags, armings + 1)

    @property
    def armings(self) -> int:
        value: int = _LAYOUT.unpack_from(self._page, 0)[2]
        return value

    def _flags(self) -> int:
        flags: int = _LAYOUT.unpack_from(self._page, 0)[1]
        return flags

    @property
    def position(self) -> int | None:
        """Where in ``session.items`` the last item the worker began stands."""
        value: int = _LAYOUT.unpack_from(self._page, 0)[0]
        return value - 1 if value else None

    @property
    def pipe_lost(self) -> bool:
        return bool(self._flags() & _LOST_PIPE)

    def close(self) -> None:
        self.release_fd()
        self._page.close()
