"""31 — Row softmax: one program instance per row, reductions inside a block.

What this shows, in order:

1. a kernel that loads a whole row as one block (``BLOCK`` is the row length
   rounded up to a power of two, masked lanes read ``other=-inf`` so they do
   not change the max and contribute ``exp(-inf) = 0`` to the sum);
2. reductions along a block (``kl.max``, ``kl.sum``) and elementwise math
   (``kl.exp``, division) on tiles;
3. ``placement="owner"``: each row's instance runs on the PE holding that row
   (the matrix is sharded by rows over every PE), so no data crosses the NOC;
4. where the device time goes: the trace of one instance (flops, bytes moved)
   comes from ``kbus.lang``'s ``kernel`` events; here we read the totals off a
   tiny recorder attached to ``torch.sim.tracer``.

Run: ``python examples/31_row_softmax.py`` (exits non-zero on a wrong result).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import kbus
import kbus.lang as kl


@kbus.kernel
def softmax(x_ptr, out_ptr, n_cols, row_stride, BLOCK: kl.constexpr):
    row = kl.program_id(0)
    cols = kl.arange(0, BLOCK)
    mask = cols < n_cols
    x = kl.load(x_ptr + row * row_stride + cols, mask=mask, other=-np.inf)
    shifted = x - kl.max(x, axis=0)  # subtract the row max: exp never overflows
    num = kl.exp(shifted)
    kl.store(out_ptr + row * row_stride + cols, num / kl.sum(num, axis=0), mask=mask)


class Totals:
    """A minimal trace sink: sums what the kernel events report."""

    def __init__(self) -> None:
        self.instances = self.flops = self.bytes = 0

    def emit(self, cat: str, name: str, path: str, ts: int, dur: int | None, args: dict[str, Any] | None) -> None:
        if cat == "kernel" and dur is not None and args is not None:
            self.instances += 1
            self.flops += args["flops"]
            self.bytes += args["bytes_loaded"] + args["bytes_stored"]


async def main() -> None:
    async with kbus.open_device("default") as torch:
        rows, cols = 512, 1000
        host = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 4
        x = torch.tensor(host)  # Shard(dim=0) over every PE: 8 rows per PE
        out = torch.empty(rows, cols, dtype=np.float32)
        block = 1 << (cols - 1).bit_length()  # 1024
        await x
        totals = Totals()
        torch.sim.tracer = totals
        res = await softmax[(rows,)](x, out, cols, cols, BLOCK=block, placement="owner")
        torch.sim.tracer = None

        e = np.exp(host - host.max(axis=1, keepdims=True))
        expect = e / e.sum(axis=1, keepdims=True)
        got = await out.numpy()
        if not np.allclose(got, expect, rtol=1e-5, atol=1e-7):
            sys.exit(f"softmax mismatch: max abs error {np.abs(got - expect).max():.3g}")
        print(f"softmax of a {rows} x {cols} matrix: {res.instances} instances on {res.active_pes} PEs, checked")
        print(f"  device time {kbus.format_time(res.duration_ps)} (first launch: includes deploying the code)")
        print(f"  {totals.instances} instances did {totals.flops:,} operations and moved {totals.bytes:,} bytes")
        print(f"  row sums: min {got.sum(axis=1).min():.6f}, max {got.sum(axis=1).max():.6f}")


if __name__ == "__main__":
    kbus.run(main)
