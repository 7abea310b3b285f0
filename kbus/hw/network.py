"""The data plane: links and memory channels shared by flows.

Every byte that moves inside the device — a control message over one link, a
DMA transfer over a route of links and a memory channel — is a :class:`Flow`
over a sequence of :class:`NetLink` resources. The network decides when each
flow's last byte leaves; the flow's owner learns it through a callback.

Flow model (``fabric.model = "flow"``, the default)
---------------------------------------------------
A flow is pipelined across its hops: it occupies every resource of its route
at once, at one rate, and arrives ::

    arrive = start + ceil(nbytes / rate) + sum(latency of every hop)

when it has the route to itself (``rate`` = the smallest bandwidth on the
route). Concurrent flows share each resource by **max-min fairness**
(progressive filling: the most constrained resource splits what it has left
equally among its unfixed flows, those flows are fixed at that share, repeat).
Rates are recomputed only when a flow starts or ends, and only for the
connected component of flows that share a resource with it; flows whose rate
did not change keep their completion timer. This is the flow-level model of
SimGrid and of ASTRA-sim's congestion-aware backend: its cost is a few events
per flow, not per packet.

Two economies keep that cost near one event per message, as cheap as the
store-and-forward links kbus had before:

* a flow alone on its route is *lazy*: it needs no rate computation and no
  timer of its own, because its owner (a sender, a DMA engine) wakes at the
  flow's deadline anyway and retires it then. A flow that joins one of its
  links first retires it (deadline passed) or wakes it up (it gets a timer and
  its share) — never later than its deadline, since company only slows a flow;
* flows that start or end at the same virtual time are shared out once, after
  all of them (no time passes in between, so the rates are the same).

Arithmetic is exact and platform independent: a rate is an integer number of
bytes per second (a fair share is rounded down, losing < 1 B/s per flow), and
a flow's progress is kept in integer *byte-picoseconds* (``nbytes * 10**12``
minus ``rate * elapsed_ps``), so completion times are exact integer ceilings
and never drift. Nothing is booked in the future: a resource's busy time is
the integral of the rate allocated on it divided by its bandwidth, so it can
never exceed the elapsed time.

Packet model (``fabric.model = "packet"``)
------------------------------------------
The reference the flow model is validated against: a flow is cut into packets
of ``fabric.packet_bytes``; the source injects the next packet when the
previous one has left its first hop; each hop serves packets first come, first
served, and forwards them cut-through (a packet's head moves on after the
hop's latency; its tail cannot leave a hop before it has arrived there). One
event per packet per hop: exact in detail, slow for big transfers.

Statistics
----------
Each resource counts the flows that crossed it (``messages``), their
``bytes``, its ``busy_ps`` and the *queueing delay* of each flow: its drain
time minus what it would have taken on an idle route.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..sim.units import S, format_bandwidth, format_time

if TYPE_CHECKING:
    from ..sim import Inbox, Sim, SimFuture

__all__ = [
    "MODELS",
    "Flow",
    "NetLink",
    "Network",
    "cube_edges",
    "cube_route",
    "draw",
    "ring_walk",
    "sip_edges",
    "topology_text",
]

MODELS = ("flow", "packet")
"""The values ``fabric.model`` accepts."""

OnEnd = Callable[["Flow", int], object]
"""``on_end(flow, arrive_ps)``: called when the flow's last byte has left (``arrive_ps`` >= now)."""


class Flow:
    """One transfer of ``nbytes`` over ``links``; see the module docstring for its timing."""

    __slots__ = (
        "_new",
        "_seen",
        "ctx",
        "deadline",
        "done",
        "ideal",
        "latency",
        "lazy",
        "links",
        "msg",
        "nbytes",
        "npk",
        "on_end",
        "owner_timer",
        "rate",
        "remaining",
        "retired",
        "start",
        "t_upd",
        "timer",
        "withdrawn",
    )

    def __init__(self, links: Sequence[NetLink], nbytes: int, on_end: OnEnd, msg: Any, ctx: Any, now: int) -> None:
        self.links = links
        self.nbytes = nbytes
        self.on_end = on_end
        self.msg = msg
        """The message carried (None for bulk data); shown by the tracing hook."""
        self.ctx = ctx
        """Whatever the owner needs back in ``on_end``."""
        self.start = now
        self.remaining = nbytes * S  # byte-picoseconds still to drain (flow model)
        self.rate = 0  # bytes/s currently allocated (flow model)
        self.t_upd = now  # when ``remaining`` was last brought up to date
        self.timer: Any = None  # the armed completion callback (flow model)
        self.npk = 0  # packets (packet model)
        self.withdrawn = False
        self.latency = 0  # sum of the route's latencies
        self.ideal = 0  # ps the bytes take alone on the route (for the queueing statistics)
        self.done = False  # its last byte has left
        self.retired = False  # done while lazy: on_end was not called, its owner carries on
        self.lazy = False  # alone on its route: no timer of its own, see Network.start
        self.deadline = 0  # when a lazy flow drains
        self.owner_timer: Any = None  # the owner's callback at a lazy flow's arrival, cancelled if it slows down
        self._seen = 0  # scratch of Network._reshare: the pass that last visited this flow
        self._new = 0  # scratch of Network._reshare: the rate given in that pass (0: not fixed yet)

    def __repr__(self) -> str:
        route = " -> ".join(link.name for link in self.links)
        return f"<Flow {self.nbytes} B over {route} rate={format_bandwidth(self.rate)}>"


class NetLink:
    """A shared resource: a link (``"src->dst"``) or a memory channel, with latency and bandwidth.

    For blocks it is a port: :meth:`send` carries one message to an inbox.
    ``messages``, ``bytes``, ``busy_ps`` and the ``on_send`` hook keep the
    shape of :class:`kbus.sim.Link`, so tracing and statistics read both alike.
    """

    __slots__ = (
        "_cap",
        "_carrying",
        "_cnt",
        "_delays",
        "_held",
        "_seen",
        "_stall_waiters",
        "alloc",
        "bandwidth",
        "bytes",
        "flows",
        "free_at",
        "kind",
        "latency",
        "lazy",
        "level",
        "messages",
        "name",
        "net",
        "on_send",
        "reverse",
        "stalled_on",
        "t_mark",
        "work",
    )

    def __init__(self, net: Network, name: str, latency: int, bandwidth: int, level: str, kind: str = "link") -> None:
        if isinstance(latency, bool) or not isinstance(latency, int) or latency < 0:
            raise ValueError(f"{kind} {name!r}: latency must be integer picoseconds >= 0, got {latency!r}")
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth <= 0:
            raise ValueError(f"{kind} {name!r}: bandwidth must be integer bytes/s > 0, got {bandwidth!r}")
        self.net = net
        self.name = name
        self.latency = latency
        self.bandwidth = bandwidth
        self.level = level
        """The configuration entry this resource was built from (``"noc_hop"``, ``"hbm"``...)."""
        self.kind = kind
        """``"link"`` or ``"memory"``."""
        self.reverse: NetLink | None = None
        """The link in the opposite direction, recorded when the pair is built."""
        self.flows: dict[Flow, None] = {}
        self.alloc = 0  # sum of the rates of ``flows`` (bytes/s)
        self.work = 0  # byte-picoseconds carried up to ``t_mark``
        self.t_mark = 0
        self.free_at = 0  # packet model: when the last queued packet leaves
        self.lazy: Flow | None = None  # the lazy flow alone on this resource, if any
        self.messages = 0
        self.bytes = 0
        self._delays = array("q")
        self._held: deque[tuple[Any, Inbox[Any]]] = deque()
        self._stall_waiters: list[SimFuture[None]] = []
        self.stalled_on: str | None = None
        self._carrying = f"link {name!r} carrying a message"
        self._seen = 0  # scratch of Network._reshare: the pass that last visited this resource
        self._cap = 0  # scratch of Network._reshare: bandwidth not yet given to fixed flows
        self._cnt = 0  # scratch of Network._reshare: flows not yet fixed
        self.on_send: Any = None
        """Hook ``on_send(link, msg, nbytes, start_ps, deliver_ps)`` for tracing; None costs nothing.

        Called once per flow when its last byte has left (``msg`` is None for bulk data)."""

    # ---------------------------------------------------------------- figures
    def serialization(self, nbytes: int) -> int:
        """Picoseconds ``nbytes`` take alone on this resource (rounded up)."""
        return -(-nbytes * S // self.bandwidth) if nbytes > 0 else 0

    def cost(self, nbytes: int) -> int:
        """Idle time from send to delivery over this one hop: serialization + latency."""
        return self.serialization(nbytes) + self.latency

    @property
    def busy_ps(self) -> int:
        """Picoseconds of full-rate use so far: the integral of the allocated rate over the bandwidth."""
        now = self.net.sim.now
        end = now
        lazy = self.lazy
        if lazy is not None and lazy.deadline < now:
            end = lazy.deadline  # drained already; retired at its owner's next step
        work = self.work + self.alloc * (end - self.t_mark)
        return min(work // self.bandwidth, now)

    def queueing(self) -> tuple[int, float, int]:
        """(count, mean ps, p99 ps) of the queueing delay of the flows that crossed this resource."""
        d = self._delays
        n = len(d)
        if not n:
            return 0, 0.0, 0
        ordered = sorted(d)
        return n, sum(ordered) / n, ordered[min(n - 1, (99 * n + 99) // 100 - 1)]

    # ------------------------------------------------------------------ port
    async def send(self, msg: Any, inbox: Inbox[Any], nbytes: int = 0) -> None:
        """Carry ``msg`` (``nbytes`` on the wire) to ``inbox``; return once its last byte has left.

        The message shares the link with every other flow on it. It reaches
        the inbox ``latency`` later; if the inbox is full then, the link
        stalls (later messages wait behind it, in order) and the next sender
        blocks until the inbox takes it: backpressure in virtual time.
        """
        if nbytes < 0:
            raise ValueError(f"link {self.name!r}: nbytes must be >= 0, got {nbytes}")
        inbox.check(msg)
        if inbox.transform is not None:
            msg = inbox.transform(msg)
        sim = self.net.sim
        while self.stalled_on is not None:
            waiter: SimFuture[None] = sim.create_future(f"link {self.name!r} stalled on inbox {self.stalled_on!r}")
            self._stall_waiters.append(waiter)
            await waiter
        net = self.net
        ctx: list[Any] = [inbox, None]
        now = sim.now
        lazy = self.lazy
        if lazy is not None and lazy.deadline <= now:
            net.retire(lazy)
        if net.fluid and nbytes > 0 and not self.flows:
            # Network.start for a message on an idle link, inlined: the path of almost every hop.
            bw = self.bandwidth
            flow = Flow((self,), nbytes, self._sent, msg, ctx, now)
            flow.latency = self.latency
            flow.rate = bw
            flow.ideal = ideal = -(-flow.remaining // bw)
            flow.deadline = now + ideal
            flow.lazy = True
            net.flows_started += 1
            self.messages += 1
            self.bytes += nbytes
            self.flows[flow] = None
            self.t_mark = now
            self.alloc = bw
            self.lazy = flow
        else:
            flow = net.start((self,), nbytes, self._sent, msg, ctx)
        try:
            if flow.lazy:
                # Alone on the link: it drains at its deadline unless another flow slows it down
                # (never sooner), so sleep until then and look again.
                end = flow.deadline
                await sim.sleep(end - sim.now)
                if flow.lazy:
                    # Network.retire for a flow on this one link, inlined (the hot path).
                    flow.lazy = False
                    flow.done = flow.retired = True
                    self.work += self.alloc * (end - self.t_mark)
                    self.t_mark = end
                    self.alloc = 0
                    self.lazy = None
                    del self.flows[flow]
                    self._delays.append(0)
                    if self.on_send is not None:
                        self.on_send(self, msg, nbytes, flow.start, end + self.latency)
                if flow.retired:  # by us, or by a flow that joined at the deadline
                    sim.call_at(end + self.latency, self._deliver, msg, inbox)
                    return
            if not flow.done:
                ctx[1] = sent = sim.create_future(self._carrying)
                await sent
        except BaseException:
            if flow.lazy and flow.deadline <= sim.now:
                net.retire(flow)
            if flow.retired:  # it left before the cancellation: it is delivered
                sim.call_at(max(flow.deadline + self.latency, sim.now), self._deliver, msg, inbox)
            elif flow.done:
                pass  # it left before the cancellation and on_end delivers it
            else:
                # Cancelled before the message left the sender: it never enters the link.
                net.withdraw(flow)
            raise

    def _sent(self, flow: Flow, arrive: int) -> None:
        inbox, sent = flow.ctx
        if sent is not None:
            sent.set_result(None)
        self.net.sim.call_at(arrive, self._deliver, flow.msg, inbox)

    def _deliver(self, msg: Any, inbox: Inbox[Any]) -> None:
        if self.stalled_on is not None:
            self._held.append((msg, inbox))
        elif not inbox.offer(msg):
            self._stall(msg, inbox)

    def _stall(self, msg: Any, inbox: Inbox[Any]) -> None:
        self.stalled_on = inbox.name
        inbox.put_later(msg, self._unstall)

    def _unstall(self) -> None:
        self.stalled_on = None
        waiters, self._stall_waiters = self._stall_waiters, []
        for w in waiters:
            w.set_result(None)
        held = self._held
        while held and self.stalled_on is None:
            msg, inbox = held.popleft()
            if not inbox.offer(msg):
                self._stall(msg, inbox)

    def __repr__(self) -> str:
        return f"<NetLink {self.name!r} {format_time(self.latency)} {format_bandwidth(self.bandwidth)}>"


class Network:
    """All the shared resources of one device and the flows crossing them."""

    def __init__(self, sim: Sim, *, model: str = "flow", packet_bytes: int = 256) -> None:
        if model not in MODELS:
            raise ValueError(f"fabric.model must be one of {', '.join(MODELS)}; got {model!r}")
        if packet_bytes <= 0:
            raise ValueError(f"fabric.packet_bytes must be > 0, got {packet_bytes}")
        self.sim = sim
        self.model = model
        self.fluid = model == "flow"
        self.packet_bytes = packet_bytes
        self.flows_started = 0
        self._dirty: dict[NetLink, None] = {}
        self.reshares = 0
        """How many max-min recomputations ran (each over one connected component)."""
        self._pass = 0  # numbers the recomputations, marking what each one visited

    def start(self, links: Sequence[NetLink], nbytes: int, on_end: OnEnd, msg: Any = None, ctx: Any = None) -> Flow:
        """Start moving ``nbytes`` over ``links`` now; ``on_end(flow, arrive_ps)`` runs when the last byte left.

        Except for a flow returned *lazy* (alone on its route in the flow model):
        its last byte leaves at ``flow.deadline`` unless another flow joins first,
        and its owner must act then itself — call :meth:`retire` at or after the
        deadline and carry on. If another flow joins before the deadline, the
        flow stops being lazy (``owner_timer`` is cancelled) and ``on_end`` runs
        as usual, never before the deadline.
        """
        sim = self.sim
        now = sim.now
        flow = Flow(links, nbytes, on_end, msg, ctx, now)
        self.flows_started += 1
        # One pass over the route (this is the per-message hot path): counters, latency, bottleneck.
        lat = 0
        rate = 0
        contended = False
        for link in links:
            link.messages += 1
            link.bytes += nbytes
            lat += link.latency
            bw = link.bandwidth
            if not rate or bw < rate:
                rate = bw
            lazy = link.lazy
            if lazy is not None:
                if lazy.deadline <= now:
                    self.retire(lazy)
                else:
                    self._wake(lazy)
            if link.flows:
                contended = True
        flow.latency = lat
        if nbytes <= 0 or not links:
            self._drained(flow, now, now + lat)
            return flow
        remaining = flow.remaining
        flow.ideal = -(-remaining // rate)
        if self.model == "packet":
            flow.npk = -(-nbytes // self.packet_bytes)
            self._hop(flow, 0, 0, 0)
            return flow
        for link in links:
            link.flows[flow] = None
        if contended:
            self._reshare_soon(links)
            return flow
        # Alone on its route: the bottleneck rate, no sharing to compute. The flow stays *lazy*:
        # no timer of its own; its owner wakes at the deadline (when it would act anyway) and
        # retires it, and a flow that joins one of its links first retires it (deadline passed)
        # or wakes it up (gives it a timer, then shares). That halves the events per message.
        for link in links:
            link.t_mark = now
            link.alloc = rate
            link.lazy = flow
        flow.rate = rate
        flow.lazy = True
        flow.deadline = now + flow.ideal
        return flow

    def retire(self, flow: Flow) -> None:
        """Take a lazy flow whose deadline has passed off its route (idempotent); its owner continues it."""
        if not flow.lazy:
            return
        flow.lazy = False
        flow.done = True
        flow.retired = True
        end = flow.deadline
        for link in flow.links:
            link.work += link.alloc * (end - link.t_mark)
            link.t_mark = end
            link.alloc = 0
            link.lazy = None
            del link.flows[flow]
            link._delays.append(0)
            if link.on_send is not None:
                link.on_send(link, flow.msg, flow.nbytes, flow.start, end + flow.latency)

    def _wake(self, flow: Flow) -> None:
        """A lazy flow gets company before its deadline: give it a timer and its owner's on_end."""
        flow.lazy = False
        if flow.owner_timer is not None:
            flow.owner_timer.cancel()
            flow.owner_timer = None
        for link in flow.links:
            link.lazy = None
        flow.timer = self.sim.call_at(flow.deadline, self._finish, flow)

    def withdraw(self, flow: Flow) -> None:
        """Stop ``flow`` (its sender gave up): it frees its share now and its ``on_end`` never runs.

        In the packet model the packets already queued still cross (they are on
        the wire); only the end is suppressed.
        """
        if flow.withdrawn or flow.done:
            return
        flow.withdrawn = True
        if flow.lazy:
            self._wake(flow)
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if self.model == "packet" or not flow.links or flow not in flow.links[0].flows:
            return
        now = self.sim.now
        busy: list[NetLink] = []
        for link in flow.links:
            link.work += link.alloc * (now - link.t_mark)
            link.t_mark = now
            link.alloc -= flow.rate
            del link.flows[flow]
            if link.flows:
                busy.append(link)
        if busy:
            self._reshare_soon(busy)

    # ------------------------------------------------------------ flow model
    def _finish(self, flow: Flow) -> None:
        now = self.sim.now
        flow.timer = None
        rate = flow.rate
        busy: list[NetLink] = []
        for link in flow.links:
            link.work += link.alloc * (now - link.t_mark)
            link.t_mark = now
            link.alloc -= rate
            del link.flows[flow]
            if link.flows:
                busy.append(link)
        if busy:
            self._reshare_soon(busy)
        self._drained(flow, now, now + flow.latency)

    def _reshare_soon(self, seeds: Sequence[NetLink]) -> None:
        """Recompute the rates around ``seeds`` later in this same instant, once for everything that changes now.

        Flows often start and end in bursts at one virtual time (an all-to-all,
        a broadcast); one recomputation after the burst gives the same rates
        as one per change, since no time passes in between.
        """
        dirty = self._dirty
        if not dirty:
            self.sim.call_at(self.sim.now, self._flush)
        for link in seeds:
            dirty[link] = None

    def _flush(self) -> None:
        seeds = [link for link in self._dirty if link.flows]
        self._dirty.clear()
        if seeds:
            self._reshare(seeds)

    def _reshare(self, seeds: Sequence[NetLink]) -> None:
        """Max-min fair rates for the flows connected to ``seeds``; re-arm the timers that changed.

        Most components are a few flows on a few links, so the constant cost
        matters: the pass keeps its scratch (visited mark, capacity and count
        left, new rate) in the flows' and links' own slots instead of sets and
        dicts built per call.
        """
        sim = self.sim
        now = sim.now
        self.reshares += 1
        mark = self._pass = self._pass + 1
        # The connected component, depth first from the seeds (its order fixes the filling's order).
        links: list[NetLink] = []
        flows: list[Flow] = []
        for link in seeds:
            link._seen = mark
        stack = list(seeds)
        stack.reverse()
        while stack:
            link = stack.pop()
            links.append(link)
            if link.alloc:
                link.work += link.alloc * (now - link.t_mark)
            link.t_mark = now
            link._cap = link.bandwidth
            link._cnt = len(link.flows)
            for f in link.flows:
                if f._seen != mark:
                    f._seen = mark
                    f._new = 0
                    if f.rate:
                        f.remaining -= f.rate * (now - f.t_upd)
                    f.t_upd = now
                    flows.append(f)
                    for other in f.links:
                        if other._seen != mark:
                            other._seen = mark
                            stack.append(other)
        # Progressive filling in integer bytes/s: each round, the smallest fair share among the
        # resources still carrying unfixed flows is given to all their unfixed flows. Fixing a flow
        # at the smallest share never lowers another resource's share, so every resource at that
        # level is settled in the same round (in route order, so the result is deterministic).
        left = len(flows)
        active = [link for link in links if link._cnt]
        while left:
            share = 0
            for link in active:
                s = link._cap // link._cnt
                if not share or s < share:
                    share = s
            if share < 1:
                share = 1  # only reachable with more flows than bytes/s of bandwidth
            for link in active:
                n = link._cnt
                if n and link._cap // n <= share:
                    for f in link.flows:
                        if not f._new:
                            f._new = share
                            left -= 1
                            for other in f.links:
                                other._cap -= share
                                other._cnt -= 1
            active = [link for link in active if link._cnt]
        for link in links:
            total = 0
            for f in link.flows:
                total += f._new
            link.alloc = total
        call_at = sim.call_at
        finish = self._finish
        for f in flows:
            r = f._new
            if r != f.rate or f.timer is None:
                if f.timer is not None:
                    f.timer.cancel()
                f.rate = r
                rem = f.remaining
                f.timer = call_at(now - (-rem // r) if rem > 0 else now, finish, f)

    # ---------------------------------------------------------- packet model
    def _hop(self, flow: Flow, i: int, h: int, tail: int) -> None:
        """Packet ``i`` of ``flow`` has its head at hop ``h`` now; its tail gets there at ``tail``."""
        now = self.sim.now
        link = flow.links[h]
        pb = self.packet_bytes
        size = pb if i < flow.npk - 1 else flow.nbytes - pb * (flow.npk - 1)
        ser = -(-size * S // link.bandwidth)
        start = link.free_at if link.free_at > now else now
        end = start + ser
        if tail > end:
            end = tail
        link.free_at = end
        link.work += ser * link.bandwidth
        call_at = self.sim.call_at
        if h == 0 and i + 1 < flow.npk:
            call_at(end, self._hop, flow, i + 1, 0, 0)
        if h + 1 < len(flow.links):
            call_at(start + link.latency, self._hop, flow, i, h + 1, end + link.latency)
        elif i == flow.npk - 1:
            call_at(end, self._last, flow, end + link.latency)

    def _last(self, flow: Flow, arrive: int) -> None:
        self._drained(flow, self.sim.now, arrive)

    # ---------------------------------------------------------------- common
    def _drained(self, flow: Flow, now: int, arrive: int) -> None:
        flow.done = True
        if flow.withdrawn:
            return
        delay = now - flow.start - flow.ideal
        if delay < 0:
            delay = 0  # packet mode: a single hop's rounding
        for link in flow.links:
            link._delays.append(delay)
            if link.on_send is not None:
                link.on_send(link, flow.msg, flow.nbytes, flow.start, arrive)
        flow.on_end(flow, arrive)

    async def transfer(self, links: Sequence[NetLink], nbytes: int, what: str = "transfer") -> int:
        """Move ``nbytes`` of bulk data over ``links``; return (and wait until) the arrival time."""
        done: SimFuture[int] = self.sim.create_future(what)
        flow = self.start(links, nbytes, self._arrive, None, done)
        if flow.lazy:
            flow.owner_timer = self.sim.call_at(flow.deadline + flow.latency, self._lazy_arrive, flow)
        return await done

    def _lazy_arrive(self, flow: Flow) -> None:
        flow.owner_timer = None
        self.retire(flow)
        flow.ctx.set_result(self.sim.now)

    def _arrive(self, flow: Flow, arrive: int) -> None:
        """``on_end`` of :meth:`transfer`: resolve its future when the data arrives."""
        if arrive <= self.sim.now:
            flow.ctx.set_result(arrive)
        else:
            self.sim.call_at(arrive, flow.ctx.set_result, arrive)


# ---------------------------------------------------------------------------
# Topologies: which nodes are wired together and how a route walks them.
# ---------------------------------------------------------------------------


def ring_walk(n: int, a: int, b: int) -> list[int]:
    """Nodes from ``a`` to ``b`` on a ring of ``n``, the short way round (ties go up)."""
    fwd = (b - a) % n
    step = 1 if fwd <= n - fwd else -1
    out = [a]
    while out[-1] != b:
        out.append((out[-1] + step) % n)
    return out


def _ring_edges(n: int) -> list[tuple[int, int]]:
    if n < 2:
        return []
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]


def cube_edges(kind: str, n: int, cols: int) -> list[tuple[int, int]]:
    """The NOC link pairs among ``n`` cubes wired as ``kind`` (ring, mesh2d, torus2d with ``cols`` columns).

    Cube ``i`` sits at row ``i // cols``, column ``i % cols``. A torus
    dimension of size 2 has one link pair, not two.
    """
    if kind == "ring":
        return _ring_edges(n)
    rows = n // cols
    edges: list[tuple[int, int]] = []
    wrap = kind == "torus2d"
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols:
                edges.append((i, i + 1))
            elif wrap and cols > 2:
                edges.append((i, r * cols))
            if r + 1 < rows:
                edges.append((i, i + cols))
            elif wrap and rows > 2:
                edges.append((i, c))
    return edges


def cube_route(kind: str, n: int, cols: int, a: int, b: int) -> list[int]:
    """Cubes a route from cube ``a`` to cube ``b`` visits, ends included.

    Ring: the short way round. Mesh and torus: dimension order (along the
    row to the target column, then along the column), each torus dimension
    the short way round (ties go up).
    """
    if a == b:
        return [a]
    if kind == "ring":
        return ring_walk(n, a, b)
    rows = n // cols
    ra, ca, rb, cb = a // cols, a % cols, b // cols, b % cols
    if kind == "torus2d":
        cs = ring_walk(cols, ca, cb)
        rs = ring_walk(rows, ra, rb)
    else:
        cs = list(range(ca, cb + (1 if cb >= ca else -1), 1 if cb >= ca else -1))
        rs = list(range(ra, rb + (1 if rb >= ra else -1), 1 if rb >= ra else -1))
    return [ra * cols + c for c in cs] + [r * cols + cb for r in rs[1:]]


def sip_edges(kind: str, n: int) -> list[tuple[int, int]]:
    """The SIP data link pairs among ``n`` SIPs wired as ``kind`` (full mesh or ring)."""
    if kind == "ring":
        return _ring_edges(n)
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def draw(kind: str, n: int, cols: int, label: str = "c") -> list[str]:
    """Text lines drawing ``n`` nodes wired as ``kind`` (ring, mesh2d, torus2d, full), for ``kbus info``."""
    name = [f"{label}{i}" for i in range(n)]
    width = max(len(x) for x in name)
    if n == 1:
        return [name[0]]
    if kind == "full":
        return [" = ".join(name) + "  (a link pair between every two)"]
    if kind == "ring":
        if n == 2:
            return [f"{name[0]} -- {name[1]}"]
        return [" -- ".join(name) + f" -- back to {name[0]}"]
    rows = n // cols
    wrap = kind == "torus2d"
    lines = []
    for r in range(rows):
        cells = [name[r * cols + c].ljust(width) for c in range(cols)]
        row = " -- ".join(cells)
        if wrap and cols > 2:
            row = f"~ {row} ~"
        elif wrap:
            row = f"  {row}"
        lines.append(row)
        if r + 1 < rows:
            pad = "  " if wrap else ""
            lines.append(pad + "    ".join("|".ljust(width) for _ in range(cols)).rstrip())
    if wrap and rows > 2:
        lines.insert(0, "  " + "    ".join("~".ljust(width) for _ in range(cols)).rstrip())
        lines.append("  " + "    ".join("~".ljust(width) for _ in range(cols)).rstrip())
    if wrap and (rows > 2 or cols > 2):
        lines.append("(~ wraps around to the other end of its row or column)")
    return lines


def topology_text(cfg: Any) -> str:
    """The data network of ``cfg`` (a :class:`~kbus.hw.config.DeviceConfig`) drawn as text, for ``kbus info``."""
    t, links, mem = cfg.topology, cfg.links, cfg.memory

    def spec(level: str) -> str:
        s = getattr(links, level)
        return f"{format_time(s.latency)}, {format_bandwidth(s.bandwidth)}"

    grid = f" {t.cubes_per_sip // t.cube_cols} x {t.cube_cols}" if t.cube_network != "ring" else ""
    routing = "dimension-order routing (row first)" if t.cube_network != "ring" else "the short way round"
    out = [f"data network of {cfg.name!r} (model: {cfg.fabric.model})"]
    out.append(f"cubes of each SIP: {t.cube_network}{grid}, NOC links {spec('noc_hop')}, {routing}")
    out += ["  " + line for line in draw(t.cube_network, t.cubes_per_sip, t.cube_cols, "cube")]
    if t.sips > 1:
        out.append(
            f"SIPs: {t.sip_network}, data links {spec('sip_data')} between the cube0 NOCs "
            f"(control stays on IO_CPU links, {spec('sip_sip')})"
        )
        out += ["  " + line for line in draw(t.sip_network, t.sips, 1, "sip")]
    hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth
    out.append(f"each PE: NOC link {spec('noc_pe')}; DMA ports to SRAM {spec('dma_sram')} and HBM {spec('dma_hbm')}")
    out.append(
        f"memory: HBM per {mem.hbm_scope}, {mem.hbm_channels} x {format_bandwidth(mem.hbm_channel_bandwidth)} = "
        f"{format_bandwidth(hbm_bw)} shared, {format_time(mem.hbm_latency)} access; "
        f"SRAM per PE {format_bandwidth(mem.sram_bandwidth)}, {format_time(mem.sram_latency)} access"
    )
    return "\n".join(out)
