"""A page of memory a worker shares with the process that forked it.

The worker writes on it where it is; the parent reads it after the worker
died without a word. Messages on the pipe cannot do this job: the worker
writes them in batches, so the one that says a test began may still sit in
the worker's buffer when the worker dies, and a test may close the pipe.
Writing the page costs no system call.

Used in both processes: created by the controller before the fork, written
by the worker, read by the controller.
"""

from __future__ import annotations

import mmap
import struct

# Position + 1 in session.items of the item whose protocol began last (0:
# none yet); flags.
_LAYOUT = struct.Struct("<qq")
_LOST_PIPE = 1


class Beacon:
    def __init__(self) -> None:
        # An anonymous mapping made with fileno -1 is MAP_SHARED: the forked
        # worker writes the very page the parent reads.
        self._page = mmap.mmap(-1, mmap.PAGESIZE)

    def began(self, position: int) -> None:
        """The worker starts the item at ``position`` in ``session.items``."""
        _LAYOUT.pack_into(self._page, 0, position + 1, self._flags())

    def lost_pipe(self) -> None:
        """The worker can no longer write to its parent."""
        position, flags = _LAYOUT.unpack_from(self._page, 0)
        _LAYOUT.pack_into(self._page, 0, position, flags | _LOST_PIPE)

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
        self._page.close()
