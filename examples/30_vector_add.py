"""30 — A first kernel: vector add over a tensor sharded across SIPs.

What this shows, in order:

1. ``@kbus.kernel`` turns a plain function into a kernel; inside it, ``kl.*``
   works on whole blocks of values (one numpy array per program instance);
2. ``add[grid](...)`` launches one program instance per block; the grid may be
   a callable of the arguments and constexprs (``meta["BLOCK"]``);
3. the tensors are split over all 64 PEs of both SIPs of the default device
   (``Shard(dim=0)``): every PE can address the whole tensor through its MMU,
   and remote data costs NOC hops or the chip-to-chip link;
4. ``placement="spread"`` (round-robin over all 64 PEs) against
   ``placement="owner"`` (each instance on the PE holding its block): same
   result, very different device time;
5. the first launch deploys the kernel's code blob to device memory; later
   launches reuse it (``kl.kernel_cache_info``).

Run: ``python examples/30_vector_add.py`` (exits non-zero on a wrong result).
"""

from __future__ import annotations

import sys

import numpy as np

import kbus
import kbus.lang as kl


@kbus.kernel
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
    pid = kl.program_id(0)
    offs = pid * BLOCK + kl.arange(0, BLOCK)  # this instance's block of element offsets
    mask = offs < n  # the last block is ragged
    x = kl.load(x_ptr + offs, mask=mask)
    y = kl.load(y_ptr + offs, mask=mask)
    kl.store(out_ptr + offs, x + y, mask=mask)


async def main() -> None:
    async with kbus.open_device("default") as torch:
        n = 1_000_000
        rng = np.random.default_rng(0)
        x_host = rng.standard_normal(n).astype(np.float32)
        y_host = rng.standard_normal(n).astype(np.float32)
        across_sips = kbus.Shard(dim=0)  # one chunk per PE, over every PE of both SIPs
        x = torch.tensor(x_host, policy=across_sips)
        y = torch.tensor(y_host, policy=across_sips)
        out = torch.empty(n, dtype=np.float32, policy=across_sips)
        for t in (x, y, out):
            await t  # uploaded: the launches below measure the kernel only
        per_sip = {s: sum(sh.sip == s for sh in x.shards) for s in range(torch.config.topology.sips)}
        print(f"x: {n:,} float32 in {len(x.shards)} shards, per SIP: {per_sip}")

        def grid(meta: dict[str, object]) -> tuple[int]:
            return (kl.cdiv(n, meta["BLOCK"]),)

        for placement in ("spread", "spread", "owner"):
            res = await add[grid](x, y, out, n, BLOCK=8192, placement=placement)
            got = await out.numpy()
            if not np.array_equal(got, x_host + y_host):
                sys.exit(f"{placement}: wrong result, first mismatch at {np.flatnonzero(got != x_host + y_host)[0]}")
            note = "deployed the code" if res.deployed else "code reused"
            print(
                f"{placement:>6}: {res.instances} instances on {res.active_pes} PEs in "
                f"{kbus.format_time(res.duration_ps)} of device time ({note}), result checked"
            )
        info = kl.kernel_cache_info(torch)
        print(
            f"kernel cache: {info.misses} miss, {info.hits} hits, {info.deployments} deployment, "
            f"{info.pe_fetches} PE code fetches"
        )


if __name__ == "__main__":
    kbus.run(main)
