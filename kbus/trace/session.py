"""``attach_from_open_device``: the tracing that ``kbus.open_device(trace=..., trace_ws=...)`` sets up.

The runtime calls it for every device it opens and enters the returned async
context manager for the device's lifetime. With neither option it does
nothing at all, so an untraced device keeps every hook ``None`` (free).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from .chrome import FileSink
from .stream import TraceServer, serve
from .tracer import TraceError, Tracer

__all__ = ["DEFAULT_WS_PORT", "TraceSession", "attach_from_open_device", "parse_ws_spec"]

DEFAULT_WS_PORT = 8765
"""The port the viewer page connects to when its URL names none."""


class TraceSession:
    """What :func:`attach_from_open_device` yields: the tracer and, if streaming, the server."""

    def __init__(self, tracer: Tracer, server: TraceServer | None) -> None:
        self.tracer = tracer
        self.server = server

    def __repr__(self) -> str:
        return f"<TraceSession {self.tracer!r} server={self.server!r}>"


def parse_ws_spec(spec: object) -> dict[str, Any]:
    """Turn an ``open_device(trace_ws=...)`` value into :func:`serve` keyword arguments.

    Accepted: ``True`` (loopback, port 8765), a port number (``0`` picks a free
    one), ``"host:port"``, ``"ws://host:port"``, or a dict of :func:`serve`
    options. Anything else raises :class:`TraceError` saying what was expected.
    """
    if spec is True:
        return {"host": "127.0.0.1", "port": DEFAULT_WS_PORT}
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec <= 65535:
            raise TraceError(f"open_device(trace_ws={spec}): a port must be in 0..65535")
        return {"host": "127.0.0.1", "port": spec}
    if isinstance(spec, str):
        text = spec if "//" in spec else f"ws://{spec}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise TraceError(
                f"open_device(trace_ws={spec!r}): {exc}; expected 'host:port' or 'ws://host:port'"
            ) from None
        if parts.scheme != "ws" or parts.path not in ("", "/"):
            raise TraceError(f"open_device(trace_ws={spec!r}): expected 'host:port' or 'ws://host:port'")
        return {"host": parts.hostname or "127.0.0.1", "port": DEFAULT_WS_PORT if port is None else port}
    if isinstance(spec, dict):
        return dict(spec)
    raise TraceError(
        f"open_device(trace_ws=...) takes True, a port, 'host:port', 'ws://host:port' or a dict of "
        f"kbus.trace.serve() options; got {type(spec).__name__} {spec!r}"
    )


@contextlib.asynccontextmanager
async def attach_from_open_device(
    device: Any,
    *,
    trace: str | os.PathLike[str] | None = None,
    trace_ws: object = None,
) -> AsyncIterator[TraceSession | None]:
    """Trace ``device`` into the Chrome JSON file ``trace`` and/or stream it per ``trace_ws``.

    Yields a :class:`TraceSession` (``None`` when both are ``None``/``False``).
    On exit the stream stops, the tracer detaches and the file is finished.
    """
    if trace is None and (trace_ws is None or trace_ws is False):
        yield None
        return
    ws_options = parse_ws_spec(trace_ws) if trace_ws is not None and trace_ws is not False else None
    tracer = Tracer(device)
    try:
        if trace is not None:
            if not isinstance(trace, (str, os.PathLike)):
                raise TraceError(f"open_device(trace=...) takes a file path, got {type(trace).__name__} {trace!r}")
            tracer.add_sink(FileSink(trace))
        if ws_options is not None:
            async with serve(device, **ws_options) as server:
                yield TraceSession(tracer, server)
        else:
            yield TraceSession(tracer, None)
    finally:
        tracer.close()
