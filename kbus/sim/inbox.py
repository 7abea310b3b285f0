"""Typed, bounded FIFO inboxes: the only way messages reach a block.

An inbox carries message objects (immutable attrs values), never bytes. It
hands a message straight to a waiting getter, and a getter that frees a slot
admits the oldest waiting putter, so order is FIFO on both sides without retry
loops. Blocking happens in virtual time through the engine's wait contract
(:meth:`Sim.park` / :meth:`Sim.wake`), which is what makes backpressure visible
in simulated latency and deadlocks detectable.

Its waits describe themselves ("empty inbox 'x'", "full inbox 'x' (4/4)"),
and while messages offered with :meth:`Inbox.put_later` wait to enter, the
inbox adds a line per message to the deadlock report, so a link or a network
model that leaves them there needs no engine registration of its own.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .engine import PARKED, SimTask

if TYPE_CHECKING:
    from .engine import Sim, Waiter

M = TypeVar("M")

__all__ = ["Inbox", "InboxFull"]


class InboxFull(Exception):
    """Raised by :meth:`Inbox.put_nowait` when the inbox is at capacity."""


class _InboxWait:
    """What a task parked on an inbox waits for (one per inbox and direction, made once)."""

    __slots__ = ("full", "inbox")

    def __init__(self, inbox: Inbox[Any], full: bool) -> None:
        self.inbox = inbox
        self.full = full

    def describe_wait(self) -> str:
        box = self.inbox
        if self.full:
            return f"full inbox {box.name!r} ({box.qsize()}/{box.capacity})"
        return f"empty inbox {box.name!r}"


class Inbox(Generic[M]):
    """A typed, bounded FIFO of messages owned by one block.

    ``accepts`` lists the message classes the inbox takes; anything else is a
    ``TypeError`` naming the inbox and the type, raised at the sender.
    ``transform``, if given, is applied to every message on entry; the device
    uses it for its debug *wire* mode, which round-trips each message through
    the codec to prove it is serializable.
    """

    __slots__ = (
        "__weakref__",
        "_accepts",
        "_empty_wait",
        "_full_wait",
        "_getters",
        "_items",
        "_later",
        "_putters",
        "_sim",
        "capacity",
        "max_depth",
        "name",
        "on_depth",
        "received",
        "transform",
    )

    def __init__(
        self,
        sim: Sim,
        accepts: Iterable[type] = (object,),
        capacity: int = 64,
        name: str = "inbox",
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"inbox {name!r}: capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"inbox {name!r}: capacity must be >= 1, got {capacity}")
        accepts = tuple(accepts)
        if not accepts or not all(isinstance(t, type) for t in accepts):
            raise TypeError(f"inbox {name!r}: accepts must be a non-empty tuple of classes, got {accepts!r}")
        self._sim = sim
        self._accepts = accepts
        self.capacity = capacity
        self.name = name
        self.transform = transform
        self._items: deque[M] = deque()
        self._getters: deque[Waiter] = deque()
        # Waiting putters, oldest first: (waiter of a blocked task or None, message, on_admit or None).
        self._putters: deque[tuple[Waiter | None, M, Callable[[], object] | None]] = deque()
        self._later = 0  # how many of the putters came through put_later
        self._empty_wait = _InboxWait(self, full=False)
        self._full_wait = _InboxWait(self, full=True)
        self.max_depth = 0
        self.received = 0
        self.on_depth: Callable[[Inbox[Any], int], object] | None = None
        """Hook called with the new depth whenever it changes (tracing); None costs nothing."""

    @property
    def accepts(self) -> tuple[type, ...]:
        return self._accepts

    def qsize(self) -> int:
        """Messages currently queued (not counting blocked putters)."""
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def empty(self) -> bool:
        return not self._items

    def check(self, msg: object) -> None:
        """Raise ``TypeError`` unless this inbox accepts ``msg``."""
        if not isinstance(msg, self._accepts):
            names = ", ".join(t.__name__ for t in self._accepts)
            raise TypeError(f"inbox {self.name!r} accepts {names}; got {type(msg).__name__}")

    def offer(self, msg: M) -> bool:
        """Try to enqueue without blocking; True if the message was taken.

        The message must already have passed :meth:`check` and ``transform``
        (senders apply both, so a message that cannot cross this inbox fails in
        the task that sent it, never inside the engine).
        """
        getters = self._getters
        while getters:
            if self._sim.wake(getters.popleft(), msg):
                self.received += 1
                return True
        items = self._items
        if len(items) < self.capacity:
            items.append(msg)
            self.received += 1
            n = len(items)
            if n > self.max_depth:
                self.max_depth = n
            if self.on_depth is not None:
                self.on_depth(self, n)
            return True
        return False

    def put_nowait(self, msg: M) -> None:
        """Enqueue at once or raise :class:`InboxFull`."""
        self.check(msg)
        if self.transform is not None:
            msg = self.transform(msg)
        if not self.offer(msg):
            raise InboxFull(f"inbox {self.name!r} is full ({self.capacity} messages)")

    @types.coroutine
    def put(self, msg: M) -> Generator[Any, Any, None]:
        """Enqueue, blocking in virtual time while the inbox is full.

        If the putting task is cancelled after its message was admitted, the
        message stays delivered (it is never lost or duplicated).
        """
        self.check(msg)
        if self.transform is not None:
            msg = self.transform(msg)
        if self.offer(msg):
            return
        sim = self._sim
        w = sim.waiter()
        entry = (w, msg, None)
        self._putters.append(entry)
        try:
            yield from sim.park(w, self._full_wait)
        except BaseException:
            if not w.woken:
                self._putters.remove(entry)  # withdrawn before admission: the message never entered
            raise

    def put_later(self, msg: M, on_admit: Callable[[], object]) -> None:
        """Queue ``msg`` behind the blocked putters and call ``on_admit`` when it is in.

        Used by links, which are not tasks: the link stalls until its message
        is admitted (backpressure without a task per message). Until then the
        message shows in the deadlock report, attributed to ``on_admit``'s owner.
        """
        self._putters.append((None, msg, on_admit))
        self._later += 1
        if self._later == 1:
            self._sim.add_report_source(self)

    @types.coroutine
    def get(self) -> Generator[Any, Any, M]:
        """Take the oldest message, blocking in virtual time while empty."""
        items = self._items
        if items:
            msg = items.popleft()
            if self._putters:
                self._admit()
            if self.on_depth is not None:
                self.on_depth(self, len(items))
            return msg
        sim = self._sim
        w = sim.waiter()
        self._getters.append(w)
        try:
            if type(w) is SimTask:
                # Sim.park inlined for a simulated task (every idle block waits here).
                w.reason = self._empty_wait
                w.woken = False
                got: M = yield PARKED
            else:
                got = yield from sim.park(w, self._empty_wait)
        except BaseException:
            if w.woken:
                # A message was handed to us just before the cancellation: keep it.
                self._give_back(w.value)
            else:
                self._getters.remove(w)
            raise
        return got

    def get_nowait(self) -> M:
        """Take the oldest message or raise ``asyncio.QueueEmpty``."""
        if not self._items:
            raise asyncio.QueueEmpty(f"inbox {self.name!r} is empty")
        msg = self._items.popleft()
        if self._putters:
            self._admit()
        if self.on_depth is not None:
            self.on_depth(self, len(self._items))
        return msg

    def blocked_lines(self) -> list[str]:
        """One deadlock-report line per message waiting to enter through :meth:`put_later`."""
        lines = []
        for w, msg, on_admit in self._putters:
            if w is None:
                lines.append(
                    f"{_owner(on_admit)} holds a message ({type(msg).__name__}) for full inbox {self.name!r} "
                    f"({len(self._items)}/{self.capacity})"
                )
        return lines

    def _admit(self) -> None:
        """A slot freed up: move the oldest putter's message in."""
        putters = self._putters
        while putters:
            w, msg, on_admit = putters.popleft()
            if w is not None:
                if not self._sim.wake(w):
                    continue  # withdrawn (defensive: cancelled putters remove themselves)
            else:
                self._later -= 1
                if self._later == 0:
                    self._sim.discard_report_source(self)
            self._items.append(msg)
            self.received += 1
            if on_admit is not None:
                on_admit()
            return

    def _give_back(self, msg: M) -> None:
        getters = self._getters
        while getters:
            if self._sim.wake(getters.popleft(), msg):
                return
        self._items.appendleft(msg)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<Inbox {self.name!r} {len(self._items)}/{self.capacity}>"


def _owner(on_admit: Callable[[], object] | None) -> str:
    """Who left a message at the inbox: the owner of the callback (``link 'x'``), else the callback."""
    owner = getattr(on_admit, "__self__", None)
    name = getattr(owner, "name", None)
    if owner is not None and isinstance(name, str):
        return f"{type(owner).__name__.lower()} {name!r}"
    return f"callback {getattr(on_admit, '__qualname__', repr(on_admit))}"
