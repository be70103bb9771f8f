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
import errno
import os
import re
import signal
import time
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


def mounts(
    proc: Path, controller: str = "memory"
) -> tuple[tuple[Path, str] | None, tuple[Path, str] | None]:
    """(mount point, root) of the cgroup v2 hierarchy and of the v1 hierarchy
    of ``controller``."""
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
            elif tail[0] == "cgroup" and controller in tail[2].split(",") and v1 is None:
                v1 = found
    return v2, v1


def own_paths(proc: Path, controller: str = "memory") -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in the v1 one of ``controller``."""
    v2: str | None = None
    v1: str | None = None
    with contextlib.suppress(OSError), open(proc / "cgroup") as lines:
        for line in lines:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0" and not controllers:
                v2 = path
            elif controller in controllers.split(","):
                v1 = path
    return v2, v1


def under(mount: tuple[Path, str], path: str) -> Path:
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


def words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def memory_hierarchy(proc: Path = Path("/proc/self")) -> Hierarchy | None:
    """The hierarchy that holds the memory controller and this process's
    cgroup in it (None if there is no such hierarchy here)."""
    mount_v2, mount_v1 = mounts(proc)
    path_v2, path_v1 = own_paths(proc)
    # The memory controller is bound to one hierarchy: v2 if its root lists it.
    if (
        mount_v2 is not None
        and path_v2 is not None
        and "memory" in words(mount_v2[0] / "cgroup.controllers")
    ):
        return Hierarchy(2, mount_v2[0], under(mount_v2, path_v2))
    if mount_v1 is not None and path_v1 is not None:
        return Hierarchy(1, mount_v1[0], under(mount_v1, path_v1))
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


# -- the cgroup ceiling ------------------------------------------------------

#: How long removing a worker's cgroup waits for processes still in it to die.
_REMOVE_WAIT_S = 2.0
#: cgroup v1 sends no event when a cgroup empties, so removal polls.
_REMOVE_POLL_S = 0.002
#: Cgroups isolator makes: ``isolator-<pid of the pytest process>-<name>``.
_OURS = re.compile(r"^isolator-(\d+)-")
#: What to run when cgroups cannot be used as things stand.
_RECIPE = (
    "run as root, or in a cgroup delegated to you, for example "
    "systemd-run --user --scope -p Delegate=yes pytest ..."
)
#: How a failure the cgroup ceiling caused is resolved.
WAYS_OUT = (
    "The cgroup ceiling counts memory the worker used (pages it wrote, its copies of pages it "
    "shared, page cache it read in); raise it with --worker-ceiling, --worker-mem or "
    "@pytest.mark.isolate(mem=...)"
)


class CgroupError(Exception):
    """Cgroups cannot give this process what it asked for; the message says why."""


def _write(path: Path, text: str) -> None:
    # One write() per value, as the kernel wants it (no buffering, no newline games).
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    """A ``key value`` line of a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    for line in _lines(path):
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass(frozen=True)
class Ending:
    """What a worker's cgroup saw, read once the worker was reaped."""

    path: Path
    #: Processes the kernel killed because the cgroup was over its limit.
    oom_kills: int
    limit_bytes: int | None
    #: Highest memory charged to the cgroup (None where the kernel has no such file).
    peak_bytes: int | None
    limit_file: str

    def describe(self) -> str:
        """How the worker ended, for ``worker w3 (PID 123) <this> while running ...``."""
        from isolator.sizes import format_size

        limit = format_size(self.limit_bytes) if self.limit_bytes is not None else "its limit"
        peak = f", peak {format_size(self.peak_bytes)}" if self.peak_bytes is not None else ""
        return (
            f"was killed by the memory ceiling (cgroup {self.path}: {self.limit_file} "
            f"{limit}{peak})"
        )


class WorkerCgroup:
    """One worker's cgroup. The worker makes and joins it itself (off the
    controller's critical path, and before it runs anything); the controller
    reads what happened in it and removes it once the worker is reaped."""

    def __init__(
        self, hierarchy: Hierarchy, path: Path, leftovers: list[WorkerCgroup] | None = None
    ) -> None:
        self.hierarchy = hierarchy
        self.path = path
        self.limit_bytes: int | None = None
        #: Where this cgroup goes if it cannot be removed yet.
        self._leftovers = leftovers

    def __repr__(self) -> str:
        return f"<cgroup v{self.hierarchy.version} {self.path}>"

    # -- in the worker ---------------------------------------------------

    def join(self, limit_bytes: int) -> None:
        """Make the cgroup, set its limit, and move this process into it."""
        # A left-over cgroup of the same name (a PID reused) is empty: reuse it.
        self.path.mkdir(exist_ok=True)
        self.set_limit(limit_bytes)
        if self.hierarchy.version == 2:
            # An OOM kill takes every process in the cgroup, not one of them:
            # a worker whose subprocess was killed would fail for no clear reason.
            with contextlib.suppress(OSError):
                _write(self.path / "memory.oom.group", "1")
            # Swap would let a worker pass its ceiling by pushing pages out.
            with contextlib.suppress(OSError):
                _write(self.path / "memory.swap.max", "0")
        _write(self.path / "cgroup.procs", "0")

    def set_limit(self, limit_bytes: int) -> None:
        if limit_bytes != self.limit_bytes:
            _write(self.path / self.hierarchy.limit_file, str(limit_bytes))
            self.limit_bytes = limit_bytes

    # -- in the controller -----------------------------------------------

    def finish(self) -> Ending:
        """What the cgroup saw, and then remove it: once the worker was reaped."""
        ending = self.ending()
        if not self.remove() and self._leftovers is not None:
            self._leftovers.append(self)
        return ending

    def ending(self) -> Ending:
        """What the cgroup saw: call once the worker was reaped, before :meth:`remove`."""
        hierarchy = self.hierarchy
        if hierarchy.version == 2:
            kills = _counter(self.path / "memory.events", "oom_kill")
        else:
            kills = _counter(self.path / "memory.oom_control", "oom_kill")
        return Ending(
            self.path,
            kills,
            read_bytes(self.path / hierarchy.limit_file),
            read_bytes(self.path / hierarchy.peak_file),
            hierarchy.limit_file,
        )

    def remove(self) -> bool:
        """Remove the cgroup, ending what is still in it (a process a test
        started in a session of its own is out of the worker's process
        group, but not out of its cgroup). False if it could not be removed."""
        deadline = time.monotonic() + _REMOVE_WAIT_S
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
            self._kill_members()
            time.sleep(_REMOVE_POLL_S)

    def _kill_members(self) -> None:
        if self.hierarchy.version == 2:
            with contextlib.suppress(OSError):
                _write(self.path / "cgroup.kill", "1")
                return
        for pid in words(self.path / "cgroup.procs"):
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


class WorkerCgroups:
    """Where workers' cgroups are made, under the cgroup this process is in.

    cgroup v1 lets any cgroup have both processes and child cgroups, so they
    go right under this process's own. cgroup v2 hands memory to child
    cgroups only from a cgroup that holds no process itself (the root
    excepted): if this process is alone in its cgroup it moves into a leaf
    of its own (``isolator-<pid>-main``, which pytest-xdist's workers then
    inherit) and enables memory for the cgroup's children; :meth:`close`
    puts things back.
    """

    def __init__(self, hierarchy: Hierarchy, home: Path) -> None:
        self.hierarchy = hierarchy
        self.home = home
        #: The controller's PID, which names its workers' cgroups (also when
        #: a worker, forked by the zygote, names its own).
        self._pid = os.getpid()
        #: (own cgroup, leaf) when this process moved itself (cgroup v2).
        self._moved: tuple[Path, Path] | None = None
        #: Worker cgroups that could not be removed yet.
        self.leftovers: list[WorkerCgroup] = []

    @classmethod
    def prepare(cls, ceiling_bytes: int, hierarchy: Hierarchy | None = None) -> WorkerCgroups:
        """Check that worker cgroups with a memory limit can be made here, and
        make them possible; CgroupError says why not."""
        if hierarchy is None:
            hierarchy = memory_hierarchy()
        if hierarchy is None:
            raise CgroupError(
                "no cgroup hierarchy with the memory controller is mounted here "
                "(/proc/self/mountinfo has neither cgroup2 with memory nor a v1 memory mount)"
            )
        own = hierarchy.own
        if not own.is_dir():
            raise CgroupError(f"this process's cgroup {own} is not visible here")
        cgroups = cls(hierarchy, own)
        if hierarchy.version == 2:
            cgroups._prepare_v2()
        cgroups._sweep()
        cgroups._try(ceiling_bytes)
        return cgroups

    def _prepare_v2(self) -> None:
        own = self.hierarchy.own
        pid = os.getpid()
        if "memory" not in words(own / "cgroup.controllers"):
            raise CgroupError(
                f"the memory controller is not enabled for {own} (its parent's "
                f"cgroup.subtree_control lacks it); {_RECIPE}"
            )
        if "memory" in words(own / "cgroup.subtree_control"):
            return
        parent = own.parent
        if _OURS.match(own.name) and "memory" in words(parent / "cgroup.subtree_control"):
            # A pytest-xdist worker, in the leaf its controller moved into.
            self.home = parent
            return
        if own != self.hierarchy.mount:
            others = [p for p in words(own / "cgroup.procs") if p != str(pid)]
            if others:
                raise CgroupError(
                    f"cgroup v2 gives memory to the cgroups under {own} only when no process "
                    f"is in it, and {len(others)} other processes are; {_RECIPE}"
                )
            leaf = own / f"isolator-{pid}-main"
            try:
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(pid))
            except OSError as exc:
                raise CgroupError(self._cannot(exc)) from None
            self._moved = (own, leaf)
        try:
            _write(own / "cgroup.subtree_control", "+memory")
        except OSError as exc:
            self.close()
            raise CgroupError(
                f"cannot enable memory for the cgroups under {own} ({exc.strerror}); {_RECIPE}"
            ) from None

    def _cannot(self, exc: OSError) -> str:
        if exc.errno == errno.EROFS:
            return (
                f"cannot create cgroups under {self.home}: the cgroup filesystem is mounted "
                "read-only (a container without write access to its cgroups)"
            )
        return f"cannot create cgroups under {self.home} ({exc.strerror}); {_RECIPE}"

    def _try(self, ceiling_bytes: int) -> None:
        """Make a cgroup, give it the limit, read it back, remove it."""
        trial = WorkerCgroup(self.hierarchy, self.home / f"isolator-{os.getpid()}-trial")
        try:
            trial.path.mkdir(exist_ok=True)
            trial.set_limit(ceiling_bytes)
        except OSError as exc:
            with contextlib.suppress(OSError):
                trial.path.rmdir()
            self.close()
            raise CgroupError(self._cannot(exc)) from None
        limit = read_bytes(trial.path / self.hierarchy.limit_file)
        trial.remove()
        if limit is None or abs(limit - ceiling_bytes) > 1 << 16:
            self.close()
            raise CgroupError(
                f"{trial.path / self.hierarchy.limit_file} did not keep the limit "
                f"{ceiling_bytes} (it reads {limit})"
            )

    def _sweep(self) -> None:
        """Remove empty worker cgroups that runs killed before they could clean up."""
        with contextlib.suppress(OSError):
            for entry in self.home.iterdir():
                match = _OURS.match(entry.name)
                if match and entry.is_dir() and not _alive(int(match[1])):
                    with contextlib.suppress(OSError):
                        entry.rmdir()

    def for_worker(self, label: str) -> WorkerCgroup:
        path = self.home / f"isolator-{self._pid}-{label}"
        return WorkerCgroup(self.hierarchy, path, self.leftovers)

    def close(self) -> list[str]:
        """Remove what is left and undo what :meth:`prepare` changed; returns
        the cgroups that could not be removed."""
        failed = [str(cg.path) for cg in self.leftovers if not cg.remove()]
        self.leftovers.clear()
        if self._moved is not None:
            own, leaf = self._moved
            self._moved = None
            with contextlib.suppress(OSError):
                _write(own / "cgroup.subtree_control", "-memory")
            with contextlib.suppress(OSError):
                _write(own / "cgroup.procs", str(os.getpid()))
            with contextlib.suppress(OSError):
                leaf.rmdir()
        return failed
