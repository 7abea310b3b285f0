"""Virtual time units: every duration in kbus is an integer count of picoseconds.

Configuration strings such as ``"12ns"`` or ``"1.5us"`` are parsed once, here,
into integers; nothing downstream ever sees a float time.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

PS = 1
NS = 1_000
US = 1_000_000
MS = 1_000_000_000
S = 1_000_000_000_000

_UNITS: dict[str, int] = {"ps": PS, "ns": NS, "us": US, "µs": US, "ms": MS, "s": S}
_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ps|ns|us|µs|ms|s)\s*$")


def _scaled(x: int | float | str, unit: int, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float, str, Decimal)):
        raise TypeError(f"{what}: expected a number, got {type(x).__name__}")
    try:
        value = Decimal(str(x)) * unit
    except InvalidOperation:
        raise ValueError(f"{what}: {x!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{what}: {x!r} is not finite")
    if value < 0:
        raise ValueError(f"{what}: {x!r} is negative; durations must be >= 0")
    return int(value.to_integral_value())


def ps(x: int | float) -> int:
    """Picoseconds as an int (rounded to the nearest picosecond)."""
    return _scaled(x, PS, "ps()")


def ns(x: int | float) -> int:
    """``x`` nanoseconds in picoseconds: ``ns(1.5) == 1500``."""
    return _scaled(x, NS, "ns()")


def us(x: int | float) -> int:
    """``x`` microseconds in picoseconds: ``us(2) == 2_000_000``."""
    return _scaled(x, US, "us()")


def ms(x: int | float) -> int:
    """``x`` milliseconds in picoseconds."""
    return _scaled(x, MS, "ms()")


def parse_time(text: str | int) -> int:
    """Parse ``"12ns"``, ``"1.5 us"``, ``"250ps"``... into integer picoseconds.

    An int is taken as picoseconds already. Anything else raises ``ValueError``
    saying what was expected.
    """
    if isinstance(text, bool):
        raise TypeError("parse_time: expected a duration string such as '12ns', got bool")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"parse_time: {text} ps is negative; durations must be >= 0")
        return text
    if not isinstance(text, str):
        raise TypeError(f"parse_time: expected a duration string such as '12ns', got {type(text).__name__}")
    m = _TIME_RE.match(text)
    if m is None:
        raise ValueError(
            f"parse_time: {text!r} is not a duration; write a number and a unit (ps, ns, us, ms, s), e.g. '12ns'"
        )
    return _scaled(m.group(1), _UNITS[m.group(2)], f"parse_time({text!r})")


def format_time(t: int) -> str:
    """Render picoseconds in the largest unit that keeps it readable: ``'1.5us'``."""
    for name, unit in (("s", S), ("ms", MS), ("us", US), ("ns", NS)):
        if abs(t) >= unit:
            return f"{t / unit:.6g}{name}"
    return f"{t}ps"


_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``"64KiB"``, ``"16 GiB"``, ``"1MB"`` or an int into bytes."""
    if isinstance(text, bool):
        raise TypeError("parse_size: expected a size such as '64KiB', got bool")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"parse_size: {text} is negative")
        return text
    if not isinstance(text, str):
        raise TypeError(f"parse_size: expected a size such as '64KiB', got {type(text).__name__}")
    m = _SIZE_RE.match(text)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"parse_size: {text!r} is not a size; write e.g. '64KiB', '16GiB', '4096'")
    return int(Decimal(m.group(1)) * unit)


_BW_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?i?)B/s\s*$")


def parse_bandwidth(text: str | int | float) -> int:
    """Parse ``"64GB/s"``, ``"1.5 TB/s"`` or a number into bytes per second."""
    if isinstance(text, bool):
        raise TypeError("parse_bandwidth: expected a bandwidth such as '64GB/s', got bool")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"parse_bandwidth: {text} must be > 0")
        return int(text)
    if not isinstance(text, str):
        raise TypeError(f"parse_bandwidth: expected a bandwidth such as '64GB/s', got {type(text).__name__}")
    m = _BW_RE.match(text)
    if m is None:
        raise ValueError(f"parse_bandwidth: {text!r} is not a bandwidth; write e.g. '64GB/s' or '12.5GiB/s'")
    unit = _SIZE_UNITS[(m.group(2) + "b").lower()]
    value = int(Decimal(m.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"parse_bandwidth: {text!r} must be > 0")
    return value


def format_bandwidth(bps: int | float) -> str:
    for name, unit in (("TB/s", 1000**4), ("GB/s", 1000**3), ("MB/s", 1000**2), ("KB/s", 1000)):
        if bps >= unit:
            return f"{bps / unit:.4g}{name}"
    return f"{bps:.4g}B/s"


def format_size(n: int) -> str:
    for name, unit in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= unit and n % (unit // 1024 or 1) == 0:
            return f"{n / unit:.6g}{name}"
    return f"{n}B"
