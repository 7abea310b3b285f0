"""The direct-step driver: bursts and the step budget, foreign waits, contexts, the watchdog, reports."""

from __future__ import annotations

import asyncio
import contextvars
import time
import warnings

import pytest

from kbus import DeadlockError, Inbox, Link, Sim, ns


def _mesh_log(budget: int) -> list[tuple[int, str]]:
    """A small program with ties, links, backpressure and a host, run with a given step budget."""

    async def main() -> list[tuple[int, str]]:
        sim = Sim()
        sim.step_budget = budget
        log: list[tuple[int, str]] = []
        boxes = [Inbox(sim, (int,), 2, name=f"b{i}") for i in range(3)]
        links = [Link(sim, latency=ns(2), bandwidth=1_000_000_000, name=f"l{i}") for i in range(3)]

        async def node(i: int) -> None:
            for _ in range(20):
                x = await boxes[i].get()
                log.append((sim.now, f"n{i} got {x}"))
                await sim.sleep(ns(i))
                await links[i].send(x + 1, boxes[(i + 1) % 3], nbytes=8)

        for i in range(3):
            sim.spawn(node(i), name=f"node{i}", daemon=True)
        for k in range(4):
            await boxes[k % 3].put(k * 100)
            log.append((sim.now, f"host put {k}"))
        await sim.run(until=ns(500))
        await sim.shutdown()
        return log

    return asyncio.run(main())


def test_the_step_budget_cannot_change_virtual_time() -> None:
    reference = _mesh_log(2000)
    assert len(reference) > 40
    for budget in (1, 2, 7):
        assert _mesh_log(budget) == reference, budget


@pytest.mark.asyncio
async def test_a_long_burst_yields_to_the_loop() -> None:
    """A host task polling the loop keeps running while a long simulation is under way."""
    sim = Sim()
    sim.step_budget = 100
    ticks = 0

    async def chatter() -> None:
        for _ in range(5000):
            await sim.sleep(ns(1))

    async def host_ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(host_ticker())
    sim.spawn(chatter(), name="chatter")
    await sim.run()
    ticker.cancel()
    assert sim.now == ns(5000)
    # 5000 steps at 100 per burst: the loop had a turn at least every burst.
    assert ticks >= 5000 // 100


@pytest.mark.asyncio
async def test_current_task_inside_a_simulated_task() -> None:
    sim = Sim()
    seen: list[object] = []

    async def probe() -> None:
        seen.append(asyncio.current_task())
        seen.append(sim.current_task())
        with pytest.raises(RuntimeError, match="inside a task"):
            async with asyncio.timeout(1):
                await sim.sleep(ns(1))

    h = sim.spawn(probe(), name="probe")
    await sim.run()
    assert seen == [None, h]
    assert sim.current_task() is None  # host code


@pytest.mark.asyncio
async def test_each_simulated_task_has_its_own_context() -> None:
    sim = Sim()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("host")
    seen: dict[str, str] = {}

    async def setter() -> None:
        var.set("setter")
        await sim.sleep(ns(2))
        seen["setter"] = var.get()

    async def reader() -> None:
        await sim.sleep(ns(1))
        seen["reader"] = var.get()

    sim.spawn(setter(), name="setter")
    sim.spawn(reader(), name="reader")
    await sim.run()
    assert seen == {"setter": "setter", "reader": "host"}
    assert var.get() == "host"


@pytest.mark.asyncio
async def test_a_foreign_wait_is_never_a_deadlock() -> None:
    """Nothing runnable and no timer, but a simulated task awaits real I/O: wait for it, do not report."""
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="box")
    event = asyncio.Event()

    async def io_bound() -> None:
        await event.wait()
        await box.put(7)

    sim.spawn(io_bound(), name="io")
    asyncio.get_running_loop().call_later(0.05, event.set)
    assert await asyncio.wait_for(box.get(), timeout=5) == 7
    assert sim.now == 0


@pytest.mark.asyncio
async def test_cancelling_a_task_cancels_its_foreign_wait() -> None:
    sim = Sim()
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waiter() -> None:
        await fut

    h = sim.spawn(waiter(), name="waiter")
    await asyncio.sleep(0)
    assert sim.runnable == 1  # the foreign wait holds time
    h.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h
    assert fut.cancelled() and sim.runnable == 0


@pytest.mark.asyncio
async def test_a_failure_reaches_every_waiter_of_the_handle() -> None:
    sim = Sim()

    async def bad() -> None:
        await sim.sleep(ns(3))
        raise ValueError("broken part")

    h = sim.spawn(bad(), name="bad-part")
    caught: list[BaseException] = []

    async def watch() -> None:
        try:
            await h
        except ValueError as exc:
            caught.append(exc)

    sim.spawn(watch(), name="watcher")
    with pytest.raises(ValueError, match="broken part") as info:
        await h
    assert "raised in simulated task 'bad-part' at 3ns" in info.value.__notes__
    with pytest.raises(ValueError, match="broken part"):
        await sim.run()
    assert len(caught) == 1 and caught[0] is info.value


@pytest.mark.asyncio
async def test_deadlock_report_lists_messages_left_by_put_later() -> None:
    """A link stalled on a full inbox shows up through the inbox, with no registration of its own."""
    sim = Sim()
    sink: Inbox[int] = Inbox(sim, (int,), 1, name="sink")
    link = Link(sim, latency=ns(1), name="wire")

    async def sender() -> None:
        for i in range(3):  # an infinitely fast link: all three leave at once
            await link.send(i, sink)
        await sim.sleep(ns(2))  # 0 entered at 1 ns, 1 is held at the inbox, 2 waits behind it
        await link.send(3, sink)

    sim.spawn(sender(), name="sender")
    with pytest.raises(DeadlockError) as info:
        await asyncio.wait_for(sim.run(), timeout=5)
    lines = info.value.blocked
    assert "link 'wire' holds a message (int) for full inbox 'sink' (1/1)" in lines
    assert "task 'sender' waits on stalled link 'wire' (its inbox 'sink' is full)" in lines
    assert sink.get_nowait() == 0 and sink.get_nowait() == 1  # the held message entered when a slot freed
    assert "holds" not in "\n".join(sim.blocked())
    await sim.shutdown()


@pytest.mark.asyncio
async def test_call_at_order_and_cancellation_from_a_callback() -> None:
    sim = Sim()
    order: list[str] = []
    handles = {}

    def fire(tag: str) -> None:
        order.append(f"{tag}@{sim.now}")
        if tag == "a":
            handles["b"].cancel()  # due at the same instant, not yet run
            sim.call_at(sim.now, fire, "again")  # joins this instant, after the others

    handles["a"] = sim.call_at(ns(5), fire, "a")
    handles["b"] = sim.call_at(ns(5), fire, "b")
    handles["c"] = sim.call_at(ns(5), fire, "c")
    handles["d"] = sim.call_at(ns(9), fire, "d")
    handles["d"].cancel()
    await sim.sleep(ns(20))
    assert order == ["a@5000", "c@5000", "again@5000"]
    assert sim.advances == 2  # 5 ns and 20 ns; the cancelled 9 ns entry is not a stop


@pytest.mark.asyncio
async def test_watchdog_names_a_task_that_holds_the_loop() -> None:
    sim = Sim()
    sim.watchdog_seconds = 0.3

    async def hog() -> None:
        time.sleep(0.9)  # noqa: ASYNC251 - the point: blocking work inside one step

    sim.spawn(hog(), name="sip0.cube0.pe0.cpu hog")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await sim.run()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'sip0.cube0.pe0.cpu hog'" in m and "held the event loop" in m for m in messages), messages
