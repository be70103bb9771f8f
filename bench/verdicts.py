"""A pytest plugin for make conformance: the verdict of every test, as JSON.

Load with ``-p bench.verdicts``; writes to the path in $VERDICTS_FILE. It
reads reports where every reporting plugin does (the replay, under
isolation), so it sees what the terminal and junit xml see.
"""

from __future__ import annotations

import json
import os

import pytest

_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 2, "failed": 3, "error": 3}


class Verdicts:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.verdicts: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        category = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[0]
        if not category or category.startswith("subtests"):
            return
        if report.when != "call" and category == "failed":
            category = "error"
        previous = self.verdicts.get(report.nodeid)
        if previous is None or _RANK.get(category, 0) >= _RANK.get(previous, 0):
            self.verdicts[report.nodeid] = category

    def pytest_sessionfinish(self) -> None:
        path = os.environ.get("VERDICTS_FILE")
        if path:
            with open(path, "w") as out:
                json.dump(self.verdicts, out, indent=0, sort_keys=True)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Verdicts(config), "bench-verdicts")
