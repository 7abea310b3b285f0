"""Typed, bounded FIFO inboxes: the only way messages reach a block.

An inbox carries message objects (immutable attrs values), never bytes. It
hands a message straight to a waiting getter, and a getter that frees a slot
admits the oldest waiting putter, so order is FIFO on both sides without retry
loops. Blocking happens in virtual time through the engine, which is what makes
backpressure visible in simulated latency and deadlocks detectable.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .engine import Sim

M = TypeVar("M")

__all__ = ["Inbox", "InboxFull"]


class InboxFull(Exception):
    """Raised by :meth:`Inbox.put_nowait` when the inbox is at capacity."""


class Inbox(Generic[M]):
    """A typed, bounded FIFO of messages owned by one block.

    ``accepts`` lists the message classes the inbox takes; anything else is a
    ``TypeError`` naming the inbox and the type, raised at the sender.
    ``transform``, if given, is applied to every message on entry; the device
    uses it for its debug *wire* mode, which round-trips each message through
    the codec to prove it is serializable.
    """

    __slots__ = (
        "_accepts",
        "_getters",
        "_items",
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
        self._getters: deque[asyncio.Future[M]] = deque()
        # Waiting putters: (future of a blocked task or None, message, callback or None).
        self._putters: deque[tuple[asyncio.Future[None] | None, M, Callable[[], object] | None]] = deque()
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
            g = getters.popleft()
            if not g.done():
                self.received += 1
                g.set_result(msg)  # Sim._wake, inlined on the hottest path
                self._sim._runnable += 1
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

    async def put(self, msg: M) -> None:
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
        fut: asyncio.Future[None] = (sim._loop or sim._loop_bound()).create_future()
        self._putters.append((fut, msg, None))
        handle = sim._park(fut, "put", self)
        try:
            await fut
        finally:
            sim._unpark(handle, fut)

    def put_later(self, msg: M, on_admit: Callable[[], object]) -> None:
        """Queue ``msg`` behind the blocked putters and call ``on_admit`` when it is in.

        Used by links, which are not tasks: the link stalls until its message
        is admitted (backpressure without a task per message).
        """
        self._putters.append((None, msg, on_admit))

    async def get(self) -> M:
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
        fut: asyncio.Future[M] = (sim._loop or sim._loop_bound()).create_future()
        self._getters.append(fut)
        handle = sim._park(fut, "get", self)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # A message was handed to us just before the cancellation: keep it.
                self._give_back(fut.result())
            raise
        finally:
            sim._unpark(handle, fut)

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

    def _admit(self) -> None:
        """A slot freed up: move the oldest live putter's message in."""
        putters = self._putters
        while putters:
            fut, msg, on_admit = putters.popleft()
            if fut is not None and fut.done():
                continue  # its task was cancelled before admission
            self._items.append(msg)
            self.received += 1
            if fut is not None:
                self._sim._wake(fut, None)
            elif on_admit is not None:
                on_admit()
            return

    def _give_back(self, msg: M) -> None:
        getters = self._getters
        while getters:
            g = getters.popleft()
            if not g.done():
                self._sim._wake(g, msg)
                return
        self._items.appendleft(msg)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<Inbox {self.name!r} {len(self._items)}/{self.capacity}>"
