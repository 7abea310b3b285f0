"""The same program gives the same event order on every event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import uvloop

from kbus import Inbox, Link, Sim, ns


async def workload() -> list[tuple[int, str]]:
    """A small many-task mesh with ties, links, backpressure and host waits."""
    sim = Sim()
    log: list[tuple[int, str]] = []
    boxes = [Inbox(sim, (tuple,), 3, name=f"b{i}") for i in range(4)]
    links = [Link(sim, latency=ns(3 + i), bandwidth=1_000_000_000 * (i + 1), name=f"l{i}") for i in range(4)]

    async def node(i: int) -> None:
        for _ in range(30):
            src, hops = await boxes[i].get()
            log.append((sim.now, f"n{i}<-{src}:{hops}"))
            await sim.sleep(ns(i % 3))
            if hops > 0:
                await links[i].send((i, hops - 1), boxes[(i + 1 + hops) % 4], nbytes=16 * hops)

    for i in range(4):
        sim.spawn(node(i), name=f"node{i}", daemon=True)
    for k in range(12):
        await boxes[k % 4].put((99, k % 5 + 1))
        log.append((sim.now, f"host put {k}"))
    await sim.run(until=ns(2000))
    await sim.shutdown()
    return log


def on_asyncio(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(fn())


def on_uvloop(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return uvloop.run(fn())


def on_anyio(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return anyio.run(fn, backend="asyncio")


def on_anyio_uvloop(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return anyio.run(fn, backend="asyncio", backend_options={"use_uvloop": True})


def test_identical_event_order_on_every_loop() -> None:
    reference = on_asyncio(workload)
    assert len(reference) > 50
    for runner in (on_uvloop, on_anyio, on_anyio_uvloop):
        assert runner(workload) == reference, runner.__name__
    assert on_asyncio(workload) == reference  # and run to run
