"""Kernel language benchmark: wall time per program instance, and launch overhead.

Measures, in one run, on the ``default`` preset (64 PEs):

* **vector add, BLOCK = 1024 float32**: wall time per program instance of a
  warm launch (code deployed and cached on every PE; ``placement="owner"``, so
  each instance reads and writes its own PE's memory), next to the named peer:
  numpy doing the same 1024-element slice add (``out[s] = x[s] + y[s]``), one
  slice at a time, in the same process. The ratio is what emulating one
  instance costs over the arithmetic itself: MMU translation, DMA
  bookkeeping, the replay of its timeline in virtual time, the Tile counting;
* **launch overhead**: an empty kernel over 64 instances (one per PE), wall
  and virtual time per launch, next to the builtin ``nop`` kernel launched on
  the same 64 PEs with a bare ``KernelLaunchMsg`` (the fabric's own cost).

Usage: ``python tools/bench/kernels.py [N_INSTANCES]`` (default 1024).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _table import print_table

import kbus
import kbus.lang as kl
from kbus.protocol import KernelLaunchMsg, KernelRef

BLOCK = 1024
REPEAT = 7


@kbus.kernel
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) + kl.load(y_ptr + offs, mask=mask), mask=mask)


@kbus.kernel
def empty():
    pass


def numpy_slices(x: np.ndarray, y: np.ndarray, out: np.ndarray, n_slices: int) -> float:
    """Wall time (s) of one 1024-element slice add, averaged over ``n_slices`` slices done in a loop."""
    t0 = time.perf_counter()
    for i in range(n_slices):
        s = slice(i * BLOCK, (i + 1) * BLOCK)
        out[s] = x[s] + y[s]
    return (time.perf_counter() - t0) / n_slices


async def measure(n_instances: int) -> dict[str, float]:
    results: dict[str, float] = {}
    async with kbus.open_device("default") as torch:
        n = n_instances * BLOCK
        rng = np.random.default_rng(0)
        x_host = rng.standard_normal(n).astype(np.float32)
        y_host = rng.standard_normal(n).astype(np.float32)
        x, y = torch.tensor(x_host), torch.tensor(y_host)
        out = torch.empty(n, dtype=np.float32)
        grid = (n_instances,)
        await add[grid](x, y, out, n, BLOCK=BLOCK, placement="owner")  # deploy + every PE caches the code
        walls, virt, peer = [], [], []
        out_np = np.empty_like(x_host)
        for _ in range(REPEAT):  # interleaved with the peer, so both see the same machine load
            t0 = time.perf_counter()
            res = await add[grid](x, y, out, n, BLOCK=BLOCK, placement="owner")
            walls.append(time.perf_counter() - t0)
            virt.append(res.duration_ps)
            peer.append(numpy_slices(x_host, y_host, out_np, n_instances))
        if not np.array_equal(await out.numpy(), x_host + y_host):
            raise SystemExit("vector add: wrong result")
        results["add_instance_wall"] = min(walls) / n_instances
        results["add_virtual_ps"] = float(virt[-1])
        results["add_pes"] = float(res.active_pes)
        results["numpy_slice_wall"] = min(peer)

        await empty[(64,)](torch=torch)  # deploy + cache
        ew, ev = [], []
        for _ in range(4 * REPEAT):
            t0 = time.perf_counter()
            r = await empty[(64,)](torch=torch)
            ew.append(time.perf_counter() - t0)
            ev.append(r.duration_ps)
        assert r.active_pes == 64
        results["empty_wall"] = statistics.median(ew)
        results["empty_virtual_ps"] = float(ev[-1])

        dev = torch.device
        nw, nv = [], []
        for i in range(4 * REPEAT):
            t0, v0 = time.perf_counter(), dev.sim.now
            rs = await dev.request(KernelLaunchMsg("bench", f"nop{i}", KernelRef("nop", "builtin"), ()))
            nw.append(time.perf_counter() - t0)
            nv.append(dev.sim.now - v0)
        assert len(rs) == 64
        results["nop_wall"] = statistics.median(nw)
        results["nop_virtual_ps"] = float(nv[-1])
    return results


def main() -> None:
    n_instances = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    r = kbus.run(measure, n_instances)
    ratio = r["add_instance_wall"] / r["numpy_slice_wall"]
    print_table(
        f"vector add, {n_instances} instances of BLOCK={BLOCK} float32 on 'default', warm, owner placement "
        f"(best of {REPEAT})",
        ["run", "wall per instance", "vs numpy slice add"],
        [
            [
                f"kbus.lang instance ({int(r['add_pes'])} PEs, {kbus.format_time(int(r['add_virtual_ps']))} virtual)",
                f"{r['add_instance_wall'] * 1e6:.1f} us",
                f"{ratio:.0f}x",
            ],
            ["numpy: out = x + y on one 1024-slice (peer)", f"{r['numpy_slice_wall'] * 1e6:.2f} us", "1x"],
        ],
    )
    print_table(
        "launch overhead, 64 PEs of 'default', code cached (median)",
        ["launch", "wall per launch", "virtual time", "vs builtin nop (wall)"],
        [
            [
                "kbus.lang empty kernel, grid (64,)",
                f"{r['empty_wall'] * 1e3:.2f} ms",
                kbus.format_time(int(r["empty_virtual_ps"])),
                f"{r['empty_wall'] / r['nop_wall']:.2f}x",
            ],
            [
                "builtin nop, bare KernelLaunchMsg (peer)",
                f"{r['nop_wall'] * 1e3:.2f} ms",
                kbus.format_time(int(r["nop_virtual_ps"])),
                "1.00x",
            ],
        ],
    )


if __name__ == "__main__":
    main()
