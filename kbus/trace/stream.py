"""Live event stream over websockets: ``async with serve(device) as server``.

Design, and why
---------------

* **Publishing never waits.** The simulation calls :meth:`StreamSink.write`
  from inside its hooks; it appends the event to the block being filled and,
  every ``batch`` events, encodes that block once (one orjson call) into a
  bounded ring of blocks. That is O(1) whatever the number of clients, and it
  never awaits, so no client can slow virtual time down, however slow it is.
* **Each client is a cursor into the ring.** A client's relay task (one per
  connection, separate from the handler that reads the client's messages)
  wakes every ``flush_interval`` seconds of wall time, takes the events between
  its cursor and the head, filters them and sends them in frames of at most
  ``batch`` events (one event per frame costs ~30x more).
* **A frame is encoded once.** The ring is cut into *blocks* of ``batch``
  consecutive sequence numbers; an unfiltered client is sent the block's bytes
  as they were sealed, and the frame for a whole block under a filter is
  built once and the same bytes go to every client with that filter.
  A block still filling is sent on its own only once the simulation has
  paused (the head did not move for a whole ``flush_interval``), so a
  running simulation costs one encoding per block per filter, not per client. The ring is the
  client's bounded buffer: if a client falls more than ``buffer`` events
  behind, the oldest are dropped for it and counted (``dropped`` in its status
  frames). ``websockets.broadcast`` is not used because it has no backpressure.
* **Shutdown never hangs.** The handler notices the close (its receive loop
  ends), cancels the relay and leaves; the server is closed with a short
  ``close_timeout`` and any connection still open after that is aborted.

The protocol is documented in ``kbus/trace/README.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from importlib import resources
from typing import Any, Final

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ._chrome_encode import encode_batch
from .events import CATEGORIES, FIELDS, Event, dumps
from .tracer import TraceError, Tracer

__all__ = ["EventFilter", "StreamClient", "StreamSink", "TraceServer", "serve", "viewer_html"]

log = logging.getLogger("kbus.trace.stream")

_OPS: Final = ("subscribe", "unsubscribe", "status")
_FRAME_HEAD: Final = b'{"type":"events","events":'
_FILTER_KEYS: Final = ("path_prefix", "cat", "msg_type")


@functools.cache
def viewer_html() -> str:
    """The live viewer page shipped with the package (``kbus/trace/viewer/index.html``)."""
    return (resources.files(__package__) / "viewer" / "index.html").read_text(encoding="utf-8")


def _http_page(connection: ServerConnection, request: Request) -> Response | None:
    """``process_request``: plain HTTP requests get the viewer page; websocket upgrades go on.

    Serving the page from the stream's own port means one URL opens the live
    view, and the page connects back to the host it was loaded from.
    """
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = request.path.split("?", 1)[0]
    if path in ("/", "/index.html"):
        response = connection.respond(HTTPStatus.OK, viewer_html())
        del response.headers["Content-Type"]  # respond() made it text/plain; headers may repeat, so replace
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Cache-Control"] = "no-store"
        return response
    return connection.respond(HTTPStatus.NOT_FOUND, f"kbus trace server: nothing at {path}; the viewer is at /\n")


class StreamSink:
    """A bounded ring of encoded event blocks that stream clients read at their own pace.

    ``write`` is the whole cost the simulation pays for streaming: it appends
    the event to the block being filled, and every ``batch`` events that block
    is encoded as one JSON array (a single orjson call) and the event objects
    are let go. Keeping tens of thousands of live tuples and dicts for late
    readers cost more than encoding them (allocation, cache misses, garbage
    collector scans); a sealed block is one bytes object nobody scans.

    Sequence numbers count events from 0; block ``k`` holds events
    ``[k * batch, (k + 1) * batch)``. The ring keeps the last
    ``ceil(buffer / batch)`` sealed blocks plus the block still filling. The
    topology (``meta`` event) is kept aside, not in the ring, so every
    subscriber can get it whenever it arrives.
    """

    def __init__(self, buffer: int = 32768, batch: int = 256) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise TraceError(f"StreamSink: buffer must be an int >= 1 (events kept per client), got {buffer!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise TraceError(f"StreamSink: batch must be an int >= 1 (events per block), got {batch!r}")
        self.batch = batch
        self.blocks: deque[bytes] = deque(maxlen=-(-buffer // batch))
        """Sealed blocks, oldest first, each a JSON array of ``batch`` events."""
        self.sealed = 0
        """Blocks sealed so far (the last of them is ``blocks[-1]``)."""
        self.pending: list[Event] = []
        """The block being filled, as event tuples."""
        self.topology: dict[str, Any] | None = None

    @property
    def seq(self) -> int:
        """Events written so far (the head's sequence number)."""
        return self.sealed * self.batch + len(self.pending)

    @property
    def oldest(self) -> int:
        """Sequence number of the oldest event still in the ring."""
        return (self.sealed - len(self.blocks)) * self.batch

    def write(self, event: Event) -> None:
        if event[2] == "meta":
            if event[3] == "topology":
                self.topology = event[5]
            return
        pending = self.pending
        pending.append(event)
        if len(pending) >= self.batch:
            self.blocks.append(encode_batch(pending))
            pending.clear()
            self.sealed += 1

    def block(self, k: int) -> bytes | None:
        """Sealed block ``k`` (a JSON array), or None if it is not sealed yet or has left the ring."""
        i = k - (self.sealed - len(self.blocks))
        if k >= self.sealed or i < 0:
            return None
        return self.blocks[i]

    def events(self, start: int, end: int) -> list[Any]:
        """The events with sequence numbers ``[start, end)`` inside one block, decoded if it is sealed.

        Decoded events are lists (JSON arrays), the same values the tuples
        encode to; filters and the encoder treat both alike.
        """
        k, first = divmod(start, self.batch)
        last = end - k * self.batch
        blob = self.block(k)
        if blob is not None:
            return list(orjson.loads(blob)[first:last])
        if k == self.sealed:
            return self.pending[first:last]
        return []

    def close(self) -> None:
        """Nothing to release; the ring is kept so late readers can still drain it."""


class EventFilter:
    """What a client subscribed to: path prefixes, categories, message types.

    A key left out matches everything. A path prefix matches an event's path
    or, for a link (``src->dst``), either end, so ``"sip0.cube1.pe3"`` also
    shows the messages delivered to that PE. ``msg_type`` matches the
    ``msg_type`` in an event's args (links and host requests carry it).
    """

    __slots__ = ("cats", "msg_types", "prefixes")

    def __init__(
        self,
        path_prefix: tuple[str, ...] | None = None,
        cat: frozenset[str] | None = None,
        msg_type: frozenset[str] | None = None,
    ) -> None:
        self.prefixes = path_prefix
        self.cats = cat
        self.msg_types = msg_type

    @classmethod
    def parse(cls, spec: object) -> EventFilter:
        """Build a filter from a subscribe message's ``filter`` object.

        Raises ``ValueError`` naming the offending key and what was expected.
        """
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"'filter' must be an object, got {_json_type(spec)}")
        unknown = sorted(k for k in spec if k not in _FILTER_KEYS)
        if unknown:
            raise ValueError(
                f"unknown filter key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_FILTER_KEYS)}"
            )
        prefixes = _strings(spec, "path_prefix")
        cats = _strings(spec, "cat")
        msg_types = _strings(spec, "msg_type")
        unknown_cats = [c for c in cats or () if c not in CATEGORIES or c == "meta"]
        if unknown_cats:
            known = ", ".join(c for c in CATEGORIES if c != "meta")
            raise ValueError(f"unknown cat {', '.join(map(repr, unknown_cats))}; expected one of {known}")
        return cls(
            tuple(prefixes) if prefixes is not None else None,
            frozenset(cats) if cats is not None else None,
            frozenset(msg_types) if msg_types is not None else None,
        )

    def to_json(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.prefixes is not None:
            out["path_prefix"] = list(self.prefixes)
        if self.cats is not None:
            out["cat"] = sorted(self.cats)
        if self.msg_types is not None:
            out["msg_type"] = sorted(self.msg_types)
        return out

    def compile(self) -> Callable[[Event], bool]:
        """A predicate for this filter, specialised so an empty filter costs one call."""
        prefixes, cats, msg_types = self.prefixes, self.cats, self.msg_types
        if prefixes is None and cats is None and msg_types is None:
            return _match_all

        def match(ev: Event) -> bool:
            if cats is not None and ev[2] not in cats:
                return False
            if msg_types is not None:
                args = ev[5]
                if args is None or args.get("msg_type") not in msg_types:
                    return False
            if prefixes is not None:
                path = ev[4]
                if path.startswith(prefixes):
                    return True
                return ev[2] == "link" and path.partition("->")[2].startswith(prefixes)
            return True

        return match

    def __repr__(self) -> str:
        return f"EventFilter({self.to_json()!r})"


def _match_all(ev: Event) -> bool:
    return True


def _json_type(v: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _strings(spec: dict[str, Any], key: str) -> list[str] | None:
    """A filter value: a string or a non-empty array of strings (None if absent)."""
    if key not in spec:
        return None
    v = spec[key]
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    if isinstance(v, list) and not v:
        raise ValueError(f"filter {key!r} is an empty array, which would match nothing; leave the key out to match all")
    raise ValueError(f"filter {key!r} must be a string or an array of strings, got {_json_type(v)}")


class StreamClient:
    """One connected websocket client, as the server sees it (read-only for users).

    ``dropped`` counts events that left the ring before this client's relay
    read them (counted before filtering, and including those being lost right
    now by a relay stuck on a client that does not read); ``sent`` counts
    events sent to it.
    """

    __slots__ = (
        "_dropped",
        "_sink",
        "cursor",
        "filter",
        "filter_key",
        "frames",
        "last_head",
        "peer",
        "predicate",
        "sent",
        "ws",
    )

    def __init__(self, ws: ServerConnection, sink: StreamSink) -> None:
        self.ws = ws
        self._sink = sink
        self.peer = str(ws.remote_address)
        self.cursor = sink.seq
        self._dropped = 0
        self.sent = 0
        self.frames = 0
        self.filter: EventFilter | None = None
        self.filter_key = b""
        self.predicate: Callable[[Event], bool] | None = None
        self.last_head = -1  # the head at the relay's previous pass (to see the simulation pause)

    @property
    def dropped(self) -> int:
        oldest = self._sink.oldest
        return self._dropped + max(0, oldest - self.cursor)

    def catch_up(self) -> None:
        """Move the cursor to the oldest event still in the ring, counting what was lost."""
        oldest = self._sink.oldest
        if self.cursor < oldest:
            self._dropped += oldest - self.cursor
            self.cursor = oldest

    def __repr__(self) -> str:
        sub = repr(self.filter) if self.filter is not None else "not subscribed"
        return f"<StreamClient {self.peer} {sub} sent={self.sent} dropped={self.dropped}>"


class TraceServer:
    """The running stream server that :func:`serve` yields.

    ``port``/``url`` say where to connect; ``viewer_url`` is the same port over
    HTTP, where the live viewer page is served; ``clients`` lists the connected
    clients; ``events`` counts events published so far. ``on_client``, if set,
    is called with ``("connect" | "disconnect", client)`` as clients come and go.
    """

    def __init__(
        self,
        sim: Any,
        sink: StreamSink,
        *,
        batch: int,
        flush_interval: float,
        status_interval: float,
    ) -> None:
        self.sim = sim
        self.sink = sink
        self.batch = batch
        self.flush_interval = flush_interval
        self.status_interval = status_interval
        self.host = ""
        self.port = 0
        self._clients: list[StreamClient] = []
        # (filter key, block) -> (encoded frame or b"" if nothing matched, events in it)
        self._frames: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        self.frames_encoded = 0
        """Event frames encoded so far (a whole block is encoded once per filter, whatever the clients)."""
        self.on_client: Callable[[str, StreamClient], object] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def viewer_url(self) -> str:
        """The live viewer page, served on the stream's own port (it connects back to this server)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def clients(self) -> tuple[StreamClient, ...]:
        return tuple(self._clients)

    @property
    def events(self) -> int:
        return self.sink.seq

    def idle(self) -> bool:
        """True when every subscribed client has been sent everything published (for tests and benches)."""
        head = self.sink.seq
        return all(c.cursor >= head for c in self._clients if c.predicate is not None)

    # --------------------------------------------------------------- frames
    def _status(self, client: StreamClient) -> bytes:
        return dumps(
            {
                "type": "status",
                "now_ps": int(self.sim.now),
                "events": self.sink.seq,
                "dropped": client.dropped,
                "sent": client.sent,
                "clients": len(self._clients),
            }
        )

    @staticmethod
    def _error(reason: str) -> bytes:
        return dumps({"type": "error", "reason": reason})

    def _on_message(self, client: StreamClient, raw: str | bytes) -> bytes:
        """Answer one client message: an ack, a status, or an error frame naming what was wrong."""
        if isinstance(raw, bytes):
            return self._error('binary frames are not understood; send JSON text such as {"op": "subscribe"}')
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._error(f"message is not valid JSON ({exc})")
        if not isinstance(msg, dict):
            return self._error(f"message must be a JSON object with an 'op' key, got {_json_type(msg)}")
        op = msg.get("op")
        if op == "subscribe":
            unknown = sorted(k for k in msg if k not in ("op", "filter", "backlog"))
            if unknown:
                return self._error(
                    f"subscribe: unknown key(s) {', '.join(map(repr, unknown))}; expected 'filter' and 'backlog'"
                )
            backlog = msg.get("backlog", False)
            if not isinstance(backlog, bool):
                return self._error(f"subscribe: 'backlog' must be true or false, got {_json_type(backlog)}")
            try:
                filt = EventFilter.parse(msg.get("filter"))
            except ValueError as exc:
                return self._error(f"subscribe: {exc}")
            sink = self.sink
            client.filter = filt
            client.filter_key = dumps(filt.to_json())
            client.predicate = filt.compile()
            client.catch_up()  # losses under the previous subscription stay counted
            client.cursor = sink.oldest if backlog else sink.seq
            return dumps(
                {
                    "type": "subscribed",
                    "filter": filt.to_json(),
                    "backlog": backlog,
                    "fields": list(FIELDS),
                    "topology": sink.topology,
                    "now_ps": int(self.sim.now),
                }
            )
        if op == "unsubscribe":
            client.filter = None
            client.predicate = None
            return dumps({"type": "unsubscribed"})
        if op == "status":
            return self._status(client)
        if op is None:
            return self._error(f"message has no 'op'; expected one of {', '.join(_OPS)}")
        return self._error(f"unknown op {op!r}; expected one of {', '.join(_OPS)}")

    # ---------------------------------------------------------- connections
    async def _handler(self, ws: ServerConnection) -> None:
        """Serve one connection: read its messages here, send events from a relay task.

        The receive loop is what notices the close; leaving it cancels the
        relay, so a vanished client leaves no task behind and the server can
        always shut down.
        """
        client = StreamClient(ws, self.sink)
        self._clients.append(client)
        self._notify("connect", client)
        relay = asyncio.create_task(self._relay(client), name=f"kbus.trace relay {client.peer}")
        try:
            async for raw in ws:
                await ws.send(self._on_message(client, raw), text=True)
        except ConnectionClosed:
            pass
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await relay
            self._clients.remove(client)
            self._notify("disconnect", client)

    def _notify(self, what: str, client: StreamClient) -> None:
        if self.on_client is not None:
            try:
                self.on_client(what, client)
            except Exception:  # a reporting callback must never break a connection
                log.exception("on_client(%r) callback failed", what)

    async def _relay(self, client: StreamClient) -> None:
        ws = client.ws
        loop = asyncio.get_running_loop()
        next_status = 0.0
        try:
            while True:
                if client.predicate is not None:
                    await self._drain(client)
                else:
                    client.cursor = self.sink.seq  # not subscribed: nothing is owed, nothing dropped
                now = loop.time()
                if now >= next_status:
                    next_status = now + self.status_interval
                    await ws.send(self._status(client), text=True)
                await asyncio.sleep(self.flush_interval)
        except ConnectionClosed:
            return

    async def _drain(self, client: StreamClient) -> None:
        """Send this client everything between its cursor and the head, filtered, block by block."""
        sink = self.sink
        size = self.batch
        head = sink.seq
        paused = head == client.last_head
        client.last_head = head
        while True:
            client.catch_up()
            pred = client.predicate
            cursor = client.cursor
            if pred is None or cursor >= head:
                return
            block, offset = divmod(cursor, size)
            end = (block + 1) * size
            if end > head:  # the block is still filling: send it now only if the simulation paused
                if not paused:
                    return
                end = head
            # Take the events out of the ring before awaiting: the ring moves meanwhile.
            if offset == 0 and end == (block + 1) * size:
                frame, n = self._block_frame(client.filter_key, block, pred)
            else:
                frame, n = self._encode([ev for ev in sink.events(cursor, end) if pred(ev)])
            client.cursor = end
            if n:
                await client.ws.send(frame, text=True)
                client.sent += n
                client.frames += 1

    def _block_frame(self, key: bytes, block: int, pred: Callable[[Event], bool]) -> tuple[bytes, int]:
        """The frame of a whole sealed block under one filter, built by the first client to need it.

        Without a filter the frame wraps the block's bytes as they are; with
        one, the block is decoded, filtered and encoded again, once per filter.
        """
        cached = self._frames.get((key, block))
        if cached is None:
            blob = self.sink.block(block)
            if blob is None:
                return b"", 0
            if pred is _match_all:
                self.frames_encoded += 1
                cached = (_FRAME_HEAD + blob + b"}", self.batch)
            else:
                cached = self._encode([ev for ev in orjson.loads(blob) if pred(ev)])
            frames = self._frames
            frames[(key, block)] = cached
            if len(frames) > 4 * (self.sink.blocks.maxlen or 1) + 64:
                oldest = self.sink.oldest // self.batch
                for k in [k for k in frames if k[1] < oldest]:
                    del frames[k]
        return cached

    def _encode(self, events: list[Event]) -> tuple[bytes, int]:
        if not events:
            return b"", 0
        self.frames_encoded += 1
        return _FRAME_HEAD + encode_batch(events) + b"}", len(events)

    def __repr__(self) -> str:
        return f"<TraceServer {self.url} clients={len(self._clients)} events={self.sink.seq}>"


@contextlib.asynccontextmanager
async def serve(
    device: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    buffer: int = 32768,
    batch: int = 256,
    flush_interval: float = 0.02,
    status_interval: float = 0.5,
    max_size: int = 64 * 1024,
    close_timeout: float = 1.0,
    compression: str | None = None,
) -> AsyncIterator[TraceServer]:
    """Stream ``device``'s trace events to websocket clients while the block runs.

    Binds to loopback unless ``host`` says otherwise; ``port=0`` picks a free
    port (read it from ``server.port``). If a :class:`~kbus.trace.Tracer` is
    already attached to the device, the stream joins it; otherwise one is
    attached for the duration and detached on exit.

    ``buffer``: events kept for a lagging client before its oldest are dropped;
    ``batch``: most events per frame; ``flush_interval``/``status_interval``:
    wall-clock seconds between sends and between status frames; ``max_size``:
    largest message accepted from a client, in bytes; ``close_timeout``: how
    long shutdown waits for a client's closing handshake before dropping it;
    ``compression``: ``"deflate"`` for remote viewers (costs CPU on this side).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise TraceError(f"serve: port must be an int in 0..65535 (0 picks a free port), got {port!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TraceError(f"serve: batch must be an int >= 1 (events per frame), got {batch!r}")
    for name, value in (("flush_interval", flush_interval), ("status_interval", status_interval)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise TraceError(f"serve: {name} must be a number of seconds > 0, got {value!r}")
    sink = StreamSink(buffer, batch)
    existing = getattr(device.sim, "tracer", None)
    own_tracer = not (isinstance(existing, Tracer) and existing.device is device and existing.attached)
    tracer = Tracer(device) if own_tracer else existing
    assert isinstance(tracer, Tracer)
    tracer.add_sink(sink)
    server = TraceServer(device.sim, sink, batch=batch, flush_interval=flush_interval, status_interval=status_interval)
    try:
        ws_server = await ws_serve(
            server._handler,
            host,
            port,
            process_request=_http_page,
            max_size=max_size,
            compression=compression,
            close_timeout=close_timeout,
            logger=log,
        )
    except BaseException:
        tracer.remove_sink(sink)
        if own_tracer:
            tracer.close()
        raise
    sockname = ws_server.sockets[0].getsockname() if ws_server.sockets else (host, port)
    server.host, server.port = str(sockname[0]), int(sockname[1])
    try:
        yield server
    finally:
        ws_server.close()
        try:
            await asyncio.wait_for(ws_server.wait_closed(), timeout=close_timeout + 1.0)
        except TimeoutError:
            # A peer that ignores the closing handshake: drop its TCP connection.
            for conn in list(ws_server.connections):
                conn.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws_server.wait_closed(), timeout=1.0)
        if tracer.attached or own_tracer:
            with contextlib.suppress(TraceError):
                tracer.remove_sink(sink)
        if own_tracer:
            tracer.close()
