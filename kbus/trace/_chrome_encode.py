"""Chrome trace-event JSON encoding, and the writer process that runs it.

This module is the part of :class:`~kbus.trace.FileSink` that turns events
into records; see ``chrome.py`` for the layout of the file and why the work
runs in a separate process. It imports nothing from kbus but
``events.py``, so the writer process can load the two files on their own and
start in a few tens of milliseconds instead of importing the whole package.

Layout of the file
------------------
The file opens in Perfetto UI (ui.perfetto.dev) and chrome://tracing. Layout:

* one *process* per SIP (``sip0``, ``sip1``...) plus one for the ``host``, named
  with ``process_name`` metadata events; pids are fixed numbers derived from
  the path (host 1, ``sipN`` N+2), never the OS's;
* one *thread track* per block, named ``path (KIND)``; busy spans are complete
  (``X``) events on it;
* one track per link (``src->dst``), where each message is an ``X`` span from the
  moment it was offered to its delivery, named by its ``msg_type``;
* host requests are ``X`` spans on the host's ``requests`` track, kernels on a
  ``path kernel`` track;
* inbox depths are counter (``C``) events; allocator and MMU events are instants.

Why lanes: a trace viewer requires the slices of one (pid, tid) to nest, but
several messages can be in flight on one link and a block may run concurrent
work. Every span therefore goes to the first *lane* of its track whose last
span ended at or before the new one starts; a new lane (a sibling track named
``... #2``) opens only when all are busy. Lanes are disjoint by construction, so
the output always nests, whatever order events arrive in.

Flows: each host request's span starts a flow (``bind_id`` + ``flow_out``) and
every response to *that* request reaching the host over a link ends one
(``flow_in``), so the viewer draws an arrow from the request to each of its own
responses. Flows are keyed by ``(correlation_id, request_id)``: a runtime sends
every request under one correlation id, and the device only promises that the
pair is unique among pending requests.

Time: ``ts``/``dur`` are microseconds (the format's unit) as floats carrying
the virtual picoseconds exactly (``ts_ps / 1e6``). ``displayTimeUnit`` is not
set on purpose: Perfetto reads it as the unit of ``ts`` itself.

Incremental and deterministic: events are encoded as they come and written in
chunks of about ``flush_bytes``, so memory stays bounded; the file is a JSON object
``{"traceEvents": [...], "otherData": {...}}`` that is valid once :meth:`FileSink.close`
has written the tail. Everything written derives from the events alone (no wall
clock, no OS pids, dicts in insertion order), so the same events give the same
bytes on every event loop.
"""

from __future__ import annotations

import struct
import sys
from typing import IO, Any, Final, TypeAlias

import orjson
from orjson import JSONEncodeError
from orjson import dumps as _orjson_dumps

# Only modules that import nothing of kbus beyond this package's leaves: the
# writer process loads this file without importing kbus (see FileSink).
from .events import _OPTS, SPAN_CATS, Event, _fallback, dumps, link_ends

__all__ = ["FRAME_EVENTS", "FRAME_FLUSH", "ChromeEncoder", "frame", "main"]

_LANE_STRIDE: Final = 1000
"""tids of a track's lanes are ``base + lane``; base tids step by this much."""

_OVERFLOW_TID: Final = 2**31
"""First tid handed out to lanes beyond the stride (absurdly busy tracks)."""

_HOST_PID: Final = 1

_HOST_NAME: Final = {"name": "process_name", "ph": "M", "ts": 0, "pid": _HOST_PID, "tid": 0, "args": {"name": "host"}}
_HOST_SORT: Final = {
    "name": "process_sort_index",
    "ph": "M",
    "ts": 0,
    "pid": _HOST_PID,
    "tid": 0,
    "args": {"sort_index": _HOST_PID},
}

_SpanKey: TypeAlias = tuple[str, str, str, object, object, object]


class _Track:
    """One named track: a base tid and the end time of the last span in each lane."""

    __slots__ = ("base", "busy", "lanes", "name", "pid", "tids")

    def __init__(self, pid: int, base: int, name: str) -> None:
        self.pid = pid
        self.base = base
        self.name = name
        self.lanes: list[int] = []
        self.tids: list[int] = []
        self.busy = _template(self, "busy")


def _template(tr: _Track, cat: str) -> dict[str, Any]:
    """A record prefilled with a track's constant fields, copied per event.

    Copying a small dict and setting four keys costs about half of building
    an eight-key literal, and it fixes the key order (so the bytes) once.
    """
    return {"name": "", "cat": cat, "ph": "X", "ts": 0.0, "dur": 0.0, "pid": tr.pid, "tid": tr.base}


def _owner(link: str, blocks: dict[str, str]) -> str:
    """The block a link's track is listed under: its source, or the block that source is a port of.

    Some link ends are ports rather than blocks (``sip0.cube0.pe0``,
    ``sip0.cube0.hbm.pe0``): the longest block path prefixing the source wins,
    else the destination block, else the source as written.
    """
    src, dst = link_ends(link)
    if src in blocks or src == "host":
        return src
    parts = src.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in blocks:
            return prefix
    return dst if dst in blocks else src


class ChromeEncoder:
    """Turn events into Chrome trace-event JSON records written to ``out``.

    Pure bookkeeping and encoding, no policy: :class:`~kbus.trace.FileSink`
    decides where it runs (a writer process, or inline). ``counters=False``
    leaves out inbox depth counters; ``flush_bytes`` is how much encoded JSON
    is kept before a write to ``out``. :meth:`finish` writes the tail that
    makes the file valid JSON.
    """

    def __init__(self, out: IO[bytes], *, counters: bool = True, flush_bytes: int = 1 << 20) -> None:
        self.counters = counters
        self._flush_bytes = flush_bytes
        self._file: IO[bytes] | None = out
        # The host's process records open the array, so every later record is ",\n" + record.
        self._buf: bytearray | None = bytearray()
        self.events_written = 0
        self._device = ""
        self._kinds: dict[str, str] = {}
        self._pids: dict[str, int] = {"host": _HOST_PID}
        self._next_other_pid = 1000
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._blocks: dict[str, _Track] = {}  # the (path, "") tracks again, for the hot path
        # link name -> (its track, whether it delivers to the host, record template)
        self._links: dict[str, tuple[_Track, bool, dict[str, Any]]] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        self._next_base = _LANE_STRIDE
        self._next_overflow = _OVERFLOW_TID
        self._open: dict[_SpanKey, list[tuple[int, dict[str, Any] | None]]] = {}
        self._flows: dict[tuple[object, object], int] = {}  # (correlation_id, request_id) -> flow id
        self._flow_used: set[int] = set()
        self._next_flow = 1
        self._last_ps = 0
        self._begin()

    # ------------------------------------------------------------ structure
    def _pid(self, path: str) -> int:
        """The process of ``path``: its first dotted component (host, sipN, or other)."""
        comp = path.split(".", 1)[0] if path else "host"
        pid = self._pids.get(comp)
        if pid is not None:
            return pid
        if comp == "host":
            pid = _HOST_PID
        elif comp.startswith("sip") and comp[3:].isdigit():
            pid = int(comp[3:]) + 2
        else:
            pid = self._next_other_pid
            self._next_other_pid += 1
        self._pids[comp] = pid
        label = comp if not self._device or comp == "host" else f"{comp} ({self._device})"
        self._out({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0, "args": {"name": label}})
        self._out({"name": "process_sort_index", "ph": "M", "ts": 0, "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        return pid

    def _track(self, path: str, group: str, owner: str) -> _Track:
        """The track for ``(path, group)``, created (and named) on first use.

        ``owner`` is the path whose process the track belongs to (a link's
        source block). Bases reserved from the topology keep each block's
        tracks together and in device order.
        """
        key = (path, group)
        tr = self._tracks.get(key)
        if tr is not None:
            return tr
        base = self._reserved.get(key)
        if base is None:
            base = self._next_base
            self._next_base += _LANE_STRIDE
        if group == "":
            kind = self._kinds.get(path)
            name = f"{path} ({kind})" if kind else path
        elif group == "link":
            name = path
        elif group == "request":
            name = "requests"
        else:
            name = f"{path} {group}"
        tr = self._tracks[key] = _Track(self._pid(owner), base, name)
        if group == "":
            self._blocks[path] = tr
        self._lane_tid(tr, 0)
        return tr

    def _lane_tid(self, tr: _Track, lane: int) -> int:
        """tid of lane ``lane`` of ``tr``, naming it when it first appears."""
        while len(tr.tids) <= lane:
            n = len(tr.tids)
            if n < _LANE_STRIDE:
                tid = tr.base + n
            else:
                tid = self._next_overflow
                self._next_overflow += 1
            tr.tids.append(tid)
            tr.lanes.append(0)
            name = tr.name if n == 0 else f"{tr.name} #{n + 1}"
            self._out({"name": "thread_name", "ph": "M", "ts": 0, "pid": tr.pid, "tid": tid, "args": {"name": name}})
            self._out(
                {
                    "name": "thread_sort_index",
                    "ph": "M",
                    "ts": 0,
                    "pid": tr.pid,
                    "tid": tid,
                    "args": {"sort_index": tid},
                }
            )
        return tr.tids[lane]

    def _place(self, tr: _Track, start: int, end: int) -> int:
        """Put the span ``[start, end]`` in the first lane free since ``start``; return its tid."""
        lanes = tr.lanes
        for i, last in enumerate(lanes):
            if last <= start:
                lanes[i] = end
                return tr.tids[i]
        tid = self._lane_tid(tr, len(lanes))
        lanes[-1] = end
        return tid

    def _topology(self, args: dict[str, Any]) -> None:
        """Reserve track bases in device order: each block, then the links it sends on."""
        self._device = str(args.get("device", ""))
        blocks: dict[str, str] = dict(args.get("blocks", {}))
        links: list[str] = list(args.get("links", []))
        self._kinds.update(blocks)
        by_src: dict[str, list[str]] = {}
        for name in links:
            by_src.setdefault(_owner(name, blocks), []).append(name)
        order: list[tuple[str, str]] = [("host", "request")]
        order += [(name, "link") for name in by_src.pop("host", [])]
        for path in blocks:
            order.append((path, ""))
            order += [(name, "link") for name in by_src.pop(path, [])]
        for rest in by_src.values():
            order += [(name, "link") for name in rest]
        for key in order:
            if key not in self._reserved and key not in self._tracks:
                self._reserved[key] = self._next_base
                self._next_base += _LANE_STRIDE
        for path in blocks:  # every block gets its named track even if idle
            self._track(path, "", path)

    # --------------------------------------------------------------- events
    def write(self, event: Event) -> None:
        """Turn one event (see :mod:`kbus.trace.events`) into a trace record.

        The two most frequent categories (link messages and busy spans) take a
        straight path with one dict lookup each. Records are built as dicts
        (orjson encodes a dict faster than Python formats a string).
        """
        ts, dur, cat, name, path, args = event
        if dur is None:
            if ts > self._last_ps:
                self._last_ps = ts
        elif ts + dur > self._last_ps:
            self._last_ps = ts + dur
        rec: dict[str, Any]
        if cat == "link":
            entry = self._links.get(path)
            if entry is None:
                src, dst = link_ends(path)
                tr = self._track(path, "link", src)
                entry = self._links[path] = (tr, dst == "host", _template(tr, "link"))
            rec = self._slice(entry[0], entry[2], name, ts, dur or 0, args)
            if args is not None and entry[1] and self._flows:
                fid = self._flows.get((args.get("correlation_id"), args.get("request_id")))
                if fid is not None:
                    rec["bind_id"] = fid
                    rec["flow_in"] = True
                    self._flow_used.add(fid)
        elif cat == "busy":
            tr = self._blocks.get(path) or self._track(path, "", path)
            rec = self._slice(tr, tr.busy, name, ts, dur or 0, args)
        elif cat == "depth":
            if not self.counters:
                return
            tr = self._blocks.get(path) or self._track(path, "", path)
            rec = {
                "name": f"{path} {name}",
                "cat": cat,
                "ph": "C",
                "ts": ts / 1e6,
                "pid": tr.pid,
                "tid": tr.tids[0],
                "args": args if args is not None else {"depth": 0},
            }
        elif cat == "meta":
            if name == "topology" and args is not None:
                self._topology(args)
            return
        elif cat in SPAN_CATS:
            self._span_event(ts, dur, cat, name, path, args)
            return
        elif dur is None:
            tr = self._blocks.get(path) or self._track(path, "", path)
            rec = {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": ts / 1e6, "pid": tr.pid, "tid": tr.tids[0]}
            if args is not None:
                rec["args"] = args
        else:
            self._span(ts, dur, cat, name, path, args)
            return
        self._out(rec)

    def _slice(
        self, tr: _Track, template: dict[str, Any], name: str, ts: int, dur: int, args: dict[str, Any] | None
    ) -> dict[str, Any]:
        """An ``X`` record on ``tr`` from its template, in lane 0 when that lane is free (the common case)."""
        lanes = tr.lanes
        rec = template.copy()
        rec["name"] = name
        rec["ts"] = ts / 1e6
        rec["dur"] = dur / 1e6
        if lanes[0] <= ts:
            lanes[0] = ts + dur
        else:
            rec["tid"] = self._place(tr, ts, ts + dur)
        if args is not None:
            rec["args"] = args
        return rec

    def _span_key(self, cat: str, name: str, path: str, args: dict[str, Any] | None) -> _SpanKey:
        """What pairs a begin marker with its span: where, what, and the ids the args carry."""
        if args is None:
            return (cat, path, name, None, None, None)
        pid = args.get("program_id")
        if isinstance(pid, list):
            pid = tuple(pid)
        return (cat, path, name, args.get("correlation_id"), args.get("request_id"), pid)

    def _span_event(
        self, ts: int, dur: int | None, cat: str, name: str, path: str, args: dict[str, Any] | None
    ) -> None:
        """A begin marker (remember it) or a completed span (write it, closing its flow)."""
        key = self._span_key(cat, name, path, args)
        flow_key = (key[3], key[4])
        if dur is None:
            self._open.setdefault(key, []).append((ts, args))
            if cat == "request":
                self._flows[flow_key] = self._next_flow
                self._next_flow += 1
            return
        opened = self._open.get(key)
        if opened:
            opened.pop(0)
            if not opened:
                del self._open[key]
        fid = self._flows.pop(flow_key, None) if cat == "request" else None
        self._span(ts, dur, cat, name, path, args, fid)

    def _span(
        self,
        ts: int,
        dur: int,
        cat: str,
        name: str,
        path: str,
        args: dict[str, Any] | None,
        flow: int | None = None,
    ) -> None:
        group = "request" if cat == "request" else cat
        tr = self._track(path, group, path)
        rec: dict[str, Any] = {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": ts / 1e6,
            "dur": dur / 1e6,
            "pid": tr.pid,
            "tid": self._place(tr, ts, ts + dur),
        }
        if args is not None:
            rec["args"] = args
        if flow is not None and flow in self._flow_used:
            self._flow_used.discard(flow)
            rec["bind_id"] = flow
            rec["flow_out"] = True
        self._out(rec)

    # ------------------------------------------------------------------ I/O
    # ---------------------------------------------------------------- output
    # The layout above (processes, tracks, lanes, flows) yields Chrome trace
    # records as dicts; these three methods turn them into bytes, and are all a
    # subclass writing another format overrides.
    def _begin(self) -> None:
        """Start the file: the array opens with the host's process records."""
        assert self._buf is not None
        self._buf += b'{"traceEvents":[\n' + dumps(_HOST_NAME) + b",\n" + dumps(_HOST_SORT)
        self.events_written = 2

    def _out(self, rec: dict[str, Any]) -> None:
        """Append one record (one line)."""
        try:
            enc = _orjson_dumps(rec, default=_fallback, option=_OPTS)
        except JSONEncodeError:
            enc = dumps(rec)
        buf = self._buf
        assert buf is not None, "ChromeEncoder: events after finish()"
        buf += b",\n"
        buf += enc
        self.events_written += 1
        if len(buf) >= self._flush_bytes:
            self.flush()

    def _end(self) -> bytes:
        """The tail that makes the file complete."""
        other = {
            "generator": "kbus.trace",
            "device": self._device,
            "clock": "virtual time; ts and dur in microseconds with picosecond resolution",
            "events": self.events_written,
            "end_ps": self._last_ps,
        }
        return b'\n],"otherData":' + dumps(other) + b"}\n"

    def flush(self) -> None:
        """Write the records encoded so far (the JSON stays unterminated until close).

        Records are encoded one by one into a single ``bytearray`` (one line
        each): the small ``bytes`` and dicts die at once, which keeps the
        allocator and the garbage collector out of the way; keeping thousands
        of them alive until a batch write is several times slower.
        """
        f = self._file
        buf = self._buf
        if f is None or not buf:
            return
        try:
            f.write(buf)
        finally:
            buf.clear()

    def finish(self) -> int:
        """Write the tail: spans still open end at the last time seen, marked ``unfinished``.

        Returns the number of records written. ``out`` itself is not closed.
        """
        if self._file is None:
            return self.events_written
        for key, opened in list(self._open.items()):
            cat, path, name = key[:3]
            for ts, args in opened:
                done = dict(args) if args is not None else {}
                done["unfinished"] = True
                fid = self._flows.pop((key[3], key[4]), None) if cat == "request" else None
                self._span(ts, max(self._last_ps - ts, 0), cat, name, path, done, fid)
        self._open.clear()
        self.flush()
        f, self._file = self._file, None
        self._buf = None
        f.write(self._end())
        f.flush()
        return self.events_written

    def feed(self, batch: bytes) -> None:
        """Encode one batch: a JSON array of events, as :func:`encode_batch` makes it."""
        write = self.write
        for ev in orjson.loads(batch):
            write(ev)


# ------------------------------------------------------------ batches, frames
def encode_batch(events: list[Event]) -> bytes:
    """A batch of events as one JSON array: one C call for thousands of events.

    Odd values in ``args`` (wide integers, non-string keys) make orjson refuse
    the batch; then each event is encoded on its own with the never-failing
    :func:`~kbus.trace.events.dumps`. Both ways give the same JSON values, so
    the trace is the same whichever path a batch took.
    """
    try:
        return orjson.dumps(events, default=_fallback, option=_OPTS)
    except orjson.JSONEncodeError:
        return b"[" + b",".join(dumps(ev) for ev in events) + b"]"


FRAME_EVENTS: Final = b"E"
"""Frame kind: a batch of events (a JSON array)."""
FRAME_FLUSH: Final = b"F"
"""Frame kind: write everything so far to the file and acknowledge with a line on stdout."""
_HEADER: Final = struct.Struct("<cI")


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame of the writer protocol: kind, payload length (u32 little-endian), payload."""
    return _HEADER.pack(kind, len(payload)) + payload


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    if not data:
        return None
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise EOFError(f"trace writer: stream ended inside a frame ({len(data)} of {n} bytes)")
        data += more
    return data


def main(argv: list[str]) -> int:
    """The writer process: ``argv = [path, format (json|perfetto), counters (0|1), flush_bytes]``.

    Reads frames from stdin until end of input, then finishes the file and
    prints the number of records written as the last line on stdout. Runs
    without importing kbus, so it starts in a few tens of milliseconds.
    """
    path, fmt, counters, flush_bytes = argv[0], argv[1], argv[2] == "1", int(argv[3])
    stdin, stdout = sys.stdin.buffer, sys.stdout
    with open(path, "wb") as out:
        enc = make_encoder(fmt, out, counters=counters, flush_bytes=flush_bytes)
        while True:
            head = _read_exact(stdin, _HEADER.size)
            if head is None:
                break
            kind, size = _HEADER.unpack(head)
            payload = _read_exact(stdin, size) if size else b""
            if kind == FRAME_EVENTS and payload:
                enc.feed(payload)
            elif kind == FRAME_FLUSH:
                enc.flush()
                out.flush()
                stdout.write("flushed\n")
                stdout.flush()
        count = enc.finish()
    stdout.write(f"{count}\n")
    stdout.flush()
    return 0


def make_encoder(fmt: str, out: IO[bytes], *, counters: bool, flush_bytes: int) -> ChromeEncoder:
    """The encoder for ``fmt``: ``"json"`` (Chrome trace-event JSON) or ``"perfetto"`` (protobuf)."""
    if fmt == "json":
        return ChromeEncoder(out, counters=counters, flush_bytes=flush_bytes)
    if fmt == "perfetto":
        from ._perfetto_encode import PerfettoEncoder

        return PerfettoEncoder(out, counters=counters, flush_bytes=flush_bytes)
    raise ValueError(f"trace format must be 'json' or 'perfetto', got {fmt!r}")
