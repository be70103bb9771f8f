"""Shared helpers for isolator's own tests.

Every acceptance test drives a real pytest run in a subprocess
(``--runpytest=subprocess`` in pyproject.toml), so forks, signals and rlimits
happen in processes of their own and never in the test runner.
"""

from __future__ import annotations

import os
import re

import pytest

from isolator import cgroup

#: Module A pollutes a shared registry; module B expects it clean. Fails
#: without isolation, passes with it.
POLLUTING = {
    "registry": "ITEMS: list[str] = []\n",
    "test_a_pollutes": """
        import registry

        def test_register():
            registry.ITEMS.append("a")
            assert registry.ITEMS == ["a"]
    """,
    "test_b_expects_clean": """
        import registry

        def test_registry_is_clean():
            assert registry.ITEMS == []
    """,
}


_TIMING = re.compile(r" in \d+\.\d+s( \(\d+:\d+:\d+\))?")
_DURATION = re.compile(r"^\d+\.\d+s ")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def without_memory_section(lines: list[str]) -> list[str]:
    """Output lines less isolator's memory summary (it shows only when isolating)."""
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("=") and "isolator: memory" in line:
            skipping = True
            continue
        if skipping and line.startswith("="):
            skipping = False
        if not skipping:
            kept.append(line)
    return kept


def normalize(lines: list[str]) -> list[str]:
    """Output lines with run times blanked, for comparing two runs."""
    return [
        _ADDRESS.sub(" at 0x?", _DURATION.sub("N.NNs ", _TIMING.sub(" in N.NNs", line)))
        for line in lines
    ]


@pytest.fixture(autouse=True)
def _plain_inner_runs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs a test starts keep their test order: pytest-randomly (installed
    for one test) would otherwise shuffle every inner run differently."""
    if "pytester" in request.fixturenames:
        # pytester clears PYTEST_ADDOPTS when it sets up, so set it after.
        request.getfixturevalue("pytester")
        monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")


@pytest.fixture
def isolated(pytester: pytest.Pytester) -> IsolatedRunner:
    return IsolatedRunner(pytester)


class IsolatedRunner:
    """Runs the pytester project plain and under isolation."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester

    def plain(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest("-p", "isolator", *args)

    def run(self, mode: str, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest("-p", "isolator", f"--isolate={mode}", *args)


def memory_cgroup_or_skip(version: int | None = None) -> cgroup.Hierarchy:
    """This process's memory cgroup, if it is on cgroup ``version`` (any, if
    None) and cgroups can be made under it here; otherwise the test is
    skipped, saying why."""
    hierarchy = cgroup.memory_hierarchy()
    if hierarchy is None:
        pytest.skip("no cgroup hierarchy with the memory controller is mounted here")
    if version is not None and hierarchy.version != version:
        pytest.skip(
            f"the memory controller is bound to cgroup v{hierarchy.version} on this machine, "
            f"so cgroup v{version} cannot limit memory here"
        )
    if not os.access(hierarchy.own, os.W_OK):
        pytest.skip(f"cannot create cgroups under {hierarchy.own} (needs root or delegation)")
    return hierarchy
