"""Room for isolator's own processes and descriptors beside the tests'.

Processes: under ``docker --pids-limit``, a Kubernetes pod's pid limit or a
non-root ``RLIMIT_NPROC``, every task (process or thread) counts against the
limit until it is reaped. isolator's own extras (a worker forked ahead, ended
workers reaped a batch at a time) take room that a test's own subprocess or
thread may need; where little room is left the controller does without them.

Descriptors: the pytest process holds a few for each worker (its pipes, its
pidfd, two memfds), more with a standby and workers not yet reaped. A conftest
that opens files (or lowers ``RLIMIT_NOFILE``) until few are free would leave
no worker able to start, where plain pytest runs every test. So the pytest
process's soft limit is raised as far as isolator needs (never past the hard
limit), and each worker's set back to leave its tests as many free as they
would have had.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from isolator import cgroup

#: Below this many more tasks, isolator keeps no extra process of its own.
TIGHT = 64


def _number(path: Path) -> int | None:
    """The number in a pids file; None for "max" or if it cannot be read."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pids_cgroup(proc: Path) -> tuple[Path, Path] | None:
    """(this process's cgroup directory, the mount above it) in whichever
    hierarchy holds the pids controller."""
    mount_v2, mount_v1 = cgroup.mounts(proc, "pids")
    path_v2, path_v1 = cgroup.own_paths(proc, "pids")
    if mount_v1 is not None and path_v1 is not None:
        return cgroup.under(mount_v1, path_v1), mount_v1[0]
    if (
        mount_v2 is not None
        and path_v2 is not None
        and "pids" in cgroup.words(mount_v2[0] / "cgroup.controllers")
    ):
        return cgroup.under(mount_v2, path_v2), mount_v2[0]
    return None


def _cgroup_room(proc: Path) -> tuple[int, str] | None:
    found = _pids_cgroup(proc)
    if found is None:
        return None
    directory, top = found
    tightest: tuple[int, str] | None = None
    # The limit of every ancestor applies too (a container's, a pod's).
    while True:
        limit = _number(directory / "pids.max")
        current = _number(directory / "pids.current")
        if limit is not None and current is not None:
            room = limit - current
            if tightest is None or room < tightest[0]:
                tightest = (room, f"pids cgroup {directory}: pids.max {limit}")
        if directory == top or directory.parent == directory:
            return tightest
        directory = directory.parent


def _user_tasks(uid: int) -> int:
    """Tasks (threads included) whose real user is ``uid``, as RLIMIT_NPROC counts."""
    tasks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry.name}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                tasks += int(fields["Threads"])
    return tasks


def _all_tasks() -> int | None:
    """Tasks on the whole machine (the last figure of /proc/loadavg's fourth field)."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return int(fields[3].split("/")[1])
    except (OSError, IndexError, ValueError):
        return None


def _rlimit_room() -> tuple[int, str] | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    # Root (with CAP_SYS_RESOURCE or CAP_SYS_ADMIN) is not held to it.
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return None
    where = f"RLIMIT_NPROC {soft} for user {os.getuid()}"
    everyone = _all_tasks()
    if everyone is not None and soft - everyone >= TIGHT:
        # Room even if every task were this user's: no need to count them
        # (which costs a read of /proc for each process on the machine).
        return soft - everyone, where
    return soft - _user_tasks(os.getuid()), where


def room(proc: Path = Path("/proc/self")) -> tuple[int, str] | None:
    """How many more tasks this process's tightest limit allows, and which
    limit that is; None where nothing limits them."""
    found = [r for r in (_cgroup_room(proc), _rlimit_room()) if r is not None]
    return min(found) if found else None


#: Descriptors isolator may hold in the pytest process at once, with room to spare.
DESCRIPTORS_NEEDED = 64


def open_descriptors() -> int | None:
    """How many descriptors this process has open; None if that cannot be read
    (no /proc, or not one descriptor free to read it with)."""
    try:
        # The listing's own descriptor is in it.
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return None


class DescriptorRoom:
    """What was free for the tests, and what isolator did about it."""

    def __init__(self, free: int, soft: int, raised_to: int | None, enough: bool) -> None:
        #: Descriptors free in the pytest process when the run began.
        self.free = free
        #: The soft limit then.
        self.soft = soft
        #: The soft limit isolator set in the pytest process, if it raised it.
        self.raised_to = raised_to
        #: The limit now leaves isolator all it may need.
        self.enough = enough

    def note(self) -> str:
        were = "descriptor was" if self.free == 1 else "descriptors were"
        text = f"only {self.free} file {were} free here (RLIMIT_NOFILE {self.soft})"
        if self.raised_to is not None:
            text += (
                f"; isolator raised the pytest process's limit to {self.raised_to} for its "
                f"own pipes, and sets each worker's so that its tests have {self.free} free, "
                "as here"
            )
        if not self.enough:
            text += (
                "; the hard limit allows no more, so no worker is forked ahead and each is "
                "reaped as it ends (a worker that still cannot start fails its test)"
            )
        return text

    def restore(self) -> None:
        """In the pytest process, once the run is over: the limit as it was
        (for a program that calls ``pytest.main()`` and goes on)."""
        if self.raised_to is None:
            return
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft, hard))

    def give_back(self) -> None:
        """In a worker, once isolator's own descriptors are open: leave its
        tests as many free as they had in the pytest process."""
        if self.raised_to is None:
            return
        opened = open_descriptors()
        if opened is None:
            return
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = opened + self.free
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def make_descriptor_room() -> DescriptorRoom | None:
    """If fewer than ``DESCRIPTORS_NEEDED`` descriptors are free, raise the
    soft limit to make them so, as far as the hard limit allows. None if
    there was room already (or no way to tell: no /proc)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    opened = open_descriptors()
    current = soft
    if opened is None and hard > soft:
        # Not one free to count them with (a conftest that opened files
        # until it could open no more): one more, to count.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft + 1, hard))
            current = soft + 1
            opened = open_descriptors()
    if opened is None:
        # None free, and none to be had: said, and the run goes on lean.
        return DescriptorRoom(0, soft, current if current > soft else None, enough=False)
    free = max(soft - opened, 0)
    if free >= DESCRIPTORS_NEEDED:
        return None
    wanted = opened + DESCRIPTORS_NEEDED
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > current:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            current = wanted
    raised_to = current if current > soft else None
    return DescriptorRoom(free, soft, raised_to, enough=current - opened >= DESCRIPTORS_NEEDED)
