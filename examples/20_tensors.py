"""20 — Sharded tensors and operations with the torch-like runtime.

What this shows, in order:

1. ``async with kbus.open_device("tiny") as torch`` builds a device on the
   running loop and yields the torch-like handle;
2. a tensor is *sharded* by default (``Shard(dim=0)`` over every PE): each PE
   holds a chunk of rows; ``t.shards`` says which PE holds which rows where;
   a tensor smaller than a page per PE uses fewer PEs (small tensors stay small);
3. ``Replicate()`` puts a full copy on each target PE instead;
4. operations return a tensor at once and queue their work; ``await t`` waits
   for it and ``await t.numpy()`` reads it back (nothing ever blocks the loop);
5. device time (``torch.now_ns``) explains what each step cost;
6. ``torch.memory_stats()`` and scopes: memory is freed when a scope exits,
   and closing the device checks that nothing leaked.

Run: ``python examples/20_tensors.py``.
"""

from __future__ import annotations

import numpy as np

import kbus


async def main() -> None:
    async with kbus.open_device("tiny") as torch:
        # --- 2. a sharded tensor: 8 row-chunks of a 512 x 256 matrix, one per PE ---------
        host = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)  # 512 KiB: a 64 KiB page per PE
        x = torch.tensor(host, name="x")  # Shard(dim=0) over every PE by default
        print(f"x: shape {x.shape}, {x.dtype}, {x.policy}")
        for s in x.shards[:3]:
            print(f"  rows {s.index[0].start}:{s.index[0].stop} on {s.path} at pa {s.pa:#x} (va {s.va:#x})")
        print(f"  ... {len(x.shards)} shards in all")
        small = torch.tensor(host[:8], name="small")  # 8 KiB, less than a page: one shard, one page held
        print(f"small: {len(small.shards)} shard on {small.shards[0].path}")
        small.free()

        # --- 3. the same data replicated on two PEs -----------------------------------------
        w = torch.tensor(np.full((256, 16), 0.5, np.float32), policy=kbus.Replicate(targets=[(0, 0, 0), (0, 1, 0)]))
        print(f"w: {w.policy}, copies on {', '.join(s.path for s in w.shards)}")

        # --- 4. operations queue work; awaiting waits; numpy() reads back --------------------
        t0 = torch.now_ns
        y = (x * 2 + 1).sum(dim=1)  # three queued operations, no waiting yet
        await y
        print(f"(x * 2 + 1).sum(dim=1) ready after {torch.now_ns - t0:.1f} ns of device time")
        got = await y.numpy()
        assert np.allclose(got, (host * 2 + 1).sum(axis=1))
        print(f"  first sums: {got[:3]}")

        z = x @ w  # matmul of a sharded (512, 256) by a replicated (256, 16)
        assert np.allclose(await z.numpy(), host @ np.full((256, 16), 0.5, np.float32))
        print(f"x @ w -> {z.shape}, checked against numpy")

        # re-placed: split by columns over PE 0 of each cube (2 shards), data moved on the device
        col = x.to(kbus.Shard(dim=1, targets=[(0, 0, 0), (0, 1, 0)]))
        print(f"x.to(kbus.Shard(dim=1, ...)): {len(col.shards)} shards on {', '.join(s.path for s in col.shards)}")

        # --- 6. memory: scopes free what they created --------------------------------------
        before = torch.memory_stats().used
        async with torch.scope():
            tmp = torch.zeros(1024, 1024)  # 4 MiB, freed when the scope exits
            await tmp
            print(f"inside the scope: {kbus.format_time(torch.now_ps)}, {torch.memory_stats().used - before} B more")
        print(f"after the scope: {torch.memory_stats().used - before} B more")
    # leaving the block waited for the queue, freed every tensor and checked for leaks
    print(f"closed: {torch.closed}, device time {kbus.format_time(torch.now_ps)}")


if __name__ == "__main__":
    kbus.run(main)
