"""The points of a sweep: dotted config keys and the values each one takes.

A grid is plain data computed once, in the process that starts the sweep, so
every worker receives ready-made ``{key: value}`` overrides and nothing about
point numbering depends on where or in which order points run. Values stay in
the config's own units (``"128GB/s"``, ``"7ns"``, ``4``) and are handed
unchanged to :meth:`kbus.hw.DeviceConfig.with_overrides`, which owns their
validation: a bad value is that point's error, not the grid's.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterator, Mapping, Sequence

import attrs

from .errors import SweepError

__all__ = ["Grid", "Value", "parse_set", "parse_value"]

Value = int | float | bool | str
"""One config value as a user writes it: a TOML scalar."""


@attrs.frozen
class Grid:
    """The ordered list of points of a sweep.

    Build one with :meth:`product` (every combination, the last key varying
    fastest) or :meth:`zip` (the i-th value of each key together). ``axes``
    keeps each key's values in the order given, which is also the order the
    report draws them in.
    """

    axes: tuple[tuple[str, tuple[Value, ...]], ...]
    points: tuple[tuple[tuple[str, Value], ...], ...]
    zipped: bool = False

    @classmethod
    def product(cls, axes: Mapping[str, Sequence[Value]]) -> Grid:
        """The cartesian product of every key's values."""
        checked = _check_axes(axes)
        keys = [k for k, _ in checked]
        points = tuple(tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in checked)))
        return cls(checked, points, zipped=False)

    @classmethod
    def zip(cls, axes: Mapping[str, Sequence[Value]]) -> Grid:
        """Pair the lists: point i takes the i-th value of every key (all lists must be equally long)."""
        checked = _check_axes(axes)
        lengths = {k: len(v) for k, v in checked}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise SweepError(f"zipped keys need value lists of the same length; got {shown}")
        keys = [k for k, _ in checked]
        points = tuple(tuple(zip(keys, combo, strict=True)) for combo in zip(*(v for _, v in checked), strict=True))
        return cls(checked, points, zipped=True)

    @property
    def keys(self) -> tuple[str, ...]:
        """The swept dotted keys, in the order given."""
        return tuple(k for k, _ in self.axes)

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[dict[str, Value]]:
        return (dict(p) for p in self.points)


def _check_axes(axes: Mapping[str, Sequence[Value]]) -> tuple[tuple[str, tuple[Value, ...]], ...]:
    if not axes:
        raise SweepError("a sweep needs at least one key with values, e.g. {'links.noc_hop.bandwidth': ['64GB/s']}")
    out = []
    for key, values in axes.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise SweepError(f"{key!r} is not a dotted config key such as 'links.noc_hop.bandwidth'")
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise SweepError(f"{key}: expected a list of values, got {type(values).__name__} {values!r}")
        if not values:
            raise SweepError(f"{key}: the list of values is empty")
        out.append((key, tuple(values)))
    return tuple(out)


def parse_value(text: str) -> Value:
    """A command-line value as TOML would read it: ``4`` is an int, ``true`` a bool, ``128GB/s`` a string.

    Counts must reach the config as integers (it rejects the string ``"4"``),
    while units such as ``128GB/s`` are not TOML at all and stay strings; a
    quoted ``"4"`` stays the string ``4``.
    """
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    return text


def parse_set(arg: str) -> tuple[str, list[Value]]:
    """Parse one ``--set KEY=V1,V2,...`` argument."""
    key, sep, rest = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SweepError(f"--set {arg!r}: expected KEY=V1,V2,... such as links.noc_hop.bandwidth=64GB/s,128GB/s")
    items = [v for v in rest.split(",")]
    if any(not v.strip() for v in items):
        raise SweepError(f"--set {arg!r}: empty value in the list for {key}")
    return key, [parse_value(v) for v in items]
