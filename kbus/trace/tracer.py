"""The Tracer: turns the engine's hooks into events and fans them out to sinks.

The engine and the blocks expose hook attributes that are ``None`` unless
somebody listens (``Link.on_send``, ``Block.on_busy``, ``Inbox.on_depth``,
``device.on_request``, ``sim.tracer``). A ``None`` check is all a hop pays when
nothing traces, which is why tracing is an attachment and not a mode: a
:class:`Tracer` sets every hook of one device on construction and
:meth:`Tracer.detach` puts ``None`` back.

Each hook builds one event tuple (see :mod:`kbus.trace.events`) and hands it to
the sinks. A sink is any object with ``write(event)`` and ``close()``; the
Chrome-JSON :class:`~kbus.trace.FileSink` and the websocket stream are the two
shipped. Sinks run synchronously inside the hook, on the simulation's thread,
so a sink must never block or await: the file sink buffers and writes in
chunks, the stream sink appends to a ring and lets its own tasks do the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from ..errors import KbusError
from .events import Event

__all__ = ["Sink", "TraceError", "Tracer", "topology_event"]


class TraceError(KbusError, RuntimeError):
    """Tracing could not be set up or used: a hook taken, a sink closed, a bad argument."""


@runtime_checkable
class Sink(Protocol):
    """Where events go. ``write`` is called on the simulation's hot path: never block."""

    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


def _noop(event: Event) -> None:
    """The fan-out used while a tracer has no sink: events are dropped on the floor."""


def topology_event(device: Any, now: int = 0) -> Event:
    """The ``meta``/``topology`` event describing ``device``'s blocks and links.

    Sinks receive it first, so they can lay out processes and tracks (the
    file sink) or rows (the viewer) in the device's own order before the first
    real event arrives. The device's dicts are built deterministically, so
    their order is the same on every run.
    """
    blocks = {path: str(getattr(block, "kind", "block")) for path, block in device.blocks.items()}
    config = getattr(device, "config", None)
    return (
        now,
        None,
        "meta",
        "topology",
        "",
        {"device": str(getattr(config, "name", "device")), "blocks": blocks, "links": list(device.links)},
    )


class Tracer:
    """Attach to every hook of ``device`` and send the events to ``sinks``.

    ``device`` follows the device contract (``sim``, ``config.name``,
    ``blocks``, ``links``, ``on_request``); see ``kbus/trace/README.md``. The
    switches leave a family of hooks unset (and so free): ``depth=False`` is
    the usual one, inbox depth changes being the most frequent events.

    Use it as a context manager, or call :meth:`close` (detach and close the
    sinks) or :meth:`detach` (detach only; the sinks stay open).
    """

    def __init__(
        self,
        device: Any,
        *sinks: Sink,
        links: bool = True,
        busy: bool = True,
        depth: bool = True,
        requests: bool = True,
    ) -> None:
        for attr in ("sim", "blocks", "links"):
            if not hasattr(device, attr):
                raise TraceError(
                    f"Tracer: {type(device).__name__} has no {attr!r} attribute; "
                    "a traced device needs sim, blocks, links (see kbus/trace/README.md)"
                )
        self.device = device
        self.sim = device.sim
        self._sinks: list[Sink] = []
        self._write: Callable[[Event], None] = _noop
        self._hooks: list[tuple[object, str, object]] = []
        self._open_requests: dict[tuple[object, object], list[int]] = {}
        self._attached = False
        self._closed = False
        self._attach(links=links, busy=busy, depth=depth, requests=requests)
        for sink in sinks:
            self.add_sink(sink)

    # ------------------------------------------------------------------ sinks
    @property
    def sinks(self) -> tuple[Sink, ...]:
        return tuple(self._sinks)

    @property
    def attached(self) -> bool:
        return self._attached

    def add_sink(self, sink: Sink) -> None:
        """Start sending events to ``sink``; it first receives the topology event."""
        if self._closed:
            raise TraceError("Tracer.add_sink: this tracer is closed; create a new Tracer")
        if not isinstance(sink, Sink):
            raise TraceError(f"Tracer.add_sink: {type(sink).__name__} is not a sink (it needs write() and close())")
        if sink in self._sinks:
            raise TraceError(f"Tracer.add_sink: {sink!r} is already attached to this tracer")
        sink.write(topology_event(self.device, self.sim.now))
        self._sinks.append(sink)
        self._rebind()

    def remove_sink(self, sink: Sink) -> None:
        """Stop sending events to ``sink`` (it is not closed)."""
        try:
            self._sinks.remove(sink)
        except ValueError:
            raise TraceError(f"Tracer.remove_sink: {sink!r} is not attached to this tracer") from None
        self._rebind()

    def _rebind(self) -> None:
        """Pick the cheapest fan-out for the current sinks.

        With one sink (the common case) the hooks call its ``write`` directly;
        only several sinks pay for a loop.
        """
        sinks = tuple(self._sinks)
        if not sinks:
            self._write = _noop
        elif len(sinks) == 1:
            self._write = sinks[0].write
        else:
            writes = tuple(s.write for s in sinks)

            def fan_out(event: Event) -> None:
                for w in writes:
                    w(event)

            self._write = fan_out

    # ------------------------------------------------------------------ hooks
    def _set(self, obj: object, attr: str, hook: object, what: str) -> None:
        current = getattr(obj, attr, None)
        if current is not None:
            raise TraceError(
                f"Tracer: {what} already has a {attr} hook ({current!r}); is another Tracer attached? detach it first"
            )
        setattr(obj, attr, hook)
        self._hooks.append((obj, attr, hook))

    def _attach(self, *, links: bool, busy: bool, depth: bool, requests: bool) -> None:
        device = self.device
        try:
            if links:
                for name, link in device.links.items():
                    self._set(link, "on_send", self._link_hook(name), f"link {name!r}")
            for path, block in device.blocks.items():
                if busy:
                    self._set(block, "on_busy", self._busy_hook(path), f"block {path!r}")
                if depth:
                    for attr in ("inbox", "resp_inbox"):
                        inbox = getattr(block, attr, None)
                        if inbox is not None:
                            self._set(inbox, "on_depth", self._depth_hook(path, attr), f"{attr} of block {path!r}")
            if requests:
                self._set(device, "on_request", self._on_request, "the device")
            self._set(self.sim, "tracer", self, "the simulation (sim.tracer)")
        except BaseException:
            self._unhook()
            raise
        self._attached = True

    def _link_hook(self, name: str) -> Callable[[Any, Any, int, int, int], None]:
        tracer = self

        def on_send(link: Any, msg: Any, nbytes: int, start: int, deliver: int) -> None:
            if msg is None:
                tracer._write((start, deliver - start, "link", "data", name, {"bytes": nbytes}))
                return
            try:  # protocol messages have all three: plain attribute reads are the cheap path
                mt = msg.msg_type
                corr = msg.correlation_id
                rid = msg.request_id
            except AttributeError:
                mt = getattr(msg, "msg_type", None) or type(msg).__name__
                corr = getattr(msg, "correlation_id", None)
                rid = getattr(msg, "request_id", None)
            tracer._write(
                (
                    start,
                    deliver - start,
                    "link",
                    mt,
                    name,
                    {"msg_type": mt, "correlation_id": corr, "request_id": rid, "bytes": nbytes},
                )
            )

        return on_send

    def _busy_hook(self, path: str) -> Callable[[Any, int, int, str], None]:
        tracer = self

        def on_busy(block: Any, start: int, end: int, label: str) -> None:
            tracer._write((start, end - start, "busy", label, path, None))

        return on_busy

    def _depth_hook(self, path: str, which: str) -> Callable[[Any, int], None]:
        tracer = self
        sim = self.sim

        def on_depth(inbox: Any, depth: int) -> None:
            tracer._write((sim.now, None, "depth", which, path, {"depth": depth}))

        return on_depth

    def _on_request(self, phase: str, msg: Any, responses: Iterable[Any] | None, now_ps: int) -> None:
        """``device.on_request``: a begin marker when a host request enters, its span when it ends."""
        mt = getattr(msg, "msg_type", None) or type(msg).__name__
        corr = getattr(msg, "correlation_id", None)
        rid = getattr(msg, "request_id", None)
        key = (corr, rid)
        args: dict[str, Any] = {"msg_type": mt, "correlation_id": corr, "request_id": rid}
        if phase == "begin":
            self._open_requests.setdefault(key, []).append(now_ps)
            self._write((now_ps, None, "request", mt, "host", args))
            return
        if phase != "end":
            raise TraceError(f"device.on_request: phase must be 'begin' or 'end', got {phase!r} for {mt} {corr!r}")
        started = self._open_requests.get(key)
        if started:
            begin = started.pop(0)
            if not started:
                del self._open_requests[key]
        else:  # the tracer was attached while this request was in flight
            begin = now_ps
            args["begin_unknown"] = True
        resp = tuple(responses or ())
        errors = [str(e) for e in (getattr(r, "error", None) for r in resp) if e]
        args["responses"] = len(resp)
        args["ok"] = all(bool(getattr(r, "success", True)) for r in resp)
        if errors:
            args["error"] = errors[0]
        self._write((begin, now_ps - begin, "request", mt, "host", args))

    # ---------------------------------------------------------- for the layers
    def emit(self, cat: str, name: str, path: str, ts_ps: int, dur_ps: int | None, args: dict[str, Any] | None) -> None:
        """Record an event from a device layer (allocator, MMU, kernel runner).

        ``ts_ps`` is when it happened (or began), in integer picoseconds;
        ``dur_ps`` its length, or ``None`` for an instant. For ``cat="kernel"``
        send a begin marker (``dur_ps=None``) when the program starts and, when
        it ends, the same ``name`` and ``path`` with ``ts_ps`` = the start and
        ``dur_ps`` = its length.
        """
        if type(ts_ps) is not int:
            raise TraceError(
                f"Tracer.emit({cat!r}, {name!r}, {path!r}): ts_ps must be integer picoseconds, "
                f"got {type(ts_ps).__name__} {ts_ps!r}"
            )
        if dur_ps is not None and (type(dur_ps) is not int or dur_ps < 0):
            raise TraceError(
                f"Tracer.emit({cat!r}, {name!r}, {path!r}): dur_ps must be None or an int >= 0 ps, got {dur_ps!r}"
            )
        self._write((ts_ps, dur_ps, cat, name, path, args))

    # -------------------------------------------------------------- lifecycle
    def _unhook(self) -> None:
        for obj, attr, hook in reversed(self._hooks):
            if getattr(obj, attr, None) is hook:
                setattr(obj, attr, None)
        self._hooks.clear()

    def detach(self) -> None:
        """Put ``None`` back in every hook this tracer set (idempotent); sinks stay open."""
        self._unhook()
        self._attached = False

    def close(self) -> None:
        """Detach, then close every sink (idempotent)."""
        if self._closed:
            return
        self.detach()
        self._closed = True
        sinks, self._sinks = self._sinks, []
        self._rebind()
        errors: list[Exception] = []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:  # close the others anyway, then report
                exc.add_note(f"while closing trace sink {sink!r}")
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("closing trace sinks failed", errors)

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"<Tracer {state} hooks={len(self._hooks)} sinks={len(self._sinks)}>"
