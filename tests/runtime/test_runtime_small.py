"""Small tensors stay small: a sharded tensor holds at most 2x its bytes plus one page of device memory.

Expected figures are computed here from the config: shards split into
``min(PEs, nbytes // page_size)`` chunks (at least one), each rounded up to
whole pages (see ``kbus.runtime.policy``).
"""

from __future__ import annotations

import numpy as np
import pytest

import kbus


def _pages(nbytes: int, page: int) -> int:
    return -(-nbytes // page) * page


@pytest.mark.asyncio
async def test_device_memory_held_by_small_and_mid_tensors() -> None:
    async with kbus.open_device("default") as torch:
        page = torch.config.memory.page_size  # 64 KiB
        pes = torch.config.num_pes  # 64
        x = np.arange(1024, dtype=np.float32)  # 4 KiB: one chunk (4096 // 65536 = 0 -> 1)
        a = torch.tensor(x)
        assert len(a.shards) == 1 and torch.memory_stats().used == page
        mid = np.arange(51200, dtype=np.float32)  # 200 KiB: 204800 // 65536 = 3 chunks of 17067 rows
        m = torch.tensor(mid)
        rows = -(-51200 // 3)
        held = 2 * _pages(rows * 4, page) + _pages((51200 - 2 * rows) * 4, page)
        assert held == 6 * page <= 2 * mid.nbytes + page
        assert torch.memory_stats().used == page + held
        big = torch.zeros(pes * page // 4)  # one page per PE: split over every PE as before
        assert len(big.shards) == pes and torch.memory_stats().used == page + held + pes * page
        # Results land where their inputs are, at the same sizes; the data is right.
        c = a + a
        assert [(s.coord, s.nbytes) for s in c.shards] == [((0, 0, 0), 4096)]
        np.testing.assert_array_equal(await c.numpy(), x + x)
        np.testing.assert_array_equal(await (m * 2).numpy(), mid * 2)
        assert await m.sum().item() == float(mid.sum(dtype=np.float64))  # partial sums: one row per owner
        spread = torch.tensor(x, policy=kbus.Shard(min_bytes=0))  # 64 shards of 64 bytes
        assert len(spread.shards) == pes and await spread.sum().item() == float(x.sum(dtype=np.float64))
        spread.free()
        for t in (a, m, big, c):
            t.free()
        await torch.synchronize()
        assert torch.memory_stats().used == 0


@pytest.mark.asyncio
async def test_redistributing_a_small_tensor_moves_runs_of_bytes() -> None:
    async with kbus.open_device("default") as torch:
        page = torch.config.memory.page_size
        x = np.arange(7 * 1024, dtype=np.float32).reshape(7, 1024)  # 28 KiB: one shard
        t = torch.tensor(x)
        reads = 0
        real = torch.device.read_va

        async def counting(*args: object, **kwargs: object) -> object:
            nonlocal reads
            reads += 1
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        torch.device.read_va = counting  # type: ignore[method-assign]
        r = t.to(kbus.Replicate())
        np.testing.assert_array_equal(await r.numpy(), x)
        assert reads <= torch.config.num_pes  # at most one read of the whole shard per replica, never per element
        assert torch.memory_stats().used == page + torch.config.num_pes * page
        # Sharding it again by columns: 28 KiB < a page, so one shard again.
        cols = t.to(kbus.Shard(dim=1))
        assert len(cols.shards) == 1
        np.testing.assert_array_equal(await cols.numpy(), x)
