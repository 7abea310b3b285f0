"""The virtual-time engine: clock, tasks, run(), deadlock, cancellation."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

import kbus
from kbus import DeadlockError, Inbox, Sim, ns, us


@pytest.mark.asyncio
async def test_sleep_advances_virtual_time_only() -> None:
    sim = Sim()
    seen: list[int] = []

    async def worker() -> int:
        await sim.sleep(ns(12))
        seen.append(sim.now)
        await sim.sleep(us(1))
        seen.append(sim.now)
        return 7

    h = sim.spawn(worker(), name="w")
    await sim.run()
    assert seen == [12_000, 1_012_000]
    assert h.result() == 7
    assert await h == 7


@pytest.mark.asyncio
async def test_ties_break_by_insertion_order() -> None:
    sim = Sim()
    order: list[str] = []

    async def at(t: int, tag: str) -> None:
        await sim.sleep(t)
        order.append(tag)

    for i, tag in enumerate("abcdef"):
        sim.spawn(at(ns(5) if i % 2 else ns(3), tag), name=tag)
    await sim.run()
    assert order == ["a", "c", "e", "b", "d", "f"]


@pytest.mark.asyncio
async def test_sleep_zero_waits_for_quiescence_at_same_instant() -> None:
    sim = Sim()
    order: list[str] = []
    box: Inbox[int] = Inbox(sim, (int,), 4, name="box")

    async def yielder() -> None:
        await sim.sleep(0)
        order.append(f"yielder@{sim.now}")

    async def chatter() -> None:
        for i in range(3):
            await box.put(i)
            await box.get()
        order.append(f"chatter@{sim.now}")

    sim.spawn(yielder(), name="y")
    sim.spawn(chatter(), name="c")
    await sim.run()
    assert order == ["chatter@0", "yielder@0"]


@pytest.mark.asyncio
async def test_run_until_returns_at_that_time() -> None:
    sim = Sim()

    async def forever() -> None:
        while True:
            await sim.sleep(ns(10))

    sim.spawn(forever(), name="ticker", daemon=True)
    await sim.run(until=ns(35))
    assert sim.now == ns(35)
    await sim.run(until=ns(100))
    assert sim.now == ns(100)
    await sim.shutdown()


@pytest.mark.asyncio
async def test_run_with_only_daemons_returns_at_once() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="svc")

    async def service() -> None:
        while True:
            await box.get()

    sim.spawn(service(), name="svc", daemon=True)
    await sim.run()
    assert sim.now == 0
    await sim.shutdown()


@pytest.mark.asyncio
async def test_failure_is_reraised_with_task_name() -> None:
    sim = Sim()

    async def bad() -> None:
        await sim.sleep(ns(1))
        raise ValueError("boom")

    async def good() -> None:
        await sim.sleep(ns(100))

    sim.spawn(good(), name="good")
    sim.spawn(bad(), name="bad-task")
    with pytest.raises(ValueError, match="boom") as info:
        await sim.run()
    assert any("bad-task" in n for n in info.value.__notes__)
    await sim.shutdown()


@pytest.mark.asyncio
async def test_tasks_progress_without_run() -> None:
    sim = Sim()
    done = sim.create_future("done")

    async def worker() -> None:
        await sim.sleep(us(3))
        done.set_result(sim.now)

    sim.spawn(worker(), name="w")
    assert await done == us(3)


@pytest.mark.asyncio
async def test_spawn_rejects_non_coroutines() -> None:
    sim = Sim()

    async def f() -> None:
        pass

    with pytest.raises(TypeError, match="did you pass the function"):
        sim.spawn(f, name="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coroutine"):
        sim.spawn(42, name="y")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_negative_and_non_int_sleep_rejected() -> None:
    sim = Sim()
    with pytest.raises(ValueError, match="negative"):
        await sim.sleep(-1)
    with pytest.raises(TypeError, match="integer picoseconds"):
        await sim.sleep(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before now"):
        await sim.sleep(ns(2))
        await sim.run(until=ns(1))


@pytest.mark.asyncio
async def test_deadlock_two_blocks_waiting_on_each_other() -> None:
    sim = Sim()
    a: Inbox[int] = Inbox(sim, (int,), 4, name="blockA.inbox")
    b: Inbox[int] = Inbox(sim, (int,), 4, name="blockB.inbox")

    async def block_a() -> None:
        x = await a.get()
        await b.put(x)

    async def block_b() -> None:
        x = await b.get()
        await a.put(x)

    sim.spawn(block_a(), name="blockA")
    sim.spawn(block_b(), name="blockB")
    with pytest.raises(DeadlockError) as info:
        await asyncio.wait_for(sim.run(), timeout=5)
    msg = str(info.value)
    assert "task 'blockA' waits on empty inbox 'blockA.inbox'" in msg
    assert "task 'blockB' waits on empty inbox 'blockB.inbox'" in msg
    assert len(info.value.blocked) >= 2
    await sim.shutdown()


@pytest.mark.asyncio
async def test_deadlock_on_full_inbox_nobody_drains() -> None:
    sim = Sim()
    q: Inbox[int] = Inbox(sim, (int,), 2, name="sink")

    async def producer() -> None:
        for i in range(5):
            await q.put(i)

    sim.spawn(producer(), name="producer")
    with pytest.raises(DeadlockError) as info:
        await asyncio.wait_for(sim.run(), timeout=5)
    assert "task 'producer' waits on full inbox 'sink' (2/2)" in str(info.value)
    await sim.shutdown()


@pytest.mark.asyncio
async def test_deadlock_raised_into_host_waiting_on_future() -> None:
    sim = Sim()
    fut = sim.create_future("answer to request r1")
    with pytest.raises(DeadlockError, match="future 'answer to request r1'"):
        await asyncio.wait_for(fut, timeout=5)
    # the engine is still usable afterwards
    fut.set_result(3)
    assert await fut == 3


@pytest.mark.asyncio
async def test_deadlock_report_lists_daemons() -> None:
    sim = Sim()
    idle: Inbox[int] = Inbox(sim, (int,), 1, name="idle.inbox")

    async def daemon() -> None:
        await idle.get()

    sim.spawn(daemon(), name="svc", daemon=True)
    fut = sim.create_future("never")
    with pytest.raises(DeadlockError) as info:
        await fut
    assert "task 'svc' (daemon) waits on empty inbox 'idle.inbox'" in str(info.value)
    await sim.shutdown()


@pytest.mark.asyncio
async def test_cancel_task_blocked_on_inbox_keeps_count() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="box")

    async def getter() -> None:
        await box.get()

    h = sim.spawn(getter(), name="getter")
    await asyncio.sleep(0)
    assert sim.runnable == 0
    h.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h
    assert sim.runnable == 0
    # the engine still advances time afterwards
    await sim.sleep(ns(5))
    assert sim.now == ns(5)
    assert sim.runnable == 0


@pytest.mark.asyncio
async def test_cancel_task_blocked_on_sleep_and_on_full_put() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="box")
    box.put_nowait(0)

    async def sleeper() -> None:
        await sim.sleep(us(1))

    async def putter() -> None:
        await box.put(1)

    hs = [sim.spawn(sleeper(), name="s"), sim.spawn(putter(), name="p")]
    # A burst runs the simulation until nothing is ready, so a bare asyncio.sleep(0)
    # could find the sleeper finished; the host resumes at 1 ns with both still blocked.
    await sim.sleep(ns(1))
    for h in hs:
        h.cancel()
    for h in hs:
        with pytest.raises(asyncio.CancelledError):
            await h
    assert sim.runnable == 0
    assert box.get_nowait() == 0
    assert box.qsize() == 0  # the cancelled putter's message was withdrawn
    await sim.sleep(ns(1))
    assert sim.now == ns(2)


@pytest.mark.asyncio
async def test_cancel_after_handoff_keeps_message() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="box")

    async def getter() -> int:
        return await box.get()

    h = sim.spawn(getter(), name="g")
    await asyncio.sleep(0)
    box.put_nowait(42)  # handed straight to the waiting getter
    h.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await h
    assert box.get_nowait() == 42
    assert sim.runnable == 0


@pytest.mark.asyncio
async def test_host_task_cancelled_while_waiting() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="box")
    t = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert sim.runnable == 0
    await sim.sleep(ns(2))
    assert sim.now == ns(2)


@pytest.mark.asyncio
async def test_foreign_await_in_sim_task_freezes_time() -> None:
    sim = Sim()
    stamps: list[int] = []

    async def io_bound() -> None:
        await asyncio.sleep(0.01)  # real I/O: virtual time must not move meanwhile
        stamps.append(sim.now)

    async def ticker() -> None:
        await sim.sleep(ns(1))
        stamps.append(sim.now)

    sim.spawn(io_bound(), name="io")
    sim.spawn(ticker(), name="tick")
    await sim.run()
    assert stamps == [0, ns(1)]


def test_kbus_run_on_both_loops() -> None:
    async def main() -> int:
        sim = Sim()
        await sim.sleep(ns(3))
        return sim.now

    assert kbus.run(main) == ns(3)
    assert kbus.run(main, use_uvloop=False) == ns(3)
    with pytest.raises(TypeError):
        kbus.run(42)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_kbus_run_inside_a_running_loop_says_to_await_instead() -> None:
    async def main() -> None:
        pass

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"kbus.run\(.*main\) was called inside a running"):
            kbus.run(main)
        with pytest.raises(RuntimeError, match=r"write `await main\(\)` instead"):
            kbus.run(main())  # a coroutine object: closed, so no "never awaited" warning either
        gc.collect()
    assert [str(w.message) for w in record] == []


@pytest.mark.asyncio
async def test_foreign_await_lets_loop_callbacks_run_before_time_moves() -> None:
    """A loop callback a simulated task schedules is foreign work: awaiting the loop once lets it run first."""
    sim = Sim()
    order: list[tuple[str, int]] = []
    loop = asyncio.get_running_loop()

    async def late(tag: str, delay: int) -> None:
        await sim.sleep(delay)
        order.append((tag, sim.now))

    async def lone() -> None:
        # A plain loop callback starts two more simulated tasks: one due earlier,
        # one due at the same instant as this task's sleep.
        loop.call_soon(
            lambda: (sim.spawn(late("early", ns(5)), name="early"), sim.spawn(late("tie", ns(10)), name="tie"))
        )
        await asyncio.sleep(0)  # foreign: time stands still while the loop runs the callback
        await sim.sleep(ns(10))
        order.append(("lone", sim.now))

    sim.spawn(lone(), name="lone")
    await sim.run()
    # The callback ran before this task resumed, so "tie" booked its timer first.
    assert order == [("early", ns(5)), ("tie", ns(10)), ("lone", ns(10))]


@pytest.mark.asyncio
async def test_cancel_before_the_first_step() -> None:
    sim = Sim()

    async def lone() -> None:
        await sim.sleep(ns(10))

    h = sim.spawn(lone(), name="lone")
    h.cancel()  # still in the ready deque: the CancelledError is thrown at its first step
    with pytest.raises(asyncio.CancelledError):
        await h
    assert h.cancelled() and sim.runnable == 0 and sim.now == 0
    await sim.sleep(ns(3))
    assert sim.now == ns(3)
