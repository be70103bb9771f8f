"""pytest entry point: options, validation, and the controller when isolation is on.

With isolation off (the default) this module registers nothing else, so
``-p isolator`` alone changes nothing about a run.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from isolator.cgroup import CgroupError, WorkerCgroups
from isolator.controller import Controller
from isolator.forking import ForkPrep
from isolator.memory import MemoryMonitor
from isolator.settings import add_options, load_settings
from isolator.worker import WorkerPlugin

controller_key = pytest.StashKey[Controller]()

#: Said at start-up when pytest was started outside the main thread (an
#: execnet socket server, an IDE or a tool calling pytest.main() from a thread).
OFF_MAIN_THREAD = (
    "pytest runs outside the main thread here, where Python cannot catch SIGTERM: a SIGTERM "
    "would end the run unreported, and processes the tests started could outlive it"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    try:
        add_options(parser)
    except (ValueError, argparse.ArgumentError) as exc:
        # argparse-level clash, typically pytest-isolate's own --isolate.
        raise pytest.UsageError(
            f"isolator: cannot add its options ({exc}); another installed plugin, likely "
            "pytest-isolate, defines them too: uninstall it, or disable one of the two with "
            "-p no:isolate or -p no:isolator"
        ) from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _close_cgroups(cgroups: WorkerCgroups) -> None:
    failed = cgroups.close()
    if failed:
        # The run is over and reported; this is all that is left to say.
        sys.stderr.write(f"isolator: could not remove cgroups: {', '.join(failed)}\n")


def _restore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "isolate(mem=None, max_growth=None, timeout=None): run this test in a worker of its "
        "own under --isolate=marked; mem= gives it its own memory budget and ceiling (and its "
        "own worker in any mode), max_growth= fails it if it retains more memory than that "
        "after its teardown, timeout= kills its worker after that many seconds.",
    )
    settings = load_settings(config)
    if not settings.enabled:
        return
    cgroups = None
    if settings.ceiling_kind == "cgroup":
        assert settings.ceiling_bytes is not None  # load_settings checked it
        try:
            cgroups = WorkerCgroups.prepare(settings.ceiling_bytes)
        except CgroupError as exc:
            raise pytest.UsageError(
                f"isolator: {settings.ceiling_kind_source}=cgroup: cannot be enforced here: {exc}"
            ) from None
        config.add_cleanup(functools.partial(_close_cgroups, cgroups))
    plugin = WorkerPlugin(config)
    config.pluginmanager.register(plugin, "isolator-worker")
    controller = Controller(config, settings, plugin, cgroups)
    config.stash[controller_key] = controller
    config.pluginmanager.register(controller, "isolator-controller")
    config.pluginmanager.register(ForkPrep(settings.mode), "isolator-forking")
    # SIGTERM ends the run the way Ctrl-C does, so that workers are stopped
    # and what finished is reported; left alone if someone else handles it.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
            config.add_cleanup(_restore_sigterm)
        else:
            controller.notes.append(OFF_MAIN_THREAD)


@pytest.fixture
def memory_monitor() -> Iterator[MemoryMonitor]:
    """This test's memory: ``current_bytes``, ``growth_bytes`` and ``peak_bytes``
    (RSS, relative to the test's start), for tests that assert on memory."""
    monitor = MemoryMonitor()
    yield monitor
    monitor.close()
