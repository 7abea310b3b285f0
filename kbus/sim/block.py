"""Block: the base class of every hardware block.

A block is a named service loop (a daemon task) that takes messages from its
own typed inbox one at a time and handles them. It keeps the counters that
statistics and traces read: messages in and out, bytes sent, and busy
picoseconds. Subclasses implement :meth:`Block.handle`.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from .inbox import Inbox

if TYPE_CHECKING:
    from .engine import Sim, SimTask
    from .link import Link

__all__ = ["Block"]


@types.coroutine
def _idle() -> Generator[Any, Any, None]:
    """An awaitable that completes at once (a zero-length busy period)."""
    yield from ()


class Block:
    """A hardware block: a dotted ``name`` (``sip0.cube1.pe3.dma``), an inbox and a ``run()`` loop."""

    kind: ClassVar[str] = "block"
    """Short block type name (``"PE_DMA"``) used by statistics and traces."""

    def __init__(
        self,
        sim: Sim,
        name: str,
        *,
        accepts: Iterable[type] = (object,),
        capacity: int = 64,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.sim = sim
        self.name = name
        self.inbox: Inbox[Any] = Inbox(sim, accepts, capacity, name=name, transform=transform)
        self.msgs_in = 0
        self.msgs_out = 0
        self.bytes_out = 0
        self.busy_ps = 0
        self.task: SimTask[None] | None = None
        self.on_busy: Any = None
        """Hook ``on_busy(block, start_ps, end_ps, label)`` for tracing; None costs nothing."""

    def start(self) -> SimTask[None]:
        """Spawn the service loop as a daemon task (idempotent)."""
        if self.task is None or self.task.done():
            self.task = self.sim.spawn(self.run(), name=self.name, daemon=True)
        return self.task

    async def run(self) -> None:
        """Take messages one at a time and :meth:`handle` each."""
        get = self.inbox.get
        while True:
            msg = await get()
            self.msgs_in += 1
            await self.handle(msg)

    async def handle(self, msg: Any) -> None:
        """Handle one message. Subclasses override this."""
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) does not handle {type(msg).__name__}")

    def busy(self, ps: int, label: str = "busy") -> Awaitable[None]:
        """Spend ``ps`` picoseconds working (counted as busy time); await the result.

        This is the engine's sleep itself, not a coroutine around it: one
        frame less on every block's busiest path. A sleep in virtual time ends
        exactly when planned, so the ``on_busy`` hook is told the whole span
        (start, start + ps) as it begins, and the busy time is counted then too
        (a block cancelled mid-span, which only happens at shutdown, keeps it).
        """
        if ps <= 0:
            return _idle()
        self.busy_ps += ps
        sim = self.sim
        if self.on_busy is not None:
            now = sim.now
            self.on_busy(self, now, now + ps, label)
        return sim.sleep(ps)

    def send(self, link: Link, msg: Any, inbox: Inbox[Any], nbytes: int = 0) -> Coroutine[Any, Any, None]:
        """Send ``msg`` over ``link`` to ``inbox``, counting it as output of this block; await the result.

        A plain function returning the link's coroutine rather than a
        coroutine of its own: one frame less for every resumption of a
        sending block (``await block.send(...)`` reads the same).
        """
        self.msgs_out += 1
        self.bytes_out += nbytes
        return link.send(msg, inbox, nbytes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
