"""The server side: one emulated device served to websocket clients.

``server = await kbus.serve_device("tiny")`` (or ``async with
kbus.serve_device(...) as server``) builds a device on the running loop and
serves it at ``server.url`` until ``await server.aclose()``. ``kbus serve``
does the same from the command line. The frames are described in
:mod:`kbus.remote.wire`.

Clients
-------
Any number of clients may connect; each gets its own namespace on the device:
its host buffers and its correlation ids are prefixed on the server side (and
the prefix removed from what goes back), so two runtimes numbering their
requests alike never collide. Device *memory* is not partitioned: the runtime
allocates it on the host side, so clients that share a device must keep to
disjoint memory (one runtime per device, or raw messages on separate ranges).

Each request runs as a simulated task on the device's engine, exactly where
an in-process runtime would issue it, and its response goes back with the
virtual time of its completion. A client that disconnects leaves its
requests to finish on the device (their answers are dropped); then its host
buffers are freed. Nothing it left behind holds the engine.

Virtual time
------------
Every response sent takes a hold on the device's engine (``sim.hold``),
released when the client acks it (``{"t": "ack"}``, sent once the client has
finished reacting; see :mod:`kbus.remote.client`). A client may opt out with
``{"t": "mode", "lockstep": false}`` (``connect_device(url, lockstep=False)``):
its responses then hold nothing, the device runs on while it reacts, and the
virtual times its requests see depend on wall-clock timing (more throughput,
no determinism). Virtual time therefore
stands still between "the device answered" and "the host reacted", as it
does in process, and a program takes the same virtual time either way. The
price: a client that takes wall time to react pauses the device for every
client (requests still run, at that instant); a client that disconnects
releases its holds, and one that has not acked for ``ack_timeout`` wall
seconds (30 by default) loses lockstep, with an error frame saying so.

Limits and safety
-----------------
Binds to loopback unless told otherwise, and refuses any other address
without a token: the device executes the kernel code clients deploy. With a
``token`` every handshake must carry ``Authorization: Bearer <token>``;
anything else is refused with HTTP 401 before a frame is read. Frames larger
than ``max_size`` close the connection (websocket code 1009); at most
``max_inflight`` requests per connection may be outstanding (more are
answered with an error), and ``max_host_bytes`` bounds the host buffers one
connection may register. A malformed frame or an unknown message type is
answered with an error frame naming the field; the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import logging
import os
from collections.abc import Callable, Generator
from http import HTTPStatus
from typing import Any, Final

import attrs
import numpy as np
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import CodecError, DeviceError
from ..hw import Device, DeviceConfig, build_device
from ..hw.blocks import REQUESTS
from ..protocol import HostMessage, MemoryReadMsg, MemoryWriteMsg, ResponseMsg, from_wire, to_wire
from ..sim import Sim
from .kernels import install_kernels
from .record import Recorder, read_range, write_bytes
from .wire import (
    CHUNK_BYTES,
    FORMATS,
    PROTOCOL_VERSION,
    SUBPROTOCOLS,
    Outbox,
    WireFormat,
    batch_frames,
    check_frame,
    decode_frames,
    encode_frame,
)
from .wire import field as _field

__all__ = ["DeviceServer", "serve_device"]

log = logging.getLogger("kbus.remote.server")

DEFAULT_MAX_SIZE: Final = CHUNK_BYTES + 64 * 1024
"""Largest frame accepted from a client (a full data chunk and its header fit)."""


def prepare_device(device: Device) -> None:
    """Install what a host runtime would install on a device it drives: builtin kernels, the kernel language."""
    from ..lang.runner import state_of
    from ..runtime import builtins

    builtins.install(device)
    state_of(device)


class _Conn:
    """One client connection: its namespace, requests in flight, host buffers and outgoing frames."""

    def __init__(self, n: int, ws: ServerConnection, fmt: WireFormat) -> None:
        self.n = n
        self.tag = f"kbus.remote.{n}/"
        self.ws = ws
        self.fmt: WireFormat = fmt
        self.open = True
        self.pending: dict[int, Any] = {}
        self.buffers: dict[str, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self.host_bytes = 0
        self.unacked = 0
        self.lockstep = True
        self.ack_timer: asyncio.TimerHandle | None = None
        self.ack_due = 0.0
        """Loop time by which the client must ack (the timer may fire earlier and look again)."""
        self.requests = 0
        self.resp_order: list[int] = []
        self.seen = 0
        self.out: list[bytes | str] = []
        """Encoded frames not handed to the outbox yet: flushed together after the current loop pass,
        so the responses a burst of the device's engine produced go out in one write."""
        self.outbox = Outbox(ws, f"kbus remote writer {n}")
        self.peer = ws.remote_address

    def send(self, frame: dict[str, Any]) -> None:
        out = self.out
        if not out:
            asyncio.get_running_loop().call_soon(self.flush)
        out.append(encode_frame(frame, self.fmt))

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.open and out:
            self.outbox.push(batch_frames(out, self.fmt))


@attrs.define
class ServerStats:
    """What a server has done so far (for tests and the ``serve`` command's log)."""

    connections: int = 0
    requests: int = 0
    rejected_frames: int = 0


class DeviceServer:
    """A device served over websockets. Get one from :func:`serve_device`."""

    def __init__(
        self,
        device: Device,
        *,
        token: str | None,
        max_size: int,
        max_inflight: int,
        max_host_bytes: int,
        recorder: Recorder | None,
        accept_kernels: bool = True,
        ack_timeout: float | None = 30.0,
    ) -> None:
        self.device = device
        self.ack_timeout = ack_timeout
        """Wall seconds a client may take to ack before it loses lockstep (None: forever)."""
        self.accept_kernels = accept_kernels
        """Whether clients may send ``@kbus.kernel`` source to compile and run here."""
        self.sim: Sim = device.sim
        self.token = token
        self.max_size = max_size
        self.max_inflight = max_inflight
        self.max_host_bytes = max_host_bytes
        self.recorder = recorder
        self.stats = ServerStats()
        self.host = ""
        self.port = 0
        self._ids = itertools.count(1)
        self._conns: dict[_Conn, None] = {}
        self._ws_server: Server | None = None
        self._closed = False
        self.on_client: Callable[[str, int, str, int], object] | None = None
        """Hook ``on_client(event, client, peer, requests)``: event ``"connect"`` or ``"leave"``."""
        self._kernels: list[Any] = []
        """Kernels clients sent (the kernel registry holds them weakly)."""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def clients(self) -> int:
        """Connections open now."""
        return sum(1 for c in self._conns if c.open)

    @property
    def kernels(self) -> tuple[Any, ...]:
        """The ``@kbus.kernel`` kernels clients have sent (registered in this process)."""
        return tuple(self._kernels)

    def host_buffers(self) -> list[str]:
        """Names (as the device knows them) of every host buffer a client has registered and not freed."""
        return sorted(c.tag + name for c in self._conns for name in c.buffers)

    def __repr__(self) -> str:
        return f"<DeviceServer {self.device.config.name!r} at {self.url}, {self.clients} client(s)>"

    async def __aenter__(self) -> DeviceServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        self._ws_server = await ws_serve(
            self._handler,
            host,
            port,
            process_request=self._check_token,
            subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
            select_subprotocol=_select_subprotocol,
            max_size=self.max_size,
            compression=None,
            close_timeout=1.0,
            logger=log,
        )
        sockname = self._ws_server.sockets[0].getsockname() if self._ws_server.sockets else (host, port)
        self.host, self.port = str(sockname[0]), int(sockname[1])

    async def aclose(self) -> None:
        """Stop serving: close every connection, stop the device, finish the recording."""
        if self._closed:
            return
        self._closed = True
        ws = self._ws_server
        if ws is not None:
            ws.close()
            try:
                await asyncio.wait_for(ws.wait_closed(), timeout=3.0)
            except TimeoutError:
                for conn in list(ws.connections):
                    conn.transport.abort()
        for client in list(self._conns):
            self._disconnect(client)
        await self.device.aclose()
        if self.recorder is not None:
            self.recorder.close()

    # ------------------------------------------------------------------ connections
    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        """``process_request``: refuse the handshake (HTTP 401) without the right bearer token."""
        if self.token is None:
            return None
        got = request.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode("utf-8"), f"Bearer {self.token}".encode()):
            return None
        response = connection.respond(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required\n")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kbus"'
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        fmt: WireFormat = "json" if ws.subprotocol == "kbus.json" else "msgpack"
        conn = _Conn(next(self._ids), ws, fmt)
        self._conns[conn] = None
        self.stats.connections += 1
        if self.on_client is not None:
            self.on_client("connect", conn.n, _peer(conn), 0)
        # A new client is busy until it first acks (its script is setting up): hold time for it.
        self._hold_for(conn)
        conn.send(
            {
                "t": "hello",
                "protocol": PROTOCOL_VERSION,
                "kbus": _version(),
                "config": self.device.config.to_toml(),
                "formats": list(FORMATS),
                "format": fmt,
                "now_ps": self.sim.now,
                "builtins": sorted(self.device.builtins),
                "max_size": self.max_size,
                "max_inflight": self.max_inflight,
                "chunk": CHUNK_BYTES,
            }
        )
        conn.flush()  # alone in its message: the client reads it before anything else
        try:
            async for raw in ws:
                try:
                    frames = decode_frames(raw, fmt)
                except CodecError as exc:
                    self.stats.rejected_frames += 1
                    conn.send({"t": "error", "id": None, "error": str(exc), "path": exc.path})
                    continue
                for item in frames:  # in order; a bad frame is refused alone
                    frame: dict[str, Any] | None = None
                    try:
                        frame = check_frame(item, fmt)
                        self._on_frame(conn, frame)
                    except CodecError as exc:
                        self.stats.rejected_frames += 1
                        rid = frame.get("id") if frame is not None and frame.get("t") == "req" else None
                        conn.send(
                            {
                                "t": "error",
                                "id": rid if isinstance(rid, int) else None,
                                "error": str(exc),
                                "path": exc.path,
                            }
                        )
        except ConnectionClosed:
            pass
        finally:
            self._disconnect(conn)
            # Let queued frames go out only while the peer still listens.
            await conn.outbox.aclose()

    def _disconnect(self, conn: _Conn) -> None:
        if not conn.open:
            return
        conn.open = False
        self._release_all(conn)
        if self.on_client is not None:
            self.on_client("leave", conn.n, _peer(conn), conn.requests)
        if not conn.pending:
            self._cleanup(conn)

    def _cleanup(self, conn: _Conn) -> None:
        """Free a gone client's buffers once none of its requests is still on the device."""
        for name in list(conn.buffers):
            self._free(conn, name)
        self._conns.pop(conn, None)

    # ------------------------------------------------------------------ frames
    def _on_frame(self, conn: _Conn, frame: dict[str, Any]) -> None:
        kind = _field(frame, "t", str)
        if kind == "req":
            try:
                self._on_request(conn, frame)
            finally:
                if "ack" in frame:  # an ack riding on the request: applied after it, whatever became of it
                    try:
                        self._ack(conn, frame, "ack")
                    except CodecError as exc:
                        conn.send({"t": "error", "id": None, "error": str(exc), "path": exc.path})
        elif kind == "ack":
            self._ack(conn, frame, "n")
        elif kind == "stats":
            rid = _field(frame, "id", int)
            dev = self.device
            conn.send(
                {
                    "t": "stats",
                    "id": rid,
                    "now_ps": self.sim.now,
                    "blocks": [list(attrs.astuple(s)) for s in dev.stats().values()],
                    "links": [list(attrs.astuple(s)) for s in dev.link_stats().values()],
                    "levels": dev.level_stats(),
                }
            )
        elif kind == "mode":
            conn.lockstep = _field(frame, "lockstep", bool)
            if not conn.lockstep:
                self._release_all(conn)
        elif kind == "kernel":
            if not self.accept_kernels:
                raise CodecError(
                    "invalid kernel frame: this server does not accept kernel code (started with --no-kernels)", "t"
                )
            specs = frame.get("specs")
            install_kernels(specs, self._kernels)
            if self.recorder is not None:
                self.recorder.on_kernel(conn.n, specs, self.sim.now)
        elif kind == "buf":
            self._on_buffer(conn, frame)
        elif kind == "put":
            self._on_put(conn, frame)
        elif kind == "free":
            name = _field(frame, "name", str)
            if name not in conn.buffers:
                raise CodecError(f"invalid free frame at name: host buffer {name!r} is not registered", "name")
            self._free(conn, name)
        else:
            raise CodecError(
                f"unknown frame kind {kind!r} (expected req, ack, buf, put, free, kernel, mode or stats)", "t"
            )

    def _ack(self, conn: _Conn, frame: dict[str, Any], key: str) -> None:
        """The client has finished reacting to ``frame[key]`` more responses: let time move for them."""
        n = _field(frame, key, int, minimum=1)
        if n > conn.unacked:
            raise CodecError(f"invalid {frame['t']} frame at {key}: {n} exceeds the {conn.unacked} unacked", key)
        conn.unacked -= n
        for _ in range(n):
            self.sim.release()
        if conn.unacked:
            self._arm_ack_timer(conn)  # progress: the client gets a fresh period for the rest

    def _on_buffer(self, conn: _Conn, frame: dict[str, Any]) -> None:
        name = _field(frame, "name", str)
        nbytes = _field(frame, "nbytes", int, minimum=0)
        if not name or name in conn.buffers:
            raise CodecError(f"invalid buf frame at name: {name!r} is empty or already registered", "name")
        if conn.host_bytes + nbytes > self.max_host_bytes:
            raise CodecError(
                f"invalid buf frame at nbytes: {nbytes} more bytes would exceed this connection's host buffer "
                f"limit of {self.max_host_bytes} (already {conn.host_bytes})",
                "nbytes",
            )
        arr = np.zeros(nbytes, dtype=np.uint8)
        self.device.register_host_buffer(conn.tag + name, arr)
        conn.buffers[name] = arr
        conn.host_bytes += nbytes
        if self.recorder is not None:
            self.recorder.on_register(conn.n, name, nbytes, self.sim.now)

    def _on_put(self, conn: _Conn, frame: dict[str, Any]) -> None:
        name = _field(frame, "name", str)
        offset = _field(frame, "offset", int, minimum=0)
        data = _field(frame, "data", bytes)
        buf = conn.buffers.get(name)
        if buf is None:
            raise CodecError(f"invalid put frame at name: host buffer {name!r} is not registered", "name")
        if offset + len(data) > buf.nbytes:
            raise CodecError(
                f"invalid put frame at offset: [{offset}, {offset + len(data)}) exceeds host buffer {name!r} "
                f"of {buf.nbytes} bytes",
                "offset",
            )
        buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def _free(self, conn: _Conn, name: str) -> None:
        arr = conn.buffers.pop(name)
        conn.host_bytes -= arr.nbytes
        with contextlib.suppress(KeyError):
            self.device.unregister_host_buffer(conn.tag + name)
        if self.recorder is not None:
            self.recorder.on_free(conn.n, name, self.sim.now)

    def _on_request(self, conn: _Conn, frame: dict[str, Any]) -> None:
        rid = _field(frame, "id", int)
        wire = frame.get("msg")
        if wire.__class__ is not dict:
            raise CodecError("invalid req frame at msg: expected a message map", "msg")
        # Decode the message already in this client's namespace on the device (one decode,
        # no copy of the message): its correlation id and host buffer get the client's prefix.
        wire = dict(wire)
        cid = wire.get("correlation_id")
        if cid.__class__ is str:
            wire["correlation_id"] = conn.tag + cid
        buf = wire.get("host_buffer")
        if buf.__class__ is str and wire.get("msg_type") in ("memory_write", "memory_read"):
            wire["host_buffer"] = conn.tag + buf
        try:
            local = from_wire(wire)
        except CodecError as exc:
            path = f"msg.{exc.path}" if exc.path else "msg"
            raise CodecError(f"invalid req frame at {path}: {_untag(str(exc), conn.tag)}", path) from None
        if not isinstance(local, REQUESTS):
            raise CodecError(
                f"invalid req frame at msg.msg_type: {local.msg_type!r} is not a host request "
                f"(expected one of {', '.join(t.__name__ for t in REQUESTS)})",
                "msg.msg_type",
            )
        if rid in conn.pending:
            raise CodecError(f"invalid req frame at id: request {rid} is already in flight", "id")
        if len(conn.pending) >= self.max_inflight:
            limit = f"too many requests in flight on this connection (limit {self.max_inflight})"
            self._reply(conn, rid, [], ok=False, raised="RemoteError", error=limit)
            self._hold_for(conn)
            return
        rec_i = -1
        if self.recorder is not None:
            seen = frame.get("seen", 0)
            if isinstance(seen, int) and not isinstance(seen, bool):
                for j in conn.resp_order[conn.seen : seen]:
                    self.recorder.on_seen(conn.n, j)
                conn.seen = max(conn.seen, min(seen, len(conn.resp_order)))
            msg = _client_form(local, conn.tag)
            data = write_bytes(msg, conn.buffers.get(msg.host_buffer or "") if type(msg) is MemoryWriteMsg else None)
            rec_i = self.recorder.on_request(conn.n, msg, data, self.sim.now)
        self.stats.requests += 1
        conn.requests += 1
        conn.pending[rid] = self.sim.spawn(
            self._serve(conn, rid, local, rec_i), name=f"remote client {conn.n} request {rid}"
        )

    async def _serve(self, conn: _Conn, rid: int, local: HostMessage, rec_i: int) -> None:
        """One client request, as a simulated task: run it, then answer at the time it completed."""
        raised: str | None = None
        error: str | None = None
        responses: tuple[ResponseMsg, ...] = ()
        try:
            responses = await self.device.request(local)
        except DeviceError as exc:
            responses, raised, error = exc.responses, type(exc).__name__, str(exc)
        except (ValueError, TypeError) as exc:
            raised, error = type(exc).__name__, str(exc)
        except Exception as exc:
            raised, error = "RemoteError", f"{type(exc).__name__}: {exc}"
        finally:
            conn.pending.pop(rid, None)
        tag = conn.tag
        local_cid = local.correlation_id
        cid = local_cid[len(tag) :]
        wires = []
        for r in responses:
            w = to_wire(r)
            if r.correlation_id == local_cid:
                w["correlation_id"] = cid
                if r.error is not None:
                    w["error"] = r.error.replace(tag, "")
            wires.append(w)
        error = _untag(error, tag)
        data = None
        rng = read_range(local) if raised is None else None
        name = rng[0][len(tag) :] if rng is not None else ""
        if rng is not None and name in conn.buffers:
            _, off, n = rng
            data = conn.buffers[name][off : off + n]
        if self.recorder is not None:
            self.recorder.on_response(
                rec_i, self.sim.now, tuple(from_wire(w) for w in wires), ok=raised is None, error=error,  # type: ignore[misc]
                raised=raised, data=None if data is None else data.tobytes(),
            )  # fmt: skip
            conn.resp_order.append(rec_i)
        if conn.open:
            if data is not None and rng is not None:
                for start in range(0, len(data), CHUNK_BYTES):
                    chunk = data[start : start + CHUNK_BYTES].data  # encoded now: one copy, not two
                    conn.send({"t": "data", "name": name, "offset": rng[1] + start, "data": chunk})
            self._reply(conn, rid, wires, ok=raised is None, raised=raised, error=error)
            self._hold_for(conn)
        elif not conn.pending:
            self._cleanup(conn)

    def _hold_for(self, conn: _Conn) -> None:
        """Keep virtual time still until ``conn`` acks what was just sent (unless it runs free)."""
        if conn.lockstep:
            if conn.unacked == 0:
                self._arm_ack_timer(conn)
            conn.unacked += 1
            self.sim.hold()

    def _release_all(self, conn: _Conn) -> None:
        """Give back every hold taken for ``conn``."""
        for _ in range(conn.unacked):
            self.sim.release()
        conn.unacked = 0
        if conn.ack_timer is not None:
            conn.ack_timer.cancel()
            conn.ack_timer = None

    def _arm_ack_timer(self, conn: _Conn) -> None:
        """Give ``conn`` a fresh ``ack_timeout`` from now. One loop timer per connection, pushed
        back lazily when it fires: acks come at every virtual instant, a timer each would cost more."""
        if self.ack_timeout is None:
            return
        loop = asyncio.get_running_loop()
        conn.ack_due = loop.time() + self.ack_timeout
        if conn.ack_timer is None:
            conn.ack_timer = loop.call_at(conn.ack_due, self._ack_overdue, conn)

    def _ack_overdue(self, conn: _Conn) -> None:
        """A client that does not ack must not freeze the device for everyone: it loses lockstep."""
        conn.ack_timer = None
        if not conn.open or not conn.unacked:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < conn.ack_due - 0.005:  # it made progress meanwhile (loop timers may fire early)
            conn.ack_timer = loop.call_at(conn.ack_due, self._ack_overdue, conn)
            return
        self._release_all(conn)
        conn.lockstep = False
        text = (
            f"no ack within {self.ack_timeout} s: this connection now runs without lockstep "
            "(the device's time no longer waits for it)"
        )
        log.warning("client %s (%s): %s", conn.n, conn.peer, text)
        conn.send({"t": "error", "id": None, "error": text, "path": "ack"})

    def _reply(
        self,
        conn: _Conn,
        rid: int,
        responses: list[dict[str, Any]],
        *,
        ok: bool,
        raised: str | None,
        error: str | None,
    ) -> None:
        conn.send(
            {
                "t": "resp",
                "id": rid,
                "now_ps": self.sim.now,
                "ok": ok,
                "raised": raised,
                "error": error,
                "responses": responses,
            }
        )


def _peer(conn: _Conn) -> str:
    peer = conn.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _select_subprotocol(connection: ServerConnection, subprotocols: Any) -> Any:
    for p in subprotocols:
        if p in SUBPROTOCOLS:
            return p
    return None  # none asked for: msgpack


def _client_form(msg: HostMessage, tag: str) -> HostMessage:
    """``msg`` as its client sent it: without the client's prefix on the correlation id and host buffer."""
    n = len(tag)
    if type(msg) is MemoryWriteMsg or type(msg) is MemoryReadMsg:
        buf = None if msg.host_buffer is None else msg.host_buffer[n:]
        return attrs.evolve(msg, correlation_id=msg.correlation_id[n:], host_buffer=buf)
    return attrs.evolve(msg, correlation_id=msg.correlation_id[n:])


def _untag(text: str | None, tag: str) -> str | None:
    return None if text is None else text.replace(tag, "")


def _version() -> str:
    from .. import __version__

    return __version__


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Serving:
    """What :func:`serve_device` returns: await it for the server, or ``async with`` it."""

    def __init__(self, start: Any) -> None:
        self._start = start
        self._server: DeviceServer | None = None

    def __await__(self) -> Generator[Any, None, DeviceServer]:
        return self._start().__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> DeviceServer:
        self._server = await self._start()
        return self._server

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.aclose()


def serve_device(
    config: DeviceConfig | str | os.PathLike[str] = "default",
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    record: str | os.PathLike[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    max_inflight: int = 65536,
    max_host_bytes: int = 8 * 1024**3,
    wire: bool | None = None,
    accept_kernels: bool = True,
    ack_timeout: float | None = 30.0,
) -> _Serving:
    """Serve a new device built from ``config`` on ``ws://host:port``.

    ``server = await serve_device("tiny")`` or ``async with serve_device("tiny")
    as server``; ``server.url`` is where clients connect (``port=0`` picks a
    free port). ``token`` requires ``Authorization: Bearer <token>`` of every
    client (needed to bind anything but loopback); ``record`` writes every
    client's messages to a ``.kbrec`` recording; ``max_size`` bounds a frame
    from a client, ``max_inflight`` the requests one connection may have
    outstanding (the runtime sends a message per shard at once: 4096 on
    ``large``), ``max_host_bytes`` the host buffers it may register.
    ``accept_kernels=False`` refuses ``@kbus.kernel`` source from clients
    (builtin kernels still run): the server then executes no client code.
    ``ack_timeout``: wall seconds a client may take to ack a response before
    it loses lockstep (so a hung client cannot freeze the device for others).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_device: port must be an int in 0..65535 (0 picks a free port), got {port!r}")
    if not _is_loopback(host) and not token:
        raise ValueError(
            f"serve_device: refusing to serve on {host!r} without a token: a device server runs the kernel code "
            "its clients deploy; pass token=... (kbus serve --token / KBUS_TOKEN) or bind to 127.0.0.1"
        )
    for name, value in (("max_size", max_size), ("max_inflight", max_inflight), ("max_host_bytes", max_host_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"serve_device: {name} must be an int >= 1, got {value!r}")

    async def start() -> DeviceServer:
        cfg = DeviceConfig.load(config)
        device = build_device(Sim(name=f"{cfg.name} (served)"), cfg, wire=wire)
        prepare_device(device)
        recorder = Recorder(record, cfg.to_toml(), "server") if record is not None else None
        server = DeviceServer(
            device,
            token=token,
            max_size=max_size,
            max_inflight=max_inflight,
            max_host_bytes=max_host_bytes,
            recorder=recorder,
            accept_kernels=accept_kernels,
            ack_timeout=ack_timeout,
        )
        try:
            await server.start(host, port)
        except BaseException:
            await server.aclose()
            raise
        return server

    return _Serving(start)
