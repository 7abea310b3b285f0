"""The records a sweep produces, one per point, and their tabular forms.

A :class:`PointResult` compares equal to another when everything the
simulation decides is equal (values, virtual time, utilisation, metrics,
error) and ignores wall time, so "the parallel sweep gave the same table as
the serial one" is a plain ``==``.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any, overload

import attrs

from ..sim.units import format_time
from .grid import Value
from .workload import MetricValue

__all__ = ["PointResult", "SweepResults"]


@attrs.frozen
class PointResult:
    """One point of a sweep: its config values and what running it gave (or why it failed)."""

    index: int
    """Position in the grid (rows are sorted by it, whatever order points finished in)."""
    values: dict[str, Value]
    """The swept keys and this point's values, as given."""
    virtual_time_ps: int | None = None
    """End-to-end virtual time; None when the point failed."""
    utilisation: dict[str, float] = attrs.field(factory=dict)
    """Peak utilisation per resource (``link.<level>``, ``block.<KIND>``)."""
    metrics: dict[str, MetricValue] = attrs.field(factory=dict)
    """What the workload returned."""
    latency: dict[str, int] = attrs.field(factory=dict)
    """Host request latencies by kind (``<Kind>.count``, ``.total_ps``, ``.p50_ps``, ``.p99_ps``)."""
    error: str | None = None
    """Why the point failed, naming its values and the workload; None when it ran."""
    wall_s: float = attrs.field(default=0.0, eq=False)
    """Host seconds the point took (not compared: it varies from run to run)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def label(self) -> str:
        """``key=value, ...`` naming this point in messages and plots."""
        return ", ".join(f"{k}={v}" for k, v in self.values.items())


@attrs.frozen
class SweepResults(Sequence[PointResult]):
    """The records of a sweep, in grid order, with CSV and pandas views."""

    keys: tuple[str, ...]
    records: tuple[PointResult, ...]

    @overload
    def __getitem__(self, i: int) -> PointResult: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[PointResult]: ...
    def __getitem__(self, i: int | slice) -> PointResult | Sequence[PointResult]:
        return self.records[i]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PointResult]:
        return iter(self.records)

    @property
    def failed(self) -> tuple[PointResult, ...]:
        """The points that recorded an error."""
        return tuple(r for r in self.records if not r.ok)

    def columns(self) -> list[str]:
        """Column names: index, the swept keys, virtual time, metrics, utilisation, latencies, wall time, error."""
        metrics = sorted({k for r in self.records for k in r.metrics})
        util = sorted({k for r in self.records for k in r.utilisation})
        latency = sorted({k for r in self.records for k in r.latency})
        return [
            "index",
            *self.keys,
            "virtual_time_ps",
            "virtual_time",
            *(f"metric.{m}" for m in metrics),
            *(f"util.{u}" for u in util),
            *(f"latency.{k}" for k in latency),
            "wall_s",
            "error",
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per point, keyed by :meth:`columns` (missing figures are None)."""
        out = []
        for r in self.records:
            row: dict[str, Any] = {"index": r.index, **r.values}
            row["virtual_time_ps"] = r.virtual_time_ps
            row["virtual_time"] = None if r.virtual_time_ps is None else format_time(r.virtual_time_ps)
            row.update({f"metric.{k}": v for k, v in r.metrics.items()})
            row.update({f"util.{k}": v for k, v in r.utilisation.items()})
            row.update({f"latency.{k}": v for k, v in r.latency.items()})
            row["wall_s"] = round(r.wall_s, 6)
            row["error"] = r.error
            out.append(row)
        return out

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The table as CSV text (empty cells for missing figures); also written to ``path`` if given."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas, which kbus does not require)."""
        try:
            pd: Any = importlib.import_module("pandas")
        except ImportError:
            raise ImportError("SweepResults.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows(), columns=self.columns())

    def best(self) -> PointResult | None:
        """The successful point with the least virtual time (first in grid order on ties)."""
        ok = [r for r in self.records if r.virtual_time_ps is not None]
        return min(ok, key=lambda r: (r.virtual_time_ps, r.index)) if ok else None

    def worst(self) -> PointResult | None:
        """The successful point with the most virtual time (first in grid order on ties)."""
        ok = [r for r in self.records if r.virtual_time_ps is not None]
        return min(ok, key=lambda r: (-(r.virtual_time_ps or 0), r.index)) if ok else None
