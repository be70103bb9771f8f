"""Memory of the current process: cheap enough to read at every test boundary.

A forked worker's RSS counts every page it shares with the parent it was
forked from, so the figure that means "this worker's own memory" is its RSS
*growth* over the moment it started: pages it allocated, plus shared pages it
wrote to (copy-on-write made them its own).

Costs measured on the project's 2-core machine: reading ``/proc/self/statm``
through a kept file descriptor is about 2 µs; resetting the peak through
``/proc/self/clear_refs`` 1 µs; ``getrusage`` 1.3 µs. ``/proc/self/status`` (30
µs) and psutil's USS (``smaps_rollup``, about 800 µs) stay off the per-test path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import resource
from pathlib import Path

import psutil

from isolator import cgroup

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: mallopt parameter that caps the number of malloc arenas (glibc).
_M_ARENA_MAX = -8


@dataclasses.dataclass(frozen=True)
class Sample:
    #: Resident set size, bytes.
    rss_bytes: int
    #: Address space (what RLIMIT_AS counts), bytes.
    vm_bytes: int


class Probe:
    """Reads this process's memory; one per worker, opened after fork."""

    def __init__(self) -> None:
        self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._clear_refs: int | None = os.open(
                "/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC
            )
        except OSError:
            self._clear_refs = None

    def close(self) -> None:
        os.close(self._statm)
        if self._clear_refs is not None:
            os.close(self._clear_refs)

    def sample(self) -> Sample:
        fields = os.pread(self._statm, 128, 0).split()
        return Sample(rss_bytes=int(fields[1]) * _PAGE, vm_bytes=int(fields[0]) * _PAGE)

    def reset_peak(self) -> None:
        """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM)."""
        if self._clear_refs is not None:
            with contextlib.suppress(OSError):
                os.write(self._clear_refs, b"5")

    def peak_rss_bytes(self) -> int:
        """Highest RSS since the last ``reset_peak``."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_ceiling(headroom_bytes: int, start_vm_bytes: int) -> int:
    """Cap this process's address space at its current size plus ``headroom_bytes``.

    Returns the absolute limit set. Only ever lowers the limit: a hard limit
    the user already set below ours stays in force.
    """
    limit = start_vm_bytes + headroom_bytes
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if limit >= 2**63 - 1:
        return soft  # no address space is that large: nothing to limit
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def limit_malloc_arenas(count: int = 2) -> None:
    """Keep glibc from reserving 64 MB of address space per thread.

    glibc gives threads their own malloc arenas, each reserving 64 MB of
    address space up front; under an RLIMIT_AS ceiling a test that starts a
    dozen threads and allocates a few bytes in each would hit the ceiling
    without using memory. Two arenas keep contention low for the few threads
    a test usually runs.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, count)


class MemoryMonitor:
    """What the ``memory_monitor`` fixture gives a test: its own memory figures.

    Figures are RSS, relative to the moment the fixture was set up, so they
    mean the same with or without isolation.
    """

    def __init__(self) -> None:
        self._probe = Probe()
        self._probe.reset_peak()
        self.start_bytes = self._probe.sample().rss_bytes

    @property
    def current_bytes(self) -> int:
        """RSS now."""
        return self._probe.sample().rss_bytes

    @property
    def growth_bytes(self) -> int:
        """RSS now, less RSS when the test started."""
        return self.current_bytes - self.start_bytes

    @property
    def peak_bytes(self) -> int:
        """Highest RSS since the test started, less RSS when it started."""
        return max(self._probe.peak_rss_bytes(), self.current_bytes) - self.start_bytes

    def close(self) -> None:
        self._probe.close()


#: A file holding a number of bytes to use instead of what the kernel says is
#: available: for tests of admission, and for machines whose figure is wrong.
AVAILABLE_OVERRIDE_ENV = "ISOLATOR_AVAILABLE_MEMORY_FILE"


@functools.cache
def _hierarchy(pid: int) -> cgroup.Hierarchy | None:
    # Keyed by PID: a process keeps its cgroup, a fork may be moved to another.
    return cgroup.memory_hierarchy()


def _cgroup_limits() -> list[tuple[int, int | None]]:
    hierarchy = _hierarchy(os.getpid())
    return cgroup.limits(hierarchy) if hierarchy is not None else []


def total_bytes() -> int:
    """All the memory this process could ever be given: MemTotal, or the
    tightest limit of its own cgroup and their ancestors if lower."""
    total = int(psutil.virtual_memory().total)
    for limit, _ in _cgroup_limits():
        total = min(total, limit)
    return total


def available_bytes() -> int:
    """Memory a new worker could use without pushing the machine into the
    OOM killer: the kernel's MemAvailable, or less if the cgroup this process
    is in (or one of its ancestors) leaves less under its limit."""
    override = os.environ.get(AVAILABLE_OVERRIDE_ENV)
    if override:
        value = cgroup.read_bytes(Path(override))
        if value is not None:
            return value
    available = int(psutil.virtual_memory().available)
    for limit, usage in _cgroup_limits():
        if usage is not None:
            available = min(available, max(limit - usage, 0))
    return available
