"""Memory cgroups: the one this process is in, and one per worker for the cgroup ceiling.

Two uses:

* **Limits.** The memory a container (or any cgroup around us) leaves this
  process is the tightest limit among its own cgroup and that cgroup's
  ancestors, so they are read where ``/proc/self/cgroup`` says this process is,
  not at the root of the mount (which is wrong whenever cgroups nest without a
  cgroup namespace).
* **The cgroup ceiling** (``--worker-ceiling-kind=cgroup``). Each worker goes into
  a cgroup of its own whose memory limit is the ceiling, so the kernel counts
  memory the worker uses (pages it writes, copies it makes of pages it shared
  with its parent, page cache it reads in), not address space, and kills it
  when it passes the limit. After the worker is reaped, what its cgroup saw
  (an OOM kill, the peak) says why it died; then the cgroup is removed.

Both cgroup v2 (``memory.max``, ``memory.current``, ``memory.peak``,
``memory.events``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``,
``memory.max_usage_in_bytes``, ``memory.oom_control``) are handled: whichever
hierarchy the memory controller is bound to.

Runs in the controller, except :meth:`WorkerCgroup.join` and
:meth:`WorkerCgroup.set_limit`, which run in the forked worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path

#: cgroup v1 writes "no limit" as a number near 2**63 (v2 writes "max").
_NO_LIMIT = 1 << 60


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """The cgroup hierarchy that holds the memory controller, as this process sees it."""

    #: 1 or 2.
    version: int
    #: Where the hierarchy is mounted.
    mount: Path
    #: This process's own cgroup: a directory under ``mount``.
    own: Path

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    @property
    def usage_file(self) -> str:
        return "memory.current" if self.version == 2 else "memory.usage_in_bytes"

    @property
    def peak_file(self) -> str:
        return "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"

    def levels(self) -> list[Path]:
        """This process's cgroup and its ancestors, as far as the mount shows them."""
        levels = [self.own]
        path = self.own
        while path != self.mount and path.parent != path:
            path = path.parent
            levels.append(path)
        return levels


def _unescape(field: str) -> str:
    """mountinfo writes spaces, tabs, newlines and backslashes as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mounts(proc: Path) -> tuple[tuple[Path, str] | None, tuple[Path, str] | None]:
    """(mount point, root) of the cgroup v2 hierarchy and of the v1 memory hierarchy."""
    v2: tuple[Path, str] | None = None
    v1: tuple[Path, str] | None = None
    with contextlib.suppress(OSError), open(proc / "mountinfo") as lines:
        for line in lines:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            found = (Path(_unescape(fields[4])), _unescape(fields[3]))
            if tail[0] == "cgroup2" and v2 is None:
                v2 = found
            elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and v1 is None:
                v1 = found
    return v2, v1


def _own_paths(proc: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in the v1 memory one."""
    v2: str | None = None
    v1: str | None = None
    with contextlib.suppress(OSError), open(proc / "cgroup") as lines:
        for line in lines:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0" and not controllers:
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    return v2, v1


def _under(mount: tuple[Path, str], path: str) -> Path:
    """The directory of cgroup ``path`` on ``mount`` (mounted from its root ``root``).

    Without a cgroup namespace a container may see the host's path of its
    cgroup while its mount shows only that cgroup's subtree.
    """
    point, root = mount
    relative = os.path.relpath(path, root)
    if relative == ".":
        return point
    if relative.startswith(".."):
        return point  # not under this mount: the mount's root is the nearest we can see
    return point / relative


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def memory_hierarchy(proc: Path = Path("/proc/self")) -> Hierarchy | None:
    """The hierarchy that holds the memory controller and this process's
    cgroup in it (None if there is no such hierarchy here)."""
    mount_v2, mount_v1 = _mounts(proc)
    path_v2, path_v1 = _own_paths(proc)
    # The memory controller is bound to one hierarchy: v2 if its root lists it.
    if (
        mount_v2 is not None
        and path_v2 is not None
        and "memory" in _words(mount_v2[0] / "cgroup.controllers")
    ):
        return Hierarchy(2, mount_v2[0], _under(mount_v2, path_v2))
    if mount_v1 is not None and path_v1 is not None:
        return Hierarchy(1, mount_v1[0], _under(mount_v1, path_v1))
    return None


def read_bytes(path: Path) -> int | None:
    """A byte count from a cgroup file; None for "max", a v1 "no limit", or no file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= _NO_LIMIT else value


def limits(hierarchy: Hierarchy) -> list[tuple[int, int | None]]:
    """``(limit, usage)`` of each level, from this process's cgroup up, that
    has a memory limit; every one of them applies to this process."""
    found: list[tuple[int, int | None]] = []
    for level in hierarchy.levels():
        limit = read_bytes(level / hierarchy.limit_file)
        if limit is not None:
            found.append((limit, read_bytes(level / hierarchy.usage_file)))
    return found
