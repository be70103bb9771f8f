"""What the user asked for: command-line options and ini keys, checked once.

Every value is validated in ``pytest_configure``, before any test runs, and a
bad one becomes a one-line ``UsageError`` that quotes it and says where it came
from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal, TypeVar

import pytest

from isolator.sizes import SizeError, parse_size

NumberT = TypeVar("NumberT", int, float)

Mode = Literal["off", "module", "test", "marked", "shared", "auto"]
MODES: tuple[Mode, ...] = ("off", "module", "test", "marked", "shared", "auto")
CeilingKind = Literal["rlimit", "cgroup"]
CEILING_KINDS: tuple[CeilingKind, ...] = ("rlimit", "cgroup")

#: Defaults of the history settings (see history.py).
DEFAULT_AUTO_SHARE = 0.25
DEFAULT_CHANGE_BYTES = 10 * 1000**2
DEFAULT_CHANGE_PERCENT = 20.0


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolator", "isolator: fresh worker processes with memory ceilings")
    group.addoption(
        "--isolate",
        dest="isolate",
        default=None,
        metavar="MODE",
        help="Which unit gets a fresh forked worker: module (each test module), test (each "
        "test), marked (tests marked @pytest.mark.isolate; the rest share one), shared (one "
        "worker recycled on memory), auto (like shared, but a test whose peak last run was "
        "over isolate_auto_threshold gets its own), or off. Ini: isolate.",
    )
    group.addoption(
        "--worker-mem",
        dest="worker_mem",
        default=None,
        metavar="SIZE",
        help="Memory budget per worker (512MB, 1.5GiB, 800M, bytes): an RLIMIT_AS ceiling "
        "above the worker's start, and the size over which a worker is recycled at the next "
        "test boundary. Ini: worker_mem.",
    )
    group.addoption(
        "--worker-ceiling",
        dest="worker_ceiling",
        default=None,
        metavar="SIZE|none",
        help="Hard RLIMIT_AS ceiling per worker, apart from the budget (default: same as "
        "--worker-mem; 'none' for no ceiling). Ini: worker_ceiling.",
    )
    group.addoption(
        "--worker-ceiling-kind",
        dest="worker_ceiling_kind",
        default=None,
        metavar="rlimit|cgroup",
        help="What the ceiling counts: rlimit (default) caps address space with RLIMIT_AS, "
        "mappings and reservations included; cgroup puts each worker in a memory cgroup of "
        "its own and caps memory used (needs root or a delegated cgroup). Ini: "
        "worker_ceiling_kind.",
    )
    group.addoption(
        "--isolate-timeout",
        dest="isolate_timeout",
        default=None,
        metavar="SECONDS",
        help="Kill a worker whose test runs longer than this, dump its stack and fail the "
        "test. Ini: isolate_timeout.",
    )
    group.addoption(
        "--mem-growth-limit",
        dest="mem_growth_limit",
        default=None,
        metavar="SIZE",
        help="Fail (as a teardown error) a test that retains more than SIZE of memory "
        "after its teardown. Ini: mem_growth_limit.",
    )
    group.addoption(
        "--mem-top",
        dest="mem_top",
        default=None,
        metavar="N",
        help="Show the N tests with the highest memory peak and the N largest workers in "
        "the summary (default 10, 0 for none). Ini: mem_top.",
    )
    group.addoption(
        "--isolate-report",
        dest="isolate_report",
        default=None,
        metavar="PATH",
        help="Write per-worker and per-test memory figures as JSON to PATH.",
    )
    group.addoption(
        "--isolate-html",
        dest="isolate_html",
        default=None,
        metavar="PATH",
        help="Write a self-contained HTML page drawing memory over time per worker to PATH.",
    )
    group.addoption(
        "--isolate-sample-interval",
        dest="isolate_sample_interval",
        default=None,
        metavar="SECONDS",
        help="How often the running worker's memory is sampled between test boundaries, "
        "for the peaks and the picture (default 0.5). Ini: isolate_sample_interval.",
    )
    group.addoption(
        "--isolate-gc-stats",
        dest="isolate_gc_stats",
        action="store_true",
        default=False,
        help="Show what each worker's garbage collector did (collections, collected, "
        "uncollectable per generation).",
    )
    _refuse_clashes(parser, group)
    parser.addini("isolate", "Default for --isolate.", default="off")
    parser.addini("isolate_sample_interval", "Default for --isolate-sample-interval.", default="")
    parser.addini("mem_growth_limit", "Default for --mem-growth-limit.", default="")
    parser.addini("mem_top", "Default for --mem-top.", default="")
    parser.addini(
        "isolate_admission_wait",
        "Seconds a unit waits for the machine to have its --worker-mem budget available "
        "before it starts anyway (default 60).",
        default="",
    )
    parser.addini("worker_mem", "Default for --worker-mem.", default="")
    parser.addini("worker_ceiling", "Default for --worker-ceiling.", default="")
    parser.addini("worker_ceiling_kind", "Default for --worker-ceiling-kind.", default="")
    parser.addini("isolate_timeout", "Default for --isolate-timeout.", default="")
    parser.addini(
        "isolate_auto_threshold",
        "Under --isolate=auto, a test whose recorded peak is over this gets a worker of its "
        "own: a size (100MB) or a share of --worker-mem (25%, the default).",
        default="",
    )
    parser.addini(
        "isolate_change_bytes",
        "A test's peak counts as grown since the last run when it grew by more than this "
        "size (default 10MB) and by more than isolate_change_percent.",
        default="",
    )
    parser.addini(
        "isolate_change_percent",
        "A test's peak counts as grown since the last run when it grew by more than this "
        "many percent (default 20) and by more than isolate_change_bytes.",
        default="",
    )
    parser.addini(
        "isolate_markers",
        "Markers that give a test a worker of its own under --isolate=marked (besides 'isolate').",
        type="args",
        default=[],
    )


def _refuse_clashes(parser: pytest.Parser, ours: object) -> None:
    """Raise if another plugin already added one of our option names.

    pytest 9 refuses the clash itself as the option is added; pytest 8 only
    once it builds its argparse parser, with a traceback instead of the
    plugin's one-line error. pytest's parser keeps no public list of options,
    so its groups are read defensively: if that changes, the check finds
    nothing and pytest's own check is what remains."""
    groups = [*getattr(parser, "_groups", ()), getattr(parser, "_anonymous", None)]

    def names(group: object) -> set[str]:
        return {name for option in getattr(group, "options", ()) for name in option.names()}

    others = set().union(*(names(group) for group in groups if group is not ours))
    clash = sorted(names(ours) & others)
    if clash:
        raise ValueError(f"argument {clash[0]}: conflicting option string: {', '.join(clash)}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated isolation settings of one pytest run."""

    #: Which unit gets a fresh worker.
    mode: Mode
    #: Recycle a worker whose own memory is over this many bytes.
    budget_bytes: int | None
    #: The ceiling: RLIMIT_AS headroom above the worker's starting address
    #: space, or the limit of its memory cgroup.
    ceiling_bytes: int | None
    #: Kill a worker whose test runs longer than this.
    timeout_s: float | None
    #: Markers that earn a test its own worker in ``marked`` mode.
    markers: tuple[str, ...]
    #: Fail a test that retains more than this after its teardown.
    growth_limit_bytes: int | None = None
    #: How many tests and workers the terminal summary lists.
    top: int = 10
    #: Where to write the JSON report and the HTML picture.
    report_path: str | None = None
    html_path: str | None = None
    #: How long a unit waits for its budget of memory to be free.
    admission_wait_s: float = 60.0
    #: How often the parent samples a running worker's memory.
    sample_interval_s: float = 0.5
    #: Collect the workers' garbage collector statistics.
    gc_stats: bool = False
    #: Under ``auto``: a test whose recorded peak is over this gets its own worker.
    auto_threshold_bytes: int | None = None
    #: A test's peak grew since the last run when it grew by more than both.
    change_min_bytes: int = DEFAULT_CHANGE_BYTES
    change_min_percent: float = DEFAULT_CHANGE_PERCENT
    #: What the ceiling counts: address space (RLIMIT_AS) or memory (a cgroup).
    ceiling_kind: CeilingKind = "rlimit"
    #: Where the ceiling kind came from, for messages.
    ceiling_kind_source: str = "--worker-ceiling-kind"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def _source(config: pytest.Config, option: str | None, ini: str) -> tuple[str | None, str]:
    """The raw value of a setting and a phrase saying where it came from."""
    value = config.getoption(option) if option is not None else None
    if value is not None:
        return str(value), f"--{option.replace('_', '-')}"  # type: ignore[union-attr]
    raw = config.getini(ini)
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None, ""
    where = f"ini option {ini!r}"
    if config.inipath is not None:
        where += f" in {config.inipath.name}"
    return text, where


def _number(
    config: pytest.Config,
    option: str | None,
    ini: str,
    kind: type[NumberT],
    *,
    positive: bool,
) -> NumberT | None:
    """A count (int) or a number of seconds (float), checked: positive, or
    0 and more."""
    raw, where = _source(config, option, ini)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
        unit = "count (a whole number" if kind is int else "number of seconds ("
        bound = "more than 0)" if positive else "0 or more)"
        sep = ", " if kind is int else ""
        raise pytest.UsageError(f"isolator: {where}: {raw!r} is not a {unit}{sep}{bound}")
    return value


def _output_path(config: pytest.Config, option: str) -> str | None:
    """A report path whose directory exists (made if need be), as junitxml does."""
    raw = config.getoption(option)
    if raw is None:
        return None
    path = Path(raw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise pytest.UsageError(
            f"isolator: --{option.replace('_', '-')}: cannot write {raw!r} ({exc.strerror or exc})"
        ) from None
    if path.is_dir():
        raise pytest.UsageError(
            f"isolator: --{option.replace('_', '-')}: {raw!r} is a directory, not a file"
        )
    return str(path)


def _size(config: pytest.Config, option: str | None, ini: str, *, allow_none: bool) -> int | None:
    raw, where = _source(config, option, ini)
    if raw is None:
        return None
    if allow_none and raw.lower() == "none":
        return None
    try:
        return parse_size(raw)
    except SizeError as exc:
        raise pytest.UsageError(f"isolator: {where}: {exc}") from None


ChoiceT = TypeVar("ChoiceT", bound=str)


def _choice(
    config: pytest.Config, option: str, ini: str, choices: tuple[ChoiceT, ...], what: str
) -> tuple[ChoiceT, str]:
    """One of ``choices`` (the first if not given), and where it came from."""
    raw, where = _source(config, option, ini)
    text = choices[0] if raw is None else raw.strip().lower()
    for choice in choices:
        if text == choice:
            return choice, where
    raise pytest.UsageError(
        f"isolator: {where}: {raw!r} is not {what} (choose from {', '.join(choices)})"
    )


def _percent(config: pytest.Config, ini: str) -> float | None:
    """A number of percent, "20" or "20%", more than 0."""
    raw, where = _source(config, None, ini)
    if raw is None:
        return None
    try:
        value = float(raw.removesuffix("%"))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise pytest.UsageError(
            f"isolator: {where}: {raw!r} is not a percentage (a number more than 0, like 20%)"
        )
    return value


def _size_or_share(config: pytest.Config, ini: str, budget: int | None) -> int | None:
    """A size, or a share of the budget ("25%")."""
    raw, where = _source(config, None, ini)
    if raw is None:
        return None
    if not raw.endswith("%"):
        return _size(config, None, ini, allow_none=False)
    share = _percent(config, ini)
    if share is None or share > 100:
        raise pytest.UsageError(
            f"isolator: {where}: {raw!r} is more than the whole budget (at most 100%)"
        )
    if budget is None:
        return None  # only --isolate=auto uses it, and that needs a budget
    return max(int(budget * share / 100), 1)


def load_settings(config: pytest.Config) -> Settings:
    mode, where = _choice(config, "isolate", "isolate", MODES, "an isolation mode")
    if mode != "off":
        missing = [name for name in ("fork", "pidfd_open", "memfd_create") if not hasattr(os, name)]
        if missing:
            raise pytest.UsageError(
                f"isolator: {where or '--isolate'}: isolation needs Linux 5.3+ "
                f"(os.{', os.'.join(missing)} is missing here); run without --isolate, "
                "or use pytest-xdist for parallel runs"
            )

    if mode != "off" and (config.getoption("usepdb", False) or config.getoption("trace", False)):
        raise pytest.UsageError(
            "isolator: --pdb and --trace need the test to run in the pytest process, and "
            "isolated tests run in forked workers; debug with --isolate=off (or -p no:isolator)"
        )

    budget = _size(config, "worker_mem", "worker_mem", allow_none=False)
    ceiling_raw, _ = _source(config, "worker_ceiling", "worker_ceiling")
    if ceiling_raw is None:
        ceiling = budget
    else:
        ceiling = _size(config, "worker_ceiling", "worker_ceiling", allow_none=True)

    ceiling_kind, kind_source = _choice(
        config, "worker_ceiling_kind", "worker_ceiling_kind", CEILING_KINDS, "a kind of ceiling"
    )
    if ceiling_kind == "cgroup" and ceiling is None:
        raise pytest.UsageError(
            f"isolator: {kind_source}: 'cgroup' needs a ceiling to enforce: --worker-mem=SIZE "
            "or --worker-ceiling=SIZE"
        )

    timeout = _number(config, "isolate_timeout", "isolate_timeout", float, positive=True)

    if mode in ("shared", "auto") and budget is None:
        raise pytest.UsageError(
            f"isolator: --isolate={mode} recycles workers on memory only, so it needs "
            "--worker-mem=SIZE (or use --isolate=module)"
        )
    auto_threshold = _size_or_share(config, "isolate_auto_threshold", budget)
    if mode == "auto" and auto_threshold is None and budget is not None:
        auto_threshold = int(budget * DEFAULT_AUTO_SHARE)
    change_bytes = _size(config, None, "isolate_change_bytes", allow_none=False)
    change_percent = _percent(config, "isolate_change_percent")

    markers = tuple(str(m) for m in config.getini("isolate_markers"))
    growth_limit = _size(config, "mem_growth_limit", "mem_growth_limit", allow_none=False)

    top = _number(config, "mem_top", "mem_top", int, positive=False)
    admission_wait = _number(config, None, "isolate_admission_wait", float, positive=False)
    sample_interval = _number(
        config, "isolate_sample_interval", "isolate_sample_interval", float, positive=True
    )

    return Settings(
        mode=mode,
        admission_wait_s=60.0 if admission_wait is None else admission_wait,
        sample_interval_s=sample_interval or 0.5,
        gc_stats=bool(config.getoption("isolate_gc_stats")),
        budget_bytes=budget,
        ceiling_bytes=ceiling,
        ceiling_kind=ceiling_kind,
        ceiling_kind_source=kind_source or "--worker-ceiling-kind",
        timeout_s=timeout,
        markers=markers,
        growth_limit_bytes=growth_limit,
        top=10 if top is None else top,
        report_path=_output_path(config, "isolate_report"),
        html_path=_output_path(config, "isolate_html"),
        auto_threshold_bytes=auto_threshold,
        change_min_bytes=DEFAULT_CHANGE_BYTES if change_bytes is None else change_bytes,
        change_min_percent=DEFAULT_CHANGE_PERCENT if change_percent is None else change_percent,
    )


@dataclasses.dataclass(frozen=True)
class Overrides:
    """What ``@pytest.mark.isolate(...)`` sets for one test."""

    #: The marker was there at all (a worker of its own under ``marked``).
    marked: bool = False
    budget_bytes: int | None = None
    growth_limit_bytes: int | None = None
    timeout_s: float | None = None

    @property
    def needs_own_worker(self) -> bool:
        # A memory figure for one test only means something if the worker
        # is that test's alone.
        return self.budget_bytes is not None


overrides_key = pytest.StashKey[Overrides]()
_NO_OVERRIDES = Overrides()


def overrides_of(item: pytest.Item) -> Overrides:
    """What the item's marker sets (nothing, before collection finished)."""
    return item.stash.get(overrides_key, _NO_OVERRIDES)


_MARKER_KWARGS = ("mem", "max_growth", "timeout")


def read_marker(item: pytest.Item, markers: tuple[str, ...]) -> Overrides:
    """The isolate marker's arguments for ``item``, checked; UsageError if bad."""
    marker = item.get_closest_marker("isolate")
    marked = marker is not None or any(item.get_closest_marker(name) for name in markers)
    if marker is None:
        return Overrides(marked=marked)
    where = f"@pytest.mark.isolate on {item.nodeid}"
    if marker.args:
        raise pytest.UsageError(
            f"isolator: {where}: takes keyword arguments only ({', '.join(_MARKER_KWARGS)})"
        )
    unknown = sorted(set(marker.kwargs) - set(_MARKER_KWARGS))
    if unknown:
        raise pytest.UsageError(
            f"isolator: {where}: unknown argument {unknown[0]!r} "
            f"(expected {', '.join(_MARKER_KWARGS)})"
        )

    def size(key: str) -> int | None:
        value = marker.kwargs.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        try:
            return parse_size(str(value))
        except SizeError as exc:
            raise pytest.UsageError(f"isolator: {where}: {key}={exc}") from None

    timeout = marker.kwargs.get("timeout")
    if timeout is not None:
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            timeout = -1.0
        if not (timeout > 0 and math.isfinite(timeout)):
            raise pytest.UsageError(
                f"isolator: {where}: timeout={marker.kwargs['timeout']!r} must be a positive "
                "number of seconds"
            )
    return Overrides(
        marked=True,
        budget_bytes=size("mem"),
        growth_limit_bytes=size("max_growth"),
        timeout_s=timeout,
    )
