"""A host task cancelled with device requests in flight leaves the device consistent.

Every way a host can give up on a request is covered: a device-time deadline
(``kbus.fail_after`` / ``kbus.move_on_after``), a wall-clock one
(``asyncio.timeout``, ``asyncio.wait_for``), an anyio cancel scope, and a
plain ``Task.cancel()``. After each, the late responses must be absorbed (no
orphans, no warnings: warnings are errors here), the same request ids must be
usable again, a new request must work, and closing must leave no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import kbus
from kbus import Sim, ns, us
from kbus.hw import Device, build_device
from kbus.protocol import MemoryWriteMsg, PeDmaMsg, ResponseMsg
from kbus.runtime import Runtime, Tensor, open_device

pytestmark = pytest.mark.filterwarnings("error")

BIG = 1 << 20  # a 1 MiB DMA takes a few microseconds of device time on "tiny"


@contextlib.asynccontextmanager
async def loop_stays_clean() -> AsyncIterator[None]:
    """Fail if the loop reports anything (e.g. "Task was destroyed but it is pending")."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        yield
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not reports, f"the event loop reported: {[r.get('message') for r in reports]}"


@contextlib.asynccontextmanager
async def tiny_device() -> AsyncIterator[Device]:
    async with loop_stays_clean():
        dev = build_device(Sim(name="cancel"), "tiny")
        try:
            yield dev
        finally:
            await dev.aclose()
        assert dev.sim.tasks() == []


def dma(dev: Device, rid: str, nbytes: int = BIG) -> PeDmaMsg:
    """A DMA read of ``nbytes`` of HBM by sip0.cube1.pe3."""
    return PeDmaMsg("cancel", rid, 0, 1, 3, dev.config.memory.hbm_base, nbytes)


async def settle_and_check(dev: Device, rid: str) -> None:
    """Let the abandoned request finish on the device, then prove the device is consistent."""
    await dev.sim.sleep(us(100))  # device time runs until the late responses are in
    assert dev.orphans == []
    (resp,) = await dev.request(dma(dev, rid, 4096))  # the same ids again: nothing is left pending
    assert isinstance(resp, ResponseMsg) and resp.success


class Freeze:
    """A simulated task that awaits a foreign event, freezing device time while requests are in flight.

    Wall-clock timeouts can only fire on a device request if it takes wall
    time; virtual time normally races ahead. Freezing it after ``after`` ps
    (past the host link, so the request is in the fabric) makes the request
    hang in wall time until :meth:`thaw`.
    """

    def __init__(self, sim: Sim, after: int = ns(50)) -> None:
        self.event = asyncio.Event()
        self.frozen = asyncio.Event()
        self.task = sim.spawn(self._run(sim, after), name="freeze", daemon=True)

    async def _run(self, sim: Sim, after: int) -> None:
        await sim.sleep(after)
        self.frozen.set()
        await self.event.wait()

    def thaw(self) -> None:
        self.event.set()


@pytest.mark.asyncio
async def test_fail_after_on_a_request() -> None:
    async with tiny_device() as dev:
        start = dev.sim.now
        with (
            pytest.raises(TimeoutError, match="deadline of 100ns device time passed") as info,
            kbus.fail_after(dev, ns(100)) as scope,
        ):
            await dev.request(dma(dev, "slow"))
        assert dev.sim.now == start + ns(100)
        # The note lists what was blocked, busy first, cut at 20 lines on a device with many blocks.
        (note,) = info.value.__notes__
        lines = note.splitlines()
        assert lines[0] == "blocked at the deadline:"
        assert lines[1].startswith("  host task") and "waits on future" in lines[1] and "'slow'" in lines[1]
        assert lines[-1].startswith(f"  ... and {len(scope.blocked_at_expiry) - 20} more")
        assert len(lines) == 22
        await settle_and_check(dev, "slow")


@pytest.mark.asyncio
async def test_move_on_after_on_a_request_and_within_budget() -> None:
    async with tiny_device() as dev:
        with kbus.move_on_after(dev, ns(100)) as scope:
            await dev.request(dma(dev, "slow"))
        assert scope.cancelled_caught
        await settle_and_check(dev, "slow")
        with kbus.fail_after(dev, us(50)) as scope:  # "this transfer must finish within 50 us"
            (resp,) = await dev.request(dma(dev, "fast"))
        assert not scope.expired and resp.value is not None and resp.value < us(50)


@pytest.mark.asyncio
async def test_asyncio_timeout_on_a_request() -> None:
    async with tiny_device() as dev:
        freeze = Freeze(dev.sim)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await dev.request(dma(dev, "wall"))
        assert freeze.frozen.is_set()
        freeze.thaw()
        await settle_and_check(dev, "wall")


@pytest.mark.asyncio
async def test_asyncio_wait_for_on_a_request() -> None:
    async with tiny_device() as dev:
        freeze = Freeze(dev.sim)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(dev.request(dma(dev, "wait_for")), timeout=0.05)
        freeze.thaw()
        await settle_and_check(dev, "wait_for")


@pytest.mark.asyncio
async def test_anyio_move_on_after_on_a_request() -> None:
    async with tiny_device() as dev:
        freeze = Freeze(dev.sim)
        with anyio.move_on_after(0.05) as scope:
            await dev.request(dma(dev, "anyio"))
        assert scope.cancelled_caught
        freeze.thaw()
        await settle_and_check(dev, "anyio")


@pytest.mark.asyncio
async def test_anyio_task_group_cancelled_with_requests_in_flight() -> None:
    async with tiny_device() as dev:
        freeze = Freeze(dev.sim)
        finished: list[str] = []

        async def one(rid: str) -> None:
            await dev.request(dma(dev, rid))
            finished.append(rid)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, f"tg{i}")
            await freeze.frozen.wait()
            tg.cancel_scope.cancel()
        assert finished == []
        freeze.thaw()
        for i in range(4):
            await settle_and_check(dev, f"tg{i}")


@pytest.mark.asyncio
async def test_task_cancel_with_requests_in_flight() -> None:
    async with tiny_device() as dev:
        freeze = Freeze(dev.sim)
        tasks = [asyncio.create_task(dev.request(dma(dev, f"t{i}"))) for i in range(3)]
        await freeze.frozen.wait()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        freeze.thaw()
        for i in range(3):
            await settle_and_check(dev, f"t{i}")


@pytest.mark.asyncio
async def test_cancelled_broadcast_write_is_absorbed() -> None:
    """A broadcast answers from every PE; abandoning it midway must absorb all the late answers."""
    async with tiny_device() as dev:
        hbm = dev.config.memory.hbm_base
        with kbus.move_on_after(dev, ns(20)) as scope:
            await dev.request(MemoryWriteMsg("cancel", "bcast", 0, 0, 0, hbm, BIG, pattern="0xAB"))
        assert scope.cancelled_caught
        await settle_and_check(dev, "bcast")


@pytest.mark.asyncio
async def test_device_error_after_abandonment_is_absorbed() -> None:
    """A request that fails on the device after its caller left raises nowhere and warns nowhere."""
    async with tiny_device() as dev:
        bad = PeDmaMsg("cancel", "bad", 0, 1, 3, 0xDEAD_0000_0000, 4096)
        with kbus.move_on_after(dev, ns(10)) as scope:
            await dev.request(bad)
        assert scope.cancelled_caught
        await settle_and_check(dev, "bad")
        with pytest.raises(kbus.DeviceError, match="outside the memory"):
            await dev.request(bad)


@pytest.mark.asyncio
async def test_cancel_while_the_request_is_still_on_the_host_link() -> None:
    async with tiny_device() as dev:
        link = dev.host_links[0]
        assert link.serialization(dev.config.fabric.msg_bytes) > 1
        with kbus.move_on_after(dev, 1) as scope:  # 1 ps: the message has not left the host yet
            await dev.request(dma(dev, "early", 4096))
        assert scope.cancelled_caught
        await settle_and_check(dev, "early")


# --------------------------------------------------------------------------------------
# The same routes one level up: runtime tensors (their work runs in simulated tasks,
# so a cancelled host only stops waiting; the device finishes the work regardless).
# --------------------------------------------------------------------------------------

N = 1 << 18  # float32 elements: 1 MiB spread over the 8 PEs of "tiny"


async def assert_closed_cleanly(torch: Runtime) -> None:
    assert torch.closed
    assert torch.memory_stats().used == 0
    assert torch.sim.tasks() == []


@pytest.mark.asyncio
async def test_runtime_fail_after_on_a_readback() -> None:
    async with loop_stays_clean():
        async with open_device("tiny") as torch:
            t = torch.arange(N, dtype=torch.float32)
            with pytest.raises(TimeoutError), kbus.fail_after(torch, ns(500)):
                await t.numpy()
            assert torch.now_ps == ns(500)
            back = await t.numpy()  # the same tensor reads back fine afterwards
            assert back[-1] == N - 1
        await assert_closed_cleanly(torch)


@pytest.mark.asyncio
async def test_runtime_move_on_after_on_an_op(kbus_device: Runtime) -> None:
    torch = kbus_device
    t = torch.ones(N, dtype=torch.float32)
    with kbus.move_on_after(torch, ns(100)) as scope:
        await (t + t)
    assert scope.cancelled_caught
    u = t * t  # the device and the queue carry on
    assert (await u.numpy()).sum() == N
    with kbus.fail_after(torch, kbus.ms(1)):
        await torch.synchronize()


@pytest.mark.asyncio
async def test_runtime_asyncio_timeout_with_work_in_flight() -> None:
    async with loop_stays_clean():
        async with open_device("tiny") as torch:
            freeze = Freeze(torch.sim)
            t = torch.ones(N, dtype=torch.float32)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await (t + t).numpy()
            freeze.thaw()
            assert (await (t + t).numpy()).sum() == 2 * N
        await assert_closed_cleanly(torch)


@pytest.mark.asyncio
async def test_runtime_anyio_scope_inside_the_device_block() -> None:
    async with loop_stays_clean():
        async with open_device("tiny") as torch:
            freeze = Freeze(torch.sim)
            t = torch.ones(N, dtype=torch.float32)
            with anyio.move_on_after(0.05) as scope:
                await t.numpy()
            assert scope.cancelled_caught
            freeze.thaw()
            assert (await t.numpy()).sum() == N
        await assert_closed_cleanly(torch)


@pytest.mark.asyncio
async def test_runtime_tasks_cancelled_with_work_in_flight() -> None:
    async with loop_stays_clean():
        async with open_device("tiny") as torch:
            freeze = Freeze(torch.sim)
            tensors = [torch.full((N,), float(i), dtype=torch.float32) for i in range(3)]

            async def read(t: Tensor) -> object:
                return await t.numpy()

            tasks = [asyncio.create_task(read(t)) for t in tensors]
            await freeze.frozen.wait()
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            freeze.thaw()
            for i, t in enumerate(tensors):
                assert (await t.numpy())[0] == i
        await assert_closed_cleanly(torch)


@pytest.mark.asyncio
async def test_runtime_asyncio_timeout_around_the_whole_device_block() -> None:
    """The timeout cancels the body; open_device's exit still frees everything (no ResourceWarning)."""
    async with loop_stays_clean():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), open_device("tiny") as torch:
                freeze = Freeze(torch.sim)
                t = torch.ones(N, dtype=torch.float32)
                try:
                    await (t + t).numpy()
                finally:
                    freeze.thaw()
        await assert_closed_cleanly(torch)


@pytest.mark.asyncio
async def test_runtime_anyio_cancel_scope_around_the_whole_device_block() -> None:
    async with loop_stays_clean():
        with anyio.CancelScope() as scope:
            async with open_device("tiny") as torch:
                # The device would finish within one burst of the engine; hold its time
                # so the cancellation lands while the work is in flight.
                freeze = Freeze(torch.sim)
                t = torch.ones(N, dtype=torch.float32)
                pending = (t + t).numpy()
                await freeze.frozen.wait()
                scope.cancel()
                try:
                    await pending
                finally:
                    freeze.thaw()
        assert scope.cancelled_caught
        assert torch.sim.tasks() == []
        await assert_closed_cleanly(torch)
