"""What a sweep runs at each point: a workload, shipped to workers once.

A :class:`Workload` is a small picklable value (a script's source text, later a
recording's bytes) plus one method, :meth:`Workload.run`, that simulates it on
one device config in the calling process and returns a :class:`Measurement`.
The sweep scatters the workload to every worker once and each point only names
its config overrides, so a 1,000-point sweep does not ship the source 1,000
times.

Kinds, chosen by the file's suffix in :func:`load_workload`:

* ``.py``: a Python file defining ``async def workload(torch) -> dict``. It is
  compiled once per worker process (cached by its text) and called with the
  runtime handle of a freshly opened device at every point; the dict it returns
  (names to numbers or strings) joins the results table.
* ``.kbrec``: a recorded run (``open_device(..., record=...)``, ``kbus demo
  --record``, ``kbus serve --record``), carried as the recording read once.
  Each point replays it on that point's config as ``kbus replay`` does: every
  request goes out once the requests it depended on have completed on the new
  device, so the end-to-end time and the latencies per request kind answer
  "what if" without the script that made it. Its grid starts from the
  recorded config unless told otherwise.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import os
import traceback
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..errors import ConfigError, RecordingError
from ..hw.config import DeviceConfig
from ..runtime import Runtime, open_device
from ..sim.runner import run as kbus_run
from .errors import WorkloadError

__all__ = [
    "Measurement",
    "MetricValue",
    "PythonWorkload",
    "RecordingWorkload",
    "RequestLatencies",
    "Workload",
    "load_workload",
    "utilisation_peaks",
]

MetricValue = int | float | str | bool | None
"""A value a workload may report: what a CSV cell can hold."""

WorkloadFn = Callable[[Runtime], Coroutine[Any, Any, Mapping[str, Any] | None]]


@attrs.frozen
class Measurement:
    """What one run of a workload on one config produced."""

    virtual_time_ps: int
    """End-to-end virtual time: from opening the device until it closed (queued work included)."""
    utilisation: dict[str, float]
    """Peak utilisation per resource: ``link.<level>`` and ``block.<KIND>`` (0..1)."""
    metrics: dict[str, MetricValue]
    """What the workload returned."""
    latency: dict[str, int] = attrs.field(factory=dict)
    """Host request latencies per message kind: ``<Kind>.count``, ``.total_ps``, ``.p50_ps``, ``.p99_ps``."""


class Workload(abc.ABC):
    """A workload a sweep can run at every point; subclasses must pickle small."""

    name: str
    """Names the workload in every error (its file name)."""

    @abc.abstractmethod
    def run(self, config: DeviceConfig) -> Measurement:
        """Simulate the workload on ``config`` in this process, on a new event loop."""

    def default_base(self) -> DeviceConfig | str:
        """The config a sweep starts every point from when it is given none."""
        return "default"

    def describe_error(self, exc: BaseException) -> str:
        """``Type: message`` of a failure, plus where in the workload it was raised if known."""
        return f"{type(exc).__name__}: {exc}"


_COMPILED: dict[str, WorkloadFn] = {}
"""Per-process cache: source digest -> the workload function, so each worker compiles a script once."""


@attrs.frozen(eq=False)
class PythonWorkload(Workload):
    """A Python file defining ``async def workload(torch) -> dict``, carried as its source text."""

    source: str
    name: str = "<workload>"
    digest: str = attrs.field(init=False)

    @digest.default
    def _digest(self) -> str:
        return hashlib.sha256(f"{self.name}\0{self.source}".encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PythonWorkload:
        """Read and check a workload script (so a broken file fails before any point is scheduled)."""
        p = Path(path)
        try:
            source = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise WorkloadError(f"workload {str(p)!r}: cannot read it: {exc.strerror or exc}", path=str(p)) from None
        wl = cls(source, name=str(p))
        wl.function()
        return wl

    def function(self) -> WorkloadFn:
        """The script's ``workload`` coroutine function, compiled and executed once per process."""
        fn = _COMPILED.get(self.digest)
        if fn is not None:
            return fn
        try:
            code = compile(self.source, self.name, "exec")
        except SyntaxError as exc:
            raise WorkloadError(
                f"workload {self.name}: syntax error at line {exc.lineno}: {exc.msg}", self.name
            ) from None
        # Not "__main__": a script may guard a runnable demo behind the usual check.
        namespace: dict[str, Any] = {"__name__": "__kbus_workload__", "__file__": self.name}
        try:
            exec(code, namespace)
        except Exception as exc:
            raise WorkloadError(
                f"workload {self.name}: running the file failed: {self.describe_error(exc)}", self.name
            ) from exc
        found = namespace.get("workload")
        if not inspect.iscoroutinefunction(found):
            what = "is missing" if found is None else f"is a {type(found).__name__}, not an async function"
            raise WorkloadError(f"workload {self.name}: `async def workload(torch) -> dict` {what}", self.name)
        _COMPILED[self.digest] = found
        return found

    def run(self, config: DeviceConfig) -> Measurement:
        return kbus_run(self._simulate, config, self.function())

    async def _simulate(self, config: DeviceConfig, fn: WorkloadFn) -> Measurement:
        async with open_device(config) as torch:
            latencies = RequestLatencies.attach(torch.device)
            returned = await fn(torch)
        # Read after closing: closing waits for queued work, which belongs to the run.
        return Measurement(torch.now_ps, utilisation_peaks(torch.device), self._metrics(returned), latencies.summary())

    def _metrics(self, returned: object) -> dict[str, MetricValue]:
        if returned is None:
            return {}
        if not isinstance(returned, Mapping):
            raise TypeError(f"workload() returned a {type(returned).__name__}; expected a dict of metrics or None")
        out: dict[str, MetricValue] = {}
        for key, value in returned.items():
            if not isinstance(key, str):
                raise TypeError(f"workload() returned a metric named {key!r}; metric names must be strings")
            if isinstance(value, np.generic):
                value = value.item()
            if value is not None and not isinstance(value, int | float | str | bool):
                raise TypeError(
                    f"workload() returned metric {key!r} = {type(value).__name__}; use a number, string, bool or None"
                )
            out[key] = value
        return out

    def describe_error(self, exc: BaseException) -> str:
        where = ""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename == self.name:
                where = f" (at {Path(self.name).name} line {frame.lineno}, in {frame.name})"
                break
        return f"{type(exc).__name__}: {exc}{where}"


@attrs.frozen(eq=False)
class RecordingWorkload(Workload):
    """A recorded run (``.kbrec``), replayed on each point's config.

    The measurement: ``virtual_time_ps`` is the replay's end-to-end time (its
    last response), ``latency`` the replay's latencies per request kind (the
    requests that succeeded), and the metrics say how many requests were
    replayed, how many failed on this config and the recorded end-to-end time.
    """

    recording: Any
    """The :class:`kbus.remote.Recording` read from the file."""
    name: str = "<recording>"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RecordingWorkload:
        """Read and check a recording (so a bad file fails before any point is scheduled)."""
        from ..remote.record import read_recording

        p = str(path)
        try:
            rec = read_recording(p)
            DeviceConfig.from_toml_text(rec.config_toml, source=p)
        except RecordingError as exc:
            raise WorkloadError(f"workload {p!r}: {exc}", p) from None
        except ConfigError as exc:
            raise WorkloadError(f"workload {p!r}: its recorded device config is not usable: {exc}", p) from None
        if not any(True for _ in rec.requests()):
            raise WorkloadError(f"workload {p!r}: the recording holds no requests, so there is nothing to replay", p)
        return cls(rec, name=p)

    def default_base(self) -> DeviceConfig:
        """The recorded config: a sweep over a recording asks "what if this device were different"."""
        return DeviceConfig.from_toml_text(self.recording.config_toml, source=self.name)

    def run(self, config: DeviceConfig) -> Measurement:
        return kbus_run(self._simulate, config)

    async def _simulate(self, config: DeviceConfig) -> Measurement:
        from ..remote.replay import replay_async

        peaks: dict[str, float] = {}
        result = await replay_async(self.recording, config, on_device=lambda dev: peaks.update(utilisation_peaks(dev)))
        latency: dict[str, int] = {}
        failed = 0
        for row in sorted(result.rows, key=lambda r: r.kind):
            failed += row.new_failed
            latency[f"{row.kind}.count"] = row.count - row.new_failed
            latency[f"{row.kind}.total_ps"] = row.new_total_ps
            latency[f"{row.kind}.p50_ps"] = row.new_p50_ps
            latency[f"{row.kind}.p99_ps"] = row.new_p99_ps
        metrics: dict[str, MetricValue] = {
            "requests": result.requests,
            "failed_requests": failed,
            "recorded_end_ps": result.old_end_ps,
        }
        return Measurement(result.new_end_ps, peaks, metrics, latency)


def utilisation_peaks(device: Any) -> dict[str, float]:
    """Peak utilisation per link level and per block kind, read generically.

    ``level_stats()`` gives one dict per level: its ``utilisation`` becomes
    ``link.<level>``, and any other key naming a utilisation (a model may add
    some, such as memory channels) becomes ``link.<level>.<key>``.
    ``stats()`` gives per-block records with ``kind`` and ``utilisation``; the
    busiest block of each kind becomes ``block.<KIND>``. Levels or blocks
    without such a figure are skipped rather than guessed.
    """
    out: dict[str, float] = {}
    level_stats = getattr(device, "level_stats", None)
    if callable(level_stats):
        for level, figures in level_stats().items():
            for key, value in figures.items():
                if "util" in key and isinstance(value, int | float):
                    name = f"link.{level}" if key == "utilisation" else f"link.{level}.{key}"
                    out[name] = max(out.get(name, 0.0), float(value))
    stats = getattr(device, "stats", None)
    if callable(stats):
        for block in stats().values():
            value = getattr(block, "utilisation", None)
            kind = getattr(block, "kind", None)
            if isinstance(value, int | float) and isinstance(kind, str):
                name = f"block.{kind}"
                out[name] = max(out.get(name, 0.0), float(value))
    return dict(sorted(out.items()))


class RequestLatencies:
    """Virtual-time latency of every host request, by message kind, from the device's ``on_request`` hook.

    Attached after the device opened, so it measures the workload's requests
    (and those of closing), not the runtime's set-up. A device without the
    hook, or whose hook is taken, gives no latencies rather than an error:
    they are an extra, not what a sweep stands on.
    """

    def __init__(self) -> None:
        self.open: dict[tuple[Any, Any], list[int]] = {}
        self.done: dict[str, list[int]] = {}

    @classmethod
    def attach(cls, device: Any) -> RequestLatencies:
        rec = cls()
        if hasattr(device, "on_request") and device.on_request is None:
            device.on_request = rec.on_request
        return rec

    def on_request(self, phase: str, msg: Any, responses: Any, now_ps: int) -> None:
        key = (getattr(msg, "correlation_id", None), getattr(msg, "request_id", None))
        if phase == "begin":
            self.open.setdefault(key, []).append(now_ps)
            return
        started = self.open.get(key)
        if not started:
            return  # began before the hook was attached
        begin = started.pop(0)
        if not started:
            del self.open[key]
        kind = getattr(msg, "msg_type", None) or type(msg).__name__
        self.done.setdefault(str(kind), []).append(now_ps - begin)

    def summary(self) -> dict[str, int]:
        """Count, total and nearest-rank p50 / p99 per kind, in integer picoseconds."""
        out: dict[str, int] = {}
        for kind in sorted(self.done):
            times = sorted(self.done[kind])
            n = len(times)
            out[f"{kind}.count"] = n
            out[f"{kind}.total_ps"] = sum(times)
            out[f"{kind}.p50_ps"] = times[max(0, -(-50 * n // 100) - 1)]
            out[f"{kind}.p99_ps"] = times[max(0, -(-99 * n // 100) - 1)]
        return out


RECORDING_SUFFIX = ".kbrec"


def load_workload(spec: str | os.PathLike[str] | Workload) -> Workload:
    """The workload named by ``spec``: a :class:`Workload`, a ``.py`` script or a ``.kbrec`` recording."""
    if isinstance(spec, Workload):
        return spec
    if not isinstance(spec, str | os.PathLike):
        raise WorkloadError(f"expected a workload file path or a Workload, got {type(spec).__name__} {spec!r}")
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == RECORDING_SUFFIX:
        return RecordingWorkload.from_file(path)
    if suffix != ".py":
        raise WorkloadError(
            f"workload {str(path)!r}: unknown kind {suffix or '(no suffix)'!r}; expected a Python file (.py) "
            "defining `async def workload(torch) -> dict`, or a recording (.kbrec)",
            str(path),
        )
    return PythonWorkload.from_file(path)
