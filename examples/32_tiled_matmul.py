"""32 — Tiled matmul: a 2-D grid of output tiles, ``kl.dot`` on blocks.

What this shows, in order:

1. a 2-D grid (``program_id(0)`` picks a block of rows, ``program_id(1)`` a
   block of columns) computed by a callable from the launch's constexprs;
2. 2-D pointer blocks: ``a_ptr + rows[:, None] * K + ks[None, :]`` addresses a
   (BM, BK) tile; masks handle sizes that are not multiples of the tile;
3. ``kl.dot(a, b, acc)`` accumulates in float32 over the K loop (the loop runs
   over blocks, never over elements);
4. data placement: A is sharded by rows over every PE, B is replicated on
   every PE (each PE reads its local copy);
5. placement is a trade-off the device time makes visible:
   ``placement="owner"`` runs each tile on the PE holding its rows of A (no
   remote reads, but only the few PEs holding row blocks work), while
   ``"spread"`` uses every PE and pays for remote reads of A. Matmul is
   compute bound (``2*BM*BN*BK`` operations per ``kl.dot`` at the PE's FLOP
   rate), so spreading wins here; the bandwidth-bound vector add of example 30
   prefers owner.

Run: ``python examples/32_tiled_matmul.py`` (exits non-zero on a wrong result).
"""

from __future__ import annotations

import sys

import numpy as np

import kbus
import kbus.lang as kl


@kbus.kernel
def matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: kl.constexpr, BN: kl.constexpr, BK: kl.constexpr):
    rows = kl.program_id(0) * BM + kl.arange(0, BM)
    cols = kl.program_id(1) * BN + kl.arange(0, BN)
    acc = kl.zeros((BM, BN), kl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + kl.arange(0, BK)
        a = kl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K))
        b = kl.load(b_ptr + ks[:, None] * N + cols[None, :], mask=(ks[:, None] < K) & (cols[None, :] < N))
        acc = kl.dot(a, b, acc)
    kl.store(c_ptr + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


async def main() -> None:
    async with kbus.open_device("default") as torch:
        M, N, K = 300, 200, 250
        rng = np.random.default_rng(2)
        a_host = rng.standard_normal((M, K)).astype(np.float32)
        b_host = rng.standard_normal((K, N)).astype(np.float32)
        a = torch.tensor(a_host)  # rows sharded over every PE
        b = torch.tensor(b_host, policy=kbus.Replicate())  # a local copy on every PE
        c = torch.zeros(M, N, dtype=np.float32)
        for t in (a, b, c):
            await t

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return kl.cdiv(meta["M"], meta["BM"]), kl.cdiv(meta["N"], meta["BN"])

        tiles = {"BM": 32, "BN": 32, "BK": 64}
        await kl.deploy(torch, matmul)  # deploy ahead, so the timings below are the kernel alone
        expect = a_host @ b_host
        flops = 2 * M * N * K
        print(f"C[{M}x{N}] = A[{M}x{K}] @ B[{K}x{N}], tiles {tiles['BM']}x{tiles['BN']}, K step {tiles['BK']}")
        for placement in ("owner", "spread"):
            res = await matmul[grid](a, b, c, M, N, K, placement=placement, **tiles)
            got = await c.numpy()
            if not np.allclose(got, expect, rtol=1e-4, atol=1e-3):
                sys.exit(f"{placement}: matmul mismatch, max abs error {np.abs(got - expect).max():.3g}")
            print(
                f"  {placement:>6}: grid {res.grid[:2]} = {res.instances} tiles on {res.active_pes} PEs, "
                f"{kbus.format_time(res.duration_ps)}, {flops / res.duration_ps:.2f} TFLOP/s, checked"
            )
        one_dot = torch.config.compute.flops_to_ps(2 * tiles["BM"] * tiles["BN"] * tiles["BK"])
        print(
            f"  one 32x32x64 kl.dot costs {kbus.format_time(one_dot)} at "
            f"{torch.config.compute.pe_flops / 1e12:.3f} TFLOP/s per PE"
        )


if __name__ == "__main__":
    kbus.run(main)
