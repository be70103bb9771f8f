"""Where replaying a report in another process differs from pytest's own
in-process path, and what we do about it. Each fix names the pytest behaviour
it answers, so it can go when pytest changes."""

from __future__ import annotations

import sys
from typing import Any

import pytest

try:
    from _pytest.subtests import SubtestReport, failed_subtests_key
except ImportError:  # pytest < 9 has no built-in subtests
    SubtestReport = None  # type: ignore[assignment,misc]
    failed_subtests_key = None  # type: ignore[assignment]


def after_unserialize(config: pytest.Config, report: object, data: dict[str, Any]) -> None:
    """Make a replayed report behave like the one the worker made."""
    if SubtestReport is None or not isinstance(report, SubtestReport):
        return
    # SubtestContext applies saferepr to its kwargs on construction, so a
    # round trip through _to_json/_from_json repr()s them twice (i=0 would
    # print as i='0'); put back the values the worker rendered once.
    context = data.get("_subtest.context")
    if isinstance(context, dict) and "kwargs" in context:
        object.__setattr__(report.context, "kwargs", dict(context["kwargs"]))
    # The subtests plugin fails a passing top-level test that contains failed
    # subtests, by counting them in config.stash while they run; they ran in
    # the worker, so count them here too, before the top-level report.
    if report.failed and failed_subtests_key is not None:
        config.stash[failed_subtests_key][report.id] += 1


def clear_inherited_queues(config: pytest.Config) -> None:
    """Empty pytest's queues of unraisable exceptions and exceptions in
    threads (pytest >= 8.4 keeps them in ``config.stash`` until the next test
    phase reports them). In the pytest process no test phase ever runs, so
    what they hold would be copied into, and reported by, every worker; call
    this right after each fork, so that one worker reports it, once."""
    for module, name in (
        ("_pytest.unraisableexception", "unraisable_exceptions"),
        ("_pytest.threadexception", "thread_exceptions"),
    ):
        key = getattr(sys.modules.get(module), name, None)
        queue = config.stash.get(key, None) if key is not None else None
        if queue is not None:
            queue.clear()
