"""The virtual-time engine: a driver that steps simulated tasks itself.

Simulated time is an integer count of picoseconds. The engine does not patch
or replace the event loop; it runs on whatever asyncio loop is current
(default loop, uvloop, anyio's asyncio backend) and gives the same event order
on each of them.

The driver
----------
A simulated task (anything started with :meth:`Sim.spawn`) is not an asyncio
task. The engine owns its coroutine and steps it with ``coro.send()`` from a
ready deque, the way SimPy steps generators. One step runs the coroutine until
it suspends; what it yields says why:

* the engine's park marker: the task waits on an engine primitive (a sleep, an
  inbox, a :class:`SimFuture`, another task) and whoever resolves that wait
  appends it to the ready deque again (:meth:`Sim.wake`);
* an asyncio future (``asyncio.sleep``, a socket, an ``asyncio.Event``): a
  *foreign* wait; a done-callback puts the task back on the deque, and until
  then virtual time is frozen (the safe direction);
* a bare ``yield`` (``asyncio.sleep(0)``): a foreign wait of one loop pass.

The driver runs as a plain loop callback. It steps ready tasks, FIFO, and when
the deque is empty it moves time, but only if no simulated task waits on
anything foreign and no host wake-up is outstanding (below): then every timer
due at the earliest deadline fires in insertion order, and the tasks they wake
run next. A burst of simulated work therefore runs synchronously inside one
callback; after :attr:`Sim.step_budget` steps it yields to the loop so host
tasks, timers and streams are never starved. The budget only decides *when*
the loop gets a turn, never the order of simulated events, so it cannot change
virtual time.

Inside a simulated task ``asyncio.current_task()`` is None (the driver is a
callback, not a task), so ``asyncio.timeout`` and anyio cancel scopes refuse
to run there rather than cancel the wrong thing; :meth:`Sim.current_task`
names the task, and :meth:`SimTask.cancel` and ``kbus.fail_after`` target it.
Each task runs in its own copy of its spawner's ``contextvars`` context. A
step cannot be interrupted; a watchdog thread notices one that holds the
loop for :attr:`Sim.watchdog_seconds` and the driver warns, naming the task.

Host tasks
----------
A host task (a script, a test, a request from a server) stays an ordinary
asyncio task. When it waits on an engine primitive it parks on an asyncio
future; its waker resolves the future and takes a *host token* that is given
back only when the host task has resumed, so time cannot jump between "the
answer arrived" and "the host looked at it".

Deadlock
--------
With nothing ready, no foreign wait, no host token and no timer left, nothing
can ever happen again. If a host is waiting on the engine, the driver raises
:class:`~kbus.errors.DeadlockError` into every host waiter, listing what each
blocked task waits on (each wait describes itself). Nobody waiting means
nobody can hang, so nothing is raised.

Determinism
-----------
The event order is a function of the program alone: the ready deque is FIFO,
timers are keyed ``(when, sequence)``, and host tasks resume in the loop's
FIFO order, which every loop implementation keeps.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import threading
import time
import types
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from heapq import heappop, heappush
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

from ..errors import DeadlockError
from .units import format_time

T = TypeVar("T")

try:  # Python 3.12+: a C function
    from _asyncio import current_task as _current_task  # type: ignore[attr-defined]
except ImportError:  # Python 3.11: asyncio.current_task() is Python; read its table directly
    _current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]

__all__ = ["PARKED", "HostWaiter", "ReportSource", "Sim", "SimFuture", "SimTask", "TimerHandle", "Waiter"]


class _Parked:
    """The marker a simulated task yields to the driver when it parks (see :meth:`Sim.park`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<kbus parked>"


PARKED: Any = _Parked()
"""Yielded by a parking simulated task; nothing else in a program should yield it."""


class ReportSource(Protocol):
    """Something that can add lines to a deadlock report (see :meth:`Sim.add_report_source`)."""

    def blocked_lines(self) -> Iterable[str]: ...


class TimerHandle(list[Any]):
    """What :meth:`Sim.call_at` returns: ``[fn, args]``, and ``cancel()`` to withdraw it.

    A list so that booking a timer costs no Python-level ``__init__`` (a
    network model arms one per flow and re-arms it whenever rates change).
    Cancelling clears ``fn``; the entry stays in the heap until its time and
    is then skipped (lazy deletion).
    """

    __slots__ = ()

    def cancel(self) -> None:
        """Withdraw the callback; harmless if it already ran or was cancelled."""
        self[0] = None

    @property
    def cancelled(self) -> bool:
        return self[0] is None


class HostWaiter:
    """One wait of a host (asyncio) task on an engine primitive: an asyncio future.

    The simulated counterpart is the :class:`SimTask` itself; both answer
    ``parked``, ``woken`` and ``value`` so primitives treat them alike.
    """

    __slots__ = ("fut", "reason", "task")

    def __init__(self, fut: asyncio.Future[Any], task: asyncio.Task[Any] | None) -> None:
        self.fut = fut
        self.task = task
        self.reason: object = None

    @property
    def parked(self) -> bool:
        """Still waiting: not woken, not withdrawn."""
        return not self.fut.done()

    @property
    def woken(self) -> bool:
        """A waker resolved this wait (even if the task was cancelled before it resumed)."""
        return self.fut.done() and not self.fut.cancelled()

    @property
    def value(self) -> Any:
        """The value the waker passed (None if it passed an exception)."""
        fut = self.fut
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()
        return None

    def describe(self) -> str:
        return "a callback outside any task" if self.task is None else f"host task {self.task.get_name()!r}"


class SimTask(Generic[T]):
    """Handle of a simulated task returned by :meth:`Sim.spawn`.

    Awaiting the handle waits (in virtual time) for the task's result and
    re-raises its exception. ``daemon`` tasks are service loops that may wait
    on their inbox forever; regular tasks are expected to finish.

    The handle is also the task's waiter in the wait contract (:meth:`Sim.park`):
    a simulated task parks on one thing at a time, so it needs no object per wait.
    """

    __slots__ = (
        "__weakref__",
        "_cancel_requests",
        "_cancelled",
        "_coro",
        "_ctx",
        "_done",
        "_exception",
        "_foreign",
        "_must_cancel",
        "_result",
        "_send",
        "_sim",
        "_throw",
        "_throw_fn",
        "_timer",
        "_value",
        "_waiters",
        "daemon",
        "name",
        "reason",
        "woken",
    )

    def __init__(self, sim: Sim, coro: Coroutine[Any, Any, T], name: str, daemon: bool) -> None:
        self._sim = sim
        self.name = name
        self.daemon = daemon
        self._coro = coro
        self._ctx = contextvars.copy_context()
        # Bound once: a step is one C-level call, in the task's own context.
        run: Any = self._ctx.run
        self._send: Callable[[Any], Any] = functools.partial(run, coro.send)
        self._throw_fn: Callable[[BaseException], Any] = functools.partial(run, coro.throw)
        self._value: Any = None
        self._throw: BaseException | None = None
        self._timer = -1  # sequence number of the live sleep entry in the timer heap, else -1
        self._foreign: Any = None  # the asyncio future (or loop handle) of a foreign wait
        self._must_cancel = False
        self._cancel_requests = 0
        self._done = False
        self._cancelled = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self.reason: object = None
        """What the task is parked on (None while ready, running or waiting on something foreign)."""
        self.woken = False
        """The last wait was resolved by a waker (not withdrawn by cancellation)."""

    # waiter protocol -------------------------------------------------------
    @property
    def parked(self) -> bool:
        return self.reason is not None

    @property
    def value(self) -> Any:
        return self._value

    def describe(self) -> str:
        return f"task {self.name!r}{' (daemon)' if self.daemon else ''}"

    def describe_wait(self) -> str:
        return f"task {self.name!r}"

    # asyncio-like handle ---------------------------------------------------
    def done(self) -> bool:
        """True once the task has finished, failed or been cancelled."""
        return self._done

    def cancel(self, msg: str | None = None) -> bool:
        """Throw ``CancelledError`` into the task at its current wait; False if it has finished.

        The wait is withdrawn at once and the task counts as ready, so virtual
        time cannot move between the cancellation and the task noticing it.
        """
        if self._done:
            return False
        self._cancel_requests += 1
        self._sim._cancel_task(self, msg)
        return True

    def cancelling(self) -> int:
        """Pending cancellation requests (as ``asyncio.Task.cancelling``), used by timeout scopes."""
        return self._cancel_requests

    def uncancel(self) -> int:
        """Withdraw one cancellation request; returns the remaining count (as ``asyncio.Task.uncancel``)."""
        if self._cancel_requests > 0:
            self._cancel_requests -= 1
        return self._cancel_requests

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> T:
        """The task's return value; raises its exception, or ``InvalidStateError`` if still running."""
        if not self._done:
            raise asyncio.InvalidStateError(f"simulated task {self.name!r} has not finished")
        if self._cancelled:
            raise asyncio.CancelledError(f"simulated task {self.name!r} was cancelled")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        if not self._done:
            raise asyncio.InvalidStateError(f"simulated task {self.name!r} has not finished")
        return self._exception

    def __await__(self) -> Generator[Any, Any, T]:
        yield from self._join()
        return self.result()

    @types.coroutine
    def _join(self) -> Generator[Any, Any, None]:
        """Wait until the task has ended, without raising its outcome."""
        if self._done:
            return
        sim = self._sim
        w = sim.waiter()
        self._waiters.append(w)
        try:
            yield from sim.park(w, self)
        except BaseException:
            if not w.woken and w in self._waiters:
                self._waiters.remove(w)
            raise

    def __repr__(self) -> str:
        state = "done" if self._done else "running"
        return f"<SimTask {self.name!r} {'daemon ' if self.daemon else ''}{state}>"


class SimFuture(Generic[T]):
    """A one-shot result owned by the engine, e.g. the answer to a host request.

    Waiting on it counts as being blocked in virtual time, so it takes part in
    deadlock detection: if it can never be resolved, its host waiters get
    :class:`~kbus.errors.DeadlockError` instead of hanging.
    """

    __slots__ = ("_done", "_exception", "_result", "_sim", "_waiters", "name")

    def __init__(self, sim: Sim, name: str = "future") -> None:
        self._sim = sim
        self.name = name
        self._done = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []

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

    def describe_wait(self) -> str:
        return f"future {self.name!r}"

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        wake = self._sim.wake
        for w in waiters:
            wake(w)

    def __await__(self) -> Generator[Any, Any, T]:
        if not self._done:
            sim = self._sim
            w = sim.waiter()
            self._waiters.append(w)
            try:
                yield from sim.park(w, self)
            except BaseException:
                if not w.woken and w in self._waiters:
                    self._waiters.remove(w)
                raise
        return self.result()

    def __repr__(self) -> str:
        return f"<SimFuture {self.name!r} {'done' if self._done else 'pending'}>"


Waiter: TypeAlias = SimTask[Any] | HostWaiter
"""What :meth:`Sim.waiter` returns: the running simulated task, or a fresh :class:`HostWaiter`."""


class _RunWait:
    """What ``sim.run()`` waits for, as the deadlock report says it."""

    __slots__ = ("until",)

    def __init__(self, until: int | None) -> None:
        self.until = until

    def describe_wait(self) -> str:
        if self.until is None:
            return "sim.run() (regular tasks to finish)"
        return f"sim.run(until={format_time(self.until)})"


class Sim:
    """The virtual-time engine. Create it inside (or before) a running loop.

    ``sim.now`` is the current virtual time in integer picoseconds. Simulated
    tasks started with :meth:`spawn` make progress on the loop by themselves;
    :meth:`run` is one way to wait for them, not the only way to advance time.
    """

    step_budget = 2000
    """Steps (and timer advances) per loop callback before the driver yields to the loop."""

    watchdog_seconds = 2.0
    """Wall-clock seconds one step may hold the loop before a ``RuntimeWarning`` names the task."""

    def __init__(self, name: str = "sim") -> None:
        self.name = name
        self._now = 0
        self._ready: deque[SimTask[Any]] = deque()
        self._timers: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()
        self._tasks: dict[SimTask[Any], None] = {}
        self._regular = 0
        self._current: SimTask[Any] | None = None
        # Foreign waits of simulated tasks plus host wake-ups not yet resumed: time stands still while > 0.
        self._held = 0
        self._host_waits: dict[HostWaiter, None] = {}
        self._run_waiters: list[Any] = []
        self._report_sources: dict[ReportSource, None] = {}
        self._scheduled = False
        self._driving = False
        self._budget = 0  # steps left in this burst; (bursts, budget) changes with every step
        self._bursts = 0
        self._stuck: tuple[str, float] | None = None  # set by the watchdog thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx = contextvars.copy_context()
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
        """Simulated tasks ready or running, foreign waits and host wake-ups outstanding.

        Time can move only while this is zero.
        """
        return len(self._ready) + self._held + (self._current is not None)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this engine is bound to (the first one it ran on), or None before that."""
        return self._loop

    def current_task(self) -> SimTask[Any] | None:
        """The simulated task being stepped right now, or None when host code is running.

        Inside a simulated task ``asyncio.current_task()`` returns None (the
        driver is a loop callback, not a task); this is the way to find the
        task instead.
        """
        return self._current

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None, daemon: bool = False) -> SimTask[T]:
        """Start ``coro`` as a simulated task and return its :class:`SimTask` handle.

        A daemon (a block's service loop) may wait on its inbox forever: that
        is idleness, not deadlock. A regular task is expected to finish;
        :meth:`run` waits for all of them. The task runs in a copy of the
        spawner's ``contextvars`` context, as an asyncio task would.
        """
        obj: Any = coro  # a generator-based coroutine (types.coroutine) is accepted too
        if not (inspect.iscoroutine(obj) or _is_generator_coroutine(obj)):
            what = type(coro).__name__
            hint = " (did you pass the function instead of calling it?)" if callable(coro) else ""
            raise TypeError(f"Sim.spawn(name={name!r}) needs a coroutine object, got {what}{hint}")
        self._bind()
        task_name = name if name is not None else getattr(coro, "__qualname__", "task")
        handle: SimTask[T] = SimTask(self, coro, task_name, daemon)
        self._tasks[handle] = None
        if not daemon:
            self._regular += 1
        self._ready.append(handle)
        self._schedule()
        return handle

    @types.coroutine
    def sleep(self, delay: int) -> Generator[Any, Any, None]:
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
        when = self._now + delay
        task = self._current
        if task is None:  # a host task: park on a future like every host wait
            w = self.waiter()
            heappush(self._timers, (when, next(self._seq), w))
            yield from self.park(w, when)
            return
        timers = self._timers
        if (
            not self._ready
            and not self._held
            and (not timers or timers[0][0] > when)
            and self._budget > 0
            and not task._must_cancel
        ):
            # Nothing else can run before this deadline: parking, popping the
            # heap and stepping this task again would give the same order, so
            # move the clock and go on (counted against the step budget, so a
            # lone ticker still yields to the loop).
            self._budget -= 1
            if when != self._now:
                self._now = when
                self.advances += 1
            return
        seq = next(self._seq)
        heappush(timers, (when, seq, task))
        task._timer = seq
        # The wait contract (Sim.park) inlined for the simulated path; nothing reads
        # ``woken`` after a sleep, so it is left alone.
        task.reason = when
        yield PARKED

    def call_at(self, when: int, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` when virtual time reaches ``when`` (ps); returns a handle with ``cancel()``.

        Callbacks run inside the driver's advance step, in insertion order
        among entries due at the same time; they may wake tasks, offer to
        inboxes, resolve futures, book further calls and cancel pending ones.
        A cancelled entry stays in the heap until its time and is then
        skipped, so arming and cancelling many timers is cheap.
        """
        if when < self._now:
            raise ValueError(f"call_at({when}): time {format_time(when)} is in the past (now {format_time(self._now)})")
        call = TimerHandle((fn, args))
        heappush(self._timers, (when, next(self._seq), call))
        if not self._scheduled and not self._driving:
            self._schedule()
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
        self._bind()
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
        w = self.waiter()
        self._run_waiters.append(w)
        call = self.call_at(until, self.wake, w) if until is not None else None
        try:
            await self.park(w, _RunWait(until))
        finally:
            if w in self._run_waiters:
                self._run_waiters.remove(w)
            if call is not None:
                call.cancel()

    async def shutdown(self) -> None:
        """Cancel every simulated task (daemons included) and wait for them to end."""
        handles = list(self._tasks)
        for h in handles:
            h.cancel()
        for h in handles:
            await h._join()

    def blocked(self) -> list[str]:
        """One line per parked wait: who waits, on what. Used in deadlock reports."""
        lines = []
        for task in self._tasks:
            if task.reason is not None:
                lines.append(f"{task.describe()} waits on {describe_wait(task.reason)}")
            elif task._foreign is not None:
                lines.append(f"{task.describe()} waits on {task._foreign!r} outside the simulation (time is frozen)")
        for w in self._host_waits:
            if w.parked:
                lines.append(f"{w.describe()} waits on {describe_wait(w.reason)}")
        for source in self._report_sources:
            lines.extend(source.blocked_lines())
        return lines

    def tasks(self) -> list[SimTask[Any]]:
        """Live simulated tasks, in spawn order."""
        return list(self._tasks)

    def __repr__(self) -> str:
        return f"<Sim {self.name!r} now={format_time(self._now)} runnable={self.runnable} tasks={len(self._tasks)}>"

    # ------------------------------------------------------- the wait contract
    def waiter(self) -> Waiter:
        """The calling task's waiter, to queue before :meth:`park`.

        Inside a simulated task it is the task itself (no allocation); in host
        code it is a new :class:`HostWaiter` around an asyncio future.
        """
        task = self._current
        if task is not None:
            return task
        loop = self._loop or self._bind()
        return HostWaiter(loop.create_future(), _current_task(loop))

    @types.coroutine
    def park(self, waiter: Waiter, reason: object) -> Generator[Any, Any, Any]:
        """Suspend the caller until a waker resolves ``waiter``; return the value it passes.

        This is the one way to block in virtual time, and the rule every
        primitive (sleep, inbox, future, task handle, link stall) follows:

        1. get ``waiter = sim.waiter()`` and put it where the waker will find
           it (a queue, a list, the timer heap);
        2. ``value = await sim.park(waiter, reason)``; ``reason`` is what the
           deadlock report shows: an object with ``describe_wait() -> str``
           (an int means "a sleep until" that time);
        3. the waker calls :meth:`wake` (or :meth:`wake_error`), which
           returns False for a waiter that is no longer parked: skip it;
        4. if the park raises (``CancelledError``), the waiter was withdrawn:
           remove it from where it was queued, unless ``waiter.woken`` says a
           waker got to it first, in which case ``waiter.value`` holds what it
           was handed (an inbox gives such a message back).

        While a simulated task is parked, time may move; while a woken host
        task has not resumed, it may not.
        """
        if type(waiter) is SimTask:
            waiter.reason = reason
            waiter.woken = False
            return (yield PARKED)
        assert isinstance(waiter, HostWaiter)
        waiter.reason = reason
        self._host_waits[waiter] = None
        self._schedule()  # the engine may be idle: it must move time or report a deadlock
        fut = waiter.fut
        try:
            return (yield from fut)
        finally:
            del self._host_waits[waiter]
            if fut.done() and not fut.cancelled():
                self.release()  # the host has resumed: give back its waker's token

    def wake(self, waiter: Waiter, value: Any = None) -> bool:
        """Resume a parked ``waiter`` with ``value``; False if it was no longer parked.

        A simulated task goes to the back of the ready deque; a host task's
        future is resolved and a host token held until it has resumed.
        """
        if type(waiter) is SimTask:
            if waiter.reason is None:
                return False
            waiter.reason = None
            waiter._timer = -1
            waiter.woken = True
            waiter._value = value
            self._ready.append(waiter)
            if not self._driving and not self._scheduled:
                self._schedule()
            return True
        assert isinstance(waiter, HostWaiter)
        if waiter.fut.done():
            return False
        waiter.fut.set_result(value)
        self._held += 1
        return True

    def wake_error(self, waiter: Waiter, exc: BaseException) -> bool:
        """Resume a parked ``waiter`` by raising ``exc`` from its :meth:`park`; False if not parked."""
        if type(waiter) is SimTask:
            if waiter.reason is None:
                return False
            waiter.reason = None
            waiter._timer = -1
            waiter.woken = True
            waiter._throw = exc
            self._ready.append(waiter)
            self._schedule()
            return True
        assert isinstance(waiter, HostWaiter)
        if waiter.fut.done():
            return False
        waiter.fut.set_exception(exc)
        self._held += 1
        return True

    def hold(self) -> None:
        """Keep time still until :meth:`release`: a host wake-up the engine cannot see is outstanding.

        Used when a timer callback cancels a host task (a deadline): the task
        must observe the deadline before time moves on.
        """
        self._held += 1

    def release(self) -> None:
        """Give back a token taken by :meth:`hold` (or by waking a host waiter)."""
        self._held -= 1
        if self._held == 0:
            self._schedule()

    def add_report_source(self, source: ReportSource) -> None:
        """Ask ``source.blocked_lines()`` for extra lines in :meth:`blocked` until it is discarded.

        An inbox registers while it holds messages waiting to enter (``put_later``),
        so whoever left them there (a link, a network model) needs no engine registration.
        """
        self._report_sources[source] = None

    def discard_report_source(self, source: ReportSource) -> None:
        self._report_sources.pop(source, None)

    # --------------------------------------------------------------- internals
    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            _Watchdog.watch(self)
        return loop

    def _schedule(self) -> None:
        """Make sure the driver runs soon (it may have work, or time may be able to move)."""
        if not self._scheduled and not self._driving:
            self._scheduled = True
            (self._loop or self._bind()).call_soon(self._drive, context=self._ctx)

    def _drive(self) -> None:
        """Run a burst: step ready tasks, move time when nothing is ready, stop at the budget.

        The step (``coro.send``) and the advance (popping the timers due at the
        earliest deadline) are inlined here: they are the whole cost of a
        simulated event, and a method call each would add a third to it.
        """
        self._scheduled = False
        if self._driving:  # pragma: no cover - the loop never nests callbacks
            return
        self._driving = True
        self._bursts += 1
        self._budget = self.step_budget
        ready = self._ready
        popleft = ready.popleft
        timers = self._timers
        try:
            while True:
                while ready:
                    if self._budget <= 0:
                        return  # the finally clause reschedules
                    self._budget -= 1
                    task = popleft()
                    self._current = task
                    exc = task._throw
                    try:
                        if exc is None:
                            value = task._value
                            if value is not None:
                                task._value = None
                            yielded = task._send(value)
                        else:
                            # The value stays readable while the exception is thrown: a cancelled
                            # getter gives back the message it had been handed (Sim.park, rule 4).
                            task._throw = None
                            yielded = task._throw_fn(exc)
                            task._value = None
                    except StopIteration as stop:
                        self._current = None
                        task._value = None
                        self._finish(task, stop.value, None)
                        continue
                    except BaseException as err:  # every outcome is recorded on the handle
                        self._current = None
                        task._value = None
                        self._finish(task, None, err)
                        continue
                    self._current = None
                    if yielded is not PARKED:
                        self._foreign_wait(task, yielded)
                    elif task._must_cancel:
                        task._must_cancel = False
                        self._cancel_task(task, None)
                # Nothing is ready: time may move if nothing outside the engine is pending.
                if self._held:
                    return
                if not timers:
                    self._check_deadlock()
                    return
                if self._budget <= 0:
                    return
                self._budget -= 1
                when = timers[0][0]
                fired = False
                while timers and timers[0][0] == when:
                    _, seq, target = heappop(timers)
                    kind = type(target)
                    if kind is SimTask:
                        if target._timer != seq:
                            continue  # withdrawn (cancelled) sleep
                        target._timer = -1
                        target.reason = None
                        ready.append(target)
                    elif kind is TimerHandle:
                        fn = target[0]
                        if fn is None:
                            continue  # cancelled
                        if not fired:
                            fired = True
                            if when != self._now:
                                self._now = when
                                self.advances += 1
                        try:
                            fn(*target[1])
                        except Exception as cb_exc:  # a broken callback must not stop the clock
                            self._callback_failed(fn, cb_exc)
                        continue
                    elif target.fut.done():  # a host sleeper that was cancelled
                        continue
                    else:
                        target.fut.set_result(None)
                        self._held += 1
                    if not fired:
                        fired = True
                        if when != self._now:
                            self._now = when
                            self.advances += 1
        finally:
            self._driving = False
            if (ready or (timers and not self._held)) and not self._scheduled:
                self._scheduled = True
                (self._loop or self._bind()).call_soon(self._drive, context=self._ctx)
            stuck = self._stuck
            if stuck is not None:
                self._stuck = None
                warnings.warn(
                    f"simulated task {stuck[0]!r} of sim {self.name!r} held the event loop for more than "
                    f"{stuck[1]:.1f} s of wall time in one step (at {format_time(self._now)}); await something "
                    f"(or move the work to a thread) so the loop can serve other tasks",
                    RuntimeWarning,
                    stacklevel=1,
                )

    def _foreign_wait(self, task: SimTask[Any], yielded: Any) -> None:
        """The task awaits something outside the engine: resume it when that is done; time stays still."""
        loop = self._loop
        assert loop is not None
        blocking = getattr(yielded, "_asyncio_future_blocking", None)
        if blocking is not None and asyncio.isfuture(yielded):
            if not blocking:
                task._throw = RuntimeError(
                    f"simulated task {task.name!r}: yield was used instead of yield from for {yielded!r}"
                )
                self._ready.append(task)
                return
            yielded._asyncio_future_blocking = False
            if yielded.get_loop() is not loop:
                task._throw = RuntimeError(
                    f"simulated task {task.name!r} awaits {yielded!r}, which belongs to another event loop"
                )
                self._ready.append(task)
                return
            task._foreign = yielded
            self._held += 1
            yielded.add_done_callback(self._foreign_done_cb(task))
        elif yielded is None:  # a bare yield (asyncio.sleep(0)): one loop pass
            self._held += 1
            task._foreign = loop.call_soon(self._foreign_resume, task, context=self._ctx)
        else:
            task._throw = RuntimeError(
                f"simulated task {task.name!r} yielded {yielded!r}; await kbus primitives or asyncio awaitables"
            )
            self._ready.append(task)
            return
        if task._must_cancel:
            task._must_cancel = False
            self._cancel_task(task, None)

    def _foreign_done_cb(self, task: SimTask[Any]) -> Callable[[Any], None]:
        def done(_fut: Any) -> None:
            if task._foreign is _fut:
                self._foreign_resume(task)

        return done

    def _foreign_resume(self, task: SimTask[Any]) -> None:
        task._foreign = None
        self._held -= 1
        self._ready.append(task)
        self._schedule()

    def _cancel_task(self, task: SimTask[Any], msg: str | None) -> None:
        """Withdraw whatever ``task`` waits on and make it ready with a ``CancelledError`` to throw."""
        if task is self._current:
            task._must_cancel = True  # it is running: cancel at its next suspension
            return
        exc = asyncio.CancelledError() if msg is None else asyncio.CancelledError(msg)
        if task.reason is not None:  # parked on an engine primitive
            task.reason = None
            task._timer = -1
            task.woken = False
            task._throw = exc
            self._ready.append(task)
            self._schedule()
        elif task._foreign is not None:  # waiting on something foreign
            foreign, task._foreign = task._foreign, None
            self._held -= 1
            foreign.cancel()  # a future's cancellation tells its owner; a loop handle just won't run
            task._throw = exc
            self._ready.append(task)
            self._schedule()
        else:  # already in the ready deque (not started yet, or woken): the throw wins
            task._throw = exc

    def _finish(self, task: SimTask[Any], result: Any, exc: BaseException | None) -> None:
        """Bookkeeping when a task ends: record the outcome, wake its waiters, report failures."""
        task._done = True
        task.reason = None
        task._coro = task._send = task._throw_fn = None  # type: ignore[assignment]
        self._tasks.pop(task, None)
        if exc is None:
            task._result = result
        elif isinstance(exc, asyncio.CancelledError):
            task._cancelled = True
        else:
            task._exception = exc
            if isinstance(exc, Exception):
                exc.add_note(f"raised in simulated task {task.name!r} at {format_time(self._now)}")
                if self._failure is None:
                    self._failure = exc
                for w in self._run_waiters:
                    self.wake_error(w, exc)
        if not task.daemon:
            self._regular -= 1
            if self._regular == 0:
                for w in self._run_waiters:
                    self.wake(w)
        waiters, task._waiters = task._waiters, []
        for w in waiters:
            self.wake(w)
        if exc is not None and not isinstance(exc, Exception | asyncio.CancelledError):
            raise exc  # KeyboardInterrupt, SystemExit: stop the loop as an asyncio task would

    def _raise_failure(self) -> None:
        exc, self._failure = self._failure, None
        if exc is not None:
            raise exc

    def _callback_failed(self, fn: Callable[..., object], exc: Exception) -> None:
        """Report a timer callback's exception to sim.run() and every host waiter."""
        name = getattr(fn, "__qualname__", repr(fn))
        exc.add_note(f"raised in timer callback {name!r} at {format_time(self._now)}")
        if self._failure is None:
            self._failure = exc
        for w in self._run_waiters:
            self.wake_error(w, exc)
        for w in list(self._host_waits):
            self.wake_error(w, exc)

    def _check_deadlock(self) -> None:
        """Nothing ready, no foreign wait, no host token, no timer: fail the host waiters, if any."""
        host_waits = [w for w in self._host_waits if w.parked]
        if not host_waits:
            # Nobody outside the simulation is waiting, so nobody can hang:
            # blocked regular tasks stay inspectable (sim.blocked(), sim.tasks()).
            return
        lines = self.blocked()
        pending = [t.name for t in self._tasks if not t.daemon]
        head = f"deadlock at {format_time(self._now)}: nothing can wake again"
        if pending:
            head += f" while regular task(s) {', '.join(repr(p) for p in pending)} are unfinished"
        err = DeadlockError(head + ":\n  " + "\n  ".join(lines) if lines else head, tuple(lines))
        for w in host_waits:
            self.wake_error(w, err)


def _is_generator_coroutine(obj: object) -> bool:
    return isinstance(obj, types.GeneratorType) and bool(obj.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE)


def describe_wait(reason: object) -> str:
    """What a parked wait is waiting for, in the words of the deadlock report."""
    if type(reason) is int:
        return f"a sleep until {format_time(reason)}"
    describe = getattr(reason, "describe_wait", None)
    if describe is not None:
        return str(describe())
    return repr(reason)


class _Watchdog:
    """One daemon thread that notices a simulated step holding the loop for too long.

    Timing every step would cost more than the step; instead the thread looks
    at each engine's step counter twice a second. If a step is still the same
    one after :attr:`Sim.watchdog_seconds`, it notes the task's name and the
    driver warns when the step returns (it cannot interrupt Python code).
    """

    _sims: ClassVar[weakref.WeakSet[Sim]] = weakref.WeakSet()
    _thread: ClassVar[threading.Thread | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    interval: ClassVar[float] = 0.25

    @classmethod
    def watch(cls, sim: Sim) -> None:
        with cls._lock:
            cls._sims.add(sim)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="kbus-sim-watchdog", daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        seen: weakref.WeakKeyDictionary[Sim, tuple[tuple[int, int], float]] = weakref.WeakKeyDictionary()
        while True:
            time.sleep(cls.interval)
            now = time.monotonic()
            with cls._lock:
                sims = list(cls._sims)
            for sim in sims:
                task = sim._current
                steps = (sim._bursts, sim._budget)
                if task is None:
                    seen.pop(sim, None)
                    continue
                last = seen.get(sim)
                if last is None or last[0] != steps:
                    seen[sim] = (steps, now)
                elif now - last[1] >= sim.watchdog_seconds and sim._stuck is None:
                    sim._stuck = (task.name, now - last[1])
                    seen[sim] = (steps, float("inf"))  # report a step once
