"""The runtime's work queue: commands run in order of their dependencies, never blocking the host.

Every factory and operation puts one :class:`Command` on the
:class:`CommandQueue`. A simulated daemon task takes commands off the queue in
FIFO order and starts each as a simulated task; a command first waits for the
commands that produce its inputs (``deps``) and, softly, for those it must not
overtake (``soft``: readers of memory it overwrites, work on memory it
unmaps), maps its output's VA range, then runs its ``work``. Commands with no
dependency between them overlap on the device; the engine breaks ties by
insertion order, so the same program always takes the same virtual time.

A command that fails stores its error in its future, naming the operation;
commands that depend on it fail the same way (:class:`InputFailed`);
everything else carries on.

Some work reports its failure as its *result* (a kernel launch: the tensors it
did not write stay usable). Such a failure is registered as a
:class:`FailureReport` among the queue's in-flight entries until someone
observes it (awaits the launch, a tensor it failed to write, or work that
depended on one); an entry whose wait raises while it is not done is what
``synchronize()`` re-raises, so an unobserved failure surfaces there (and at
device close) at the latest, and warns if it is never observed at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError
from ..sim import Inbox, Sim, SimFuture

if TYPE_CHECKING:
    from .tensor import _Storage

__all__ = ["Command", "CommandQueue", "FailureReport", "InputFailed", "observe"]

Mapper = Callable[["_Storage", list[SimFuture[Any]]], Coroutine[Any, Any, BaseException | None]]
"""Maps a new tensor's VA range after the given unmaps; returns the error instead of raising."""


class Command:
    """One unit of queued work; ``done`` resolves with its result or its (wrapped) error.

    ``deps`` are ``(future, storage)`` pairs whose failure fails this command;
    ``soft`` futures are only waited for; ``creates`` lists the new storages
    to map with the unmaps they must wait for; ``reads`` the storages this
    command reads (their frees wait for it).
    """

    __slots__ = ("after", "creates", "deps", "done", "label", "reads", "soft", "work")

    def __init__(
        self,
        label: str,
        done: SimFuture[Any],
        work: Callable[[], Awaitable[Any]] | None,
        *,
        deps: Sequence[tuple[SimFuture[Any], _Storage]] = (),
        soft: Sequence[SimFuture[Any]] = (),
        creates: Sequence[tuple[_Storage, list[SimFuture[Any]]]] = (),
        reads: Sequence[_Storage] = (),
        after: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        self.after = after
        """Called with (result, error) right after ``done`` is resolved."""
        self.label = label
        self.done = done
        self.work = work
        self.deps = deps
        self.soft = soft
        self.creates = creates
        self.reads = reads


class InputFailed(Exception):
    """An input of a command is unavailable because the command that produced it failed."""

    def __init__(self, storage: _Storage, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.storage = storage
        self.cause = cause


def _root(exc: BaseException) -> str:
    root = getattr(exc, "kbus_root", None)
    return root if isinstance(root, str) else f"{type(exc).__name__}: {exc}"


class FailureReport:
    """A failure that work returned as its result, waiting for someone to observe it.

    It sits among :attr:`CommandQueue.inflight` until observed. Awaiting it
    raises the failure and counts as observing it; :meth:`done` stays False,
    so ``synchronize()`` (which re-raises a wait that fails on an entry not
    yet done) raises it. Dropped unobserved, it warns (``RuntimeWarning``).
    """

    __slots__ = ("error", "label", "observed", "queue")

    def __init__(self, queue: CommandQueue, error: BaseException, label: str) -> None:
        self.queue = queue
        self.error = error
        self.label = label
        self.observed = False
        error.kbus_report = self  # type: ignore[attr-defined]
        queue.inflight[self] = None

    def observe(self) -> None:
        """The failure reached a user: it is no longer reported."""
        self.observed = True
        self.queue.inflight.pop(self, None)

    def done(self) -> bool:
        return False

    def __await__(self) -> Generator[Any, None, None]:
        return self._raise().__await__()

    async def _raise(self) -> None:
        self.observe()
        raise self.error

    def __del__(self) -> None:
        if not self.observed:
            warnings.warn(f"{self.label} failed and nothing observed it: {self.error}", RuntimeWarning, stacklevel=1)


def observe(exc: BaseException) -> None:
    """Mark the failures behind ``exc`` (its chain of causes) observed: ``exc`` is being raised to a user."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            return
        report = getattr(seen, "kbus_report", None)
        if isinstance(report, FailureReport):
            report.observe()
        seen = seen.__cause__


class CommandQueue:
    """The FIFO of :class:`Command` objects and the simulated daemon that starts them."""

    def __init__(self, sim: Sim, name: str, mapper: Mapper) -> None:
        self.sim = sim
        self.name = name
        self._mapper = mapper
        self.inflight: dict[SimFuture[Any] | FailureReport, None] = {}
        """Futures of the commands queued or running (in queue order), and unobserved failure reports."""
        self._inbox: Inbox[Command] = Inbox(sim, (Command,), capacity=1 << 40, name=name)
        self._dispatcher = sim.spawn(self._dispatch(), name=f"{name}.dispatch", daemon=True)

    def enqueue(self, cmd: Command) -> None:
        self.inflight[cmd.done] = None
        for st in cmd.reads:
            st.readers[cmd.done] = None
        self._inbox.put_nowait(cmd)

    async def _dispatch(self) -> None:
        get = self._inbox.get
        spawn = self.sim.spawn
        while True:
            cmd = await get()
            spawn(self._run(cmd), name=cmd.label)
            # Do not pin the last command (an upload's closure holds its host
            # snapshot) while waiting for the next one.
            del cmd

    async def _run(self, cmd: Command) -> None:
        error: BaseException | None = None
        result: Any = None
        maps = [self.sim.spawn(self._mapper(st, waits), name=f"map {st.name}") for st, waits in cmd.creates]
        try:
            for fut, st in cmd.deps:
                try:
                    await fut
                except Exception as exc:
                    raise InputFailed(st, exc) from exc
            for fut in cmd.soft:
                try:
                    await fut
                except Exception:
                    pass
        except Exception as exc:
            error = exc
        for m in maps:
            err = await m
            if error is None and err is not None:
                error = err
        work, cmd.work = cmd.work, None  # the closure (and an upload's snapshot) dies with the work
        if error is None and work is not None:
            try:
                result = await work()
            except Exception as exc:
                error = exc
        del work
        wrapped = None if error is None else CommandQueue._wrap(cmd, error)
        if wrapped is None:
            cmd.done.set_result(result)
        else:
            cmd.done.set_exception(wrapped)
        if cmd.after is not None:
            cmd.after(result, wrapped)
        self.inflight.pop(cmd.done, None)
        for st in cmd.reads:
            st.readers.pop(cmd.done, None)

    @staticmethod
    def _wrap(cmd: Command, exc: BaseException) -> BaseException:
        """The error a failed command leaves in its future: names the operation and its tensors."""
        responses: tuple[Any, ...] = ()
        if isinstance(exc, InputFailed):
            cause = exc.cause
            observe(cause)  # handed on: this command's failure now carries it
            root = _root(cause)
            msg = (
                f"{cmd.label}: input {exc.storage.describe()} is unavailable because an earlier command failed: {root}"
            )
            kind: type[DeviceError] = type(cause) if isinstance(cause, DeviceError) else DeviceError
            responses = cause.responses if isinstance(cause, DeviceError) else ()
        else:
            kind = type(exc) if isinstance(exc, DeviceError) else DeviceError
            responses = exc.responses if isinstance(exc, DeviceError) else ()
            detail = str(exc) if isinstance(exc, DeviceError) else f"{type(exc).__name__}: {exc}"
            msg = root = f"{cmd.label} failed: {detail}"
        try:
            new = kind(msg, responses)
        except TypeError:
            new = DeviceError(msg, responses)
        new.kbus_root = root  # type: ignore[attr-defined]
        new.__cause__ = exc.cause if isinstance(exc, InputFailed) else exc
        return new

    async def synchronize(self) -> None:
        """Wait until every queued command (including frees) has finished.

        Failures of commands are not raised here; they stay with the tensors
        they concern. An unobserved :class:`FailureReport` and a
        :class:`~kbus.DeadlockError` (work that can never finish) are raised.
        """
        while self.inflight:
            for fut in list(self.inflight):
                try:
                    await fut
                except Exception:
                    if not fut.done():  # not the command's own failure: the wait itself failed
                        raise
