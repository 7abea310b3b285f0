"""The virtual-time engine.

Simulated time is an integer count of picoseconds that moves only when every
simulated task is blocked on one of kbus's own primitives (an inbox, a sleep, a
future the engine owns). The engine does not patch or replace the event loop;
it runs on whatever asyncio loop is current (default loop, uvloop, anyio's
asyncio backend) and gives the same event order on each of them.

How it knows everything is blocked
----------------------------------
The engine keeps one integer, the *runnable count*:

* a simulated task counts 1 from ``spawn`` until it finishes;
* a simulated task about to suspend on an engine primitive counts itself down
  first, and whoever resolves that wait (the *waker*) counts it up again at the
  moment it resolves it, not when the task actually resumes;
* a non-simulated task (a host script) is not counted while it runs, but the
  waker of its engine wait counts 1 until it has resumed, so time cannot jump
  between "the response arrived" and "the host looked at it".

When the count reaches zero the engine schedules a single ``call_soon`` pass.
If the count is still zero then, it pops every timer due at the earliest
deadline, sets ``now`` to it and wakes them in insertion order. Because ties
break by insertion sequence and the loop runs ``call_soon`` callbacks in FIFO
order on every implementation, a program produces the same event order
everywhere.

A simulated task that awaits something foreign (``asyncio.sleep``, a socket)
keeps its count while it waits, which freezes virtual time until it returns:
the safe direction, never a silent skip.

When the count is zero, no timer is left and somebody is still waiting (a
regular task, ``sim.run()``, a host request), nothing can ever happen again:
the engine raises :class:`~kbus.errors.DeadlockError` into every waiter that a
host is blocked on, listing what each blocked task waits for.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import types
from collections.abc import Callable, Coroutine, Generator
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..errors import DeadlockError
from .units import format_time

if TYPE_CHECKING:
    from .link import Link

T = TypeVar("T")


class _InPass:
    """Stands for the future of a sleep that is running the idle pass itself."""

    __slots__ = ()

    def done(self) -> bool:
        return False


_IN_PASS: Any = _InPass()


@types.coroutine
def _one_pass() -> Generator[None, None, None]:
    """Let the loop run everything already scheduled, then resume (a bare yield)."""
    yield

try:  # Python 3.12+: a C function
    from _asyncio import current_task as _c_current_task  # type: ignore[attr-defined]

    def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return _c_current_task(loop)  # type: ignore[no-any-return]

except ImportError:  # Python 3.11: asyncio.current_task() is Python; read its table directly
    _current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]

__all__ = ["Sim", "SimFuture", "SimTask"]


class _Call:
    """A timer entry that runs a plain callback instead of waking a task."""

    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SimTask(Generic[T]):
    """Handle of a simulated task returned by :meth:`Sim.spawn`.

    Awaiting the handle waits (in virtual time) for the task's result and
    re-raises its exception. ``daemon`` tasks are service loops that may wait
    on their inbox forever; regular tasks are expected to finish.
    """

    __slots__ = ("_exception", "_precounted", "_result", "_sim", "_task", "_waiters", "_waiting", "daemon", "name")

    def __init__(self, sim: Sim, name: str, daemon: bool) -> None:
        self._sim = sim
        self.name = name
        self.daemon = daemon
        self._task: asyncio.Task[None] | None = None
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[asyncio.Future[Any]] = []
        self._waiting: tuple[asyncio.Future[Any], str, Any] | None = None
        self._precounted = False

    def done(self) -> bool:
        """True once the task has finished, failed or been cancelled."""
        return self._task is not None and self._task.done()

    def cancel(self, msg: str | None = None) -> bool:
        """Cancel the task; its blocked wait (inbox, sleep) is withdrawn cleanly.

        Use this (or :meth:`Sim.shutdown`) rather than cancelling the asyncio
        task directly: it counts the task runnable at once, so virtual time
        cannot move between the cancellation and the task noticing it.
        """
        assert self._task is not None
        waiting = self._waiting
        if waiting is not None and not waiting[0].done() and not self._precounted:
            self._sim._runnable += 1
            self._precounted = True
        return self._task.cancel(msg)

    def cancelled(self) -> bool:
        return self._task is not None and self._task.cancelled()

    def result(self) -> T:
        """The task's return value; raises its exception, or ``InvalidStateError`` if still running."""
        if not self.done():
            raise asyncio.InvalidStateError(f"simulated task {self.name!r} has not finished")
        assert self._task is not None
        if self._task.cancelled():
            raise asyncio.CancelledError(f"simulated task {self.name!r} was cancelled")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        if not self.done():
            raise asyncio.InvalidStateError(f"simulated task {self.name!r} has not finished")
        return self._exception

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        if not self.done():
            fut = self._sim._loop_bound().create_future()
            self._waiters.append(fut)
            await self._sim._block_on(fut, "task", self)
        return self.result()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<SimTask {self.name!r} {'daemon ' if self.daemon else ''}{state}>"


class SimFuture(Generic[T]):
    """A one-shot result owned by the engine, e.g. the answer to a host request.

    Waiting on it counts as being blocked in virtual time, so it takes part in
    deadlock detection: if it can never be resolved, its waiters get
    :class:`~kbus.errors.DeadlockError` instead of hanging.
    """

    __slots__ = ("_done", "_exception", "_result", "_sim", "_waiters", "name")

    def __init__(self, sim: Sim, name: str = "future") -> None:
        self._sim = sim
        self.name = name
        self._done = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[asyncio.Future[Any]] = []

    def done(self) -> bool:
        return self._done

    def set_result(self, value: T) -> None:
        if self._done:
            raise asyncio.InvalidStateError(f"future {self.name!r} is already resolved")
        self._done = True
        self._result = value
        self._wake_all()

    def set_exception(self, exc: BaseException) -> None:
        if self._done:
            raise asyncio.InvalidStateError(f"future {self.name!r} is already resolved")
        self._done = True
        self._exception = exc
        self._wake_all()

    def result(self) -> T:
        if not self._done:
            raise asyncio.InvalidStateError(f"future {self.name!r} is not resolved")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                self._sim._wake(w, None)

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        if not self._done:
            fut = self._sim._loop_bound().create_future()
            self._waiters.append(fut)
            await self._sim._block_on(fut, "future", self)
        return self.result()

    def __repr__(self) -> str:
        return f"<SimFuture {self.name!r} {'done' if self._done else 'pending'}>"


class Sim:
    """The virtual-time engine. Create it inside (or before) a running loop.

    ``sim.now`` is the current virtual time in integer picoseconds. Simulated
    tasks started with :meth:`spawn` make progress on the loop by themselves;
    :meth:`run` is one way to wait for them, not the only way to advance time.
    """

    def __init__(self, name: str = "sim") -> None:
        self.name = name
        self._now = 0
        self._runnable = 0
        self._regular = 0
        self._timers: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()
        self._tasks: dict[asyncio.Task[Any], SimTask[Any]] = {}
        # Parked waits of host (non-simulated) tasks: future -> (task, kind, object waited on).
        # A simulated task's wait lives on its handle (SimTask._waiting).
        self._host_waits: dict[asyncio.Future[Any], tuple[asyncio.Task[Any] | None, str, Any]] = {}
        self._run_waiters: list[asyncio.Future[Any]] = []
        self._stalled_links: dict[Link, None] = {}
        self._idle_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self.advances = 0
        """How many times virtual time moved forward (a cheap progress counter)."""
        self.tracer: Any = None
        """Trace sink for events that have no hook of their own (memory, MMU, kernels); None costs nothing."""

    # ------------------------------------------------------------------ public
    @property
    def now(self) -> int:
        """Current virtual time in picoseconds (an int)."""
        return self._now

    @property
    def runnable(self) -> int:
        """Number of simulated tasks (and pending host wake-ups) that may run now."""
        return self._runnable

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None, daemon: bool = False) -> SimTask[T]:
        """Start ``coro`` as a simulated task and return its :class:`SimTask` handle.

        A daemon (a block's service loop) may wait on its inbox forever: that
        is idleness, not deadlock. A regular task is expected to finish;
        :meth:`run` waits for all of them.
        """
        if not inspect.iscoroutine(coro):
            what = type(coro).__name__
            hint = " (did you pass the function instead of calling it?)" if callable(coro) else ""
            raise TypeError(f"Sim.spawn(name={name!r}) needs a coroutine object, got {what}{hint}")
        loop = self._loop_bound()
        task_name = name if name is not None else getattr(coro, "__qualname__", "task")
        handle: SimTask[T] = SimTask(self, task_name, daemon)
        task = loop.create_task(self._main(handle, coro), name=task_name)
        task.add_done_callback(lambda _t: self._finish(handle, coro))
        handle._task = task
        self._tasks[task] = handle
        self._runnable += 1
        if not daemon:
            self._regular += 1
        return handle

    async def sleep(self, delay: int) -> None:
        """Block for ``delay`` picoseconds of virtual time.

        ``sleep(0)`` waits until every other task runnable at this instant has
        blocked, then resumes at the same time.
        """
        if type(delay) is not int:
            if isinstance(delay, bool) or not isinstance(delay, int):
                raise TypeError(f"sim.sleep() takes integer picoseconds, got {type(delay).__name__}; use kbus.ns()")
            delay = int(delay)
        if delay < 0:
            raise ValueError(f"sim.sleep({delay}): negative delay; virtual time cannot go backwards")
        loop = self._loop or self._loop_bound()
        when = self._now + delay
        seq = next(self._seq)
        handle = self._tasks.get(_current_task(loop))  # type: ignore[arg-type]
        if handle is None:  # a host task: the general path
            fut = loop.create_future()
            heappush(self._timers, (when, seq, fut))
            host = self._park(fut, "sleep", when)
            try:
                await fut
            finally:
                self._unpark(host, fut)
            return
        # The hot path of every simulated block, inlined from _park/_unpark.
        self._runnable -= 1
        if self._runnable == 0 and not self._idle_scheduled:
            # This task is the last one to block, so it runs the idle pass itself.
            # One bare yield is the call_soon pass the rule asks for. If nothing
            # became runnable meanwhile and no timer is due at or before this
            # sleep's deadline, time jumps and the task goes on: no future, no
            # heap entry, no second trip through the loop. Nobody else can
            # advance time during the pass, since the idle pass is taken.
            handle._waiting = (_IN_PASS, "sleep", when)
            self._idle_scheduled = True
            try:
                await _one_pass()
            except BaseException:
                handle._waiting = None
                self._idle_scheduled = False
                self._unpark_cancelled(handle)  # it was cancelled during the pass
                self._schedule_idle()
                raise
            self._idle_scheduled = False
            handle._waiting = None
            timers = self._timers
            if self._runnable == 0 and (not timers or timers[0][0] > when):
                if when != self._now:
                    self._now = when
                    self.advances += 1
                self._runnable += 1
                return
            fut = loop.create_future()
            heappush(timers, (when, seq, fut))  # its original sequence number keeps tie order
            handle._waiting = (fut, "sleep", when)
            if self._runnable == 0:
                self._advance()
        else:
            fut = loop.create_future()
            heappush(self._timers, (when, seq, fut))
            handle._waiting = (fut, "sleep", when)
        try:
            await fut
        finally:
            handle._waiting = None
            if fut.cancelled():
                self._unpark_cancelled(handle)

    def call_at(self, when: int, fn: Callable[..., object], *args: Any) -> _Call:
        """Run ``fn(*args)`` when virtual time reaches ``when`` (ps).

        Callbacks run inside the engine's advance step, in insertion order
        among entries due at the same time. Used by :class:`~kbus.Link` to
        deliver messages without a task per message.
        """
        if when < self._now:
            raise ValueError(f"call_at({when}): time {format_time(when)} is in the past (now {format_time(self._now)})")
        call = _Call(fn, args)
        heappush(self._timers, (when, next(self._seq), call))
        if self._runnable == 0:
            self._schedule_idle()
        return call

    def create_future(self, name: str = "future") -> SimFuture[Any]:
        """A :class:`SimFuture` owned by this engine (deadlock-aware)."""
        return SimFuture(self, name)

    async def run(self, until: int | None = None) -> None:
        """Wait until every regular task has finished, or until virtual time ``until``.

        Re-raises the first failure of any simulated task (with a note naming
        the task), and raises :class:`~kbus.errors.DeadlockError` if the
        regular tasks can never finish.
        """
        self._loop_bound()
        self._raise_failure()
        if until is not None:
            if isinstance(until, bool) or not isinstance(until, int):
                raise TypeError(f"sim.run(until=...) takes integer picoseconds, got {type(until).__name__}")
            if until < self._now:
                raise ValueError(
                    f"sim.run(until={until}): {format_time(until)} is before now ({format_time(self._now)})"
                )
        elif self._regular == 0:
            return
        fut = self._loop_bound().create_future()
        self._run_waiters.append(fut)
        call = self.call_at(until, self._wake_if_pending, fut) if until is not None else None
        try:
            await self._block_on(fut, "run", until)
        finally:
            if fut in self._run_waiters:
                self._run_waiters.remove(fut)
            if call is not None:
                call.cancel()

    async def shutdown(self) -> None:
        """Cancel every simulated task (daemons included) and wait for them to end."""
        handles = list(self._tasks.values())
        for h in handles:
            h.cancel()
        tasks = [h._task for h in handles if h._task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def blocked(self) -> list[str]:
        """One line per parked wait: who waits, on what. Used in deadlock reports."""
        lines = []
        for handle in self._tasks.values():
            if handle._waiting is not None and not handle._waiting[0].done():
                lines.append(f"{_who(handle)} waits on {_what(handle._waiting[1], handle._waiting[2])}")
        for fut, (who, kind, obj) in self._host_waits.items():
            if not fut.done():
                lines.append(f"{_who(who)} waits on {_what(kind, obj)}")
        for link in self._stalled_links:
            lines.append(f"link {link.name!r} holds a message for full inbox {link.stalled_on!r}")
        return lines

    def tasks(self) -> list[SimTask[Any]]:
        """Live simulated tasks, in spawn order."""
        return list(self._tasks.values())

    def __repr__(self) -> str:
        return f"<Sim {self.name!r} now={format_time(self._now)} runnable={self._runnable} tasks={len(self._tasks)}>"

    # --------------------------------------------------------------- internals
    def _loop_bound(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _wake(self, fut: asyncio.Future[Any], value: Any) -> None:
        """Resolve a parked wait and count its waiter runnable (the waker's half)."""
        fut.set_result(value)
        self._runnable += 1

    def _wake_exc(self, fut: asyncio.Future[Any], exc: BaseException) -> None:
        fut.set_exception(exc)
        self._runnable += 1

    def _wake_if_pending(self, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            self._wake(fut, None)

    def _park(self, fut: asyncio.Future[Any], kind: str, obj: Any) -> SimTask[Any] | None:
        """The waiter's half of the count, before it suspends on ``fut``.

        Every engine primitive parks through here and :meth:`_unpark`, so the
        counting rule lives in one place; the primitive decides what ``fut``
        means, and its waker must resolve it with :meth:`_wake`. Returns the
        simulated task's handle, or None for a host (non-simulated) task.
        """
        loop = self._loop
        task = _current_task(loop) if loop is not None else None
        handle = self._tasks.get(task) if task is not None else None
        if handle is not None:
            handle._waiting = (fut, kind, obj)
            self._runnable -= 1
            if self._runnable == 0 and not self._idle_scheduled:
                self._idle_scheduled = True
                loop.call_soon(self._on_idle)  # type: ignore[union-attr]
        else:
            self._host_waits[fut] = (task, kind, obj)
            if self._runnable == 0:
                # A host waiting on an idle simulation (a sleep, a future that can
                # never resolve) must still see time advance or a deadlock report.
                self._schedule_idle()
        return handle

    def _unpark(self, handle: SimTask[Any] | None, fut: asyncio.Future[Any]) -> None:
        """The waiter's half of the count, after it resumed (normally or by cancellation)."""
        if handle is not None:
            handle._waiting = None
            if fut.cancelled():
                self._unpark_cancelled(handle)
        else:
            del self._host_waits[fut]
            if not fut.cancelled():
                # A host task has resumed: give back the waker's token.
                self._runnable -= 1
                if self._runnable == 0:
                    self._schedule_idle()

    def _unpark_cancelled(self, handle: SimTask[Any]) -> None:
        if handle._precounted:
            handle._precounted = False  # SimTask.cancel() counted us already
        else:
            # Cancelled from outside kbus: nobody counted us back in.
            self._runnable += 1

    async def _block_on(self, fut: asyncio.Future[Any], kind: str, obj: Any) -> Any:
        """Park on ``fut`` until a waker resolves it (for the less hot primitives)."""
        handle = self._park(fut, kind, obj)
        try:
            return await fut
        finally:
            self._unpark(handle, fut)

    async def _main(self, handle: SimTask[T], coro: Coroutine[Any, Any, T]) -> None:
        try:
            handle._result = await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            handle._exception = exc
            if not isinstance(exc, Exception):
                raise
            exc.add_note(f"raised in simulated task {handle.name!r} at {format_time(self._now)}")
            if self._failure is None:
                self._failure = exc
            for w in self._run_waiters:
                if not w.done():
                    self._wake_exc(w, exc)
        finally:
            self._finish(handle, coro)

    def _finish(self, handle: SimTask[Any], coro: Coroutine[Any, Any, Any]) -> None:
        """Bookkeeping when a task ends; idempotent, also for tasks cancelled before they started."""
        task = handle._task
        if task is None or self._tasks.pop(task, None) is None:
            return
        coro.close()  # no "never awaited" warning for a task cancelled before its first step
        self._runnable -= 1
        if handle._precounted:
            handle._precounted = False
        if not handle.daemon:
            self._regular -= 1
            if self._regular == 0:
                for w in self._run_waiters:
                    if not w.done():
                        self._wake(w, None)
        for w in handle._waiters:
            if not w.done():
                self._wake(w, None)
        handle._waiters.clear()
        if self._runnable == 0:
            self._schedule_idle()

    def _raise_failure(self) -> None:
        exc, self._failure = self._failure, None
        if exc is not None:
            raise exc

    def _schedule_idle(self) -> None:
        if not self._idle_scheduled:
            self._idle_scheduled = True
            self._loop_bound().call_soon(self._on_idle)

    def _on_idle(self) -> None:
        """Everything looked blocked one pass ago: advance time or report deadlock."""
        self._idle_scheduled = False
        if self._runnable != 0:
            return
        self._advance()

    def _advance(self) -> None:
        """Wake every timer due at the earliest deadline; report a deadlock if none is left."""
        timers = self._timers
        while timers:
            when = timers[0][0]
            while timers and timers[0][0] == when:
                target = heappop(timers)[2]
                if type(target) is _Call:
                    if target.cancelled:
                        continue
                    if when != self._now:
                        self._now = when
                        self.advances += 1
                    try:
                        target.fn(*target.args)
                    except Exception as exc:  # a broken callback must not stop the clock
                        self._callback_failed(target, exc)
                elif not target.done():
                    if when != self._now:
                        self._now = when
                        self.advances += 1
                    target.set_result(None)
                    self._runnable += 1
            if self._runnable != 0:
                return
        self._check_deadlock()

    def _callback_failed(self, call: _Call, exc: Exception) -> None:
        """Report a timer callback's exception to sim.run() and every host waiter."""
        name = getattr(call.fn, "__qualname__", repr(call.fn))
        exc.add_note(f"raised in timer callback {name!r} at {format_time(self._now)}")
        if self._failure is None:
            self._failure = exc
        for w in self._run_waiters:
            if not w.done():
                self._wake_exc(w, exc)
        for fut in list(self._host_waits):
            if not fut.done():
                self._wake_exc(fut, exc)

    def _check_deadlock(self) -> None:
        host_waits = [fut for fut in self._host_waits if not fut.done()]
        if not host_waits:
            # Nobody outside the simulation is waiting, so nobody can hang:
            # blocked regular tasks stay inspectable (sim.blocked(), sim.tasks()).
            return
        lines = self.blocked()
        pending = [h.name for h in self._tasks.values() if not h.daemon]
        head = f"deadlock at {format_time(self._now)}: nothing can wake again"
        if pending:
            head += f" while regular task(s) {', '.join(repr(p) for p in pending)} are unfinished"
        err = DeadlockError(head + ":\n  " + "\n  ".join(lines) if lines else head, tuple(lines))
        for fut in host_waits:
            if not fut.done():
                self._wake_exc(fut, err)


def _who(who: SimTask[Any] | asyncio.Task[Any] | None) -> str:
    if isinstance(who, SimTask):
        return f"task {who.name!r}{' (daemon)' if who.daemon else ''}"
    if who is None:
        return "a callback outside any task"
    return f"host task {who.get_name()!r}"


def _what(kind: str, obj: Any) -> str:
    if kind == "get":
        return f"empty inbox {obj.name!r}"
    if kind == "put":
        return f"full inbox {obj.name!r} ({obj.qsize()}/{obj.capacity})"
    if kind == "sleep":
        return f"a sleep until {format_time(obj)}"
    if kind == "task":
        return f"task {obj.name!r}"
    if kind == "future":
        return f"future {obj.name!r}"
    if kind == "run":
        return "sim.run() (regular tasks to finish)" if obj is None else f"sim.run(until={format_time(obj)})"
    if kind == "link":
        return f"stalled link {obj.name!r} (its inbox {obj.stalled_on!r} is full)"
    return f"{kind} {obj!r}"
