"""Host memory and host threads of the runtime: snapshots, resident bytes, BLAS pools."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest
import threadpoolctl

import kbus
from kbus.hw import DeviceConfig
from kbus.runtime.builtins import host_threads
from kbus.runtime.transfer import HostTransfers


@pytest.mark.asyncio
async def test_upload_snapshot_is_released_when_the_upload_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[weakref.ref[Any]] = []
    upload = HostTransfers.upload

    async def spy(self: HostTransfers, st: Any, data: Any, pattern: str | None) -> None:
        seen.append(weakref.ref(data))
        await upload(self, st, data, pattern)

    monkeypatch.setattr(HostTransfers, "upload", spy)
    async with kbus.open_device("tiny") as torch:
        x = np.arange(1 << 16, dtype=np.float32)
        a = torch.tensor(x)
        await a
        (snap,) = seen
        assert snap() is None  # no gc.collect(): nothing holds the copy once its DMA is done
        assert np.array_equal(await a.numpy(), x)


@pytest.mark.asyncio
async def test_store_backs_only_what_is_allocated() -> None:
    async with kbus.open_device("tiny") as torch:
        mem = torch.config.memory
        pes = torch.config.num_pes
        # One page of float32 per PE: 8 shards of exactly one page each.
        n = pes * mem.page_size // 4
        a = torch.ones(n)
        await a
        stats = torch.memory_stats()
        assert stats.used == pes * mem.page_size
        stores = [s for b in torch.device.blocks.values() for s in _stores(b)]
        resident = sum(s.resident_bytes for s in stores)
        assert resident == pes * mem.page_size  # 64 KiB chunks: exactly the pages written


def _stores(block: Any) -> list[Any]:
    out = []
    if hasattr(block, "store"):
        out.append(block.store)
    slices = getattr(block, "slices", None)
    if isinstance(slices, dict):
        out += list(slices.values())
    elif isinstance(slices, list):
        out += [s for s in slices if s is not None]
    return out


def test_host_threads_caps_the_blas_pools() -> None:
    with host_threads(1):
        infos = threadpoolctl.threadpool_info()
        assert all(info["num_threads"] == 1 for info in infos)


def test_host_threads_key_defaults_to_one_and_is_checked() -> None:
    assert DeviceConfig.load("default").compute.host_threads == 1
    assert DeviceConfig.load("large").compute.host_threads == 1
    cfg = DeviceConfig.load("tiny").with_overrides({"compute.host_threads": 4})
    assert cfg.compute.host_threads == 4
    with pytest.raises(kbus.ConfigError, match=r"compute\.host_threads"):
        DeviceConfig.load("tiny").with_overrides({"compute.host_threads": 0})


@pytest.mark.asyncio
async def test_host_threads_change_nothing_on_the_device() -> None:
    """The thread count is a host matter: same results, same virtual time."""
    results = []
    for threads in (1, 2):
        cfg = DeviceConfig.load("tiny").with_overrides({"compute.host_threads": threads})
        async with kbus.open_device(cfg) as torch:
            torch.manual_seed(3)
            a = torch.rand(64, 32)
            b = torch.rand(32, 16, policy=kbus.Shard(dim=1))
            c = a @ b
            results.append((await c.numpy(), torch.now_ps))
    (r1, t1), (r2, t2) = results
    assert np.array_equal(r1, r2) and t1 == t2


@pytest.mark.asyncio
async def test_sharded_fill_is_one_write_per_sip() -> None:
    """``ones`` over every PE of ``default`` (2 SIPs): equal shards at one PA are one broadcast per SIP."""
    async with kbus.open_device("default") as torch:
        sent: list[Any] = []
        torch.device.on_request = lambda phase, msg, _r, _t: sent.append(msg) if phase == "begin" else None
        pes = torch.config.num_pes
        n = pes * torch.config.memory.page_size // 4  # one page of float32 per PE
        a = torch.ones(n)
        assert np.array_equal(await a.numpy(), np.ones(n, np.float32))
        writes = [m for m in sent if m.msg_type == "memory_write"]
        assert len(writes) == torch.config.topology.sips
        assert all(m.target_cubes == "all" and m.target_pe == "all" for m in writes)
