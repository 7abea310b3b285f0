"""Links: latency plus bandwidth between a sender and an inbox.

A message of ``nbytes`` sent at ``now`` starts when the link is free, occupies
it for ``nbytes / bandwidth`` (serialization), and arrives ``latency`` later::

    start   = max(now, link_free)
    done    = start + ceil(nbytes * 1e12 / bandwidth)     # the sender waits until here
    deliver = done + latency                              # the inbox gets it here

The sender is held only for the serialization (occupancy), so several
messages can be in flight on a long link at once, and back-to-back messages
queue behind each other. Delivery is a timer callback, not a task. If the
destination inbox is full on arrival the link *stalls*: the message waits at the
inbox, later messages wait behind it (order is preserved), and the next sender
blocks until the inbox takes it: backpressure in virtual time.

:meth:`Link.carry` reserves the link for a bulk transfer without a message
(data moved by DMA): it waits for occupancy plus latency and returns.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .units import S, format_bandwidth, format_time

if TYPE_CHECKING:
    from .engine import Sim, Waiter
    from .inbox import Inbox

__all__ = ["Link"]


class Link:
    """A point-to-point hop with ``latency`` (ps) and ``bandwidth`` (bytes/s or None for infinite)."""

    __slots__ = (
        "_deliver_cb",
        "_free_at",
        "_inflight",
        "_sim",
        "_stall_waiters",
        "bandwidth",
        "busy_ps",
        "bytes",
        "latency",
        "messages",
        "name",
        "on_send",
        "stalled_on",
    )

    def __init__(self, sim: Sim, latency: int = 0, bandwidth: int | None = None, name: str = "link") -> None:
        if isinstance(latency, bool) or not isinstance(latency, int):
            raise TypeError(f"link {name!r}: latency must be integer picoseconds, got {type(latency).__name__}")
        if latency < 0:
            raise ValueError(f"link {name!r}: latency must be >= 0 ps, got {latency}")
        if bandwidth is not None:
            if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
                raise TypeError(f"link {name!r}: bandwidth must be bytes/s or None, got {type(bandwidth).__name__}")
            if bandwidth <= 0:
                raise ValueError(
                    f"link {name!r}: bandwidth must be > 0 bytes/s (or None for infinite), got {bandwidth}"
                )
        self._sim = sim
        self.name = name
        self.latency = latency
        self.bandwidth = bandwidth
        self._free_at = 0
        self._inflight: deque[tuple[int, Any, Inbox[Any]]] = deque()
        self._deliver_cb = self._deliver  # one bound method, not one per message
        self._stall_waiters: deque[Waiter] = deque()
        self.stalled_on: str | None = None
        self.messages = 0
        self.bytes = 0
        self.busy_ps = 0
        self.on_send: Any = None
        """Hook ``on_send(link, msg, nbytes, start_ps, deliver_ps)`` for tracing; None costs nothing."""

    def serialization(self, nbytes: int) -> int:
        """Picoseconds that ``nbytes`` occupy the link (rounded up)."""
        bw = self.bandwidth
        if bw is None or nbytes <= 0:
            return 0
        if type(bw) is int:
            return -(-nbytes * S // bw)
        return int(-(-nbytes * S // bw))

    def cost(self, nbytes: int) -> int:
        """Idle-link time from send to delivery: serialization + latency."""
        return self.serialization(nbytes) + self.latency

    @property
    def free_at(self) -> int:
        """Virtual time at which the link finishes its current occupancy."""
        return self._free_at

    async def _wait_stall(self) -> None:
        """Hold the sender while the link's head message waits at a full inbox (backpressure)."""
        sim = self._sim
        while self.stalled_on is not None:
            w = sim.waiter()
            self._stall_waiters.append(w)
            try:
                await sim.park(w, self)
            except BaseException:
                if not w.woken:
                    self._stall_waiters.remove(w)
                raise

    def _book(self, at: int, nbytes: int) -> int:
        """Occupy the link for ``nbytes`` from ``max(at, free_at)``; return when serialization ends."""
        start = self._free_at if self._free_at > at else at
        ser = self.serialization(nbytes)
        done = start + ser
        self._free_at = done
        self.messages += 1
        self.bytes += nbytes
        self.busy_ps += ser
        return done

    async def send(self, msg: Any, inbox: Inbox[Any], nbytes: int = 0) -> None:
        """Send ``msg`` to ``inbox``; returns once the link has taken it (after serialization).

        The inbox type check happens here, at the sender, so a wrong message
        type fails in the task that sent it.
        """
        if nbytes < 0:
            raise ValueError(f"link {self.name!r}: nbytes must be >= 0, got {nbytes}")
        inbox.check(msg)
        if inbox.transform is not None:
            msg = inbox.transform(msg)
        sim = self._sim
        now = t0 = sim.now
        if self.stalled_on is not None:
            await self._wait_stall()
            now = sim.now
        # _book and serialization inlined: this is every block's hottest path.
        free = self._free_at
        start = free if free > now else now
        bw = self.bandwidth
        if bw is None or nbytes <= 0:
            ser = 0
        elif type(bw) is int:
            ser = -(-nbytes * S // bw)
        else:
            ser = int(-(-nbytes * S // bw))
        done = start + ser
        self._free_at = done
        self.messages += 1
        self.bytes += nbytes
        self.busy_ps += ser
        if done > now:
            await sim.sleep(done - now)
            now = done  # a sleep resumes exactly at its deadline
        deliver = done + self.latency
        if self.on_send is not None:
            self.on_send(self, msg, nbytes, t0, deliver)
        if deliver <= now and not self._inflight and self.stalled_on is None:
            if not inbox.offer(msg):
                self._stall(msg, inbox)
            return
        self._inflight.append((deliver, msg, inbox))
        sim.call_at(deliver, self._deliver_cb)

    async def carry(self, nbytes: int) -> int:
        """Move ``nbytes`` of bulk data across the link; return the arrival time (ps).

        Returns once the data has arrived (occupancy + latency), which is how
        DMA transfers are costed hop by hop.
        """
        if nbytes < 0:
            raise ValueError(f"link {self.name!r}: nbytes must be >= 0, got {nbytes}")
        sim = self._sim
        t0 = sim.now
        if self.stalled_on is not None:
            await self._wait_stall()
        now = sim.now
        done = self._book(now, nbytes)
        if done > now:
            await sim.sleep(done - now)
        deliver = done + self.latency
        if self.on_send is not None:
            self.on_send(self, None, nbytes, t0, deliver)
        if deliver > sim.now:
            await sim.sleep(deliver - sim.now)
        return deliver

    def reserve(self, at: int, nbytes: int) -> int:
        """Book the link for ``nbytes`` starting no earlier than ``at``; return the arrival time.

        Synchronous and without a message: bulk transfers along a multi-hop
        route book each hop in turn (store-and-forward) and then sleep once
        until the last arrival, instead of one sleep per hop.
        """
        done = self._book(at, nbytes)
        deliver = done + self.latency
        if self.on_send is not None:
            self.on_send(self, None, nbytes, done - self.serialization(nbytes), deliver)
        return deliver

    def _deliver(self) -> None:
        inflight = self._inflight
        now = self._sim.now
        while inflight and self.stalled_on is None and inflight[0][0] <= now:
            _, msg, inbox = inflight.popleft()
            if not inbox.offer(msg):
                self._stall(msg, inbox)

    def describe_wait(self) -> str:
        """What a sender held by this link's stall waits for (the deadlock report's words)."""
        return f"stalled link {self.name!r} (its inbox {self.stalled_on!r} is full)"

    def _stall(self, msg: Any, inbox: Inbox[Any]) -> None:
        # The inbox reports the held message itself while it waits (Inbox.put_later).
        self.stalled_on = inbox.name
        inbox.put_later(msg, self._unstall)

    def _unstall(self) -> None:
        self.stalled_on = None
        waiters = self._stall_waiters
        wake = self._sim.wake
        while waiters:
            wake(waiters.popleft())
        self._deliver()

    def __repr__(self) -> str:
        bw = "inf" if self.bandwidth is None else format_bandwidth(self.bandwidth)
        return f"<Link {self.name!r} {format_time(self.latency)} {bw}>"
