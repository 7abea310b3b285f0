"""34 — Tree reduction: block sums on every PE, then a two-level combine across PEs.

What this shows, in order:

1. level 0: one program instance per block of ``x`` sums its block where the
   block lives (``placement="owner"``) into ``partial[pid]``: no data crosses
   the NOC, and each PE runs its blocks as one batched run of the body;
2. level 1: ``FAN`` partial sums at a time are combined by one instance each
   (``kl.load`` of a strided slice of the partials, which live on other PEs),
   giving ``FAN`` times fewer partials;
3. level 2: a single instance combines what is left into the result;
4. every level is its own launch, ordered by the runtime's work queue
   (each launch waits for the one producing its input), and the device time
   of each level shows where a reduction spends it: the leaves move the
   bytes, the combines pay latency.

Checked against numpy on the ``tiny`` and ``default`` presets.

Run: ``python examples/34_tree_reduce.py [preset ...]`` (default: tiny, then default; exits non-zero on a
wrong result).
"""

from __future__ import annotations

import sys

import numpy as np

import kbus
import kbus.lang as kl


@kbus.kernel
def block_sum(x_ptr, out_ptr, n, BLOCK: kl.constexpr):
    """Level 0: ``out[pid] = sum(x[pid*BLOCK : (pid+1)*BLOCK])`` (float64 accumulation)."""
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    x = kl.load(x_ptr + offs, mask=offs < n, other=0.0)
    kl.store(out_ptr + kl.program_id(0), kl.sum(x.to(kl.float64)))


@kbus.kernel
def combine(in_ptr, out_ptr, n, FAN: kl.constexpr):
    """A tree level: ``out[pid] = sum(in[pid*FAN : (pid+1)*FAN])`` over the ``n`` partial sums."""
    offs = kl.program_id(0) * FAN + kl.arange(0, FAN)
    kl.store(out_ptr + kl.program_id(0), kl.sum(kl.load(in_ptr + offs, mask=offs < n, other=0.0)))


async def run(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        n, BLOCK, FAN = 1_000_003, 4096, 16
        host = np.random.default_rng(34).standard_normal(n).astype(np.float32)
        x = torch.tensor(host)  # sharded over the PEs
        await x
        leaves = kl.cdiv(n, BLOCK)
        mids = kl.cdiv(leaves, FAN)
        if mids > FAN:
            sys.exit(f"{n} elements need a third level with BLOCK={BLOCK}, FAN={FAN}")
        partial = torch.empty(leaves, dtype=np.float64)
        middle = torch.empty(mids, dtype=np.float64)
        total = torch.empty(1, dtype=np.float64)
        r0 = block_sum[(leaves,)](x, partial, n, BLOCK=BLOCK, placement="owner")
        r1 = combine[(mids,)](partial, middle, leaves, FAN=FAN)
        r2 = combine[(1,)](middle, total, mids, FAN=FAN)
        levels = [await r0, await r1, await r2]
        got = float((await total.numpy())[0])
        expect = float(host.astype(np.float64).sum())
        if not np.isclose(got, expect, rtol=1e-9, atol=1e-6):
            sys.exit(f"{preset}: tree sum {got!r} != numpy {expect!r}")
        shape = " -> ".join(f"{r.instances} ({kbus.format_time(r.duration_ps)}, {r.active_pes} PEs)" for r in levels)
        print(f"{preset:>8}: sum of {n:,} float32 = {got:.6f}, checked; instances per level: {shape}")


PRESETS = ("tiny", "default")


async def main() -> None:
    for preset in sys.argv[1:] or PRESETS:
        await run(preset)


if __name__ == "__main__":
    kbus.run(main)
