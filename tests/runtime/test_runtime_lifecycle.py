"""Tensor lifetime: free, del, scopes, context managers, reuse ordering, leak checks at close."""

from __future__ import annotations

import asyncio
import gc
import warnings

import numpy as np
import pytest

import kbus
from kbus.hw import DeviceConfig
from kbus.runtime import MemoryLeakError, Replicate, Runtime, Shard


def mapped_bytes(torch: Runtime) -> int:
    return sum(node.mmu.table.mapped_bytes for node in torch.device.iter_pes())


async def assert_clean(torch: Runtime) -> None:
    """Nothing allocated, nothing pending, nothing mapped on any PE."""
    await torch.synchronize()
    stats = torch.memory_stats()
    assert stats.used == 0, str(stats)
    assert stats.va_used == 0
    assert stats.pending_frees == 0
    assert stats.live_tensors == 0
    assert mapped_bytes(torch) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", [Replicate(), Shard(dim=0), Shard(dim=1, over="cube")])
async def test_free_releases_memory_and_mappings(policy: kbus.runtime.DPPolicy) -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.ones(6, 5, policy=policy)
        b = a * 3
        await b
        stats = torch.memory_stats()
        assert stats.live_tensors == 2 and stats.used > 0 and mapped_bytes(torch) > 0
        assert sum(m.used for m in stats.per_pe.values()) == stats.used
        assert len(stats.per_pe) == 8 and "live tensor" in str(stats)
        a.free()
        b.free()
        assert torch.memory_stats().used == 0  # released at once; the unmap is queued
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_del_frees_through_the_finalizer() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.zeros(100)
        (a + 1).sum()  # temporaries dropped at once
        del a
        await asyncio.sleep(0)  # the finalizer schedules the free on the loop
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_use_after_free_and_double_free() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.zeros(4, name="weights")
        a.free()
        a.free()  # harmless
        assert a.is_freed
        for use in (lambda: a + 1, lambda: -a, lambda: a.numpy(), lambda: a.sum(), lambda: a.clone()):
            with pytest.raises(kbus.TensorFreedError, match=r"'weights' \(shape \(4,\), float32.*freed by free\(\)"):
                use()
        with pytest.raises(kbus.TensorFreedError):
            await a
        assert "freed" in repr(a)


@pytest.mark.asyncio
async def test_free_waits_for_queued_readers() -> None:
    x = np.arange(12, dtype=np.float32)
    async with kbus.open_device("tiny") as torch:
        a = torch.tensor(x)
        b = torch.tensor(x * 2, policy=Replicate())
        c = a + b
        a.free()
        b.free()  # both still feed c, queued before the frees
        np.testing.assert_array_equal(await c.numpy(), x * 3)
        c.free()
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_reuse_of_freed_memory_waits_for_the_unmap() -> None:
    # 1216 KiB of HBM per PE (the last PE gives 152 KiB of it to the kernel code
    # region): a replicated 600 KiB tensor (640 KiB in pages) fits only once, so each
    # iteration reuses the previous tensor's memory and VA while its sum is queued.
    cfg = DeviceConfig.preset("tiny").replace("memory.hbm_per_pe", "1216KiB")
    n = 600 * 1024 // 4
    async with kbus.open_device(cfg) as torch:
        sums = []
        for i in range(6):
            t = torch.full(n, float(i), policy=Replicate())
            sums.append(t.sum())
            t.free()
        assert [await s.item() for s in sums] == [float(i * n) for i in range(6)]
        for s in sums:
            s.free()
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_scopes_free_what_they_created() -> None:
    async with kbus.open_device("tiny") as torch:
        outer_keep = torch.ones(3)
        async with torch.scope() as scope:
            a = torch.ones(3)
            b = a + 1
            with torch.scope() as inner:
                c = b * 2
                d = c + 1
                inner.keep(d)
            assert c.is_freed and not d.is_freed  # d moved to the outer scope
            scope.keep(b)
        assert a.is_freed and d.is_freed and not b.is_freed
        with pytest.raises(kbus.TensorFreedError, match="scope exit"):
            a + 1
        np.testing.assert_array_equal(await b.numpy(), np.full(3, 2, np.float32))
        assert torch.memory_stats().live_tensors == 2
        b.free()
        outer_keep.free()
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_tensor_context_managers() -> None:
    async with kbus.open_device("tiny") as torch:
        with torch.zeros(8) as a:
            assert not a.is_freed
        assert a.is_freed
        async with torch.ones(8, policy=Replicate()) as b:
            np.testing.assert_array_equal(await b.numpy(), np.ones(8, np.float32))
        assert b.is_freed and mapped_bytes(torch) == 0
        await assert_clean(torch)


@pytest.mark.asyncio
async def test_close_frees_live_tensors_and_leaves_nothing() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.rand(16, 4)
        b = a @ torch.rand(4, 2, policy=Replicate())
        c = b.sum()  # queued, never awaited
    assert torch.closed
    assert all(t.is_freed for t in (a, b, c))
    with pytest.raises(kbus.TensorFreedError, match="device close"):
        a + 1
    with pytest.raises(RuntimeError, match="closed"):
        torch.zeros(3)
    assert torch.memory_stats().used == 0 and mapped_bytes(torch) == 0
    assert torch.sim.tasks() == []  # every simulated task (blocks, dispatcher) is gone
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.mark.asyncio
async def test_close_reports_a_leak() -> None:
    with pytest.raises(MemoryLeakError, match=r"sip0\.cube1\.pe2\.hbm: 4 KiB in 1 allocation"):
        async with kbus.open_device("tiny") as torch:
            torch._alloc_of((0, 1, 2)).alloc(4096)  # memory the runtime does not know about


def test_finalizer_after_the_loop_closed_is_silent() -> None:
    kept = []

    async def main() -> None:
        async with kbus.open_device("tiny") as torch:
            kept.append(torch.zeros(4))
            kept.append(torch)

    asyncio.run(main())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.clear()
        gc.collect()


def test_finalizer_of_a_tensor_outliving_its_loop_without_close() -> None:
    holder = []

    async def main() -> None:
        session = kbus.open_device("tiny")
        torch = await session.__aenter__()
        holder.append(torch.zeros(4))
        await torch.device.aclose()  # the loop ends without closing the runtime

    asyncio.run(main())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        holder.clear()
        gc.collect()


@pytest.mark.asyncio
async def test_pending_work_at_close_still_completes() -> None:
    async with kbus.open_device("tiny") as torch:
        out = torch.arange(64, dtype=np.float32)
        for _ in range(5):
            out = out + 1
        fut = out.numpy()
    np.testing.assert_array_equal(fut.result(), np.arange(64, dtype=np.float32) + 5)


@pytest.mark.asyncio
async def test_memory_stats_print_a_summary_and_details_on_request() -> None:
    async with kbus.open_device("default") as torch:
        t = torch.zeros(torch.config.num_pes * torch.config.memory.page_size // 4, dtype=np.float32)  # a page per PE
        await t
        stats = torch.memory_stats()
        summary = str(stats).splitlines()
        assert len(summary) == 2 and "per PE: min" in summary[1] and f"of {torch.config.num_pes} PE(s)" in summary[1]
        details = stats.details().splitlines()
        assert len(details) == 1 + sum(1 for m in stats.per_pe.values() if m.used) and len(details) > 8
        assert details[1].startswith("  sip0.cube0.pe0: hbm ")
        t.free()
