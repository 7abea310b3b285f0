"""Protocol audit: every message class is registered and survives the wire.

The classes are found by introspecting the protocol modules, not listed by
hand, so a message added later without registering it fails here. Instances are
generated from the field types, so a field type the wire form cannot carry
fails here too.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kbus.protocol
from kbus.protocol import (
    MESSAGE_TYPES,
    HostMessage,
    Message,
    codec,
    decode,
    encode,
    fabric,
    from_wire,
    messages,
    to_wire,
)
from kbus.protocol import roundtrip as wire_roundtrip

MODULES = (messages, fabric)


def message_classes() -> list[type]:
    found = []
    for module in MODULES:
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and attrs.has(obj)
                and obj.__module__ == module.__name__
                and "msg_type" in attrs.fields_dict(obj)
            ):
                found.append(obj)
    return found


CLASSES = message_classes()

SMALL = st.integers(min_value=0, max_value=64)
ADDRESS = st.integers(min_value=0, max_value=2**64 - 1)
INTS = st.one_of(SMALL, ADDRESS)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def strategy_for(t: Any) -> st.SearchStrategy[Any]:
    """A hypothesis strategy producing valid values of a protocol field type."""
    origin = get_origin(t)
    if t is int:
        return INTS
    if t is float:
        return FLOATS
    if t is str:
        return st.text(max_size=12)
    if t is bool:
        return st.booleans()
    if t is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(get_args(t))
    if origin is tuple:
        elem, ellipsis = get_args(t)
        assert ellipsis is Ellipsis
        return st.lists(strategy_for(elem), max_size=4).map(tuple)
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in get_args(t)])
    if attrs.has(t):
        return st.builds(t, **{f.name: strategy_for(f.type) for f in attrs.fields(t)})
    raise AssertionError(f"audit has no strategy for field type {t!r}")


def test_audit_finds_every_class() -> None:
    # Guard against the introspection silently finding nothing.
    names = {cls.__name__ for cls in CLASSES}
    assert {"MemoryWriteMsg", "KernelLaunchMsg", "ResponseMsg", "DmaCommand", "Completion"} <= names
    assert len(CLASSES) == 10


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_registered(cls: type) -> None:
    tag = str(attrs.fields_dict(cls)["msg_type"].default)
    assert MESSAGE_TYPES[tag] is cls
    assert get_args(attrs.fields_dict(cls)["msg_type"].type) == (tag,)


def test_registry_has_nothing_else() -> None:
    assert set(MESSAGE_TYPES.values()) == set(CLASSES)
    assert len(MESSAGE_TYPES) == len(CLASSES)  # tags are unique


def test_union_aliases_are_registered() -> None:
    assert set(get_args(Message)) == set(get_args(HostMessage)) | {messages.ResponseMsg}
    assert set(get_args(Message)) <= set(MESSAGE_TYPES.values())
    assert set(get_args(fabric.FabricMessage)) <= set(MESSAGE_TYPES.values())


def test_package_exports() -> None:
    for name in kbus.protocol.__all__:
        assert hasattr(kbus.protocol, name), name
    for cls in [*CLASSES, messages.MapEntry, messages.UnmapEntry, messages.KernelRef]:
        assert getattr(kbus.protocol, cls.__name__) is cls
    assert kbus.protocol.CodecError is __import__("kbus.errors").errors.CodecError


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_classes_are_frozen_and_slotted(cls: type) -> None:
    assert "__slots__" in vars(cls)
    field = attrs.fields(cls)[0].name
    instance: Any = object.__new__(cls)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(instance, field, 1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_roundtrip_generated(cls: type) -> None:
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy_for(cls))
    def check(msg: Any) -> None:
        wire = to_wire(msg)
        assert wire["msg_type"] == msg.msg_type
        for fmt in ("json", "msgpack"):
            data = encode(msg, fmt)
            assert isinstance(data, bytes)
            back = decode(data, fmt)
            assert type(back) is cls
            assert back == msg
        # The wire dict is exactly what JSON carries (sequences as lists).
        assert orjson.loads(encode(msg)) == wire
        assert from_wire(wire) == msg
        # The path-tracking converter used for errors agrees with the fast one.
        assert codec._detailed.structure(wire, cls) == msg
        assert wire_roundtrip(msg, "msgpack") == msg

    check()
