"""Sweep benchmark: a local Dask cluster against serial execution of the same points.

Two measurements, each interleaved round by round with its peer (serial
execution of the same points, one after another in this process) so both see
the same machine load; the table gives min / median / max of the per-round
speed-up (serial wall time / cluster wall time):

1. **16 points of the demo workload** (the demo's tensor program on preset
   ``tiny``, NoC hop bandwidth x cubes per SIP), on a local cluster of
   ``--workers`` processes (default 2). Every round checks that the cluster's
   table equals the serial one (virtual times, utilisation, metrics, errors).
2. **1,000 tiny points** (a workload that only opens and closes a device),
   reported in points per second, to show whether Dask's scheduler, rather
   than the simulations, limits throughput: "workers busy" is the points' own
   wall time summed over workers x the sweep's wall time (near 100 %: the
   workers never waited for the scheduler).

The cluster is started once and reused across rounds (its start-up time is
shown on its own); each round submits the whole grid afresh, so scattering the
workload and collecting the results are timed.

Usage: ``python tools/bench/sweep.py [--rounds N] [--workers N] [--tiny-points N] [--tiny-rounds N]``.

This file is also the 16-point workload: it defines ``async def workload(torch)``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

import kbus
from kbus.sweep import PythonWorkload, SweepResults, sweep

GRID_16 = {
    "links.noc_hop.bandwidth": ["16GB/s", "32GB/s", "64GB/s", "256GB/s"],
    "topology.cubes_per_sip": [1, 2, 3, 4],
}
TINY = PythonWorkload("async def workload(torch):\n    return {}\n", name="tiny_workload.py")


async def workload(torch: kbus.Runtime) -> dict[str, int]:
    """The demo's tensor program: uploads, elementwise ops, matmuls, a reduction and a redistribution."""
    from kbus.demo import workload as demo

    rows = await demo(torch)
    return {"steps": len(rows), "steps_ok": sum(ok for _, ok, _ in rows)}


def tiny_grid(n: int) -> dict[str, list[Any]]:
    """``n`` distinct points: NoC-to-PE latencies of 1 .. n ps (a config change that costs nothing)."""
    return {"links.noc_pe.latency": [f"{i}ps" for i in range(1, n + 1)]}


def timed(fn: Callable[[], SweepResults]) -> tuple[float, SweepResults]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def interleaved(
    rounds: int, serial: Callable[[], SweepResults], cluster: Callable[[], SweepResults], workers: int
) -> tuple[list[float], list[float], list[float], SweepResults]:
    """Run both ``rounds`` times, alternating which goes first; check identical tables every round.

    Also returns, per cluster round, how busy the workers were: the points'
    own wall times summed, over workers x the sweep's wall time. Near 1, the
    workers never waited for the scheduler; well below 1, Dask was the limit.
    """
    t_serial, t_cluster, busy = [], [], []
    reference: SweepResults | None = None
    for i in range(rounds):
        order = [("serial", serial), ("cluster", cluster)]
        if i % 2:
            order.reverse()
        for name, fn in order:
            wall, res = timed(fn)
            (t_serial if name == "serial" else t_cluster).append(wall)
            if name == "cluster":
                busy.append(sum(r.wall_s for r in res) / (workers * wall))
            if reference is None:
                reference = res
            elif list(res) != list(reference):
                raise SystemExit(f"round {i}: the {name} table differs from the first one")
    assert reference is not None
    return t_serial, t_cluster, busy, reference


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the 16-point sweep (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="local cluster worker processes (default 2)")
    ap.add_argument("--tiny-points", type=int, default=1000, help="points of the throughput run (default 1000)")
    ap.add_argument("--tiny-rounds", type=int, default=3, help="interleaved rounds of the throughput run (default 3)")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from kbus.sweep.runner import LOCAL_SCHEDULER_OPTIONS

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs=dict(LOCAL_SCHEDULER_OPTIONS),
        silence_logs=logging.CRITICAL,
    )
    client = Client(cluster)
    startup = time.perf_counter() - t0
    try:
        here = Path(__file__)
        # Warm-up (imports, the compiled workload cached in each process), not timed.
        sweep(here, {"topology.cubes_per_sip": [1]}, base="tiny", workers=0)
        sweep(here, {"topology.cubes_per_sip": [1, 2]}, base="tiny", client=client)

        s16, c16, b16, ref16 = interleaved(
            args.rounds,
            lambda: sweep(here, GRID_16, base="tiny", workers=0),
            lambda: sweep(here, GRID_16, base="tiny", client=client),
            args.workers,
        )
        if ref16.failed:
            raise SystemExit(f"points failed: {[r.error for r in ref16.failed]}")
        ratio16 = [s / c for s, c in zip(s16, c16, strict=True)]

        grid = tiny_grid(args.tiny_points)
        st, ct, bt, ref_t = interleaved(
            args.tiny_rounds,
            lambda: sweep(TINY, grid, base="tiny", workers=0),
            lambda: sweep(TINY, grid, base="tiny", client=client),
            args.workers,
        )
        if ref_t.failed or len(ref_t) != args.tiny_points:
            raise SystemExit("the throughput run lost or failed points")
        ratio_t = [s / c for s, c in zip(st, ct, strict=True)]
    finally:
        client.close()
        cluster.close()

    n16 = len(ref16)
    table = Table(
        title=f"kbus sweep: local Dask cluster ({args.workers} workers) vs serial, interleaved "
        f"(cluster start-up {startup:.1f} s, not counted)"
    )
    columns = ["run", "points", "serial median", "cluster median", "serial pts/s", "cluster pts/s", "workers busy"]
    for c in [*columns, "speed-up min/med/max"]:
        table.add_column(c, justify="left" if c == "run" else "right")
    for row in [
        [
            "demo workload, tiny preset",
            str(n16),
            f"{statistics.median(s16):.2f} s",
            f"{statistics.median(c16):.2f} s",
            f"{n16 / statistics.median(s16):.1f}",
            f"{n16 / statistics.median(c16):.1f}",
            f"{statistics.median(b16):.0%}",
            spread(ratio16),
        ],
        [
            "tiny points (open + close)",
            str(len(ref_t)),
            f"{statistics.median(st):.2f} s",
            f"{statistics.median(ct):.2f} s",
            f"{len(ref_t) / statistics.median(st):.0f}",
            f"{len(ref_t) / statistics.median(ct):.0f}",
            f"{statistics.median(bt):.0%}",
            spread(ratio_t),
        ],
    ]:
        table.add_row(*row)
    Console(width=140).print(table)
    print(f"identical tables in every round: yes ({args.rounds} + {args.tiny_rounds} rounds)")


if __name__ == "__main__":
    main()
