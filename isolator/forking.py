"""Runs in the controller: makes forking the pytest process cheaper.

``fork()`` copies a page table entry for every anonymous page the process
holds, one per 4 KB page, and the worker tears them all down again when it
ends: measured here, 24 ms of CPU per worker for a pytest process that
imported torch (229 MB), about half of it in the fork and half in the exit.
A 2 MB transparent huge page takes one entry instead of 512. So the
controller asks the kernel to collapse the anonymous memory it holds into
huge pages (``MADV_COLLAPSE``, Linux 6.1), 2 MB extent by 2 MB extent, and
only extents it already holds nearly whole, so that the process hardly grows.
Memory allocated later keeps its small pages (the system's THP setting
decides that, as before).

It does so twice. First on a thread of its own, from the start of
collection, over what the process holds by then (the conftests' imports,
which are most of a big process): the ``madvise`` calls let go of the GIL, so
this runs on another core while pytest collects. Then once more after
collection, before the first worker is forked, over what is not huge yet
(an extent already huge costs about 2 µs to ask again). Only the second is
in the way of the first test: in the torch process, 1.4 to 2 ms against 40
to 350 ms for the whole collapse (see Cost in the README).

What does not change: a write to a shared huge page, by a worker or by the
controller, splits that mapping into small pages in the writing process and
copies 4 KB, not 2 MB, so a worker's own memory is what it was without huge
pages (``tests/test_forking.py`` measures it).

Collapsing costs 0.6 to 5 ms of CPU per 2 MB extent here (the same process
takes one or the other from run to run: the kernel getting memory for the
huge pages), and each worker forked after
it saves about 90 µs per extent (fork + exit of the torch process: 6.1 ms of
CPU down to 3.8 ms; of a bare pytest process: 2.5 ms down to 2.2 ms). So it is
done only for a run that will fork at least ``MIN_FORKS`` workers.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import dataclasses
import errno
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence

import pytest

from isolator import headroom

_HUGE = 2 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: madvise(2) advice: collapse the range into transparent huge pages (Linux 6.1).
MADV_COLLAPSE = 25
#: Fewer forks than this do not pay back the collapse.
MIN_FORKS = 50
#: A pytest process holding this much anonymous memory is one whose users
#: would notice forking without huge pages (about 6 ms more per worker).
NOTICEABLE_BYTES = 128 * 1000**2


@dataclasses.dataclass(frozen=True)
class Collapse:
    """What collapsing the controller's memory into huge pages did."""

    #: Bytes now held in huge pages.
    collapsed_bytes: int = 0
    #: Resident 2 MB extents the kernel would not collapse.
    refused: int = 0
    seconds: float = 0.0
    #: Why nothing was collapsed, when huge pages are not to be had here.
    unavailable: str | None = None


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise: Callable[[int, int, int], int] = libc.madvise
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        self.mincore: Callable[[int, int, ctypes.Array[ctypes.c_ubyte]], int] = libc.mincore
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.mincore.restype = ctypes.c_int

    def collapse(self, address: int) -> int:
        """0, or the errno of a refused collapse of the extent at ``address``."""
        if self.madvise(address, _HUGE, MADV_COLLAPSE) == 0:
            return 0
        return ctypes.get_errno() or errno.EINVAL


def _libc() -> _Libc | None:
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


def _explain(error: int) -> str:
    if error == errno.EINVAL:
        return (
            "the kernel refuses MADV_COLLAPSE (it needs Linux 6.1 or later, with transparent "
            "huge pages not disabled for this process)"
        )
    return f"madvise(MADV_COLLAPSE) failed: {os.strerror(error)}"


def huge_pages_unavailable() -> str | None:
    """Why anonymous memory cannot be collapsed into huge pages here, or
    None if it can: tried on a scratch mapping, which is what it takes to
    know (a kernel setting, a seccomp filter or a container can each say no)."""
    libc = _libc()
    if libc is None:
        return "madvise is not available through ctypes"
    scratch = mmap.mmap(-1, 2 * _HUGE, flags=mmap.MAP_PRIVATE)
    try:
        view = ctypes.c_char.from_buffer(scratch)
        base = ctypes.addressof(view)
        del view  # a buffer still exported would keep the mapping from closing
        address = (base + _HUGE - 1) & ~(_HUGE - 1)
        offset = address - base
        for page in range(offset, offset + _HUGE, _PAGE):
            scratch[page] = 1
        error = libc.collapse(address)
    finally:
        with contextlib.suppress(BufferError):
            scratch.close()
    return _explain(error) if error else None


def anonymous_extents(maps: str = "/proc/self/maps") -> Iterator[int]:
    """Start addresses of the 2 MB extents inside private anonymous
    read-write mappings: the heap, malloc and pymalloc arenas, numpy and
    torch buffers. Stacks are left alone, and file mappings (shared libraries)
    cannot be collapsed this way."""
    with open(maps) as f:
        for line in f:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if fields[1] != "rw-p" or path not in ("", "[heap]"):
                continue
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            yield from range((low + _HUGE - 1) & ~(_HUGE - 1), high & ~(_HUGE - 1), _HUGE)


#: Collapsing fills the holes of an extent with zeroed pages, so the process
#: grows: only extents at least nine tenths resident are collapsed (for the
#: torch process, 40 MB more collapsed than with whole extents only, for 0.6
#: MB of growth, and fork + exit cost 35% less).
MIN_RESIDENT_PAGES = _HUGE // _PAGE * 9 // 10


def resident_extents(
    libc: _Libc, extents: Iterator[int], stop: threading.Event | None = None
) -> list[int]:
    """The extents of which at least ``MIN_RESIDENT_PAGES`` are resident
    (as many as were looked at before ``stop`` was set)."""
    vec = (ctypes.c_ubyte * (_HUGE // _PAGE))()
    found = []
    for extent in extents:
        if stop is not None and stop.is_set():
            break
        # A page is resident where its byte is 1 (the other bits are
        # reserved, and 0): counted in C, since a process may reserve
        # gigabytes it never touches, and each extent is looked at.
        if (
            libc.mincore(extent, _HUGE, vec) == 0
            and len(vec) - bytes(vec).count(0) >= MIN_RESIDENT_PAGES
        ):
            found.append(extent)
    return found


def collapse_anonymous_memory(
    stop: threading.Event | None = None, candidates: Sequence[int] | None = None
) -> Collapse:
    """Collapse the resident anonymous memory of this process into huge
    pages: of ``candidates`` (extents), or of every anonymous extent now.
    Stops early once ``stop`` is set."""
    begin = time.perf_counter()
    libc = _libc()
    if libc is None:
        return Collapse(unavailable="madvise is not available through ctypes")
    try:
        extents = resident_extents(
            libc, iter(candidates) if candidates is not None else anonymous_extents(), stop
        )
    except OSError as exc:
        return Collapse(unavailable=f"cannot read /proc/self/maps: {exc}")
    collapsed = refused = 0
    error = 0
    for extent in extents:
        if stop is not None and stop.is_set():
            break
        failed = libc.collapse(extent)
        if not failed:
            collapsed += _HUGE
        else:
            refused += 1
            error = failed
            if not collapsed and refused >= 3:
                break  # refused from the start: the kernel says no to all of them
    seconds = time.perf_counter() - begin
    if not collapsed and refused:
        return Collapse(0, refused, seconds, _explain(error))
    return Collapse(collapsed, refused, seconds)


def anonymous_bytes() -> int:
    """Anonymous memory this process holds (what fork copies entries for)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def expected_forks(mode: str, items: Sequence[pytest.Item]) -> int:
    """About how many workers a run will fork: one per test or one per file
    (the shared workers of ``marked`` and ``shared`` count like files)."""
    if mode == "test":
        return len(items)
    return len({item.path for item in items})


_module_names: tuple[int, frozenset[str]] = (-1, frozenset())


def module_names() -> frozenset[str]:
    """The names in ``sys.modules``, for a worker to know what its parent has
    imported: built here, in the parent, before forking, and built again only
    when the count changes (the parent imports little once tests run).

    Building the set in the worker instead writes to the reference count of
    every module name, scattered over the heap: measured in the torch
    process, 820 pages copied (about 2.5 ms) at the start of every worker.
    """
    global _module_names
    count, names = _module_names
    if count != len(sys.modules):
        names = frozenset(sys.modules)
        _module_names = (len(sys.modules), names)
    return names


#: The first pass while it runs, for ``_before_fork``.
_running: _Early | None = None
_fork_hook_registered = False


def _before_fork() -> None:
    """A fork while the first pass runs (a test module that starts a
    multiprocessing pool as it is imported, say) ends the pass first: the
    child would not have the thread anyway, and CPython 3.12+ warns about a
    fork from a process with threads (an error under ``-W error``). The pass
    after collection does what is left."""
    early = _running
    if early is None or threading.current_thread() is early.thread:
        return
    try:
        early.finish(wanted=False)
    except KeyboardInterrupt:
        # Raised in an at-fork hook, it would be reported as unraisable and
        # dropped, and the fork go ahead with the thread alive: the thread
        # is ended all the same, and Ctrl-C raised again once the fork is
        # over (only in this process: a child forgets pending signals).
        early.finish(wanted=False)
        _thread.interrupt_main()
    early.wait_gone()


class _Early:
    """The first collapse, on a thread of its own while pytest collects."""

    def __init__(self) -> None:
        # Read here, before collection starts, not on the thread: a
        # descriptor the thread opened while a test module is imported
        # could be the one it needed (a conftest that leaves few spare).
        # The thread itself opens none.
        self._candidates = list(anonymous_extents())
        self.stop = threading.Event()
        self.result: Collapse | None = None
        self.thread = threading.Thread(target=self._run, name="isolator-collapse", daemon=True)
        global _running, _fork_hook_registered
        if not _fork_hook_registered:
            os.register_at_fork(before=_before_fork)
            _fork_hook_registered = True
        # RuntimeError if no thread can be started (a pids limit reached):
        # the caller does without, and nothing is left for the hook to join.
        self.thread.start()
        _running = self

    def _run(self) -> None:
        # An error here would reach pytest as an unhandled thread exception
        # (a warning, an error under -W error): the second pass does it all.
        with contextlib.suppress(Exception):
            self.result = collapse_anonymous_memory(self.stop, self._candidates)

    def finish(self, wanted: bool) -> Collapse | None:
        """Wait for it to end (at once, if it is no longer ``wanted``): no
        thread of ours may be running when the zygote is forked."""
        global _running
        if not wanted:
            self.stop.set()
        # Joining lets go of the GIL, which the thread needs to see the stop.
        self.thread.join()
        if _running is self:
            _running = None
        return self.result

    def wait_gone(self, timeout_s: float = 0.5) -> None:
        """Wait until the thread is gone from the kernel's list too (what
        CPython counts to warn), which is a moment after ``join`` returns."""
        task = f"/proc/self/task/{self.thread.native_id}"
        deadline = time.monotonic() + timeout_s
        while os.path.exists(task) and time.monotonic() < deadline:
            os.sched_yield()


class ForkPrep:
    """Plugin: readies the controller's process for forking, once."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        #: What the collapse did, once the run began: while pytest collected,
        #: then after collection.
        self.early: Collapse | None = None
        self.collapse: Collapse | None = None
        self._early: _Early | None = None
        #: Once the run began: how the first pass was told whether to go on.
        self.early_stop: threading.Event | None = None

    def pytest_report_header(self, config: pytest.Config) -> str | None:
        """One line, only when the machine has no huge pages to give and the
        process is big enough for a user to notice what that costs."""
        if anonymous_bytes() < NOTICEABLE_BYTES:
            return None
        reason = huge_pages_unavailable()
        if reason is None:
            return None
        return (
            f"isolator: workers are forked without huge pages, so each costs more CPU "
            f"(README: Cost): {reason}"
        )

    @property
    def early_thread(self) -> _Early | None:
        """The first pass, while it may still be running."""
        return self._early

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        config = session.config
        # Not in a process that collects nothing to run (--collect-only; the
        # pytest-xdist controller, whose nodes collect for themselves).
        if config.option.collectonly or config.pluginmanager.has_plugin("dsession"):
            return
        # With one CPU to run on it would only slow collection down: the
        # pass after collection does it all then, as it always did.
        if len(os.sched_getaffinity(0)) < 2:
            return
        # Nor where few more tasks may start (a thread counts): the tests'
        # own processes and threads come first.
        room = headroom.room()
        if room is not None and room[0] < headroom.TIGHT:
            return
        if _libc() is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._early = _Early()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Generator[None, object, object]:
        wanted = not session.config.option.collectonly and (
            expected_forks(self.mode, session.items) >= MIN_FORKS
        )
        if self._early is not None:
            self.early_stop = self._early.stop
            self.early = self._early.finish(wanted)
            self._early = None
        if wanted:
            self.collapse = collapse_anonymous_memory()
        return (yield)
