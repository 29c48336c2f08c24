"""Byte sizes: ints, or strings such as ``"512MiB"``, ``"6GiB"``, ``"1.5GB"`` and ``"80%"``."""
from __future__ import annotations

import math
import re
from typing import Optional, Union

from .errors import ConfigError

Size = Union[int, str]

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*|%)\s*$")
_FORMS = "an int (bytes) or a string like '512MiB', '6GiB', '1.5GB' or '80%' (of the device's total)"


def parse_size(value: Optional[Size], *, total: Optional[int] = None, what: str = "size") -> int:
    """Return ``value`` in bytes.

    ``"80%"`` is taken of ``total`` (bytes); percentages need a total. Raises
    :class:`ConfigError` naming ``what``, the bad value and the accepted forms.
    """
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{what}={value!r} is not a size; expected {_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}={value!r} is negative; sizes are >= 0 bytes")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{what}={value!r} must be a finite number of bytes >= 0")
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}={value!r} ({type(value).__name__}) is not a size; expected {_FORMS}")
    match = _PATTERN.match(value)
    if not match:
        raise ConfigError(f"{what}={value!r} is not a size; expected {_FORMS}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number):
        raise ConfigError(f"{what}={value!r} must be a finite size")
    if unit == "%":
        if total is None:
            raise ConfigError(f"{what}={value!r} is a percentage, but no total is known to take it of")
        if not 0 <= number <= 100:
            raise ConfigError(f"{what}={value!r} must be between 0% and 100%")
        return int(total * number / 100)
    if unit not in _UNITS:
        raise ConfigError(f"{what}={value!r} has unknown unit {match.group(2)!r}; "
                          f"use one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB")
    return int(number * _UNITS[unit])


def format_bytes(n: Optional[int]) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> '-'``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
