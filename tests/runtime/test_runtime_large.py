"""The ``large`` preset (4096 PEs) runs a tensor program: a sharded add, checked against numpy.

Before shared mappings every PE copied every shard's map entry (16.7 million
extents for one tensor) and creating one sharded tensor did not finish in 300 s.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import kbus
import kbus.runtime.runtime


@pytest.mark.asyncio
async def test_sharded_add_on_large() -> None:
    async with kbus.open_device("large") as torch:
        topo = torch.config.topology
        pes = topo.sips * topo.cubes_per_sip * topo.pes_per_cube
        assert pes == 4096
        assert gc.get_freeze_count() > 100_000  # the device's objects are out of the collector's way
        per_pe = 16  # float32 elements per shard
        x = np.arange(pes * per_pe, dtype=np.float32)
        # min_bytes=0: one 64-byte shard on every PE (the default would use 4 PEs for 256 KiB).
        a = torch.tensor(x, policy=kbus.Shard(dim=0, min_bytes=0))
        b = torch.full((pes * per_pe,), 0.5, policy=kbus.Shard(dim=0, min_bytes=0))
        c = a + b
        assert len(c.shards) == pes  # one shard on every PE
        assert np.array_equal(await c.numpy(), x + np.float32(0.5))
        # One broadcast map per sharded tensor: every PE references the same run.
        runs = [node.mmu.table.shared_runs() for node in torch.device.iter_pes()]
        assert all(len(r) == 3 for r in runs)
        assert all(r[2] is runs[0][2] for r in runs)
        for t in (a, b, c):
            t.free()
        await torch.synchronize()
        assert all(node.mmu.table.mapped_bytes == 0 for node in torch.device.iter_pes())
    assert gc.get_freeze_count() == 0  # handed back to the collector on close


@pytest.mark.asyncio
async def test_a_small_device_is_not_frozen() -> None:
    """Freezing starts with a full collection: below FREEZE_MIN_PES it would cost more than it saves."""
    before = gc.get_freeze_count()
    async with kbus.open_device("default") as torch:
        assert torch.config.topology.num_pes < kbus.runtime.runtime.FREEZE_MIN_PES
        assert gc.get_freeze_count() == before
    assert gc.get_freeze_count() == before
