"""Perfetto's native protobuf trace format, written by hand for speed.

:class:`PerfettoEncoder` reuses the whole layout of the Chrome JSON encoder
(processes, a track per block and link, lanes for overlapping spans, request
-> response flows) and only changes the last step: each record becomes
``TracePacket`` messages instead of a JSON line. The result opens in Perfetto
UI and ``trace_processor`` like any trace a Perfetto SDK writes, and is several
times smaller than the JSON file, because names are interned (sent once per
trace, then referred to by number) and numbers are varints.

Why by hand: the few messages needed (``TracePacket``, ``TrackDescriptor``,
``TrackEvent``, ``DebugAnnotation``, ``InternedData``) are encoded here from
their field numbers in ``protos/perfetto/trace/perfetto_trace.proto``; building
the same packets through the generated protobuf classes costs several
microseconds per event, which would make the writer process, not the
simulation, the bottleneck. The tests decode every packet with the published
schema (the ``perfetto`` package's generated classes) to keep this honest.

Mapping, record by record:

* process records -> a process track (``TrackDescriptor.process``);
* thread (lane) records -> a named child track of its process, ordered by tid;
* ``X`` -> ``TYPE_SLICE_BEGIN`` and ``TYPE_SLICE_END`` on the lane's track,
  args as debug annotations;
* ``i`` -> ``TYPE_INSTANT``; ``C`` -> a counter track per (process, name) and
  ``TYPE_COUNTER`` values;
* flows: a request's begin carries one flow id per response, and each
  response's begin terminates its own, so Perfetto draws an arrow from the
  request to every one of its responses (not a chain through them).

Time: Perfetto timestamps are integer nanoseconds, so picoseconds are
rounded down (a span's begin and end are rounded separately, so nesting is
kept). Perfetto rounds the JSON file's microsecond floats to nanoseconds on
load in the same way, so both files show the same thing.
"""

from __future__ import annotations

import struct
from typing import IO, Any, Final

from ._chrome_encode import _HOST_NAME, ChromeEncoder
from .events import Event, dumps

__all__ = ["PerfettoEncoder"]

_SEQ: Final = 1
"""The trusted packet sequence id of every packet (one writer, one sequence)."""

# TracePacket fields
_PKT_TIMESTAMP: Final = 8
_PKT_SEQ_ID: Final = 10
_PKT_TRACK_EVENT: Final = 11
_PKT_INTERNED: Final = 12
_PKT_SEQ_FLAGS: Final = 13
_PKT_TRACK_DESC: Final = 60
_PKT_FIRST_ON_SEQ: Final = 87
_SEQ_CLEARED: Final = 1
_SEQ_NEEDS_STATE: Final = 2
# TrackEvent fields and types
_TE_ANNOTATION: Final = 4
_TE_TYPE: Final = 9
_TE_NAME_IID: Final = 10
_TE_TRACK_UUID: Final = 11
_TE_CATEGORY_IIDS: Final = 3
_TE_COUNTER: Final = 30
_TE_DOUBLE_COUNTER: Final = 44
_TE_FLOW_IDS: Final = 47
_TE_TERMINATING_FLOW_IDS: Final = 48
_SLICE_BEGIN: Final = 1
_SLICE_END: Final = 2
_INSTANT: Final = 3
_COUNTER: Final = 4
# TrackDescriptor, ProcessDescriptor, CounterDescriptor
_TD_UUID: Final = 1
_TD_NAME: Final = 2
_TD_PROCESS: Final = 3
_TD_PARENT: Final = 5
_TD_COUNTER: Final = 8
_TD_CHILD_ORDERING: Final = 11
_TD_SIBLING_RANK: Final = 12
_EXPLICIT_ORDER: Final = 3
_PD_PID: Final = 1
_PD_NAME: Final = 6
# InternedData, EventName / EventCategory / DebugAnnotationName
_ID_CATEGORIES: Final = 1
_ID_EVENT_NAMES: Final = 2
_ID_ANNOTATION_NAMES: Final = 3
_ID_STRINGS: Final = 29
_IID: Final = 1
_IID_NAME: Final = 2
# DebugAnnotation
_DA_NAME_IID: Final = 1
_DA_BOOL: Final = 2
_DA_INT: Final = 4
_DA_DOUBLE: Final = 5
_DA_STRING: Final = 6
_DA_STRING_IID: Final = 17
_DA_NAME: Final = 10
_DA_DICT: Final = 11
_DA_ARRAY: Final = 12

_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")
_U64: Final = (1 << 64) - 1
_MAX_INTERNED: Final = 100_000
"""Interned strings kept before the tables are cleared (bounds the writer's memory on long runs)."""


def _slow_varint(n: int) -> bytes:
    if n < 0:
        n &= _U64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL: Final = tuple(_slow_varint(n) for n in range(1 << 14))
"""The varints of 0 .. 16383 (one or two bytes): lengths, ids and small values are looked up, not computed."""


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of an int (a negative int64 as its 64-bit two's complement)."""
    if 0 <= n < 16384:
        return _SMALL[n]
    if 0 < n < 1 << 35:  # timestamps: three to five bytes, without a loop
        if n < 1 << 21:
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
        if n < 1 << 28:
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21 & 0x7F | 0x80, n >> 28))
    return _slow_varint(n)


def key(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def vfield(field: int, n: int) -> bytes:
    """A varint field."""
    return key(field, 0) + varint(n)


def lfield(field: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a nested message)."""
    return key(field, 2) + varint(len(payload)) + payload


def sfield(field: int, text: str) -> bytes:
    return lfield(field, text.encode())


def fixed64(field: int, n: int) -> bytes:
    return key(field, 1) + _FIXED64.pack(n & _U64)


_K_TIMESTAMP: Final = key(_PKT_TIMESTAMP, 0)
_K_TRACK_EVENT: Final = key(_PKT_TRACK_EVENT, 2)
_K_PACKET: Final = key(1, 2)  # Trace.packet
_SEQ_HEAD: Final = vfield(_PKT_SEQ_ID, _SEQ) + vfield(_PKT_SEQ_FLAGS, _SEQ_NEEDS_STATE)
_BEGIN: Final = vfield(_TE_TYPE, _SLICE_BEGIN)
_END: Final = vfield(_TE_TYPE, _SLICE_END)
_INSTANT_TYPE: Final = vfield(_TE_TYPE, _INSTANT)
_COUNTER_TYPE: Final = vfield(_TE_TYPE, _COUNTER)


def _packet(body: bytes) -> bytes:
    """One ``Trace.packet`` entry: the file is a plain concatenation of these."""
    return _K_PACKET + varint(len(body)) + body


class PerfettoEncoder(ChromeEncoder):
    """Write the same trace as :class:`ChromeEncoder`, as Perfetto protobuf packets."""

    def __init__(self, out: IO[bytes], *, counters: bool = True, flush_bytes: int = 1 << 20) -> None:
        self._names: dict[str, bytes] = {}  # event name -> its encoded name_iid field
        self._categories: dict[str, bytes] = {}  # category -> its encoded category_iids field
        self._keys: dict[str, int] = {}  # debug annotation name -> iid
        self._strings: dict[str, bytes] = {}  # annotation string value -> its encoded string_value_iid field
        self._pairs: dict[tuple[str, type, Any], bytes] = {}  # (key, type, scalar) -> the encoded annotation
        self._end_tails: dict[bytes, bytes] = {}  # track field -> a slice end packet after its timestamp
        self._heads: dict[tuple[int, int, str, str], tuple[bytes, bytes]] = {}  # -> (track field, its event head)
        self._interned: list[bytes] = []  # InternedData entries for the next packet
        # Track uuids are small numbers handed out in order (1-2 byte varints on every event).
        self._uuids: dict[tuple[int, int], int] = {}  # (pid, tid) of a lane, or (pid, -1) of a process
        self._track_uuids: dict[tuple[int, int], bytes] = {}  # (pid, tid) -> encoded track_uuid field
        self._counter_tracks: dict[tuple[int, str], bytes] = {}
        self._responses: dict[int, int] = {}  # flow id -> responses seen so far
        super().__init__(out, counters=counters, flush_bytes=flush_bytes)

    # ------------------------------------------------------------- the fast path
    def write(self, event: Event) -> None:
        """Link messages and busy spans (most events) go straight to packets; the rest take the record layout.

        The straight path places the slice in a lane exactly as the layout
        does, but skips the Chrome record dict and its microsecond floats:
        the packets are the same bytes either way.
        """
        ts, dur, cat, name, path, args = event
        if cat == "link":
            entry = self._links.get(path)
            if entry is None or dur is None:
                super().write(event)
                return
            tr = entry[0]
        elif cat == "busy":
            tr = self._blocks.get(path)  # type: ignore[assignment]
            if tr is None or dur is None:
                super().write(event)
                return
            entry = None
        else:
            super().write(event)
            return
        end = ts + dur
        if end > self._last_ps:
            self._last_ps = end
        lanes = tr.lanes
        if lanes[0] <= ts:
            lanes[0] = end
            tid = tr.tids[0]
        else:
            tid = self._place(tr, ts, end)
        self.events_written += 1
        if len(self._pairs) >= _MAX_INTERNED or len(self._strings) >= _MAX_INTERNED:
            self._clear_interning()
        where = (tr.pid, tid, name, cat)
        cached = self._heads.get(where)
        if cached is None:
            track = self._track_field(tr.pid, tid)
            cached = (track, track + self._name_field(name) + self._category_field(cat))
            self._heads[where] = cached
        track, head = cached
        if args:
            head += self._annotations(args)
            if entry is not None and entry[1] and self._flows:
                fid = self._flows.get((args.get("correlation_id"), args.get("request_id")))
                if fid is not None:
                    self._flow_used.add(fid)
                    k = self._responses.get(fid, 0)
                    self._responses[fid] = k + 1
                    head += fixed64(_TE_TERMINATING_FLOW_IDS, (fid << 20) | k)
        # The begin and end packets, as _event and _slice_end build them, in one go.
        te = _BEGIN + head
        body = _K_TIMESTAMP + varint(ts // 1000) + _SEQ_HEAD
        if self._interned:
            body += lfield(_PKT_INTERNED, b"".join(self._interned))
            self._interned.clear()
        body += _K_TRACK_EVENT + varint(len(te)) + te
        tail = self._end_tails.get(track)
        if tail is None:
            te = _END + track
            tail = self._end_tails[track] = _SEQ_HEAD + _K_TRACK_EVENT + varint(len(te)) + te
        end_body = _K_TIMESTAMP + varint(end // 1000) + tail
        buf = self._buf
        assert buf is not None, "PerfettoEncoder: records after finish()"
        buf += _K_PACKET + varint(len(body)) + body + _K_PACKET + varint(len(end_body)) + end_body
        if len(buf) >= self._flush_bytes:
            self.flush()

    # ------------------------------------------------------------- interning
    def _name_field(self, name: str) -> bytes:
        field = self._names.get(name)
        if field is None:
            iid = len(self._names) + 1
            self._interned.append(lfield(_ID_EVENT_NAMES, vfield(_IID, iid) + sfield(_IID_NAME, name)))
            field = self._names[name] = vfield(_TE_NAME_IID, iid)
        return field

    def _category_field(self, cat: str) -> bytes:
        field = self._categories.get(cat)
        if field is None:
            iid = len(self._categories) + 1
            self._interned.append(lfield(_ID_CATEGORIES, vfield(_IID, iid) + sfield(_IID_NAME, cat)))
            field = self._categories[cat] = vfield(_TE_CATEGORY_IIDS, iid)
        return field

    def _key_iid(self, name: str) -> int:
        iid = self._keys.get(name)
        if iid is None:
            iid = self._keys[name] = len(self._keys) + 1
            self._interned.append(lfield(_ID_ANNOTATION_NAMES, vfield(_IID, iid) + sfield(_IID_NAME, name)))
        return iid

    def _string_field(self, text: str) -> bytes:
        field = self._strings.get(text)
        if field is None:
            iid = len(self._strings) + 1
            self._interned.append(lfield(_ID_STRINGS, vfield(_IID, iid) + sfield(_IID_NAME, text)))
            field = self._strings[text] = vfield(_DA_STRING_IID, iid)
        return field

    def _clear_interning(self) -> None:
        """Forget every interned entry; the next packet tells the reader to do the same."""
        self._names.clear()
        self._categories.clear()
        self._keys.clear()
        self._strings.clear()
        self._pairs.clear()
        self._heads.clear()
        self._interned.clear()
        self._write(vfield(_PKT_SEQ_ID, _SEQ) + vfield(_PKT_SEQ_FLAGS, _SEQ_CLEARED))

    # ----------------------------------------------------------- annotations
    def _value(self, v: Any, top: bool = True) -> bytes:
        """The value part of a DebugAnnotation (JSON-decoded args: str, int, float, bool, None, list, dict).

        Top-level strings are interned: request ids, message types and
        correlation ids repeat on every hop of a request.
        """
        if isinstance(v, str):
            return self._string_field(v) if top else sfield(_DA_STRING, v)
        if isinstance(v, bool):
            return vfield(_DA_BOOL, int(v))
        if isinstance(v, int):
            if -(1 << 63) <= v < (1 << 63):
                return vfield(_DA_INT, v)
            return sfield(_DA_STRING, str(v))
        if isinstance(v, float):
            return key(_DA_DOUBLE, 1) + _DOUBLE.pack(v)
        if isinstance(v, dict):
            return b"".join(lfield(_DA_DICT, sfield(_DA_NAME, str(k)) + self._value(x, False)) for k, x in v.items())
        if isinstance(v, list):
            return b"".join(lfield(_DA_ARRAY, self._value(x, False)) for x in v) or sfield(_DA_STRING, "[]")
        return sfield(_DA_STRING, "null" if v is None else dumps(v).decode())

    def _annotations(self, args: dict[str, Any]) -> bytes:
        """Every arg as a DebugAnnotation; a (key, scalar) pair seen before costs one dict lookup."""
        pairs = self._pairs
        out = b""
        for k, v in args.items():
            if type(v) is str:  # the common case: request ids, message types
                field = pairs.get((k, str, v))
                if field is not None:
                    out += field
                    continue
            elif type(v) is dict or type(v) is list:
                out += lfield(_TE_ANNOTATION, vfield(_DA_NAME_IID, self._key_iid(str(k))) + self._value(v))
                continue
            pair = (k, type(v), v)  # the type keeps True, 1 and 1.0 apart
            field = pairs.get(pair)
            if field is None:
                field = lfield(_TE_ANNOTATION, vfield(_DA_NAME_IID, self._key_iid(str(k))) + self._value(v))
                pairs[pair] = field
            out += field
        return out

    # ---------------------------------------------------------------- tracks
    def _descriptor(self, body: bytes) -> None:
        self._write(vfield(_PKT_SEQ_ID, _SEQ) + lfield(_PKT_TRACK_DESC, body))

    def _uuid(self, pid: int, tid: int) -> int:
        uuid = self._uuids.get((pid, tid))
        if uuid is None:
            uuid = self._uuids[(pid, tid)] = len(self._uuids) + 1
        return uuid

    def _track_field(self, pid: int, tid: int) -> bytes:
        field = self._track_uuids.get((pid, tid))
        if field is None:  # a lane nobody named (cannot happen with the layout, but never fail)
            field = self._track_uuids[(pid, tid)] = vfield(_TE_TRACK_UUID, self._uuid(pid, tid))
        return field

    def _metadata(self, rec: dict[str, Any]) -> None:
        name, pid, tid = rec["name"], rec["pid"], rec.get("tid", 0)
        label = str((rec.get("args") or {}).get("name", ""))
        if name == "process_name":
            self._descriptor(
                vfield(_TD_UUID, self._uuid(pid, -1))
                + lfield(_TD_PROCESS, vfield(_PD_PID, pid) + sfield(_PD_NAME, label))
                + vfield(_TD_CHILD_ORDERING, _EXPLICIT_ORDER)
                + vfield(_TD_SIBLING_RANK, pid)
            )
        elif name == "thread_name":
            uuid = self._uuid(pid, tid)
            self._track_uuids[(pid, tid)] = vfield(_TE_TRACK_UUID, uuid)
            self._descriptor(
                vfield(_TD_UUID, uuid)
                + vfield(_TD_PARENT, self._uuid(pid, -1))
                + sfield(_TD_NAME, label)
                + vfield(_TD_SIBLING_RANK, tid)
            )
        # process_sort_index / thread_sort_index: the sibling ranks above say the same

    def _counter_field(self, pid: int, name: str) -> bytes:
        field = self._counter_tracks.get((pid, name))
        if field is None:
            uuid = len(self._uuids) + 1
            self._uuids[(pid, -2 - len(self._counter_tracks))] = uuid
            self._descriptor(
                vfield(_TD_UUID, uuid)
                + vfield(_TD_PARENT, self._uuid(pid, -1))
                + sfield(_TD_NAME, name)
                + lfield(_TD_COUNTER, b"")
            )
            field = self._counter_tracks[(pid, name)] = vfield(_TE_TRACK_UUID, uuid)
        return field

    # ---------------------------------------------------------------- output
    def _write(self, body: bytes) -> None:
        buf = self._buf
        assert buf is not None, "PerfettoEncoder: records after finish()"
        buf += _packet(body)
        if len(buf) >= self._flush_bytes:
            self.flush()

    def _event(self, ts_ps: int, te: bytes) -> None:
        """One TrackEvent packet at ``ts_ps``, carrying any names interned since the last packet."""
        body = _K_TIMESTAMP + varint(ts_ps // 1000) + _SEQ_HEAD
        if self._interned:
            body += lfield(_PKT_INTERNED, b"".join(self._interned))
            self._interned.clear()
        body += _K_TRACK_EVENT + varint(len(te)) + te
        buf = self._buf
        assert buf is not None, "PerfettoEncoder: records after finish()"
        buf += _K_PACKET + varint(len(body)) + body
        if len(buf) >= self._flush_bytes:
            self.flush()

    def _slice_end(self, ts_ps: int, track: bytes) -> None:
        """The end of a slice: all but the timestamp is the same for every slice of a track."""
        tail = self._end_tails.get(track)
        if tail is None:
            te = _END + track
            tail = self._end_tails[track] = _SEQ_HEAD + _K_TRACK_EVENT + varint(len(te)) + te
        body = _K_TIMESTAMP + varint(ts_ps // 1000) + tail
        buf = self._buf
        assert buf is not None, "PerfettoEncoder: records after finish()"
        buf += _K_PACKET + varint(len(body)) + body

    def _begin(self) -> None:
        """The first packet clears the sequence's interning state, as the format requires."""
        self._write(vfield(_PKT_SEQ_ID, _SEQ) + vfield(_PKT_SEQ_FLAGS, _SEQ_CLEARED) + vfield(_PKT_FIRST_ON_SEQ, 1))
        self._out(dict(_HOST_NAME))

    def _out(self, rec: dict[str, Any]) -> None:
        self.events_written += 1
        if len(self._pairs) >= _MAX_INTERNED or len(self._strings) >= _MAX_INTERNED:
            self._clear_interning()  # between records, so no record mixes old and new ids
        ph = rec["ph"]
        if ph == "M":
            self._metadata(rec)
            return
        ts = round(rec["ts"] * 1e6)  # back to the picoseconds the layout divided
        args = rec.get("args")
        if ph == "C":
            name = str(rec["name"])
            for k, v in (args or {}).items():
                series = name if len(args or ()) == 1 else f"{name} {k}"
                value = (
                    key(_TE_DOUBLE_COUNTER, 1) + _DOUBLE.pack(v)
                    if isinstance(v, float)
                    else vfield(_TE_COUNTER, int(v))
                )
                self._event(ts, _COUNTER_TYPE + self._counter_field(rec["pid"], series) + value)
            return
        where = (rec["pid"], rec["tid"], rec["name"], rec.get("cat", ""))
        cached = self._heads.get(where)
        if cached is None:
            track = self._track_field(where[0], where[1])
            cached = (track, track + self._name_field(str(where[2])) + self._category_field(str(where[3])))
            self._heads[where] = cached
        track, head = cached
        if args:
            head += self._annotations(args)
        if ph == "i":
            self._event(ts, _INSTANT_TYPE + head)
            return
        fid = rec.get("bind_id")
        if fid is not None:
            if rec.get("flow_in"):
                k = self._responses.get(fid, 0)
                self._responses[fid] = k + 1
                head += fixed64(_TE_TERMINATING_FLOW_IDS, (fid << 20) | k)
            elif rec.get("flow_out"):
                for k in range(self._responses.pop(fid, 0)):
                    head += fixed64(_TE_FLOW_IDS, (fid << 20) | k)
        end = ts + round(rec["dur"] * 1e6)
        self._event(ts, _BEGIN + head)
        self._slice_end(end, track)

    def _end(self) -> bytes:
        return b""
