"""Memory sizes as users type them, and as we print them.

One parser and one formatter, so every message speaks the same units.
"""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

#: RLIMIT_AS is a signed 64-bit number of bytes.
_LARGEST = 2**63

_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


class SizeError(ValueError):
    """A size string that does not parse; the message quotes it."""


def parse_size(text: str) -> int:
    """Parse ``512MB``, ``1.5GiB``, ``800M`` or ``1048576`` into bytes.

    Decimal units (kB, MB, GB) are powers of 1000 and binary ones (KiB, MiB,
    GiB) powers of 1024, as in psutil and the IEC; a bare ``M`` or ``G`` follows
    the decimal reading so that ``800M`` and ``800MB`` agree.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise SizeError(
            f"{text!r} is not a memory size (expected a number with an optional unit, "
            "like 512MB, 1.5GiB, 800M or 1048576)"
        )
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise SizeError(
            f"{text!r} has an unknown unit {match['unit']!r} (use B, kB, MB, GB, TB, "
            "KiB, MiB, GiB or TiB)"
        )
    value = float(match["number"]) * _UNITS[unit]
    if value < 1:
        raise SizeError(f"{text!r} is not a positive memory size")
    if value >= _LARGEST:
        raise SizeError(f"{text!r} is larger than any address space (at most 8EiB)")
    return int(value)


def format_size(num_bytes: float) -> str:
    """Render bytes the way the parser reads them back (``512MB``, ``1.5GB``)."""
    sign = "-" if num_bytes < 0 else ""
    value = abs(float(num_bytes))
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            if unit == "B":
                return f"{sign}{int(value)}B"
            return f"{sign}{value:.3g}{unit}" if value < 100 else f"{sign}{value:.0f}{unit}"
        value /= 1000
    return f"{sign}{value:.3g}TB"
