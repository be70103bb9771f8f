"""Memory cgroups: limits read from this process's own cgroup, v1 and v2.

The real tests make nested cgroups under the one this test process is in and
run a process inside them; they need root and a writable memory hierarchy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import memory_cgroup_or_skip
from isolator import cgroup, headroom

MB = 1000**2


class Nest:
    """Cgroups made under this process's own, removed at the end."""

    def __init__(self, hierarchy: cgroup.Hierarchy, name: str) -> None:
        self.hierarchy = hierarchy
        self.top = hierarchy.own / name
        self.made: list[Path] = []

    def make(self, relative: str, limit: int | None = None) -> Path:
        path = self.top / relative if relative else self.top
        path.mkdir()
        self.made.append(path)
        if limit is not None:
            (path / self.hierarchy.limit_file).write_text(str(limit))
        return path

    def remove(self) -> None:
        for path in reversed(self.made):
            for pid in (path / "cgroup.procs").read_text().split():
                (self.hierarchy.own / "cgroup.procs").write_text(pid)
            path.rmdir()


@pytest.fixture
def v1_nest() -> Iterator[Nest]:
    nest = Nest(memory_cgroup_or_skip(1), f"isolator-test-{os.getpid()}")
    yield nest
    nest.remove()


_REPORT_LIMITS = """
import json, os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
    procs.write("0")  # into the nested cgroup, before anything reads limits
from isolator import memory
print(json.dumps({"total": memory.total_bytes(), "available": memory.available_bytes()}))
"""


def _limits_seen_from(path: Path) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "ISOLATOR_AVAILABLE_MEMORY_FILE"}
    completed = subprocess.run(
        [sys.executable, "-c", _REPORT_LIMITS, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    data: dict[str, int] = json.loads(completed.stdout)
    return data


def test_v1_limits_come_from_this_process_cgroup_and_its_ancestors(v1_nest: Nest) -> None:
    # A limit on the process's own cgroup, and one on an ancestor that is
    # tighter than the process's own: both apply, the tightest wins.
    v1_nest.make("", limit=900 * MB)
    inner = v1_nest.make("inner", limit=300 * MB)
    seen = _limits_seen_from(inner)
    page = os.sysconf("SC_PAGE_SIZE")
    assert seen["total"] == 300 * MB // page * page
    assert 0 < seen["available"] <= seen["total"]

    deeper = v1_nest.make("inner/deeper")  # no limit of its own
    outer_only = v1_nest.make("other", limit=None)
    assert _limits_seen_from(deeper)["total"] == 300 * MB // page * page
    assert _limits_seen_from(outer_only)["total"] == 900 * MB // page * page


def test_v2_limits_come_from_this_process_cgroup_for_real() -> None:
    hierarchy = memory_cgroup_or_skip(2)
    nest = Nest(hierarchy, f"isolator-test-{os.getpid()}")
    try:
        nest.make("", limit=400 * MB)
        (nest.top / "cgroup.subtree_control").write_text("+memory")
        inner = nest.make("inner")
        assert _limits_seen_from(inner)["total"] == 400 * MB
    finally:
        nest.remove()


def _fake_machine(tmp_path: Path, cgroup_line: str, mount_root: str) -> tuple[Path, Path]:
    """A /proc/self and a cgroup v2 mount, as files: for the paths the kernel
    would show in a container without a cgroup namespace."""
    proc = tmp_path / "proc"
    proc.mkdir()
    mount = tmp_path / "cg 2"  # a space, escaped in mountinfo
    (proc / "cgroup").write_text(f"{cgroup_line}\n")
    (proc / "mountinfo").write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n"
        f"41 31 0:38 {mount_root} {str(mount).replace(' ', chr(92) + '040')} rw - cgroup2 "
        "cgroup2 rw\n"
    )
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("cpu io memory pids\n")
    return proc, mount


def test_v2_paths_and_limits_as_a_container_without_a_namespace_sees_them(
    tmp_path: Path,
) -> None:
    """Fakes the files only: the real v2 test above needs a machine whose
    memory controller is bound to cgroup v2."""
    proc, mount = _fake_machine(tmp_path, "0::/docker/abc/job", "/docker/abc")
    own = mount / "job"
    own.mkdir()
    (mount / "memory.max").write_text("2000000000\n")
    (mount / "memory.current").write_text("500000000\n")
    (own / "memory.max").write_text("max\n")
    (own / "memory.current").write_text("100\n")
    hierarchy = cgroup.memory_hierarchy(proc)
    assert hierarchy == cgroup.Hierarchy(2, mount, own)
    assert hierarchy.levels() == [own, mount]
    # The ancestor's limit applies; the process's own cgroup has none.
    assert cgroup.limits(hierarchy) == [(2_000_000_000, 500_000_000)]


def test_v1_is_used_when_v2_has_no_memory_controller(tmp_path: Path) -> None:
    proc, mount = _fake_machine(tmp_path, "0::/", "/")
    (mount / "cgroup.controllers").write_text("hugetlb\n")
    v1 = tmp_path / "memory"
    (v1 / "job").mkdir(parents=True)
    with open(proc / "mountinfo", "a") as mountinfo:
        mountinfo.write(f"35 31 0:32 / {v1} rw - cgroup cgroup rw,memory\n")
    with open(proc / "cgroup", "a") as lines:
        lines.write("4:memory:/job\n")
    assert cgroup.memory_hierarchy(proc) == cgroup.Hierarchy(1, v1, v1 / "job")


def test_process_room_is_the_tightest_pids_limit_up_the_tree(tmp_path: Path) -> None:
    """A container's limit (an ancestor's) applies as well as the job's own."""
    proc, mount = _fake_machine(tmp_path, "0::/docker/abc/job", "/docker/abc")
    own = mount / "job"
    own.mkdir()
    (mount / "pids.max").write_text("100\n")
    (mount / "pids.current").write_text("90\n")
    (own / "pids.max").write_text("max\n")
    (own / "pids.current").write_text("30\n")
    assert headroom._cgroup_room(proc) == (10, f"pids cgroup {mount}: pids.max 100")
    (own / "pids.max").write_text("35\n")
    assert headroom._cgroup_room(proc) == (5, f"pids cgroup {own}: pids.max 35")
    # No pids controller: nothing is known to limit processes.
    (mount / "cgroup.controllers").write_text("cpu memory\n")
    assert headroom._cgroup_room(proc) is None
