"""What the user asked for: command-line options and ini keys, checked once.

Every value is validated in ``pytest_configure``, before any test runs, and a
bad one becomes a one-line ``UsageError`` that quotes it and says where it came
from.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from isolator.sizes import SizeError, parse_size

Mode = Literal["off", "module", "test", "marked", "shared"]
MODES: tuple[Mode, ...] = ("off", "module", "test", "marked", "shared")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolator", "isolator: fresh worker processes with memory ceilings")
    group.addoption(
        "--isolate",
        dest="isolate",
        default=None,
        metavar="MODE",
        help="Which unit gets a fresh forked worker: module (each test module), test (each "
        "test), marked (tests marked @pytest.mark.isolate; the rest share one), shared (one "
        "worker recycled on memory), or off. Ini: isolate.",
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
        "--isolate-timeout",
        dest="isolate_timeout",
        default=None,
        metavar="SECONDS",
        help="Kill a worker whose test runs longer than this, dump its stack and fail the "
        "test. Ini: isolate_timeout.",
    )
    parser.addini("isolate", "Default for --isolate.", default="off")
    parser.addini("worker_mem", "Default for --worker-mem.", default="")
    parser.addini("worker_ceiling", "Default for --worker-ceiling.", default="")
    parser.addini("isolate_timeout", "Default for --isolate-timeout.", default="")
    parser.addini(
        "isolate_markers",
        "Markers that give a test a worker of its own under --isolate=marked (besides 'isolate').",
        type="args",
        default=[],
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated isolation settings of one pytest run."""

    #: Which unit gets a fresh worker.
    mode: Mode
    #: Recycle a worker whose own memory is over this many bytes.
    budget_bytes: int | None
    #: RLIMIT_AS headroom above the worker's starting address space.
    ceiling_bytes: int | None
    #: Kill a worker whose test runs longer than this.
    timeout_s: float | None
    #: Markers that earn a test its own worker in ``marked`` mode.
    markers: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def _source(config: pytest.Config, option: str, ini: str) -> tuple[str | None, str]:
    """The raw value of a setting and a phrase saying where it came from."""
    value = config.getoption(option)
    if value is not None:
        return str(value), f"--{option.replace('_', '-')}"
    raw = config.getini(ini)
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None, ""
    where = f"ini option {ini!r}"
    if config.inipath is not None:
        where += f" in {config.inipath.name}"
    return text, where


def _size(config: pytest.Config, option: str, ini: str, *, allow_none: bool) -> int | None:
    raw, where = _source(config, option, ini)
    if raw is None:
        return None
    if allow_none and raw.lower() == "none":
        return None
    try:
        return parse_size(raw)
    except SizeError as exc:
        raise pytest.UsageError(f"isolator: {where}: {exc}") from None


def load_settings(config: pytest.Config) -> Settings:
    raw_mode, where = _source(config, "isolate", "isolate")
    mode_text = (raw_mode or "off").strip().lower()
    if mode_text not in MODES:
        raise pytest.UsageError(
            f"isolator: {where}: {raw_mode!r} is not an isolation mode "
            f"(choose from {', '.join(MODES)})"
        )
    mode: Mode = mode_text

    budget = _size(config, "worker_mem", "worker_mem", allow_none=False)
    ceiling_raw, _ = _source(config, "worker_ceiling", "worker_ceiling")
    if ceiling_raw is None:
        ceiling = budget
    else:
        ceiling = _size(config, "worker_ceiling", "worker_ceiling", allow_none=True)

    timeout: float | None = None
    raw_timeout, where = _source(config, "isolate_timeout", "isolate_timeout")
    if raw_timeout is not None:
        try:
            timeout = float(raw_timeout)
        except ValueError:
            raise pytest.UsageError(
                f"isolator: {where}: {raw_timeout!r} is not a number of seconds"
            ) from None
        if not timeout > 0:
            raise pytest.UsageError(
                f"isolator: {where}: {raw_timeout!r} must be a positive number of seconds"
            )

    if mode == "shared" and budget is None:
        raise pytest.UsageError(
            "isolator: --isolate=shared recycles workers on memory only, so it needs "
            "--worker-mem=SIZE (or use --isolate=module)"
        )

    markers = tuple(str(m) for m in config.getini("isolate_markers"))
    return Settings(
        mode=mode,
        budget_bytes=budget,
        ceiling_bytes=ceiling,
        timeout_s=timeout,
        markers=markers,
    )
