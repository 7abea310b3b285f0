"""Design-space sweeps: one workload, many device configs, one table (see ``README.md`` here).

Importing this package is cheap: Dask is imported when a sweep runs on it and
plotly when a report is written.
"""

from __future__ import annotations

from .errors import SweepError, SweepInterrupted, WorkloadError
from .grid import Grid, Value, parse_set, parse_value
from .report import write_report
from .results import PointResult, SweepResults
from .runner import OnResult, run_point, sweep
from .workload import (
    Measurement,
    MetricValue,
    PythonWorkload,
    RecordingWorkload,
    RequestLatencies,
    Workload,
    load_workload,
    utilisation_peaks,
)

__all__ = [
    "Grid",
    "Measurement",
    "MetricValue",
    "OnResult",
    "PointResult",
    "PythonWorkload",
    "RecordingWorkload",
    "RequestLatencies",
    "SweepError",
    "SweepInterrupted",
    "SweepResults",
    "Value",
    "Workload",
    "WorkloadError",
    "load_workload",
    "parse_set",
    "parse_value",
    "run_point",
    "sweep",
    "utilisation_peaks",
    "write_report",
]
