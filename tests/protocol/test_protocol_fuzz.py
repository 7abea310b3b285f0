"""Fuzz the decoder: malformed input gives a CodecError or a valid message, never a crash.

A seeded mutator (deterministic, so a failure reproduces) corrupts valid
encodings of random messages of every registered class, both structurally
(deleted fields, values swapped for other types, extra keys, bad tags) and as
bytes (flips, truncation, insertion, splicing), in JSON and msgpack.
"""

from __future__ import annotations

import copy
import random
import types
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import msgpack
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kbus.errors import CodecError
from kbus.protocol import MESSAGE_TYPES, codec, decode, encode, from_wire, to_wire

SEED = 20_240_611
ITERATIONS_PER_FORMAT = 6_000  # 12,000 inputs in all

JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    2**64 - 1,
    1.0,
    -0.0,
    1e300,
    "",
    "all",
    "response",
    "x" * 64,
    "\u00e9\u4e2d",
    [],
    [0, 1],
    [[[]]],
    [{"va": 1}],
    {},
    {"msg_type": "response"},
    {"arg_kind": "tensor"},
]

TAG_SWAPS = ["memory_write", "kernel_launch", "tensor", "scalar", "all", "deployed", "bogus", ""]


def random_value(t: Any, rng: random.Random) -> Any:
    """A valid value of a protocol field type."""
    origin = get_origin(t)
    if t is int:
        return rng.choice([rng.randrange(8), rng.randrange(2**64)])
    if t is float:
        return rng.uniform(-1e6, 1e6)
    if t is str:
        return rng.choice(["", "a", "req-17", "zeros", "f32"])
    if t is bool:
        return rng.random() < 0.5
    if t is type(None):
        return None
    if origin is Literal:
        return rng.choice(get_args(t))
    if origin is tuple:
        return tuple(random_value(get_args(t)[0], rng) for _ in range(rng.randrange(4)))
    if origin in (Union, types.UnionType):
        return random_value(rng.choice(get_args(t)), rng)
    if attrs.has(t):
        return t(**{f.name: random_value(f.type, rng) for f in attrs.fields(t)})
    raise AssertionError(f"no generator for {t!r}")


def junk(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(JUNK))  # never share (and so never grow) a JUNK object


def containers(obj: Any) -> list[Any]:
    """Every dict and list inside ``obj`` (including itself)."""
    out: list[Any] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            out.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            out.append(node)
            stack.extend(node)
    return out


def mutate_wire(wire: dict[str, Any], rng: random.Random) -> Any:
    """Apply one to three structural corruptions to a wire dict (in place)."""
    for _ in range(rng.randint(1, 3)):
        node = rng.choice(containers(wire))
        op = rng.randrange(7)
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if op == 0:
                del node[key]
            elif op in (1, 2):
                node[key] = junk(rng)
            elif op == 3:
                node[rng.choice(["extra", "msg_type2", key + "_", "VA"])] = junk(rng)
            elif op == 4 and key in ("msg_type", "arg_kind", "kind", "src_kind", "op"):
                node[key] = rng.choice(TAG_SWAPS + list(MESSAGE_TYPES))
            elif op == 5:
                node[key] = [node[key]]
            else:
                node[key] = {"v": node[key]}
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if op < 2:
                del node[i]
            elif op < 4:
                node[i] = junk(rng)
            else:
                node.append(copy.deepcopy(node[i]))
    if rng.random() < 0.02:
        return rng.choice([[wire], "msg", 5])
    return wire


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Apply one to three byte-level corruptions."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            break
        op = rng.randrange(6)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.randrange(256)
        elif op == 2:
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 4:
            del buf[i : i + rng.randint(1, 8)]
        else:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 16)]
    return bytes(buf)


def pack(obj: Any, fmt: str) -> bytes:
    return orjson.dumps(obj) if fmt == "json" else msgpack.packb(obj)


def check_decode(data: bytes, fmt: Literal["json", "msgpack"]) -> bool:
    """Decode; True for a valid message, False for a CodecError. Anything else fails."""
    try:
        msg = decode(data, fmt)
    except CodecError as e:
        assert isinstance(e.path, str)
        assert str(e)
        return False
    assert type(msg) in MESSAGE_TYPES.values()
    assert decode(encode(msg, fmt), fmt) == msg  # whatever decodes is a real, re-encodable message
    return True


def check_converters_agree(obj: Any) -> None:
    """The fast converter and the path-tracking one accept exactly the same input."""
    if not isinstance(obj, dict):
        return
    tag = obj.get("msg_type")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        return
    results: list[Any] = []
    for converter in (codec._fast, codec._detailed):
        try:
            results.append(converter.structure(obj, cls))
        except Exception:
            results.append(None)
    assert (results[0] is None) == (results[1] is None), obj
    assert results[0] == results[1]


def run_mutations(fmt: Literal["json", "msgpack"]) -> tuple[int, int]:
    rng = random.Random(f"{SEED}-{fmt}")
    classes = list(MESSAGE_TYPES.values())
    accepted = rejected = 0
    for n in range(ITERATIONS_PER_FORMAT):
        msg = random_value(rng.choice(classes), rng)
        if n % 2:
            obj = mutate_wire(to_wire(msg), rng)
            check_converters_agree(obj)
            data = pack(obj, fmt)
        else:
            data = mutate_bytes(encode(msg, fmt), rng)
        if check_decode(data, fmt):
            accepted += 1
        else:
            rejected += 1
    return accepted, rejected


def test_fuzz_json() -> None:
    accepted, rejected = run_mutations("json")
    assert accepted + rejected == ITERATIONS_PER_FORMAT
    assert rejected > ITERATIONS_PER_FORMAT // 2  # the mutator really does break things
    assert accepted > 0  # ...and some mutations are harmless (e.g. a default field dropped)


def test_fuzz_msgpack() -> None:
    accepted, rejected = run_mutations("msgpack")
    assert accepted + rejected == ITERATIONS_PER_FORMAT
    assert rejected > ITERATIONS_PER_FORMAT // 2
    assert accepted > 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["json", "msgpack"]))
def test_fuzz_arbitrary_bytes(data: bytes, fmt: Literal["json", "msgpack"]) -> None:
    check_decode(data, fmt)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(st.sampled_from(["correlation_id", "request_id", "args", "entries", "src_pe", "x"]), JSON_VALUES),
)
def test_fuzz_arbitrary_wire_dicts(tag: str, fields: dict[str, Any]) -> None:
    obj = {"msg_type": tag, **fields}
    check_converters_agree(obj)
    try:
        msg = from_wire(obj)
    except CodecError:
        return
    assert type(msg) is MESSAGE_TYPES[tag]
