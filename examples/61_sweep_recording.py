"""61 — Sweep a recorded run: the demo, replayed over NoC bandwidth x cube topology.

What this shows, in order:

1. ``kbus.open_device("default", record=path)`` records the demo workload once
   (``kbus demo --record demo.kbrec`` does the same from the shell);
2. ``kbus.sweep(path, grid, workers=2)`` replays that recording at every point
   of the grid on a local cluster of two worker processes: each request goes
   out once the requests it depended on have completed on the point's device,
   so the script that made the recording is not run again. Without ``base`` the
   grid starts from the recorded config, so the point equal to it reproduces
   the recorded end-to-end time exactly (checked below; a ring ignores
   ``cube_cols``);
3. every row carries the end-to-end virtual time, the utilisation peaks and the
   latencies per request kind, plus ``requests``, ``failed_requests`` and
   ``recorded_end_ps``.

The same sweep from the command line::

    kbus demo --record demo.kbrec
    kbus sweep demo.kbrec --set links.noc_hop.bandwidth=32GB/s,256GB/s \\
        --set topology.cube_network=ring,mesh2d --set topology.cube_cols=4 --report sweep.html

Run: ``python examples/61_sweep_recording.py [report.html]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console

import kbus
from kbus.demo import workload
from kbus.sweep import Value, write_report

BASE = "default"  # 4 cubes per SIP on a ring, 256 GB/s NOC links between cubes
SWEEP: dict[str, list[Value]] = {
    "links.noc_hop.bandwidth": ["32GB/s", "256GB/s"],  # NOC <-> NOC link between cubes
    "topology.cube_network": ["ring", "mesh2d"],  # how a SIP's cubes connect
    "topology.cube_cols": [4],  # the mesh as one row of 4 (a 2 x 2 mesh would be the same graph as the ring)
}


async def record(path: Path) -> None:
    async with kbus.open_device(BASE, record=path) as torch:
        rows = await workload(torch, console=Console(quiet=True))
    if not all(ok for _, ok, _ in rows):
        sys.exit("the demo workload did not match numpy")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.kbrec"
        kbus.run(lambda: record(path))
        results = kbus.sweep(path, SWEEP, workers=2)
    keys = list(SWEEP)
    print(f"{len(results)} points of the recorded demo, {len(results.failed)} failed")
    print("  ".join(f"{k:>24}" for k in keys) + f"  {'virtual time':>14}  {'vs recorded':>11}  {'noc_hop peak':>12}")
    for r in results:
        if r.virtual_time_ps is None:
            print("  ".join(f"{r.values[k]!s:>24}" for k in keys) + f"  {r.error}")
            continue
        recorded = int(r.metrics["recorded_end_ps"] or 0)
        ratio = r.virtual_time_ps / recorded if recorded else float("nan")
        util = r.utilisation.get("link.noc_hop", 0.0)
        print(
            "  ".join(f"{r.values[k]!s:>24}" for k in keys)
            + f"  {kbus.format_time(r.virtual_time_ps):>14}  {ratio:>10.3f}x  {util:>12.1%}"
        )
    same = [r for r in results if r.values["links.noc_hop.bandwidth"] == "256GB/s" and r.values[keys[1]] == "ring"]
    if not same or same[0].virtual_time_ps != same[0].metrics["recorded_end_ps"]:
        sys.exit("the point equal to the recorded config did not reproduce the recorded time")
    print("the point equal to the recorded config reproduces the recorded end-to-end time exactly")
    if len(sys.argv) > 1:
        write_report(results, sys.argv[1], title="recorded demo: NoC bandwidth x cube topology")
        print(f"report: {sys.argv[1]}")


if __name__ == "__main__":
    main()
