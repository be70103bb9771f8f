"""Memory of the current process, and what a worker may use.

A worker's *own memory* is its USS: the pages no other process maps, which
are the pages it allocated plus the copies it made of pages it shared with
the pytest process it was forked from (a write to an inherited page swaps a
shared page for a private copy, and RSS does not move: measured here, a
child that rewrites 200 MB it inherited grows 0.1 MB in RSS and 200 MB in
USS).

USS is read from ``/proc/PID/smaps_rollup``, which walks the page tables: in
a worker between tests (its caches cold) 1.2 ms of CPU at 40 MB resident,
7 ms at 250 MB, 10 ms at 560 MB here, several times what a trivial test
costs. So a test boundary reads only ``/proc/self/statm`` and ``getrusage``
(5 µs in all, with the arithmetic) and :class:`Meter` carries the last USS
reading forward by them, reading USS again only when they say the figure may
have drifted, or a limit decision is near.

Other costs measured on the project's 2-core machine: resetting the peak
through ``/proc/self/clear_refs`` 1 µs; psutil's ``memory_info()`` 11 µs (so
the hot path reads statm itself); ``/proc/self/status`` 30 µs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import time
from pathlib import Path
from typing import NamedTuple

from isolator import cgroup
from isolator.sizes import format_size

_PAGE = os.sysconf("SC_PAGE_SIZE")

# Bound once: a test may patch these (monkeypatch in a fixture, mock.patch),
# and a worker reads its memory while the patch is in place (see ``wire``).
_pread = os.pread
_getrusage = resource.getrusage
_process_time = time.process_time
#: mallopt parameter that caps the number of malloc arenas (glibc).
_M_ARENA_MAX = -8
#: What a USS reading costs per byte resident, until the first one is timed.
_READING_S_PER_BYTE = 30e-6 / 1e6
#: Readings due because the carried-forward figure may have drifted take at
#: most this share of a worker's time, readings due to age alone this share.
_DRIFT_SHARE = 0.05
_AGE_SHARE = 0.01
#: Drift that calls for a reading: this much, or a 64th of RSS if larger.
_MIN_TOLERANCE = 1 << 20


class Sample(NamedTuple):
    """One look at this process's memory. (A tuple: several are made at every
    test boundary, and a tuple is made three times faster than a frozen
    dataclass.)"""

    #: Resident set size, bytes.
    rss_bytes: int
    #: Address space (what RLIMIT_AS counts), bytes.
    vm_bytes: int
    #: Page faults (minor and major) since the process began; a fork starts at 0.
    faults: int = 0
    #: Highest RSS since the peak was last reset (``Probe.reset_peak``), bytes.
    peak_rss_bytes: int = 0
    #: Own memory (USS), bytes: read, or carried forward from the last reading.
    own_bytes: int = 0
    #: How far ``own_bytes`` may be off: 0 right after a reading.
    drift_bytes: int = 0


class Probe:
    """Reads this process's memory cheaply; one per worker, opened after fork."""

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
        fields = _pread(self._statm, 128, 0).split()
        usage = _getrusage(resource.RUSAGE_SELF)
        return Sample(
            int(fields[1]) * _PAGE,
            int(fields[0]) * _PAGE,
            usage.ru_minflt + usage.ru_majflt,
            usage.ru_maxrss * 1024,
        )

    def reset_peak(self) -> None:
        """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM)."""
        if self._clear_refs is not None:
            with contextlib.suppress(OSError):
                os.write(self._clear_refs, b"5")

    def peak_rss_bytes(self) -> int:
        """Highest RSS since the last ``reset_peak``."""
        return _getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# psutil is imported where it is used, never at start-up: importing it costs
# every pytest run about 15 ms, and most runs never read USS.


def uss_bytes(pid: int) -> int | None:
    """Another process's own memory (USS), or None if it is gone; walks its page
    tables (see the module docstring for the cost)."""
    import psutil

    try:
        uss: int = psutil.Process(pid).memory_full_info().uss
    except (psutil.Error, OSError):
        return None
    return uss


def _own_uss(smaps_rollup_fd: int) -> int:
    """This process's USS, as psutil computes it (the ``Private_*`` lines of
    smaps_rollup), read here without psutil: importing it would cost a worker
    16 ms of CPU, fifty times what a reading costs."""
    data = _pread(smaps_rollup_fd, 1 << 14, 0)
    return (
        sum(int(line.split()[1]) for line in data.splitlines() if line.startswith(b"Private_"))
        * 1024
    )


class Meter:
    """A worker's own memory (USS) at its test boundaries, at the price of RSS.

    Between two USS readings, every page the worker makes its own costs it a
    page fault: a fresh page for an allocation, or a copy of a page it
    shared. Fresh pages also raise RSS, copies do not. So the figure is
    carried forward from a *base* (the last reading, or the start of the
    running test, where the kernel's RSS high-water mark was reset) by the
    change of RSS, plus the faults that no rise of RSS over the base
    accounts for (the copies): memory allocated and freed again within a
    test raised the high-water mark as much as it faulted, and is not
    counted as kept. What this still gets wrong (memory freed and allocated
    again several times within a test, counted once per time; shared pages
    unmapped, counted as freed) is bounded by the faults and the RSS changes
    since the last reading, the *drift*; pages others stop sharing by writing
    their own copies are not seen at all until the next reading.

    USS is read again when the drift passes a 64th of RSS (1 MB at least)
    and readings so far leave room (they take at most 5% of the worker's
    CPU time), when none was taken for a hundred times what one costs (1%),
    and when the drift passes a tenth of the growth limit in force (the leak
    guard decides on it). Callers ask for a reading themselves when a
    decision is within the drift (:meth:`settle`).

    The worker starts with the pages it faulted in since the fork: a fresh
    fork shares every page with its parent, so it owned nothing then.
    """

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        # A fork inherits its parent's high-water mark.
        probe.reset_peak()
        now = probe.sample()
        self._base = now._replace(own_bytes=now.faults * _PAGE)
        #: What the last call returned: the answer when there is no memory
        #: left to measure with (a worker at its ceiling).
        self._last = self._base
        # Shares of the worker's time are shares of its CPU time: on a loaded
        # machine wall time passes without the worker doing anything. (Not
        # getrusage's: it moves in scheduler ticks, milliseconds apart.)
        self._read_at = _process_time()
        self._read_cost_s = now.rss_bytes * _READING_S_PER_BYTE
        #: USS readings taken (for the tests of this class, and curiosity).
        self.readings = 0

    def start_test(self, growth_limit_bytes: int | None = None) -> Sample:
        """At a test's start: a new window for the RSS high-water mark (the
        test's peak), and the base its figures are carried forward from."""
        self.probe.reset_peak()
        self._base = self.read(growth_limit_bytes)
        return self._base

    def read(self, growth_limit_bytes: int | None = None) -> Sample:
        """Own memory now: carried forward from the base, or read when due."""
        with contextlib.suppress(MemoryError):
            self._last = self._read(growth_limit_bytes)
        return self._last

    def _read(self, growth_limit_bytes: int | None) -> Sample:
        # On every test boundary, three times per test: kept to a few µs.
        now = self._carried(self.probe.sample())
        drift = now.drift_bytes
        age_s = _process_time() - self._read_at
        if (
            (
                drift > max(_MIN_TOLERANCE, now.rss_bytes >> 6)
                and age_s * _DRIFT_SHARE >= self._read_cost_s
            )
            or age_s * _AGE_SHARE >= self._read_cost_s
            or (growth_limit_bytes is not None and drift > growth_limit_bytes // 10)
        ):
            return self._read_exactly()
        return now

    def _carried(self, now: Sample) -> Sample:
        """``now`` with the figure at the base carried forward to it."""
        base = self._base
        rss_change = now.rss_bytes - base.rss_bytes
        faulted = (now.faults - base.faults) * _PAGE
        fresh = max(now.peak_rss_bytes - base.rss_bytes, rss_change, 0)
        own = base.own_bytes + rss_change + max(faulted - fresh, 0)
        drift = base.drift_bytes + faulted + abs(rss_change)
        return Sample(now[0], now[1], now[2], now[3], max(own, 0), drift)

    def read_exactly(self) -> Sample:
        """Own memory now, read from the page tables."""
        with contextlib.suppress(MemoryError):
            self._last = self._read_exactly()
        return self._last

    def _read_exactly(self) -> Sample:
        started = _process_time()
        try:
            # Opened for each reading (10 µs, against a millisecond or more for
            # the reading): a descriptor held for good would be one fewer for
            # the tests (see ``headroom``).
            fd = os.open("/proc/self/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC)
            try:
                uss: int | None = _own_uss(fd)
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError):
            uss = None
        now = self.probe.sample()
        finished = _process_time()
        if uss is None:  # smaps_rollup unreadable: carry on with what we have
            return self._carried(now)
        self._read_cost_s = finished - started
        self._read_at = finished
        self._base = now._replace(own_bytes=uss)
        self.readings += 1
        return self._base

    def settle(self, now: Sample, margin_bytes: int, other_drift_bytes: int = 0) -> Sample:
        """``now``, or an exact reading if a decision ``margin_bytes`` away from
        its threshold could go the other way within the drift (``now``'s, and
        that of the figure it is compared with)."""
        if now.drift_bytes and abs(margin_bytes) <= now.drift_bytes + other_drift_bytes:
            return self.read_exactly()
        return now

    @staticmethod
    def peak_bytes(start: Sample, end: Sample) -> int:
        """Highest own memory from ``start`` (taken when the peak was reset) to
        ``end``, as far as the RSS high-water mark tells: what was new at the peak."""
        return start.own_bytes + max(end.peak_rss_bytes - start.rss_bytes, 0)


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


#: How an exception says ENOMEM in words (strerror), for libraries that put
#: it in their own message (lmdb, for one).
_ENOMEM_TEXT = os.strerror(errno.ENOMEM)


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # a broken __str__ is the test's business, not ours
        return ""


def _ceiling_failure(error: BaseException) -> BaseException | None:
    """The exception in ``error``'s chain that says an allocation or a mapping
    failed: what reaching an RLIMIT_AS ceiling looks like from Python."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):  # allocations, numpy's _ArrayMemoryError
            return current
        if isinstance(current, OSError) and current.errno == errno.ENOMEM:  # mmap, mremap
            return current
        text = _text(current)
        if isinstance(current, RuntimeError) and "can't start new thread" in text:
            return current  # pthread_create could not map the thread's stack
        if _ENOMEM_TEXT in text:
            return current
        current = current.__cause__ or current.__context__
    return None


def explain_ceiling_failure(
    error: BaseException, worker: str, test: str, ceiling_bytes: int, mapped_bytes: int
) -> bool:
    """Say in ``error`` (or the exception in its chain that failed to get
    memory) that the worker's RLIMIT_AS ceiling is what it ran into, what that
    ceiling counts, and the ways out. True if ``error`` is of that kind.

    ``mapped_bytes`` is the address space the worker had mapped over its start.
    """
    failure = _ceiling_failure(error)
    if failure is None:
        return False
    if getattr(failure, "_isolator_explained", False):
        return True
    left = max(ceiling_bytes - mapped_bytes, 0)
    explanation = (
        f"worker {worker} is limited to {format_size(ceiling_bytes)} of address space "
        f"(RLIMIT_AS) and {test} asked for more than the {format_size(left)} left; RLIMIT_AS "
        f"counts every mapping and reservation, used or not ({format_size(mapped_bytes)} mapped "
        "since the worker started). Ways out: a bigger ceiling (--worker-mem, --worker-ceiling "
        "or @pytest.mark.isolate(mem=...)), none (--worker-ceiling=none), or one that counts "
        "memory used (--worker-ceiling-kind=cgroup)"
    )
    # The message is where every report shows it (terminal, junit xml, -rA):
    # in front for MemoryError, whose own message is often empty; after the
    # original words for the others, keeping their type and errno.
    if isinstance(failure, MemoryError):
        detail = failure.args[0] if failure.args and failure.args[0] else None
        failure.args = (explanation + (f" ({detail})" if detail else ""),)
    elif isinstance(failure, OSError):
        failure.strerror = f"{failure.strerror}: {explanation}"
    elif isinstance(failure, RuntimeError) and type(failure).__str__ is BaseException.__str__:
        failure.args = (f"{failure}: {explanation}",)
    elif hasattr(failure, "add_note"):
        failure.add_note(f"isolator: {explanation}")
    with contextlib.suppress(AttributeError, TypeError):
        failure._isolator_explained = True  # type: ignore[attr-defined]
    return True


#: Address space a worker may map past its ceiling once it has hit it, only to
#: report that failure: pytest needs memory to format the traceback, and a
#: worker with none left would die before the test had a verdict.
RESERVE_BYTES = 64 << 20


def open_reserve() -> bool:
    """Raise the soft RLIMIT_AS by :data:`RESERVE_BYTES`; True if it was raised.

    The hard limit is left where it was when the ceiling was set (usually
    unlimited), so raising the soft one needs no privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return False
    raised = soft + RESERVE_BYTES
    if hard != resource.RLIM_INFINITY:
        raised = min(raised, hard)
    if raised <= soft:
        return False
    resource.setrlimit(resource.RLIMIT_AS, (raised, hard))
    return True


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
    import psutil

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
    import psutil

    available = int(psutil.virtual_memory().available)
    for limit, usage in _cgroup_limits():
        if usage is not None:
            available = min(available, max(limit - usage, 0))
    return available
