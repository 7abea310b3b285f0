"""kbus.fail_after / kbus.move_on_after: deadlines in device time on a bare Sim."""

from __future__ import annotations

import asyncio
import gc

import pytest

import kbus
from kbus import Sim, fail_after, move_on_after, ns, us
from kbus.sim.timeouts import TimeoutScope

pytestmark = pytest.mark.filterwarnings("error")


async def _far_ticker(sim: Sim) -> None:
    """A daemon with a timer far in the future: without care, time would jump to it."""
    while True:
        await sim.sleep(us(1000))


@pytest.mark.asyncio
async def test_move_on_after_stops_the_block_at_the_deadline_exactly(kbus_sim: Sim) -> None:
    kbus_sim.spawn(_far_ticker(kbus_sim), name="ticker", daemon=True)
    reached = False
    with move_on_after(kbus_sim, ns(5)) as scope:
        await kbus_sim.sleep(ns(100))
        reached = True
    assert not reached
    assert scope.expired and scope.cancelled_caught
    assert scope.deadline == ns(5) and scope.remaining == 0
    # The engine did not run ahead to the ticker's timer before the host saw the expiry.
    assert kbus_sim.now == ns(5)


@pytest.mark.asyncio
async def test_fail_after_raises_timeout_error_naming_the_deadline(kbus_sim: Sim) -> None:
    kbus_sim.spawn(_far_ticker(kbus_sim), name="ticker", daemon=True)
    await kbus_sim.sleep(ns(7))
    with pytest.raises(TimeoutError) as info:
        async with fail_after(kbus_sim, "3ns"):
            await kbus_sim.sleep(ns(100))
    err = info.value
    assert "deadline of 3ns device time passed" in str(err)
    assert "entered at 7ns" in str(err) and "at 10ns" in str(err) and "kbus_sim" in str(err)
    assert isinstance(err.__cause__, asyncio.CancelledError)
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "task 'ticker' (daemon) waits on a sleep until 1ms" in notes
    assert "waits on a sleep until 107ns" in notes  # the host's own wait
    assert kbus_sim.now == ns(10)


@pytest.mark.asyncio
async def test_block_finishing_in_time_is_untouched_and_timer_is_withdrawn(kbus_sim: Sim) -> None:
    with fail_after(kbus_sim, ns(10)) as scope:
        await kbus_sim.sleep(ns(4))
    assert not scope.expired and not scope.cancelled_caught
    assert scope.remaining == ns(6)
    advances = kbus_sim.advances
    await kbus_sim.sleep(ns(20))  # the withdrawn deadline at 10 ns must not be a stop on the way
    assert kbus_sim.now == ns(24)
    assert kbus_sim.advances == advances + 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_block_ending_at_the_deadline_instant_times_out(kbus_sim: Sim) -> None:
    # The host's sleep and the deadline fall due together: like asyncio.timeout,
    # a deadline reached while the block is still inside counts as expired.
    with move_on_after(kbus_sim, ns(5)) as scope:
        await kbus_sim.sleep(ns(5))
    assert scope.expired and kbus_sim.now == ns(5)


@pytest.mark.asyncio
async def test_none_means_no_deadline(kbus_sim: Sim) -> None:
    with fail_after(kbus_sim, None) as scope:
        await kbus_sim.sleep(ns(1))
    assert scope.deadline is None and scope.remaining is None and not scope.expired


@pytest.mark.asyncio
async def test_block_that_swallows_the_cancellation_is_left_alone(kbus_sim: Sim) -> None:
    with fail_after(kbus_sim, ns(5)) as scope:
        try:
            await kbus_sim.sleep(ns(100))
        except asyncio.CancelledError:
            pass
        # device time is free to move again: the cleanup can still wait on the sim
        await kbus_sim.sleep(ns(1))
    assert scope.expired and not scope.cancelled_caught
    assert kbus_sim.now == ns(6)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_nested_scopes_inner_expires_first(kbus_sim: Sim) -> None:
    with fail_after(kbus_sim, ns(50)) as outer:
        with move_on_after(kbus_sim, ns(5)) as inner:
            await kbus_sim.sleep(ns(100))
        await kbus_sim.sleep(ns(10))
    assert inner.cancelled_caught and not outer.expired
    assert kbus_sim.now == ns(15)


@pytest.mark.asyncio
async def test_nested_scopes_outer_expires_first_passes_through_inner(kbus_sim: Sim) -> None:
    with move_on_after(kbus_sim, ns(5)) as outer, move_on_after(kbus_sim, ns(50)) as inner:
        await kbus_sim.sleep(ns(100))
    assert outer.cancelled_caught
    assert not inner.expired and not inner.cancelled_caught


@pytest.mark.asyncio
async def test_nested_scopes_same_deadline_outer_claims_it(kbus_sim: Sim) -> None:
    with pytest.raises(TimeoutError), fail_after(kbus_sim, ns(5)) as outer, move_on_after(kbus_sim, ns(5)) as inner:
        await kbus_sim.sleep(ns(100))
    assert outer.cancelled_caught and inner.expired and not inner.cancelled_caught
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_outer_asyncio_cancellation_is_not_mistaken_for_expiry(kbus_sim: Sim) -> None:
    """A foreign cancellation of the host task propagates as CancelledError."""
    started = asyncio.Event()

    async def host() -> None:
        with move_on_after(kbus_sim, ns(5)):
            started.set()
            await asyncio.sleep(3600)  # foreign wait: device time jumps to the deadline at once

    # With the sim idle, the deadline passes immediately, so this one expires.
    await asyncio.wait_for(host(), timeout=5)

    async def host_on_sim() -> None:
        with move_on_after(kbus_sim, ns(5_000)):
            started.set()
            await kbus_sim.create_future("never")

    blocker = kbus_sim.spawn(asyncio.sleep(3600), name="io-bound", daemon=True)  # freezes device time
    started.clear()
    task = asyncio.create_task(host_on_sim())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    blocker.cancel()


@pytest.mark.asyncio
async def test_scope_inside_a_simulated_task(kbus_sim: Sim) -> None:
    seen: list[object] = []

    async def worker() -> None:
        try:
            with fail_after(kbus_sim, ns(3)):
                await kbus_sim.sleep(ns(10))
        except TimeoutError as exc:
            seen.append((kbus_sim.now, type(exc)))
        await kbus_sim.sleep(ns(1))
        seen.append(kbus_sim.now)

    kbus_sim.spawn(_far_ticker(kbus_sim), name="ticker", daemon=True)
    kbus_sim.spawn(worker(), name="worker")
    await kbus_sim.run()
    assert seen == [(ns(3), TimeoutError), ns(4)]
    assert kbus_sim.runnable == 0


@pytest.mark.asyncio
async def test_scope_accepts_anything_with_a_sim(kbus_sim: Sim) -> None:
    class Handle:
        sim = kbus_sim

    with move_on_after(Handle(), ns(1)) as scope:
        await kbus_sim.sleep(ns(2))
    assert scope.expired


@pytest.mark.asyncio
async def test_async_with_and_repr(kbus_sim: Sim) -> None:
    scope = move_on_after(kbus_sim, us(2))
    assert repr(scope) == "<kbus move_on_after 2us created>"
    async with scope:
        await kbus_sim.sleep(us(3))
    assert repr(scope) == "<kbus move_on_after 2us exited expired>"


@pytest.mark.parametrize(
    ("target", "delay", "error", "text"),
    [
        (object(), 1, TypeError, "got object"),
        ("sim", 1.5, TypeError, "got float 1.5; use kbus.ns()"),
        ("sim", True, TypeError, "got bool"),
        ("sim", -1, ValueError, "delay -1 ps is negative"),
        ("sim", "soon", ValueError, "'soon' is not a duration"),
    ],
)
def test_bad_arguments_name_what_was_wrong(target: object, delay: object, error: type[Exception], text: str) -> None:
    target = Sim() if target == "sim" else target
    with pytest.raises(error, match=text):
        fail_after(target, delay)  # type: ignore[arg-type]


def test_entering_without_a_running_loop_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="needs a running event loop"), move_on_after(Sim(), 1):
        pass


@pytest.mark.asyncio
async def test_a_scope_is_entered_once(kbus_sim: Sim) -> None:
    scope = move_on_after(kbus_sim, 10)
    with scope:
        pass
    with pytest.raises(RuntimeError, match="already entered"), scope:
        pass


def test_sim_of_another_loop_is_refused() -> None:
    sim = Sim()
    asyncio.run(sim.sleep(1))  # binds the sim to that loop

    async def use() -> None:
        with pytest.raises(RuntimeError, match="runs on another event loop"), move_on_after(sim, 10):
            pass

    asyncio.run(use())


@pytest.mark.asyncio
async def test_deadline_on_a_deadlocked_wait_reports_what_was_blocked(kbus_sim: Sim) -> None:
    """A pending deadline is a timer, so a wait that can never finish ends at the deadline, with notes."""
    box: kbus.Inbox[int] = kbus.Inbox(kbus_sim, (int,), 1, name="nobody-writes-here")
    with pytest.raises(TimeoutError) as info, fail_after(kbus_sim, us(1)):
        await box.get()
    assert "waits on empty inbox 'nobody-writes-here'" in "\n".join(info.value.__notes__)
    # Without a deadline the same wait is a DeadlockError, not a hang.
    with pytest.raises(kbus.DeadlockError):
        await box.get()


def _program(use_uvloop: bool) -> list[tuple[int, str]]:
    events: list[tuple[int, str]] = []

    async def main() -> None:
        sim = Sim()

        async def worker(name: str, step: int) -> None:
            for _ in range(3):
                await sim.sleep(step)
                events.append((sim.now, name))

        sim.spawn(worker("a", ns(2)), name="a")
        sim.spawn(worker("b", ns(3)), name="b")
        with move_on_after(sim, ns(5)) as scope:
            await sim.run()
        events.append((sim.now, f"scope expired={scope.expired}"))
        await sim.run()
        events.append((sim.now, "done"))

    kbus.run(main, use_uvloop=use_uvloop)
    return events


def test_same_events_on_the_default_loop_and_uvloop() -> None:
    pytest.importorskip("uvloop")
    default, uv = _program(False), _program(True)
    assert default == uv
    assert (ns(5), "scope expired=True") in default
    assert default[-1] == (ns(9), "done")


@pytest.mark.asyncio
async def test_no_task_or_timer_is_left_behind(kbus_sim: Sim) -> None:
    for _ in range(100):
        with move_on_after(kbus_sim, ns(1)):
            await kbus_sim.sleep(ns(2))
    assert kbus_sim.runnable == 1  # the last expiry's token: held until the loop has run the host once
    await asyncio.sleep(0)
    gc.collect()
    assert kbus_sim.runnable == 0
    assert isinstance(move_on_after(kbus_sim, 1), TimeoutScope)
