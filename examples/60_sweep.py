"""60 — A design-space sweep: NoC link bandwidth x cubes per SIP, on a local Dask cluster.

What this shows, in order:

1. a workload is a Python file defining ``async def workload(torch) -> dict``;
   this very file is one (the sweep loads it as source, so the block under
   ``if __name__ == "__main__"`` does not run on the workers);
2. ``SWEEP`` below is the one place naming the swept config keys and their
   values, in the config's own units;
3. ``kbus.sweep(path, grid, base="tiny", workers=2)`` runs every point (the
   cartesian product) on a local cluster of two worker processes and returns
   one record per point, in grid order: the values, the end-to-end virtual
   time, utilisation peaks, the workload's metrics, wall time, error if any;
4. ``results.to_csv()`` gives the table; ``write_report`` (or ``kbus sweep
   --report``) draws it. (On ``kbus``, the name ``sweep`` is the function, so
   the package's other names come from ``from kbus.sweep import ...``.)

The same sweep from the command line::

    kbus sweep examples/60_sweep.py --config tiny \\
        --set links.noc_hop.bandwidth=16GB/s,64GB/s,256GB/s --set topology.cubes_per_sip=1,2,4 \\
        --report sweep.html

Run: ``python examples/60_sweep.py [report.html]``.
"""

from __future__ import annotations

import sys

import numpy as np

import kbus
from kbus.sweep import Value, write_report

# The swept keys and their values: edit here (and only here) to sweep something else.
SWEEP: dict[str, list[Value]] = {
    "links.noc_hop.bandwidth": ["16GB/s", "64GB/s", "256GB/s"],  # NOC <-> NOC link between cubes
    "topology.cubes_per_sip": [1, 2, 4],  # cubes (each with its PEs) per SIP
}
BASE = "tiny"


async def workload(torch: kbus.Runtime) -> dict[str, float | int]:
    """Shard a matrix over every PE, reduce it, and gather it on PE 0 (every shard crosses the NoC)."""
    host = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    x = torch.tensor(host, policy=kbus.Shard(dim=0, min_bytes=0))  # 64 KiB: a shard on every PE anyway
    row_sums = (x * 2 + 1).sum(dim=1)
    gathered = x.to(kbus.Replicate(targets=[(0, 0, 0)]))
    await gathered
    got = await row_sums.numpy()
    assert np.allclose(got, (host * 2 + 1).sum(axis=1))
    return {"pes": len(x.shards), "checksum": float(got.sum())}


def main() -> None:
    results = kbus.sweep(__file__, SWEEP, base=BASE, workers=2)
    keys = list(SWEEP)
    print(f"{len(results)} points, {len(results.failed)} failed")
    print("  ".join(f"{k:>24}" for k in keys) + f"  {'virtual time':>14}  {'noc_hop peak':>12}")
    for r in results:
        util = r.utilisation.get("link.noc_hop")
        shown = "-" if util is None else f"{util:.1%}"
        time = r.error if r.virtual_time_ps is None else kbus.format_time(r.virtual_time_ps)
        print("  ".join(f"{r.values[k]!s:>24}" for k in keys) + f"  {time:>14}  {shown:>12}")
    best = results.best()
    if best is not None:
        print(f"best: {best.label()}")
    if len(sys.argv) > 1:
        write_report(results, sys.argv[1], title="NoC bandwidth x cubes per SIP")
        print(f"report: {sys.argv[1]}")


if __name__ == "__main__":
    main()
