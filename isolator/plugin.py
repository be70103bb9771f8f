"""pytest entry point: options, validation, and the controller when isolation is on.

With isolation off (the default) this module registers nothing else, so
``-p isolator`` alone changes nothing about a run.
"""

from __future__ import annotations

import pytest

from isolator.controller import Controller
from isolator.settings import add_options, load_settings
from isolator.worker import WorkerReporter

controller_key = pytest.StashKey[Controller]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    settings = load_settings(config)
    if not settings.enabled:
        return
    reporter = WorkerReporter(config)
    config.pluginmanager.register(reporter, "isolator-worker-reporter")
    controller = Controller(config, settings, reporter)
    config.stash[controller_key] = controller
    config.pluginmanager.register(controller, "isolator-controller")
