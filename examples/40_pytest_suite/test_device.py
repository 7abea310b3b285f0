"""40 — A small pytest suite using kbus's pytest plugin.

What this shows:

* the ``kbus_device`` fixture: an open runtime handle per test, closed (and
  checked for leaked device memory) after it;
* ``@pytest.mark.kbus(config=...)`` to pick the device for one test;
* ``kbus.fail_after``: a budget in *device* time ("this transfer must finish
  within 20 us of device time"), checked in microseconds of wall time;
* ``kbus_sim``: a bare engine for testing a model built on kbus.sim;
* the same fixtures under anyio's pytest plugin.

Run: ``pytest examples/40_pytest_suite`` (see README.md here).
"""

from __future__ import annotations

import numpy as np
import pytest

import kbus
from kbus import Runtime


@pytest.mark.asyncio
async def test_add_reads_back(kbus_device: Runtime) -> None:
    torch = kbus_device
    a = torch.tensor(np.arange(1024, dtype=np.float32))
    b = torch.ones(1024)
    assert np.array_equal(await (a + b).numpy(), np.arange(1, 1025, dtype=np.float32))


@pytest.mark.asyncio
async def test_upload_fits_the_budget(kbus_device: Runtime) -> None:
    torch = kbus_device
    with kbus.fail_after(torch, kbus.us(20)):  # device time, however slow the host is
        await torch.zeros(256 * 1024, dtype=torch.float32)  # 1 MiB over PCIe


@pytest.mark.asyncio
async def test_too_tight_a_budget_fails(kbus_device: Runtime) -> None:
    with (
        pytest.raises(TimeoutError, match="deadline of 100ns device time passed"),
        kbus.fail_after(kbus_device, "100ns"),
    ):
        await kbus_device.zeros(256 * 1024)


@pytest.mark.asyncio
@pytest.mark.kbus(config="default")
async def test_on_the_default_device(kbus_device: Runtime) -> None:
    torch = kbus_device
    topo = torch.config.topology
    pes = topo.sips * topo.cubes_per_sip * topo.pes_per_cube
    page = torch.config.memory.page_size
    x = torch.zeros(pes * page // 4, policy=kbus.Shard(dim=0))  # a page of float32 per PE
    assert len(x.shards) == pes
    assert float(np.sum(await x.numpy())) == 0.0
    small = torch.zeros(4 * pes)  # less than a page: one shard, so it holds one page, not one per PE
    assert len(small.shards) == 1
    spread = torch.zeros(4 * pes, policy=kbus.Shard(dim=0, min_bytes=0))  # one chunk per PE regardless
    assert len(spread.shards) == pes


@pytest.mark.asyncio
async def test_a_model_on_the_bare_engine(kbus_sim: kbus.Sim) -> None:
    inbox: kbus.Inbox[str] = kbus.Inbox(kbus_sim, accepts=(str,), capacity=2, name="rx")
    link = kbus.Link(kbus_sim, latency=kbus.ns(100), bandwidth=1_000_000_000, name="wire")
    kbus_sim.spawn(link.send("ping", inbox, nbytes=64), name="tx")
    assert await inbox.get() == "ping"
    assert kbus_sim.now == kbus.ns(64 + 100)  # 64 B at 1 GB/s, then the latency


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_under_anyio(kbus_device: Runtime) -> None:
    t = kbus_device.full((8,), 3.0)
    assert await t.sum().item() == 24.0
