"""The core promise: each module (or test) runs in a fresh forked worker, and
everything pytest reports stays what it would be without isolation."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import POLLUTING, IsolatedRunner, normalize, without_memory_section


def test_state_left_by_one_module_does_not_reach_the_next(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**POLLUTING)
    pytester.syspathinsert()
    isolated.plain().assert_outcomes(passed=1, failed=1)
    isolated.run("module").assert_outcomes(passed=2)
    isolated.run("test").assert_outcomes(passed=2)


def test_without_isolate_the_plugin_changes_nothing(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**POLLUTING)
    pytester.syspathinsert()
    isolated.run("off").assert_outcomes(passed=1, failed=1)
    pytester.runpytest("-p", "no:isolator").assert_outcomes(passed=1, failed=1)


PIDS = """
    import os, pathlib

    def record(name):
        with open(pathlib.Path(os.environ["PIDS_FILE"]), "a") as f:
            f.write(f"{name} {os.getpid()}\\n")

    def test_1():
        record(__name__ + "::1")

    def test_2():
        record(__name__ + "::2")
"""


def _pids(path: Path) -> dict[str, int]:
    return {
        name: int(pid)
        for name, pid in (line.split() for line in path.read_text().split("\n") if line)
    }


@pytest.mark.parametrize("mode", ["module", "test"])
def test_each_unit_gets_a_process_of_its_own(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    pytester.makepyfile(test_m1=PIDS, test_m2=PIDS)
    pids_file = pytester.path / "pids.txt"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    isolated.run(mode).assert_outcomes(passed=4)
    pids = _pids(pids_file)
    assert len(pids) == 4
    if mode == "module":
        assert pids["test_m1::1"] == pids["test_m1::2"]
        assert pids["test_m2::1"] == pids["test_m2::2"]
        assert pids["test_m1::1"] != pids["test_m2::1"]
    else:
        assert len(set(pids.values())) == 4


def test_ini_option_turns_isolation_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**POLLUTING)
    pytester.syspathinsert()
    pytester.makeini("[pytest]\nisolate = module\n")
    pytester.runpytest("-p", "isolator").assert_outcomes(passed=2)
    # The command line wins over the ini file.
    pytester.runpytest("-p", "isolator", "--isolate=off").assert_outcomes(passed=1, failed=1)


RICH_SUITE = {
    "test_rich": """
        import logging, sys, warnings
        import pytest

        @pytest.fixture
        def broken_setup():
            raise RuntimeError("setup broke")

        @pytest.fixture
        def broken_teardown():
            yield
            raise RuntimeError("teardown broke")

        def test_pass_with_output(record_property):
            print("to stdout")
            sys.stderr.write("to stderr\\n")
            logging.getLogger("rich").warning("a log line")
            record_property("answer", 42)

        def test_fail():
            print("before failing")
            assert [1, 2] == [1, 3]

        def test_setup_error(broken_setup):
            pass

        def test_teardown_error(broken_teardown):
            pass

        def test_skip():
            pytest.skip("not today")

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert False

        @pytest.mark.xfail(strict=True)
        def test_xpass_strict():
            pass

        @pytest.mark.xfail
        def test_xpass():
            pass

        def test_warns():
            warnings.warn("mind the gap", UserWarning)

        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_param(n):
            assert n != 2

        class TestGroup:
            def test_in_class(self):
                pass
    """,
    "test_subtests": """
        def test_with_subtests(subtests):
            for i in range(3):
                with subtests.test(msg="sub", i=i):
                    assert i != 1
    """,
}


@pytest.mark.parametrize("mode", ["module", "test"])
def test_terminal_output_is_what_pytest_prints_without_isolation(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    pytester.makepyfile(**RICH_SUITE)
    args = ("-v", "-rA", "-p", "no:cacheprovider", "-W", "always::UserWarning")
    plain = isolated.plain(*args)
    isolated_run = isolated.run(mode, *args)
    assert isolated_run.ret == plain.ret == pytest.ExitCode.TESTS_FAILED
    assert normalize(without_memory_section(isolated_run.outlines)) == normalize(plain.outlines)
    assert normalize(isolated_run.errlines) == normalize(plain.errlines)


def test_keyword_and_marker_selection(pytester: pytest.Pytester, isolated: IsolatedRunner) -> None:
    pytester.makepyfile(
        test_sel="""
            import pytest

            def test_alpha(): pass
            def test_beta(): pass

            @pytest.mark.slow
            def test_gamma(): pass
        """
    )
    pytester.makeini("[pytest]\nmarkers = slow: slow tests\n")
    result = isolated.run("module", "-k", "alpha or gamma", "-m", "not slow", "-v")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["*test_alpha PASSED*"])


STOPPING = {
    "test_s1": """
        def test_ok(): pass
        def test_bad(): assert False
        def test_bad_again(): assert False
    """,
    "test_s2": """
        import os, pathlib

        def test_never():
            pathlib.Path(os.environ["MARK_FILE"]).write_text("ran")
    """,
}


@pytest.mark.parametrize("mode", ["module", "test"])
@pytest.mark.parametrize(("stop_arg", "failed"), [("-x", 1), ("--maxfail=2", 2)])
def test_exitfirst_and_maxfail_start_no_new_worker(
    pytester: pytest.Pytester,
    isolated: IsolatedRunner,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    stop_arg: str,
    failed: int,
) -> None:
    pytester.makepyfile(**STOPPING)
    mark = pytester.path / "mark"
    monkeypatch.setenv("MARK_FILE", str(mark))
    result = isolated.run(mode, stop_arg)
    result.assert_outcomes(passed=1, failed=failed)
    result.stdout.fnmatch_lines([f"*stopping after {failed} failures*"])
    assert not mark.exists()


def test_last_failed_sees_every_result(pytester: pytest.Pytester, isolated: IsolatedRunner) -> None:
    pytester.makepyfile(
        test_lf="""
            def test_ok(): pass
            def test_broken(): assert False
        """,
        test_lf2="def test_also_ok(): pass\n",
    )
    isolated.run("module").assert_outcomes(passed=2, failed=1)
    rerun = isolated.run("module", "--lf", "-v")
    rerun.assert_outcomes(failed=1)
    rerun.stdout.fnmatch_lines(["*rerun previous 1 failure*", "*test_broken FAILED*"])
    ff = isolated.run("test", "--ff", "-v")
    ff.stdout.fnmatch_lines(["*test_broken FAILED*", "*test_ok PASSED*"])


def test_junitxml_has_one_testcase_per_test_with_properties_and_output(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(**RICH_SUITE)
    plain_xml = pytester.path / "plain.xml"
    isolated_xml = pytester.path / "isolated.xml"
    isolated.plain(f"--junitxml={plain_xml}", "-o", "junit_logging=all")
    isolated.run("module", f"--junitxml={isolated_xml}", "-o", "junit_logging=all")

    def cases(path: Path) -> dict[str, str]:
        root = ET.parse(path).getroot()
        out: dict[str, str] = {}
        for case in root.iter("testcase"):
            # isolator's own memory properties are checked below; the rest
            # must match the plain run exactly.
            for properties in case.findall("properties"):
                for prop in properties.findall("property"):
                    if prop.get("name", "").startswith("isolator_"):
                        properties.remove(prop)
                if not len(properties):
                    case.remove(properties)
            key = f"{case.get('classname')}::{case.get('name')}"
            assert key not in out
            children = sorted(
                ET.tostring(child, encoding="unicode").replace("\n", " ") for child in case
            )
            out[key] = json.dumps(normalize(children))
        return out

    assert cases(isolated_xml) == cases(plain_xml)
    assert 'name="answer" value="42"' in isolated_xml.read_text()
    root = ET.parse(isolated_xml).getroot()
    for case in root.iter("testcase"):
        names = {p.get("name") for p in case.iter("property")}
        assert {"isolator_peak_bytes", "isolator_growth_bytes"} <= names, case.get("name")


def test_durations_are_reported(pytester: pytest.Pytester, isolated: IsolatedRunner) -> None:
    pytester.makepyfile(
        test_slow="""
            import time
            def test_sleepy():
                time.sleep(0.05)
        """
    )
    result = isolated.run("test", "--durations=1")
    result.stdout.fnmatch_lines(["*slowest 1 durations*", "0.0*s call*test_sleepy*"])


FIXTURE_LOG = """
    import os, pathlib
    import pytest

    def log(event):
        with open(os.environ["FIXTURE_LOG"], "a") as f:
            f.write(f"{event} {os.getpid()}\\n")

    @pytest.fixture(scope="session")
    def session_fix():
        log("session-setup")
        yield
        log("session-teardown")

    @pytest.fixture(scope="module")
    def module_fix(session_fix):
        log("module-setup")
        yield
        log("module-teardown")

    def test_one(module_fix):
        log("test_one")

    def test_two(module_fix):
        log("test_two")
"""


def test_module_fixture_is_set_up_once_and_torn_down_in_its_worker(
    pytester: pytest.Pytester, isolated: IsolatedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_fx1=FIXTURE_LOG, test_fx2=FIXTURE_LOG)
    log = pytester.path / "fixtures.log"
    monkeypatch.setenv("FIXTURE_LOG", str(log))
    isolated.run("module").assert_outcomes(passed=4)
    lines = [line.split() for line in log.read_text().splitlines()]
    events = [event for event, _ in lines]
    one_worker = [
        "session-setup",
        "module-setup",
        "test_one",
        "test_two",
        "module-teardown",
        "session-teardown",
    ]
    # Session fixtures are per worker: each module's worker sets up its own.
    assert events == one_worker * 2
    first_pids = {pid for _, pid in lines[:6]}
    second_pids = {pid for _, pid in lines[6:]}
    assert len(first_pids) == len(second_pids) == 1
    assert first_pids != second_pids


def test_worker_ends_even_if_a_test_leaves_a_non_daemon_thread(
    pytester: pytest.Pytester, isolated: IsolatedRunner
) -> None:
    pytester.makepyfile(
        test_thread="""
            import threading

            STOP = threading.Event()

            def test_leaves_thread():
                threading.Thread(target=STOP.wait, name="lingering", daemon=False).start()
        """
    )
    result = isolated.pytester.runpytest_subprocess(
        "-p", "isolator", "--isolate=module", timeout=60
    )
    result.assert_outcomes(passed=1)


def test_bad_mode_is_a_one_line_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest("-p", "isolator", "--isolate=sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: isolator: --isolate: 'sometimes' is not an isolation mode (choose from *)"]
    )
    assert "Traceback" not in result.stderr.str()


def test_bad_ini_mode_names_the_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    pytester.makeini("[pytest]\nisolate = always\n")
    result = pytester.runpytest("-p", "isolator")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: isolator: ini option 'isolate' in tox.ini: 'always' *"])


@pytest.mark.parametrize("mode", ["module", "test"])
def test_a_stop_decided_in_the_worker_stops_the_run(
    pytester: pytest.Pytester, isolated: IsolatedRunner, mode: str
) -> None:
    """session.shouldstop or shouldfail set by a hook or a test, which run in
    the worker, ends the run as it does without isolation."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            if report.failed and item.name == "test_critical":
                item.session.shouldstop = f"critical test {item.name} failed"
            return report
        """
    )
    pytester.makepyfile(
        test_stop="""
            def test_first():
                pass

            def test_critical():
                assert False

            def test_never():
                pass
        """,
        test_fail="""
            def test_says_fail(request):
                request.session.shouldfail = "a test said so"

            def test_never_either():
                pass
        """,
    )
    plain = isolated.plain("-p", "no:randomly", "test_stop.py")
    result = isolated.run(mode, "test_stop.py")
    assert result.ret == plain.ret == pytest.ExitCode.INTERRUPTED
    assert result.parseoutcomes() == plain.parseoutcomes() == {"passed": 1, "failed": 1}
    result.stdout.fnmatch_lines(["*Interrupted: critical test test_critical failed*"])
    plain = isolated.plain("-p", "no:randomly", "test_fail.py")
    result = isolated.run(mode, "test_fail.py")
    assert result.ret == plain.ret
    assert result.parseoutcomes() == plain.parseoutcomes() == {"passed": 1}
