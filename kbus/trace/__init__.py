"""kbus.trace: watch a simulated device — hooks to events, events to sinks.

* :class:`Tracer` attaches to every hook of a device (links, blocks, inboxes,
  host requests, ``sim.tracer``) and fans events out to sinks; detached, the
  hooks are ``None`` again and cost nothing.
* :class:`FileSink` writes Chrome trace-event JSON for Perfetto UI and
  chrome://tracing; :func:`record` is the one-liner.
* :func:`serve` streams events live over websockets (the page in
  the viewer page ``serve()`` also serves draws them).

See ``kbus/trace/README.md`` for the event model and the stream protocol.
"""

from __future__ import annotations

import os
from typing import Any

from .chrome import FileSink
from .events import CATEGORIES, FIELDS, SPAN_CATS, Event, event_dict
from .session import TraceSession, attach_from_open_device, parse_ws_spec
from .stream import EventFilter, StreamClient, StreamSink, TraceServer, serve
from .tracer import Sink, TraceError, Tracer, topology_event


def record(device: Any, path: str | os.PathLike[str], *, counters: bool = True) -> Tracer:
    """Trace ``device`` into the Chrome JSON file ``path``; close the returned tracer to finish it.

    ``with kbus.trace.record(device, "run.json"): ...`` is the usual form.
    """
    return Tracer(device, FileSink(path, counters=counters))


__all__ = [
    "CATEGORIES",
    "FIELDS",
    "SPAN_CATS",
    "Event",
    "EventFilter",
    "FileSink",
    "Sink",
    "StreamClient",
    "StreamSink",
    "TraceError",
    "TraceServer",
    "TraceSession",
    "Tracer",
    "attach_from_open_device",
    "event_dict",
    "parse_ws_spec",
    "record",
    "serve",
    "topology_event",
]
