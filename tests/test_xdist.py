"""Under pytest-xdist: isolation inside each xdist worker, one summary for all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import execnet
import pytest

from conftest import POLLUTING, IsolatedRunner

RECORDING = """
    import os

    def record(name):
        with open(os.environ["RAN_FILE"], "a") as f:
            f.write(f"{name} {os.getpid()}\\n")

    @pytest.fixture(scope="module")
    def module_state():
        return []

    @pytest.mark.parametrize("n", range(6))
    def test_numbered(n, module_state):
        module_state.append(n)
        record(f"{__name__}::{n}")
        # The module's tests share one worker, in order, under module isolation.
        assert module_state == list(range(n + 1)) or os.environ.get("SPLIT_OK")
"""


@pytest.mark.parametrize("dist", ["load", "loadscope", "loadfile", "loadgroup", "worksteal", "no"])
def test_every_dist_mode_runs_each_test_once_in_isolation(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    dist: str,
) -> None:
    for name in ("test_m1", "test_m2", "test_m3"):
        pytester.makepyfile(**{name: "import pytest\n" + RECORDING.replace("\n    ", "\n")})
    ran = pytester.path / "ran.txt"
    monkeypatch.setenv("RAN_FILE", str(ran))
    if dist in ("load", "loadgroup", "worksteal"):
        # These modes may split a module across xdist workers.
        monkeypatch.setenv("SPLIT_OK", "1")
    args = ["-n", "2", "--dist", dist] if dist != "no" else ["-p", "xdist"]
    result = isolated.run("module", *args)
    result.assert_outcomes(passed=18)
    names = Counter(line.split()[0] for line in ran.read_text().splitlines())
    assert len(names) == 18
    assert set(names.values()) == {1}


def test_parallel_isolation_and_one_summary_for_all_nodes(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**POLLUTING)
    pytester.syspathinsert()
    report_path = pytester.path / "memory.json"
    result = isolated.run(
        "module",
        "--worker-mem=512MB",
        "-n",
        "2",
        "--dist",
        "loadfile",
        f"--isolate-report={report_path}",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= isolator: memory =*", "*gw?/w1 *"])
    report = json.loads(report_path.read_text())
    assert report["summary"]["tests"] == 2
    assert {worker["node"] for worker in report["workers"]} == {"gw0", "gw1"}
    assert {test["worker"].split("/")[0] for test in report["tests"]} == {"gw0", "gw1"}
    assert report["summary"]["largest_peak_worker"].startswith(("gw0/w", "gw1/w"))


def test_admission_waits_for_memory_and_counts_it(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_one="def test_one():\n    pass\n", test_two="def test_two():\n    pass\n"
    )
    available = pytester.path / "available"
    available.write_text(str(100 * 1000**2))
    monkeypatch.setenv("ISOLATOR_AVAILABLE_MEMORY_FILE", str(available))
    pytester.makeini("[pytest]\nisolate_admission_wait = 0.2\n")
    result = isolated.run("module", "--worker-mem=512MB")
    result.assert_outcomes(passed=2)
    # The first unit waits its full time; after that nobody is freeing
    # memory, so the run stops waiting rather than stall every unit.
    result.stdout.fnmatch_lines(
        ["1 times a worker waited for the machine to have its budget of memory available"]
    )
    # With room to spare nobody waits.
    available.write_text(str(100 * 1000**3))
    roomy = isolated.run("module", "--worker-mem=512MB")
    roomy.assert_outcomes(passed=2)
    assert "waited for the machine" not in roomy.stdout.str()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: execnet's socket server, run in a thread: the node's pytest then runs
#: outside the main thread, where Python cannot catch signals.
SERVER_IN_A_THREAD = """
import sys, threading
from execnet.gateway_base import get_execmodel
from execnet.script import socketserver

socketserver.execmodel = get_execmodel("thread")
listening = socketserver.bind_and_listen(sys.argv[1], socketserver.execmodel)
thread = threading.Thread(target=socketserver.startserver, args=(listening, True))
thread.start()
thread.join()
"""


@pytest.mark.parametrize("in_a_thread", [False, True], ids=["server", "server-in-a-thread"])
def test_workers_on_another_host_through_execnet_socket(
    pytester: pytest.Pytester, tmp_path: Path, in_a_thread: bool
) -> None:
    """xdist's --tx socket=HOST:PORT against an execnet socket server on loopback."""
    remote = tmp_path / "remote"
    remote.mkdir()
    cwd_file = tmp_path / "cwd.txt"
    pytester.makepyfile(
        test_remote=f"""
            import os

            def test_where():
                with open({str(cwd_file)!r}, "a") as f:
                    f.write(os.getcwd() + "\\n")

            def test_other():
                pass
        """
    )
    port = _free_port()
    server_script = Path(execnet.__file__).parent / "script" / "socketserver.py"
    if in_a_thread:
        server_script = tmp_path / "server_in_a_thread.py"
        server_script.write_text(SERVER_IN_A_THREAD)
    server = subprocess.Popen(
        [sys.executable, str(server_script), f"127.0.0.1:{port}"],
        cwd=remote,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        # The server says when it listens; read until then.
        for line in server.stdout:
            if "Entering Accept loop" in line:
                break
        result = pytester.runpytest_subprocess(
            "-p",
            "isolator",
            "--isolate=module",
            "-d",
            f"--tx=socket=127.0.0.1:{port}",
            "--rsyncdir=.",
            # (-W error: a note must not become an error that stops the node.)
            "-W",
            "error",
            "-W",
            "ignore::DeprecationWarning",
            timeout=120,
        )
    finally:
        server.kill()
        server.wait()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*gw0/w1 *"])
    if in_a_thread:
        # Said where the user looks, not on the server's console.
        result.stdout.fnmatch_lines(
            [
                "*= isolator: notes from xdist nodes =*",
                "gw0: pytest runs outside the main thread here*",
            ]
        )
    ran_in = cwd_file.read_text().strip()
    assert ran_in.startswith(str(remote)), ran_in
    assert os.path.exists(ran_in)


def test_admission_does_not_wait_for_a_budget_no_machine_here_has(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    available = pytester.path / "available"
    available.write_text(str(100 * 1000**2))
    monkeypatch.setenv("ISOLATOR_AVAILABLE_MEMORY_FILE", str(available))
    pytester.makeini("[pytest]\nisolate_admission_wait = 30\n")
    result = isolated.pytester.runpytest_subprocess(
        "-p",
        "isolator",
        "--isolate=module",
        "--worker-mem=100TB",
        "--worker-ceiling=none",
        timeout=25,
    )
    result.assert_outcomes(passed=1)
    assert "waited for the machine" not in result.stdout.str()
