"""The body of ``kbus sweep``: parse ``--set``, run the sweep with a progress bar, write the outputs.

Kept here rather than in ``kbus/cli.py`` so the command stays a thin shell
and its logic is importable and testable without a subprocess.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from ..sim.units import format_time
from .errors import SweepError, SweepInterrupted
from .grid import Grid, Value
from .report import write_report
from .results import SweepResults
from .runner import import_distributed, sweep

__all__ = ["grid_from_sets", "run_sweep_command"]


def grid_from_sets(sets: list[str], zipped: bool) -> Grid:
    """The grid of ``--set KEY=V1,V2`` arguments (a key given twice is an error, not a silent override)."""
    from .grid import parse_set

    if not sets:
        raise SweepError("nothing to sweep: give at least one --set KEY=V1,V2,...")
    axes: dict[str, list[Value]] = {}
    for arg in sets:
        key, values = parse_set(arg)
        if key in axes:
            raise SweepError(f"--set {key} is given twice; put all its values in one list")
        axes[key] = values
    return Grid.zip(axes) if zipped else Grid.product(axes)


def _summary(results: SweepResults, console: Console, full: bool) -> None:
    table = Table(title=f"sweep: {len(results)} points, {len(results.failed)} failed")
    table.add_column("#", justify="right")
    for key in results.keys:
        table.add_column(key, justify="right")
    table.add_column("virtual time", justify="right")
    table.add_column("wall", justify="right")
    table.add_column("error")
    for r in results:
        if not full and r.ok and r is not results.best() and r is not results.worst():
            continue
        table.add_row(
            str(r.index),
            *(str(r.values[k]) for k in results.keys),
            "" if r.virtual_time_ps is None else format_time(r.virtual_time_ps),
            f"{r.wall_s:.2f}s",
            r.error or "",
        )
    console.print(table)
    best, worst = results.best(), results.worst()
    if best is not None and worst is not None:
        console.print(f"best  #{best.index} {best.label()}: {format_time(best.virtual_time_ps or 0)}")
        console.print(f"worst #{worst.index} {worst.label()}: {format_time(worst.virtual_time_ps or 0)}")


def _write(results: SweepResults, args: argparse.Namespace, console: Console) -> None:
    if args.out:
        results.to_csv(args.out)
        console.print(f"results: {args.out}")
    if args.report:
        write_report(results, args.report, title=f"kbus sweep of {args.workload}")
        console.print(f"report: {args.report}")


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``kbus sweep``; exit 0 when every point ran, 1 when some failed, 130 on Ctrl-C."""
    console = Console()
    grid = grid_from_sets(args.sets, args.zip)
    client: Any = None
    if args.scheduler:
        if args.workers is not None:
            raise SweepError("--workers applies to the local cluster; the cluster at --scheduler has its own")
        client = import_distributed().Client(args.scheduler)
    try:
        results = sweep(args.workload, grid, base=args.config, client=client, workers=args.workers, progress=True)
    except SweepInterrupted as stop:
        console.print(f"[yellow]interrupted: {stop.cancelled} points cancelled, {len(stop.results)} kept[/]")
        _summary(stop.results, console, full=len(stop.results) <= 40)
        _write(stop.results, args, console)
        return 130
    finally:
        if client is not None:
            client.close()
    _summary(results, console, full=not args.out or len(results) <= 40)
    _write(results, args, console)
    return 1 if results.failed else 0
