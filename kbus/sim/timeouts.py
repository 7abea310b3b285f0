"""Deadlines in device time: :func:`fail_after` and :func:`move_on_after`.

``asyncio.timeout`` and ``anyio.fail_after`` measure wall-clock seconds, which
say nothing about a simulated device: a transfer that takes 5 us of device time
may take 50 ms of host time, or 5 s under a debugger. These scopes measure
*virtual* time instead, so a test can say "this transfer must finish within
5 us on the device" and get an answer that is the same on every machine::

    with kbus.fail_after(device, kbus.us(5)):
        await device.request(msg)

How it works
------------
Entering a scope books a timer callback with :meth:`Sim.call_at` at
``sim.now + delay``; leaving it cancels the timer. If the timer fires first,
the callback cancels the task that entered the scope, exactly as
``asyncio.timeout`` does, and the scope turns *its own* cancellation (counted
with ``Task.cancelling()``/``Task.uncancel()``, so an outer timeout or a
cancel scope still propagates) into :class:`TimeoutError` (``fail_after``) or
swallows it (``move_on_after``).

The callback runs inside the engine's advance step. A host task is not counted
by the engine while it waits, so without care the engine would keep advancing
past the deadline before the cancelled task got to run. The scope therefore
holds time still (:meth:`Sim.hold`) from the expiry until the loop has run the
cancelled task once, the same rule the engine applies to any host wake-up: the
task observes ``sim.now`` equal to the deadline. Inside a simulated task
(``sim.spawn``), where ``asyncio.current_task()`` is None, the scope targets
the :class:`SimTask` instead and cancels it with :meth:`SimTask.cancel`, which
makes it ready at once.

A deadline is a timer like any other, so while one is pending the engine will
jump to it rather than report a deadlock: a request that can never complete
inside a scope ends in ``TimeoutError`` at the deadline, with the engine's
list of blocked tasks attached as a note. Time also jumps to the deadline when
the simulation is idle while the host waits on something foreign (real I/O):
device time does not wait for the host.
"""

from __future__ import annotations

import asyncio
import enum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .engine import Sim, SimTask, TimerHandle
from .units import format_time, parse_time

__all__ = ["TimeoutScope", "fail_after", "move_on_after"]


_KBUS_DIR = str(Path(__file__).resolve().parent.parent)


def _without_kbus_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the frames of kbus's own modules (a new chain; frames are shared)."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_KBUS_DIR):
            kept.append(tb)
        tb = tb.tb_next
    out: TracebackType | None = None
    for t in reversed(kept):
        out = TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return out


class _HasSim(Protocol):
    """Anything that names its engine as ``.sim``: a Device, a runtime handle."""

    @property
    def sim(self) -> Sim: ...


SimLike = Sim | _HasSim
"""A :class:`Sim`, or an object whose ``.sim`` is one (a Device, a runtime handle)."""


class _State(enum.Enum):
    CREATED = "created"
    ENTERED = "entered"
    EXPIRING = "expiring"
    EXITED = "exited"


def _find_sim(target: object, who: str) -> Sim:
    if isinstance(target, Sim):
        return target
    sim = getattr(target, "sim", None)
    if isinstance(sim, Sim):
        return sim
    raise TypeError(
        f"{who}: expected a kbus.Sim, a Device or a runtime handle (anything with a .sim), "
        f"got {type(target).__name__}" + ("" if sim is None else f" whose .sim is a {type(sim).__name__}")
    )


def _delay_ps(delay: object, who: str) -> int | None:
    if delay is None:
        return None
    if isinstance(delay, str):
        return parse_time(delay)
    if isinstance(delay, bool) or not isinstance(delay, int):
        raise TypeError(
            f"{who}: the delay is integer picoseconds or a duration string such as '5us', "
            f"got {type(delay).__name__} {delay!r}; use kbus.ns() / kbus.us() to convert"
        )
    if delay < 0:
        raise ValueError(f"{who}: delay {delay} ps is negative; virtual time cannot go backwards")
    return delay


class TimeoutScope:
    """A deadline in device time around a block of host (or simulated) code.

    Made by :func:`fail_after` and :func:`move_on_after`; usable as ``with``
    or ``async with`` inside a task. Each scope can be entered once.

    Attributes worth reading after the block:

    * ``deadline``: absolute virtual time (ps) of the deadline, set on entry
      (None for a scope without a deadline);
    * ``expired``: the deadline passed while the block was running;
    * ``cancelled_caught``: the scope's own cancellation reached it and was
      turned into ``TimeoutError`` or swallowed (false if the block caught the
      cancellation itself, or finished at the same instant).
    """

    __slots__ = (
        "_call",
        "_cancelling",
        "_delay",
        "_loop",
        "_raise",
        "_state",
        "_task",
        "_who",
        "blocked_at_expiry",
        "cancelled_caught",
        "deadline",
        "entered_at",
        "expired",
        "sim",
    )

    def __init__(self, target: SimLike, delay: int | str | None, *, raise_on_expiry: bool) -> None:
        who = "kbus.fail_after()" if raise_on_expiry else "kbus.move_on_after()"
        self._who = who
        self.sim = _find_sim(target, who)
        self._delay = _delay_ps(delay, who)
        self._raise = raise_on_expiry
        self._state = _State.CREATED
        self._call: TimerHandle | None = None
        self._task: asyncio.Task[Any] | SimTask[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelling = 0
        self.deadline: int | None = None
        self.entered_at: int | None = None
        self.expired = False
        self.cancelled_caught = False
        self.blocked_at_expiry: tuple[str, ...] = ()
        """``sim.blocked()`` when a ``fail_after`` deadline passed (the error's note shows the first lines)."""

    @property
    def remaining(self) -> int | None:
        """Picoseconds of device time left before the deadline (0 once passed), None without one."""
        if self.deadline is None:
            return None
        return max(0, self.deadline - self.sim.now)

    # -------------------------------------------------------------- protocol
    def __enter__(self) -> TimeoutScope:
        if self._state is not _State.CREATED:
            raise RuntimeError(f"{self._who}: this scope was already entered; make a new one for each block")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(f"{self._who} needs a running event loop (use it inside an async function)") from None
        sim = self.sim
        task: asyncio.Task[Any] | SimTask[Any] | None = sim.current_task() or asyncio.current_task(loop)
        if task is None:
            raise RuntimeError(f"{self._who} must be entered inside a task, not a bare callback")
        if sim.loop is not None and sim.loop is not loop:
            raise RuntimeError(
                f"{self._who}: sim {sim.name!r} runs on another event loop than the task entering the scope"
            )
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _State.ENTERED
        self.entered_at = sim.now
        if self._delay is not None:
            self.deadline = sim.now + self._delay
            self._call = sim.call_at(self.deadline, self._expire)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        __tracebackhide__ = True  # pytest: the user's own lines come first in a timeout's traceback
        if self._call is not None:
            self._call.cancel()
            self._call = None
        state, self._state = self._state, _State.EXITED
        if state is not _State.EXPIRING:
            return False
        assert self._task is not None
        # Ours to convert only if no other cancellation is outstanding (an outer
        # scope, a cancel scope, the test framework): the asyncio.timeout rule.
        if self._task.uncancel() > self._cancelling or exc_type is None:
            return False
        if not issubclass(exc_type, asyncio.CancelledError):
            return False
        self.cancelled_caught = True
        if self._raise:
            err = TimeoutError(self._message())
            if self.blocked_at_expiry:
                err.add_note(_blocked_note(self.blocked_at_expiry))
            # The cause says where the block was when the deadline hit; kbus's own frames
            # (the engine's park, an inbox) say nothing to the reader, so only theirs stay.
            assert exc is not None
            raise err from exc.with_traceback(_without_kbus_frames(exc.__traceback__))
        return True

    async def __aenter__(self) -> TimeoutScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        __tracebackhide__ = True
        return self.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------- internals
    def _message(self) -> str:
        assert self._delay is not None and self.deadline is not None and self.entered_at is not None
        return (
            f"deadline of {format_time(self._delay)} device time passed: the scope entered at "
            f"{format_time(self.entered_at)} on sim {self.sim.name!r} was still running at "
            f"{format_time(self.deadline)}"
        )

    def _expire(self) -> None:
        """Timer callback at the deadline, run inside the engine's advance step."""
        self._call = None
        if self._state is not _State.ENTERED:
            return
        self._state = _State.EXPIRING
        self.expired = True
        sim = self.sim
        task = self._task
        assert task is not None and self._loop is not None
        if self._raise:  # only fail_after reports it; on a large device the list is long
            self.blocked_at_expiry = tuple(sim.blocked())
        if isinstance(task, SimTask):
            task.cancel()  # the simulated task is ready at once: time waits for it
            return
        task.cancel()
        # A host task is not counted, so hold time still until it has run once.
        sim.hold()
        self._loop.call_soon(sim.release)

    def __repr__(self) -> str:
        kind = "fail_after" if self._raise else "move_on_after"
        when = "no deadline" if self._delay is None else format_time(self._delay)
        return f"<kbus {kind} {when} {self._state.value}{' expired' if self.expired else ''}>"


_NOTE_LINES = 20


def _blocked_note(lines: tuple[str, ...]) -> str:
    """The note of a fail_after TimeoutError: what was blocked, the informative lines first.

    Idle service loops (daemons waiting on an empty inbox) are most of the
    list on a device and say least, so they go last and are cut first.
    """
    idle = [line for line in lines if "(daemon) waits on empty inbox" in line]
    busy = [line for line in lines if "(daemon) waits on empty inbox" not in line]
    ordered = busy + idle
    shown = "\n  ".join(ordered[:_NOTE_LINES])
    cut = len(ordered) - _NOTE_LINES
    more = f"\n  ... and {cut} more (idle blocks last; scope.blocked_at_expiry has them all)" if cut > 0 else ""
    return "blocked at the deadline:\n  " + shown + more


def fail_after(target: SimLike, delay: int | str | None) -> TimeoutScope:
    """Raise :class:`TimeoutError` if the block runs longer than ``delay`` of device time.

    ``target`` is a :class:`~kbus.Sim`, a Device or a runtime handle (its
    ``.sim`` is used). ``delay`` is integer picoseconds (``kbus.us(5)``), a
    duration string (``"5us"``) or None for no deadline. Use as ``with`` or
    ``async with`` inside a task. The error says the deadline and lists what
    the engine had blocked when it passed.
    """
    return TimeoutScope(target, delay, raise_on_expiry=True)


def move_on_after(target: SimLike, delay: int | str | None) -> TimeoutScope:
    """Stop the block quietly once ``delay`` of device time has passed.

    Like :func:`fail_after`, but the expiry cancels the block and execution
    continues after it; check ``scope.expired`` or ``scope.cancelled_caught``
    to see whether it finished.
    """
    return TimeoutScope(target, delay, raise_on_expiry=False)
