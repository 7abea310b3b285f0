"""The client side: :func:`connect_device` and :class:`RemoteDevice`.

A :class:`RemoteDevice` has the host-facing surface of an in-process
:class:`~kbus.hw.Device` (``request``, ``register_host_buffer``,
``unregister_host_buffer``, ``host_buffer``, ``config``, ``now_ps``,
``sim``, ``aclose``), so the tensor runtime and the kernel language run on it
unchanged: ``kbus.open_device("ws://127.0.0.1:8766")``.

The local engine
----------------
The runtime runs its command queue as simulated tasks on ``device.sim``. On a
remote device that is a local :class:`ClientSim`: an ordinary engine for the
host-side tasks, whose clock reads the device's time as the server last
reported it (every response carries it). Waiting on the server follows the
engine's wait contract:

* a request parks its caller (simulated task or host task) on
  ``sim.waiter()`` / ``sim.park``, and the frame's response wakes it with
  ``sim.wake`` (or ``wake_error``);
* while any request is outstanding the client holds one engine token
  (``sim.hold``), released when the last answer is in: the local engine
  neither declares a deadlock nor moves its own timers while the device is
  working. Local time needs no moving: it *is* the device's.

Lockstep with the server
------------------------
In process, the device's time cannot move between "an answer arrived" and
"the host reacted to it" (the engine's host token). Across a socket the
server keeps that rule by holding its engine for every response it sends (and
for the hello, while the host sets up) until the client *acks* it, and the
client acks once its local engine is quiescent again: nothing ready, no host
wake-up pending, only its own hold left, seen twice across a loop pass (so a
loop callback already queued, such as the free of a garbage-collected tensor,
gets to send its requests first). Any request the host sent in reaction went
out before the ack on the same ordered connection, so it enters the device at
the virtual time it was sent at, whatever the wall-clock delays: a program
takes the same virtual time on every run, on asyncio and uvloop (tested).
Virtual time moves only while every client is blocked on the device, exactly
as a local device's time moves only while its host is. (The numbers can
differ slightly from an in-process run of the same program: there the host's
tasks share the device's engine, so requests issued at the same picosecond
interleave with the device's own events in another order.)

Kernels
-------
Writing a ``@kbus.kernel``'s code blob first sends the kernel's source and the
globals it uses (once per kernel and connection); the server registers it, so
launches find it there (see :mod:`kbus.remote.kernels`).

Host buffers
------------
Registering a buffer announces its name and size; the bytes a write reads
travel (in frames of at most ``chunk`` bytes) just before the request that
reads them, once per byte range, so a buffer registered for a readback costs
nothing to announce. The device therefore sees a range as it was when the
first request reading it was sent; re-register the buffer to send new
contents under the same name. A read's bytes come back in ``data`` frames
before its response and are copied into the local buffer before the caller
resumes. Closing the connection frees every buffer on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import types
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Any, Final, NoReturn

import attrs
import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from ..errors import CodecError, DeviceError, RemoteError
from ..hw import DeviceConfig, HostDevice
from ..hw.blocks import REQUESTS
from ..hw.device import BlockStats, LinkStats, PeNode, host_buffer_bytes
from ..lang.kernel import MAX_BLOB, KernelId
from ..protocol import HostMessage, MemoryWriteMsg, ResponseMsg, from_wire, to_wire
from ..sim import Sim, TimerHandle
from ..sim.units import format_time
from .kernels import blob_kernel, kernel_specs
from .wire import (
    CHUNK_BYTES,
    PROTOCOL_VERSION,
    Outbox,
    WireFormat,
    batch_frames,
    check_frame,
    decode_frame,
    decode_frames,
    encode_frame,
)

__all__ = ["ClientSim", "DeviceStats", "RemoteDevice", "connect_device"]


_FAST_POLLS: Final = 64
"""Loop passes the ack check spins for before it polls on a timer (and stops holding frames back)."""

_QUIET_PASSES: Final = 4
"""Loop passes the local engine must stay quiet before the client acks. A response resumes its
caller's task (one pass); the end of that task resolves what awaits it (``gather``, a done
callback: a pass each) before the host code that reacts runs: its requests must be queued
before the ack, so that they ride with it (one write) and enter the device at this instant."""


class ClientSim(Sim):
    """The local engine of a remote device: host-side tasks only, on the device's clock.

    ``now`` is the device's virtual time as of the last frame from the
    server. Timers in device time (``sleep``, ``call_at``, hence
    ``kbus.fail_after``) would need the server's clock: they raise
    ``NotImplementedError``.
    """

    def __init__(self, name: str = "sim") -> None:
        super().__init__(name)
        self.device_now = 0

    @property
    def now(self) -> int:
        return self.device_now

    def call_at(self, when: int, fn: Callable[..., object], *args: Any) -> TimerHandle:
        raise NotImplementedError(self._no_timers(f"call_at({when})"))

    @types.coroutine
    def sleep(self, delay: int) -> Generator[Any, Any, None]:
        raise NotImplementedError(self._no_timers(f"sleep({delay})"))
        yield  # type: ignore[unreachable]  # a generator, like Sim.sleep: the error comes when awaited

    def _no_timers(self, what: str) -> str:
        return (
            f"{self.name}: {what}: timers in device time (sim.sleep, sim.call_at, kbus.fail_after, "
            "kbus.move_on_after) need the device in this process; on a remote device its clock runs in the "
            "server and is only seen in responses"
        )


@attrs.frozen
class DeviceStats:
    """A served device's counters, as :meth:`Device.stats`, ``level_stats`` and ``link_stats`` give them."""

    now_ps: int
    blocks: dict[str, BlockStats]
    levels: dict[str, dict[str, float]]
    links: dict[str, LinkStats]


@attrs.define(slots=True)
class _Call:
    msg: HostMessage
    waiter: Any
    data: list[tuple[str, int, bytes]] = attrs.Factory(list)


class _RemoteWait:
    """What a caller parked on a remote request is waiting for (deadlock reports)."""

    __slots__ = ("msg", "url")

    def __init__(self, msg: HostMessage, url: str) -> None:
        self.msg = msg
        self.url = url

    def describe_wait(self) -> str:
        return f"the response to {self.msg.msg_type} {self.msg.request_id!r} from {self.url}"


class _Ranges:
    """Byte ranges of one host buffer already sent to the server (merged, sorted)."""

    __slots__ = ("spans",)

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        out = []
        pos = start
        for a, b in self.spans:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.spans, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.spans = merged


class RemoteDevice(HostDevice):
    """A device served by another process (``kbus serve``), driven over a websocket.

    Create it with :func:`connect_device`. It is a
    :class:`~kbus.hw.HostDevice`, like the in-process :class:`~kbus.hw.Device`,
    so the runtime and the kernel language drive it alike; the blocks, links
    and statistics live in the server: those attributes raise
    :class:`AttributeError` here.
    """

    def __init__(
        self, ws: ClientConnection, hello: dict[str, Any], fmt: WireFormat, url: str, *, lockstep: bool = True
    ) -> None:
        self.url = url
        self.format: WireFormat = fmt
        self.hello = hello
        self.config = DeviceConfig.from_toml_text(hello["config"], source=url)
        self.sim: ClientSim = ClientSim(name=f"{self.config.name}@{url}")
        self.sim.device_now = int(hello["now_ps"])
        self.builtins = {name: _served_builtin for name in hello.get("builtins", ())}
        self.deployed_resolver = None
        self.on_request = None
        self.orphans = []
        self.wire = False
        self.transform = None
        self.max_size = int(hello.get("max_size", CHUNK_BYTES))
        # A data frame must fit the server's max_size with its header (1 KiB is plenty);
        # base64 text (JSON) is 4/3 of the bytes.
        room = self.max_size - 1024 if fmt == "msgpack" else (self.max_size - 1024) * 3 // 4
        self.chunk = max(256, min(int(hello.get("chunk", CHUNK_BYTES)), CHUNK_BYTES, room))
        self.bytes_sent = 0
        """Payload bytes sent to the server (frames as encoded), for measuring overhead."""
        self.bytes_received = 0
        self.errors: list[str] = []
        """Error frames the server sent about frames that had no request to fail (buffers)."""
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._stat_calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._buffers: dict[str, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self._sent: dict[str, _Ranges] = {}
        self._shipped: set[KernelId] = set()
        self._delivered = 0
        self._unacked = 0
        self._ack_scheduled = False
        self._flush_scheduled = False
        self._quiet = 0
        self._polls = 0
        self._out: list[dict[str, Any] | bytes | str] = []
        """Frames to send (maps, or already encoded), flushed after the loop pass or with the ack."""
        self._outbox = Outbox(ws, f"kbus remote writer {url}", self._lost)
        self._closed = False
        self._failure: BaseException | None = None
        # The hello counts as a response to react to: the server holds time until the
        # host has set up and gone quiet (see "Lockstep" above).
        self.lockstep = lockstep
        self._unacked = 0
        if lockstep:
            self._unacked = 1
            self._schedule_ack()
        else:
            self._send({"t": "mode", "lockstep": False})
        self._reader = asyncio.create_task(self._read_loop(), name=f"kbus remote reader {url}")
        self._flush_soon()

    def __getattr__(self, name: str) -> NoReturn:
        # Only reached for what an in-process Device has beyond the host surface (blocks, links, stats...).
        where = self.__dict__.get("url", "another process")
        raise AttributeError(
            f"{name!r} is not available on a remote device: the device's hardware lives in the server at {where}"
        )

    def __repr__(self) -> str:
        t = self.config.topology
        return (
            f"<RemoteDevice {self.config.name!r} {t.sips}x{t.cubes_per_sip}x{t.pes_per_cube} at {self.url} "
            f"now={format_time(self.sim.now)}>"
        )

    # ------------------------------------------------------------ host surface
    @property
    def now_ps(self) -> int:
        return self.sim.now

    def iter_pes(self) -> Iterator[PeNode]:
        """No PE is local: the server checks its own memory."""
        return iter(())

    def register_host_buffer(self, name: str, buffer: Any) -> str:
        """Announce a writable host buffer; its bytes travel with the requests that read it."""
        self._check_open()
        arr = self._buffers[name] = host_buffer_bytes(name, buffer, self._buffers)
        self._sent[name] = _Ranges()
        self._send({"t": "buf", "name": name, "nbytes": int(arr.nbytes)})
        return name

    def unregister_host_buffer(self, name: str) -> None:
        if self._buffers.pop(name, None) is None:
            raise KeyError(f"host buffer {name!r} is not registered")
        del self._sent[name]
        if not self._closed:
            self._send({"t": "free", "name": name})

    def host_buffer(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        try:
            return self._buffers[name]
        except KeyError:
            raise KeyError(f"host buffer {name!r} is not registered") from None

    async def request(self, msg: HostMessage) -> tuple[ResponseMsg, ...]:
        """Send ``msg`` to the device and wait for every targeted PE's answer.

        Raises as :meth:`Device.request` does (:class:`~kbus.errors.DeviceError`
        for a failed response, ``ValueError`` for ids already in flight), and
        :class:`~kbus.errors.RemoteError` if the connection fails or the
        server refuses the frame.
        """
        if not isinstance(msg, REQUESTS):
            raise TypeError(
                f"device.request() takes a host request message ({', '.join(t.__name__ for t in REQUESTS)}), "
                f"got {type(msg).__name__}"
            )
        self._check_open()
        wire = to_wire(msg)
        if type(msg) is MemoryWriteMsg and msg.src_kind == "host_buffer_ref" and msg.host_buffer in self._buffers:
            self._ship_kernel(msg)
            self._upload(msg.host_buffer, msg.host_offset, msg.nbytes)
        rid = next(self._ids)
        sim = self.sim
        waiter = sim.waiter()
        if not self._calls:
            sim.hold()
        self._calls[rid] = _Call(msg, waiter)
        self._send({"t": "req", "id": rid, "msg": wire, "seen": self._delivered})
        return await sim.park(waiter, _RemoteWait(msg, self.url))  # type: ignore[no-any-return]

    async def fetch_stats(self) -> DeviceStats:
        """The served device's block, level and link counters now (outside virtual time)."""
        self._check_open()
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._stat_calls[rid] = fut
        self._send({"t": "stats", "id": rid})
        self._flush_soon()
        try:
            frame = await fut
        finally:
            self._stat_calls.pop(rid, None)
        blocks = [BlockStats(*row) for row in frame["blocks"]]
        links = [LinkStats(*row) for row in frame["links"]]
        return DeviceStats(
            int(frame["now_ps"]), {b.path: b for b in blocks}, frame["levels"], {k.name: k for k in links}
        )

    async def aclose(self) -> None:
        """Close the connection (the server frees this client's buffers) and stop local tasks."""
        if not self._closed:
            if self._unacked:
                self._send({"t": "ack", "n": self._unacked})
                self._unacked = 0
            self._flush()
            self._closed = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._outbox.flushed(), timeout=5)
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._fail_pending(RemoteError(f"the connection to {self.url} was closed by this client"))
        await self._outbox.aclose()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self.sim.shutdown()

    # ---------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._failure is not None:
            raise RemoteError(f"the connection to {self.url} failed: {self._failure}") from self._failure
        if self._closed:
            raise RemoteError(f"the remote device at {self.url} is closed")

    def _send(self, frame: dict[str, Any] | bytes | str) -> None:
        """Queue a frame, sent after the current loop pass (with the frames queued meanwhile).
        While an ack is due, hold the queue: the server's time is held for us anyway, and the
        ack can then ride on the last request (one message, one write)."""
        out = self._out
        out.append(frame)
        if len(out) == 1 and not (self._ack_scheduled and self._unacked and self._polls < _FAST_POLLS):
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_cb)

    def _flush_cb(self) -> None:
        self._flush_scheduled = False
        if self._ack_scheduled and self._unacked and self._polls < _FAST_POLLS:
            return  # the ack sends them
        self._flush()

    def _flush(self) -> None:
        """Encode the queued frames and hand them to the outbox (written at once when small)."""
        if not self._out or self._closed:
            return
        out, self._out = self._out, []
        fmt = self.format
        batch = batch_frames([encode_frame(frame, fmt) if isinstance(frame, dict) else frame for frame in out], fmt)
        self.bytes_sent += sum(len(m) for m in batch)
        self._outbox.push(batch)

    def _ship_kernel(self, msg: MemoryWriteMsg) -> None:
        """Before a kernel's code blob is written, send the kernel itself (see :mod:`kbus.remote.kernels`)."""
        if not 0 < msg.nbytes <= MAX_BLOB or msg.host_buffer is None:
            return
        kern = blob_kernel(self._buffers[msg.host_buffer][msg.host_offset : msg.host_offset + msg.nbytes])
        if kern is None or kern.id in self._shipped:
            return
        specs = kernel_specs(kern, set(self._shipped))
        self._send({"t": "kernel", "specs": specs})
        self._shipped.add(kern.id)
        for spec in specs:
            self._shipped.add(KernelId(spec["name"], spec["sha"], 0))

    def _upload(self, name: str, offset: int, nbytes: int) -> None:
        buf = self._buffers[name]
        end = min(offset + max(nbytes, 0), buf.nbytes)
        if offset < 0 or offset >= end:
            return  # the device reports the bad range
        ranges = self._sent[name]
        for a, b in ranges.missing(offset, end):
            for start in range(a, b, self.chunk):
                stop = min(start + self.chunk, b)
                # Encoded now, from a view of the buffer: one copy, of the bytes as they are now.
                frame = {"t": "put", "name": name, "offset": start, "data": buf[start:stop].data}
                self._send(encode_frame(frame, self.format))
        ranges.add(offset, end)

    async def _read_loop(self) -> None:
        try:
            async for raw in self._ws:
                self.bytes_received += len(raw)
                for frame in decode_frames(raw, self.format):
                    self._on_frame(check_frame(frame, self.format))
        except ConnectionClosed as exc:
            self._lost(exc)
            return
        except Exception as exc:  # a frame we cannot understand: the connection is unusable
            self._lost(exc)
            with contextlib.suppress(Exception):
                await self._ws.close(code=1002, reason="protocol error")
            return
        self._lost(ConnectionError("the server closed the connection"))

    def _lost(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._failure = exc
        self._fail_pending(RemoteError(f"lost the connection to {self.url}: {exc}"))

    def _fail_pending(self, exc: BaseException) -> None:
        for fut in self._stat_calls.values():
            if not fut.done():
                fut.set_exception(exc)
        pending, self._calls = self._calls, {}
        for call in pending.values():
            self.sim.wake_error(call.waiter, exc)
        if pending:
            self.sim.release()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind == "data":
            self._on_data(frame)
        elif kind == "resp":
            self._on_response(frame)
        elif kind == "stats":
            fut = self._stat_calls.get(frame.get("id"))  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(frame)
        elif kind == "error":
            self._on_error(frame)
        else:
            raise RemoteError(f"the server sent a frame of unknown kind {kind!r}", path="t")

    def _on_data(self, frame: dict[str, Any]) -> None:
        name, offset, data = frame["name"], frame["offset"], frame["data"]
        buf = self._buffers.get(name)
        if buf is None:  # unregistered meanwhile (an abandoned read): nothing to fill
            return
        buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def _settle(self, rid: int) -> _Call | None:
        call = self._calls.pop(rid, None)
        if call is not None and not self._calls:
            self.sim.release()
        return call

    def _on_response(self, frame: dict[str, Any]) -> None:
        sim: ClientSim = self.sim
        now = int(frame["now_ps"])
        if now > sim.device_now:
            sim.device_now = now
        self._delivered += 1
        if self.lockstep:
            self._unacked += 1
            self._schedule_ack()
        call = self._settle(int(frame["id"]))
        if call is None:
            return
        try:
            responses = tuple(_response(r) for r in frame["responses"])
        except CodecError as exc:
            sim.wake_error(call.waiter, RemoteError(f"the server sent a bad response: {exc}", path=exc.path))
            return
        if frame["ok"]:
            sim.wake(call.waiter, responses)
            return
        raised, error = frame.get("raised"), str(frame.get("error"))
        failure: BaseException
        if raised in ("DeviceError", "KernelError"):
            failure = DeviceError(error, responses)
        elif raised == "ValueError":
            failure = ValueError(error)
        elif raised == "TypeError":
            failure = TypeError(error)
        else:
            failure = RemoteError(f"{call.msg.msg_type} {call.msg.request_id!r}: {error}", path=frame.get("path") or "")
        sim.wake_error(call.waiter, failure)

    def _on_error(self, frame: dict[str, Any]) -> None:
        text = f"the server at {self.url} rejected a frame: {frame.get('error')}"
        rid = frame.get("id")
        call = self._settle(rid) if isinstance(rid, int) else None
        if call is not None:
            self.sim.wake_error(call.waiter, RemoteError(text, path=str(frame.get("path") or "")))
        else:
            self.errors.append(text)
            warnings.warn(text, RuntimeWarning, stacklevel=1)

    def _schedule_ack(self) -> None:
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self._polls = 0
            asyncio.get_running_loop().call_soon(self._maybe_ack)

    def _maybe_ack(self) -> None:
        """Ack the responses delivered so far once the local engine has nothing left to do."""
        if self._closed or self._failure is not None:
            self._ack_scheduled = False
            self._quiet = 0
            self._flush()
            return
        own = 1 if self._calls else 0
        if self.sim.runnable > own:
            # The host is still reacting (a task ready, a woken host task not resumed yet).
            self._quiet = 0
            self._polls += 1
            loop = asyncio.get_running_loop()
            if self._polls < _FAST_POLLS:
                loop.call_soon(self._maybe_ack)
            else:  # a long foreign wait: poll without spinning, and stop holding frames back
                self._flush()
                loop.call_later(0.0005, self._maybe_ack)
            return
        if self._quiet < _QUIET_PASSES:
            # Quiet for now: let the callbacks already queued run (a finished task resolves a
            # gather; a tensor freed by the host queues its unmap from a loop callback) and
            # look again before acking.
            self._quiet += 1
            asyncio.get_running_loop().call_soon(self._maybe_ack)
            return
        self._ack_scheduled = False
        self._quiet = 0
        if self._unacked:
            out = self._out
            last = out[-1] if out else None
            if isinstance(last, dict) and last["t"] == "req":
                last["ack"] = self._unacked  # processed after the request, as a separate ack would be
            else:
                out.append({"t": "ack", "n": self._unacked})
            self._unacked = 0
        self._flush()


async def _served_builtin(*_: Any) -> NoReturn:  # pragma: no cover - never called
    raise RuntimeError("builtins of a remote device run in the server")


def _response(wire: Any) -> ResponseMsg:
    msg = from_wire(wire)
    if type(msg) is not ResponseMsg:
        raise CodecError(f"expected a response, got {type(msg).__name__}", path="msg_type")
    return msg


async def connect_device(
    url: str,
    *,
    token: str | None = None,
    format: WireFormat = "msgpack",
    max_size: int | None = None,
    open_timeout: float = 10.0,
    lockstep: bool = True,
) -> RemoteDevice:
    """Connect to a device server (``kbus serve``) at ``url`` (``ws://host:port``).

    ``token`` (default: the ``KBUS_TOKEN`` environment variable) is sent as a
    bearer token; ``format`` is ``"msgpack"`` or ``"json"``; ``max_size``
    bounds the frames accepted from the server (default: no bound, the
    server is trusted). ``lockstep=False`` lets the device's time run on while
    this client reacts to a response: more requests per second, but virtual
    times that depend on wall-clock timing (see :mod:`kbus.remote.server`).
    Close it with ``await device.aclose()``.
    """
    if format not in ("msgpack", "json"):
        raise ValueError(f"connect_device: format must be 'msgpack' or 'json', got {format!r}")
    if token is None:
        token = os.environ.get("KBUS_TOKEN") or None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await ws_connect(
            url,
            subprotocols=[f"kbus.{format}"],  # type: ignore[list-item]
            additional_headers=headers,
            max_size=max_size,
            open_timeout=open_timeout,
            compression=None,
            close_timeout=2.0,
        )
    except InvalidStatus as exc:
        code = exc.response.status_code
        why = "a valid token is required (--token / KBUS_TOKEN)" if code in (401, 403) else "refused"
        raise RemoteError(f"the device server at {url} refused the connection: HTTP {code}: {why}") from None
    except InvalidURI as exc:
        raise RemoteError(f"{url!r} is not a websocket URL (ws://host:port): {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise RemoteError(f"cannot connect to a device server at {url}: {exc}") from None
    try:
        hello = decode_frame(await asyncio.wait_for(ws.recv(), open_timeout), format)
        if hello.get("t") != "hello":
            raise RemoteError(f"{url} did not greet with a hello frame (got {hello.get('t')!r})", path="t")
        version = hello.get("protocol")
        if version != PROTOCOL_VERSION:
            raise RemoteError(
                f"{url} speaks kbus remote protocol {version!r}; this client speaks {PROTOCOL_VERSION}",
                path="protocol",
            )
    except BaseException:
        await ws.close()
        raise
    return RemoteDevice(ws, hello, format, url, lockstep=lockstep)


def is_url(spec: object) -> bool:
    """True for a ``ws://`` or ``wss://`` device URL."""
    return isinstance(spec, str) and spec.startswith(("ws://", "wss://"))
