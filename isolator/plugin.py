"""pytest entry point: options, validation, and the controller when isolation is on.

With isolation off (the default) this module registers nothing else, so
``-p isolator`` alone changes nothing about a run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from isolator.controller import Controller
from isolator.memory import MemoryMonitor
from isolator.settings import add_options, load_settings
from isolator.worker import WorkerPlugin

controller_key = pytest.StashKey[Controller]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


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
    plugin = WorkerPlugin(config)
    config.pluginmanager.register(plugin, "isolator-worker")
    controller = Controller(config, settings, plugin)
    config.stash[controller_key] = controller
    config.pluginmanager.register(controller, "isolator-controller")


@pytest.fixture
def memory_monitor() -> Iterator[MemoryMonitor]:
    """This test's memory: ``current_bytes``, ``growth_bytes`` and ``peak_bytes``
    (RSS, relative to the test's start), for tests that assert on memory."""
    monitor = MemoryMonitor()
    yield monitor
    monitor.close()
