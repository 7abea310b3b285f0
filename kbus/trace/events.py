"""Trace events: plain tuples, cheap to build on the simulation's hot path.

An event is the 6-tuple ``(ts_ps, dur_ps, cat, name, path, args)``:

``ts_ps``
    virtual time in integer picoseconds at which the event (or span) starts.
``dur_ps``
    span length in picoseconds, or ``None`` for an instant (or, for the
    :data:`SPAN_CATS`, the *begin marker* of a span completed later).
``cat``
    category, one of :data:`CATEGORIES` (layers may add their own).
``name``
    what happened: a message type (``"memory_write"``), a busy label, ``"alloc"``...
``path``
    where: a block path (``"sip0.cube1.pe3.dma"``), a link name
    (``"sip0.cube1.noc->sip0.cube1.pe3.dma"``) or ``"host"``.
``args``
    a small dict of details, or ``None``.

Why tuples and not objects: the tracer builds one per hop, busy span and inbox
change, so construction cost is what the simulation pays; a tuple literal is
about ten times cheaper than a dataclass or NamedTuple instance, and orjson
serializes it as a JSON array without any conversion (which is what the
websocket stream sends). Sinks unpack it: ``ts, dur, cat, name, path, args = ev``.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import orjson

__all__ = [
    "CATEGORIES",
    "FIELDS",
    "SPAN_CATS",
    "Event",
    "dumps",
    "event_dict",
    "link_ends",
]

Event: TypeAlias = tuple[int, int | None, str, str, str, dict[str, Any] | None]
"""``(ts_ps, dur_ps, cat, name, path, args)``; see the module docstring."""

FIELDS: Final = ("ts_ps", "dur_ps", "cat", "name", "path", "args")
"""Names of the event tuple's positions, in order (sent to stream clients)."""

CATEGORIES: Final = ("link", "busy", "request", "depth", "mem", "mmu", "kernel", "meta")
"""Categories the tracer and the device layers emit.

``link``: a message (or bulk DMA data, name ``"data"``) crossing a link, from the
moment the sender offered it (``ts_ps``) to its delivery (``ts_ps + dur_ps``);
``busy``: a block working; ``request``: a host request, begin marker then span;
``depth``: an inbox's depth changed (``args["depth"]``); ``mem``: allocator
alloc/free; ``mmu``: map/unmap; ``kernel``: a kernel program, begin marker then
span; ``meta``: the device topology, sent once when a sink is attached.
"""

SPAN_CATS: Final = frozenset({"request", "kernel"})
"""Categories whose events come in two parts: a begin marker without duration
when the work starts, then the complete span (``ts_ps`` = begin, ``dur_ps``) when
it ends. Sinks that draw spans skip the marker unless the span never comes."""


def link_ends(name: str) -> tuple[str, str]:
    """Split a link name ``"src->dst"`` into its two block paths.

    A name without ``->`` is treated as a link owned by that path with an
    unknown destination (``""``), so a link not named by the device convention
    still lands somewhere sensible instead of raising on the hot path.
    """
    src, sep, dst = name.partition("->")
    return (src, dst) if sep else (name, "")


def _fallback(obj: Any) -> Any:
    """orjson ``default``: render anything it cannot encode natively.

    Trace args come from many layers (numpy scalars, enums, attrs values);
    a trace must never fail because of one odd value, so unknown objects are
    written as their ``str()``. Sets become sorted lists so output is
    deterministic.
    """
    if isinstance(obj, (set, frozenset)):
        return sorted((_fallback(x) if not isinstance(x, (int, float, str)) else x for x in obj), key=repr)
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(obj)


_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY


def _sanitize(obj: Any) -> Any:
    """Make ``obj`` encodable by orjson: integers outside 64 bits and non-string keys become strings."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (float, str)):
        return obj
    if isinstance(obj, int):
        return obj if -(2**63) <= obj < 2**64 else str(obj)
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(x) for x in obj]
    return _fallback(obj)


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` as compact JSON bytes, never failing on odd values.

    The fast path is a single orjson call. If it refuses (an integer wider
    than 64 bits, a non-string key orjson cannot render), the value is
    sanitized once and encoded again; the result is still deterministic.
    """
    try:
        return orjson.dumps(obj, default=_fallback, option=_OPTS)
    except orjson.JSONEncodeError:
        return orjson.dumps(_sanitize(obj), default=_fallback, option=_OPTS)


def event_dict(ev: Event) -> dict[str, Any]:
    """The event as a dict keyed by :data:`FIELDS` (for people and tests, not the hot path)."""
    return dict(zip(FIELDS, ev, strict=True))
