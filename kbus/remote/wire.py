"""The frames a device server and its clients exchange, and their bytes.

A *frame* is a map with a ``"t"`` key naming its kind. A websocket message
carries one frame, or several as an array of frames handled in order (both
sides batch the small frames they have ready at once: a window of requests,
the responses of one virtual instant; parsing a websocket message costs more
than the frame in it). Protocol messages ride inside frames in the codec's wire form
(:func:`kbus.protocol.to_wire`), so the cattrs codec stays the one place that
decides what a message looks like and checks it on the way in.

Formats
-------
The client picks the format by websocket subprotocol: ``kbus.msgpack``
(binary frames; the default when the client names none) or ``kbus.json``
(text frames). Bulk bytes are msgpack ``bin`` values, never lists of ints, so
a tensor byte costs one socket byte; in JSON they are base64 strings. Nothing
is ever pickled: a frame decodes to plain maps, lists, strings, numbers and
bytes.

Frames
------
A client that is not :class:`~kbus.remote.RemoteDevice` must either ack the
``hello`` and every ``resp`` once it has reacted (the server holds the
device's virtual time until it does, for every client), or send ``mode``
with ``lockstep: false`` first.

Server to client:

* ``hello``: ``protocol`` (version), ``kbus`` (package version), ``config``
  (the device config as TOML), ``formats``, ``format`` (the one in use),
  ``now_ps``, ``builtins`` (kernel names the device knows), ``max_size``,
  ``max_inflight``, ``chunk`` (largest ``data`` payload either side sends);
* ``data``: ``name``, ``offset``, ``data``: bytes a read put into the client's
  host buffer (sent before the ``resp`` of that read);
* ``resp``: ``id``, ``now_ps`` (device time of completion), ``ok``, ``error``,
  ``raised`` (the exception type a local device would have raised) and
  ``responses`` (the ``ResponseMsg`` wire dicts);
* ``stats``: ``id``, ``now_ps``, ``blocks``, ``links`` (rows of the fields of
  ``BlockStats`` / ``LinkStats``), ``levels``: the answer to a ``stats`` frame;
* ``error``: ``id`` (or null), ``error``, ``path`` (the frame field at fault).

Client to server:

* ``buf``: ``name``, ``nbytes``: announce a host buffer;
* ``put``: ``name``, ``offset``, ``data``: bytes of a host buffer a write reads;
* ``free``: ``name``: forget a host buffer;
* ``req``: ``id`` (the client's number), ``msg`` (a host request), ``seen``
  (how many ``resp`` frames the client had delivered when it sent this; the
  server's recorder turns it into the request's causal frontier);
* ``ack``: ``n``: the client has finished reacting to ``n`` more ``resp``
  frames (see *Virtual time* in :mod:`kbus.remote.server`); the same count
  may ride on a ``req`` as its ``ack`` field, applied after the request;
* ``stats``: ``id``: ask for the device's counters now (answered at once,
  outside virtual time);
* ``mode``: ``lockstep`` (bool): false lets the device run on while this
  client reacts (no acks needed);
* ``kernel``: ``specs``: ``@kbus.kernel`` kernels to register before their
  code blob is written (see :mod:`kbus.remote.kernels`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast

import msgpack
import orjson
from websockets.exceptions import ConnectionClosed, InvalidState

from ..errors import CodecError

__all__ = [
    "CHUNK_BYTES",
    "FORMATS",
    "PROTOCOL_VERSION",
    "SUBPROTOCOLS",
    "Outbox",
    "WireFormat",
    "batch_frames",
    "check_frame",
    "decode_frame",
    "decode_frames",
    "encode_frame",
    "field",
    "format_of",
]

PROTOCOL_VERSION: Final = 2
"""Bumped whenever a frame changes incompatibly (2: a message may carry an array of frames);
the client refuses another version."""

WireFormat: TypeAlias = Literal["msgpack", "json"]
FORMATS: Final[tuple[WireFormat, ...]] = ("msgpack", "json")
SUBPROTOCOLS: Final = {"kbus.msgpack": "msgpack", "kbus.json": "json"}
"""Websocket subprotocol -> frame format."""

CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Largest ``data`` payload in one frame: big transfers travel as several frames under ``max_size``."""

_BYTES_KEY: Final = "data"

T = TypeVar("T")


COALESCE_BYTES: Final = 64 * 1024
"""Messages up to this size queued together go out in one transport write."""

_BACKLOG_BYTES: Final = 4 * CHUNK_BYTES
"""Transport write buffer beyond which the outbox waits for it to drain."""


class Outbox:
    """The websocket messages one side has yet to send, sent in order.

    Small messages go out at once, several in one transport write, without a
    task switch: a system call and a wake-up of the peer cost far more than
    the frame (tens of microseconds each on loopback), and a burst of small
    frames (a window of requests, the responses due at one instant, an ack)
    is the common case. Each is still its own websocket message, built by the
    connection's sans-I/O protocol (``ws.protocol.send_binary`` +
    ``data_to_send``). Large messages (bulk data) and anything queued behind
    them go through a writer task and ``ws.send``, which applies the
    connection's backpressure; so does a transport buffer grown past a few
    chunks. ``on_lost(exc)`` hears of a connection that fails while writing.
    """

    def __init__(self, ws: Any, name: str, on_lost: Callable[[BaseException], object] | None = None) -> None:
        self.ws = ws
        self.name = name
        self.on_lost = on_lost
        self._queue: deque[bytes | str] = deque()
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def push(self, messages: list[bytes | str]) -> None:
        """Send ``messages`` after everything pushed before (at once when they are small and nothing waits)."""
        if self._closed or not messages:
            return
        ws = self.ws
        if (
            not self._queue
            and all(len(m) <= COALESCE_BYTES for m in messages)
            and ws.transport.get_write_buffer_size() <= _BACKLOG_BYTES
        ):
            try:
                _write(ws, messages)
            except (ConnectionClosed, InvalidState) as exc:
                self._lose(exc)
            return
        self._queue.extend(messages)
        self._drained.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write_loop(), name=self.name)
        self._ready.set()

    @property
    def idle(self) -> bool:
        """Nothing queued behind a large message."""
        return not self._queue

    async def flushed(self) -> None:
        """Wait until everything pushed so far has been handed to the transport."""
        if self._task is not None and not self._task.done():
            await self._drained.wait()

    async def aclose(self) -> None:
        """Stop sending (what is queued is dropped)."""
        self._closed = True
        self._queue.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _lose(self, exc: BaseException) -> None:
        self._closed = True
        self._queue.clear()
        self._drained.set()
        if self.on_lost is not None:
            self.on_lost(exc)

    async def _write_loop(self) -> None:
        queue, ready, ws = self._queue, self._ready, self.ws
        try:
            while True:
                while queue:
                    batch: list[bytes | str] = []
                    while queue and len(queue[0]) <= COALESCE_BYTES:
                        batch.append(queue.popleft())
                    _write(ws, batch)
                    if queue:
                        await ws.send(queue.popleft())
                    elif ws.transport.get_write_buffer_size() > _BACKLOG_BYTES:
                        await ws.drain()
                self._drained.set()
                ready.clear()
                await ready.wait()
        except (ConnectionClosed, InvalidState) as exc:
            self._lose(exc)
        finally:
            self._drained.set()


def _write(ws: Any, batch: list[bytes | str]) -> None:
    if not batch:
        return
    proto = ws.protocol
    for data in batch:
        if isinstance(data, str):
            proto.send_text(data.encode("utf-8"))
        else:
            proto.send_binary(data)
    ws.transport.write(b"".join(proto.data_to_send()))


def format_of(subprotocol: str | None) -> WireFormat:
    """The frame format of a negotiated subprotocol (msgpack when none was asked for)."""
    if subprotocol is None:
        return "msgpack"
    fmt = SUBPROTOCOLS.get(subprotocol)
    if fmt is None:
        raise CodecError(f"unknown subprotocol {subprotocol!r} (expected one of {', '.join(SUBPROTOCOLS)})")
    return fmt  # type: ignore[return-value]


def encode_frame(frame: dict[str, Any], fmt: WireFormat) -> bytes | str:
    """The websocket message for ``frame``: msgpack bytes, or JSON text with bytes as base64."""
    if fmt == "msgpack":
        return msgpack.packb(frame, use_bin_type=True)
    data = frame.get(_BYTES_KEY)
    if isinstance(data, bytes | bytearray | memoryview):
        frame = {**frame, _BYTES_KEY: base64.b64encode(data).decode("ascii")}
    return orjson.dumps(frame).decode("utf-8")


BATCH_FRAMES: Final = 256
"""Most frames in one websocket message (each is at most ``COALESCE_BYTES``; so is the batch)."""


def batch_frames(encoded: list[bytes | str], fmt: WireFormat) -> list[bytes | str]:
    """Websocket messages for ``encoded`` frames (each from :func:`encode_frame`), in order.

    Consecutive small frames share a message, as an array (built from the
    frames' own bytes, not re-encoded), up to ``COALESCE_BYTES`` and
    ``BATCH_FRAMES``; a frame alone, and a large one, goes as itself.
    """
    out: list[bytes | str] = []
    group: list[bytes | str] = []
    size = 0
    for frame in encoded:
        n = len(frame)
        if group and (size + n > COALESCE_BYTES or len(group) >= BATCH_FRAMES):
            out.append(_array(group, fmt))
            group, size = [], 0
        if n > COALESCE_BYTES:
            out.append(frame)
            continue
        group.append(frame)
        size += n
    if group:
        out.append(_array(group, fmt))
    return out


def _array(group: list[bytes | str], fmt: WireFormat) -> bytes | str:
    if len(group) == 1:
        return group[0]
    if fmt == "msgpack":
        return _PACKER.pack_array_header(len(group)) + b"".join(group)  # type: ignore[arg-type]
    return "[" + ",".join(group) + "]"  # type: ignore[arg-type]


_PACKER: Final = msgpack.Packer(use_bin_type=True)


def decode_frames(raw: bytes | str, fmt: WireFormat) -> list[Any]:
    """The frames of one websocket message (a map, or an array of them); check each with :func:`check_frame`.

    CodecError if the message does not parse or is neither a map nor an
    array; a bad element of an array is refused on its own by
    :func:`check_frame` (the other frames of the message stay valid).
    """
    obj = _parse(raw, fmt)
    if obj.__class__ is list:
        return obj
    if obj.__class__ is not dict:
        raise CodecError(f"a message must be a frame (a map) or an array of frames, got {type(obj).__name__}")
    return [obj]


def check_frame(item: Any, fmt: WireFormat) -> dict[str, Any]:
    """``item`` if it is a map (JSON: its base64 ``data`` decoded); CodecError otherwise."""
    if item.__class__ is not dict:
        raise CodecError(f"a frame must be a map, got {type(item).__name__}")
    frame = cast(dict[str, Any], item)
    if fmt == "json" and isinstance(frame.get(_BYTES_KEY), str):
        try:
            frame[_BYTES_KEY] = base64.b64decode(frame[_BYTES_KEY], validate=True)
        except ValueError:
            raise CodecError("invalid frame at data: expected base64 text", path=_BYTES_KEY) from None
    return frame


def decode_frame(raw: bytes | str, fmt: WireFormat) -> dict[str, Any]:
    """Parse a websocket message of one frame into its map; CodecError (naming the field) if it is not one."""
    return check_frame(_parse(raw, fmt), fmt)


def _parse(raw: bytes | str, fmt: WireFormat) -> Any:
    try:
        if fmt == "msgpack":
            if isinstance(raw, str):
                raise CodecError("expected a binary msgpack frame, got a text frame")
            return msgpack.unpackb(raw, raw=False, strict_map_key=True)
        return orjson.loads(raw)
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"malformed {fmt} frame: {type(e).__name__}: {e}") from None


def field(frame: dict[str, Any], name: str, kind: type[T], *, minimum: int | None = None) -> T:
    """``frame[name]``, checked to be a ``kind`` (ints: not bools, at least ``minimum``); CodecError names it."""
    if name not in frame:
        raise CodecError(f"invalid {frame.get('t', 'frame')!s} frame at {name}: missing required field", path=name)
    value = frame[name]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise CodecError(
            f"invalid {frame.get('t', 'frame')!s} frame at {name}: expected {kind.__name__}, "
            f"got {type(value).__name__}",
            path=name,
        )
    if minimum is not None and isinstance(value, int) and value < minimum:
        raise CodecError(f"invalid {frame.get('t')!s} frame at {name}: must be >= {minimum}, got {value}", path=name)
    return cast(T, value)
