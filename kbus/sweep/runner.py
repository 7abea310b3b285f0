"""Running the points: serially in this process, or as Dask tasks on a cluster.

Scheduling, retries and moving data to workers are Dask's job; this module
only decides what a task is (:func:`run_point`: one point, start to finish, in
a fresh event loop) and turns finished tasks into records.

Why these choices:

* The workload and the base config are scattered to every worker once
  (``broadcast=True``); each task carries only its point's overrides.
* A point's own failure (invalid config, the workload raising) is caught in the
  task and recorded, so Dask never sees it and the sweep goes on. Only the loss
  of a worker reaches Dask, which re-runs that worker's tasks elsewhere (the
  scheduler's ``allowed-failures``); ``retries`` covers transient task errors
  such as an unpicklable result. A point Dask finally gives up on is recorded
  with Dask's reason, never dropped.
* Points travel in batches (:func:`batch_size`) so that tiny points are not
  limited by the scheduler's per-task cost.
* Results are collected as they finish and sorted by grid index, so the table
  does not depend on which worker ran what. Each point builds its own device
  on its own loop, which is why the same point gives the same virtual times on
  any worker and serially.
* Ctrl-C cancels the tasks not yet finished and raises
  :class:`SweepInterrupted` carrying the finished ones.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..hw.config import DeviceConfig
from .errors import SweepError, SweepInterrupted
from .grid import Grid, Value
from .results import PointResult, SweepResults
from .workload import Workload, load_workload

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["OnResult", "batch_size", "dask_setup", "run_point", "run_points", "sweep"]

OnResult = Callable[[PointResult, int, int], None]
"""Called in the submitting process as each point finishes: ``(result, done, total)``."""


def run_point(workload: Workload, base: DeviceConfig, index: int, values: Mapping[str, Value]) -> PointResult:
    """Run one point: apply the overrides to ``base``, simulate, and record the outcome or the error.

    Never raises for a problem of the point itself; the error names the
    point's values and, for a failing run, the workload and where it failed.
    """
    values = dict(values)
    t0 = time.perf_counter()
    label = ", ".join(f"{k}={v!r}" for k, v in values.items())
    try:
        config = base.with_overrides(values, source=f"sweep point {index}")
    except ConfigError as exc:
        return PointResult(
            index, values, error=f"invalid config at point {index} ({label}): {exc}", wall_s=time.perf_counter() - t0
        )
    try:
        m = workload.run(config)
    except Exception as exc:
        return PointResult(
            index,
            values,
            error=f"workload {workload.name} failed at point {index} ({label}): {workload.describe_error(exc)}",
            wall_s=time.perf_counter() - t0,
        )
    return PointResult(
        index, values, m.virtual_time_ps, m.utilisation, m.metrics, m.latency, wall_s=time.perf_counter() - t0
    )


def _as_grid(grid: Grid | Mapping[str, Sequence[Value]]) -> Grid:
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, Mapping):
        return Grid.product(grid)
    raise SweepError(f"expected a Grid or a mapping of dotted keys to value lists, got {type(grid).__name__}")


def sweep(
    workload: str | os.PathLike[str] | Workload,
    grid: Grid | Mapping[str, Sequence[Value]],
    base: DeviceConfig | str | os.PathLike[str] | None = None,
    client: Client | None = None,
    *,
    workers: int | None = None,
    retries: int = 2,
    on_result: OnResult | None = None,
    progress: bool = False,
) -> SweepResults:
    """Run ``workload`` at every point of ``grid`` and return one record per point, in grid order.

    ``grid`` is a :class:`Grid` or a mapping ``{dotted key: [values]}`` (its
    cartesian product). ``base`` is the config every point starts from
    (default: ``"default"`` for a script, the recorded config for a recording).
    ``client`` is a ``dask.distributed.Client`` to submit to; without one a
    local cluster of ``workers`` processes is started for this sweep and
    closed after (default: one per core). ``workers=0`` runs every point in
    this process, one after another, without Dask. ``retries`` is Dask's
    per-task retry count for task errors (a lost worker is handled by the
    scheduler's own re-runs). ``on_result(result, done, total)`` is called
    here as each point finishes; ``progress`` shows a bar with an ETA on the
    terminal. Ctrl-C raises :class:`SweepInterrupted` holding the finished
    points. A synchronous call: do not call it from a running event loop
    (each point runs its own).
    """
    if client is not None and workers is not None:
        raise SweepError(f"workers={workers} applies to a local cluster; the client's cluster has its own workers")
    wl = load_workload(workload)
    points = _as_grid(grid)
    base_cfg = DeviceConfig.load(wl.default_base() if base is None else base)
    total = len(points)
    finished: dict[int, PointResult] = {}

    def collect(result: PointResult) -> None:
        finished[result.index] = result
        if on_result is not None:
            on_result(result, len(finished), total)

    def results() -> SweepResults:
        return SweepResults(points.keys, tuple(finished[i] for i in sorted(finished)))

    with _progress_bar(total, progress) as tick:

        def record(result: PointResult) -> None:
            collect(result)
            tick(result)

        try:
            if client is None and workers == 0:
                for i, values in enumerate(points):
                    record(run_point(wl, base_cfg, i, values))
            elif client is None:
                with _local_client(workers) as own:
                    _run_dask(own, wl, base_cfg, points, retries, record)
            else:
                _run_dask(client, wl, base_cfg, points, retries, record)
        except KeyboardInterrupt:
            raise SweepInterrupted(results(), total - len(finished)) from None
    return results()


def import_distributed() -> Any:
    """The ``distributed`` module (typed as Any: its API is mostly unannotated), or a clear error."""
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise SweepError(
            "parallel sweeps need Dask: pip install 'kbus[sweep]' (or pass workers=0 / --workers 0 to run serially)"
        ) from None


LOCAL_SCHEDULER_OPTIONS: dict[str, Any] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
"""Scheduler options of a throw-away local cluster: no dashboard, and its HTTP endpoint (which the
scheduler starts anyway) on a free loopback port, so a second cluster on the machine (another
sweep, a test run) neither collides on port 8787 nor warns about it."""


@contextlib.contextmanager
def _local_client(workers: int | None) -> Iterator[Client]:
    """A throw-away local cluster: worker processes (the simulation is pure Python, so threads would share a GIL)."""
    dd: Any = import_distributed()
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise SweepError(f"workers={n}: need at least one worker process (or 0 to run serially in this process)")
    with _sigint_ignored_while_spawning():
        cluster = dd.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs=dict(LOCAL_SCHEDULER_OPTIONS),
            # Quiet: shutdown races log harmless errors, and every point's fate is in the table anyway.
            silence_logs=logging.CRITICAL,
            preload=[__name__],  # runs dask_setup below in each worker process
        )
    try:
        with dd.Client(cluster) as client:
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _sigint_ignored_while_spawning() -> Iterator[None]:
    """Ignore SIGINT while the local cluster starts its worker processes.

    An ignored signal stays ignored across ``exec``, and Python keeps it so,
    which is the only way to keep a terminal's Ctrl-C from interrupting a
    worker while it is still importing (before :func:`dask_setup` can run) and
    filling the terminal with its traceback. The price: Ctrl-C during the
    second or two of start-up is ignored; once points run it cancels them.
    Only the main thread may change signal handling; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def dask_setup(worker: object) -> None:
    """Dask preload hook of the local cluster's workers: ignore SIGINT.

    Ctrl-C on a terminal reaches the whole process group. The submitting
    process handles it (cancels the remaining points, then closes the
    cluster); workers that also stopped on it would only print tracebacks.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_points(
    workload: Workload, base: DeviceConfig, points: Sequence[tuple[int, Mapping[str, Value]]]
) -> list[PointResult]:
    """Run a batch of points in order (one Dask task; see :func:`batch_size`)."""
    return [run_point(workload, base, i, values) for i, values in points]


def batch_size(points: int, workers: int) -> int:
    """Points per Dask task: about 16 tasks per worker, never fewer than one point.

    A task costs the scheduler about a millisecond whatever it does, which is
    as long as a tiny point takes; batching keeps 1,000 tiny points from
    being limited by the scheduler, while 16 tasks per worker still balance
    points of uneven cost. A worker lost mid-batch costs a re-run of that batch
    only, and points are deterministic, so the re-run gives the same records.
    """
    return max(1, points // (max(1, workers) * 16))


def _run_dask(
    client: Any,
    workload: Workload,
    base: DeviceConfig,
    points: Grid,
    retries: int,
    record: Callable[[PointResult], None],
) -> None:
    as_completed: Any = import_distributed().as_completed

    token = uuid.uuid4().hex[:12]
    # Shipped once per worker, not once per point.
    wl_future = client.scatter(workload, broadcast=True, hash=False)
    base_future = client.scatter(base, broadcast=True, hash=False)
    indexed = list(enumerate(points))
    size = batch_size(len(indexed), len(client.scheduler_info().get("workers", {})))
    futures: dict[Any, list[tuple[int, dict[str, Value]]]] = {}
    for start in range(0, len(indexed), size):
        batch = indexed[start : start + size]
        fut = client.submit(
            run_points,
            wl_future,
            base_future,
            batch,
            key=f"kbus-sweep-{token}-{start}",
            pure=False,
            retries=retries,
        )
        futures[fut] = batch
    pending = set(futures)
    try:
        for fut in as_completed(list(futures)):
            pending.discard(fut)
            if fut.status == "finished":
                for result in fut.result():
                    record(result)
            else:
                for index, values in futures[fut]:
                    record(_lost(fut, index, values, workload))
    except BaseException:
        client.cancel(list(pending), force=True)
        raise
    finally:
        client.cancel([wl_future, base_future])


def _lost(fut: Any, index: int, values: dict[str, Value], workload: Workload) -> PointResult:
    """The record of a point Dask could not run (its worker died too often, or it was cancelled)."""
    label = ", ".join(f"{k}={v!r}" for k, v in values.items())
    try:
        exc = fut.exception()
        reason = f"{type(exc).__name__}: {exc}"
    except BaseException as e:  # a cancelled future raises instead of returning its exception
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return PointResult(index, values, error=f"dask could not run {workload.name} at point {index} ({label}): {reason}")


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[PointResult], None]]:
    if not enabled:
        yield lambda _r: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    failed = 0
    with Progress(
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("sweep", total=total, failed=0)

        def tick(result: PointResult) -> None:
            nonlocal failed
            failed += not result.ok
            bar.update(task, advance=1, failed=failed)

        yield tick
