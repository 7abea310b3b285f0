"""The wire form of protocol messages: one cattrs configuration, JSON and msgpack bytes.

Messages travel between blocks as immutable objects; bytes appear only where a
message leaves the process or is recorded (the host<->device transport, the
trace stream, recordings, the debug "wire" inbox mode). This module is the one
place that decides what those bytes look like.

Wire form
---------
A message is a JSON/msgpack object (map) of its fields by name, including its
``msg_type`` tag, which selects the class on decode. Nested attrs values
(``KernelRef``, ``TensorArg``...) are objects; tuples are arrays; the kernel
argument union is told apart by ``arg_kind``. JSON and msgpack carry exactly the
same dict (:func:`to_wire`), so one configuration serves both formats.

Strictness
----------
Input is untrusted, so decoding is strict and every failure is a
:class:`~kbus.errors.CodecError` whose ``path`` names the offending field
(``args[1].shards[0].pa``):

- an ``int`` field takes only an int: not a bool, not a float (``1.0``), not a
  numeric string; a ``str`` field only a string; a ``bool`` field only a bool;
  a number field (``float | int``) an int or a finite float, never a bool;
- a tuple field takes an array (a JSON array decodes to a tuple);
- a nested value must be an object; a tag must be one of its known values;
- unknown fields are **rejected**, naming the field. The seed allows new
  optional fields, so a newer peer may add some; silently dropping them would
  hide a version mismatch (and a misspelt optional field, which would otherwise
  fall back to its default without a word). Upgrade both ends together.
- only finite floats cross the wire (JSON has no NaN or infinity; orjson would
  write ``null``), checked both when encoding and decoding.

Value ranges (coordinates inside the topology, addresses inside a memory) are not
checked here: the block that acts on the message knows the device and answers a
bad one with a failed ``ResponseMsg``.

Speed
-----
Structuring is done by a converter without detailed validation; only when it
fails is the input structured again by an identically configured converter
with detailed validation, to find the field path for the error. Valid input
never pays for path tracking.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias, TypeVar, Union, cast, get_args, get_origin

import attrs
import cattrs
import msgpack
import orjson
from cattrs.errors import AttributeValidationNote, ForbiddenExtraKeysError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from kbus.errors import CodecError
from kbus.protocol.fabric import Completion, DmaCommand, FabricMessage, SipForward
from kbus.protocol.messages import (
    KernelLaunchMsg,
    MapEntry,
    MemoryReadMsg,
    MemoryWriteMsg,
    Message,
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    ResponseMsg,
)

Format: TypeAlias = Literal["json", "msgpack"]
"""The byte formats :func:`encode` and :func:`decode` speak."""

AnyMessage: TypeAlias = Message | FabricMessage
"""Everything the codec knows how to carry (plus classes added by :func:`register`)."""

M = TypeVar("M")

_StructureHook: TypeAlias = Callable[[Any, Any], Any]
_UnstructureHook: TypeAlias = Callable[[Any], Any]

_NoneType: Final = type(None)
_SCALARS: Final[frozenset[type]] = frozenset({int, float, str, bool, _NoneType})

MESSAGE_TYPES: dict[str, type] = {}
"""Every ``msg_type`` tag the codec decodes, mapped to its class."""


# --------------------------------------------------------------------------- types


def _is_union(t: Any) -> bool:
    return get_origin(t) in (Union, types.UnionType)


def _is_literal(t: Any) -> bool:
    return get_origin(t) is Literal


def _is_homogeneous_tuple(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _describe_type(t: Any) -> str:
    """The name of a wire type as an error message should say it."""
    if t is int:
        return "int"
    if t is float:
        return "number"
    if t is str:
        return "string"
    if t is bool:
        return "bool"
    if t is _NoneType:
        return "null"
    if _is_literal(t):
        return " or ".join(repr(v) for v in get_args(t))
    if _is_homogeneous_tuple(t):
        return f"array of {_describe_type(get_args(t)[0])}"
    if _is_union(t):
        members = get_args(t)
        if float in members:  # "number" already covers int
            members = tuple(m for m in members if m is not int)
        return " or ".join(_describe_type(m) for m in members)
    if attrs.has(t):
        return f"{t.__name__} object"
    return repr(t)


def _describe_value(v: Any) -> str:
    if v is None:
        return "null"
    text = repr(v)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = {dict: "object", list: "array", tuple: "array", str: "string", float: "number"}.get(v.__class__)
    return f"{kind or type(v).__name__} {text}"


def _tag_of(cls: type, field: str) -> object:
    """The single Literal value of ``cls.field``, or raise TypeError."""
    fields = attrs.fields_dict(cls)
    attribute = fields.get(field)
    if attribute is None or not _is_literal(attribute.type) or len(get_args(attribute.type)) != 1:
        raise TypeError(f"{cls.__qualname__}.{field} must be a field typed Literal[<one value>]")
    tag = get_args(attribute.type)[0]
    if attribute.default != tag:
        raise TypeError(f"{cls.__qualname__}.{field} must default to its tag {tag!r}")
    return tag


def _discriminator(members: tuple[type, ...]) -> tuple[str, dict[object, type]]:
    """Find the field whose Literal value tells the attrs classes of a union apart."""
    common = set(attrs.fields_dict(members[0]))
    for cls in members[1:]:
        common &= set(attrs.fields_dict(cls))
    for name in sorted(common):
        try:
            table = {_tag_of(cls, name): cls for cls in members}
        except TypeError:
            continue
        if len(table) == len(members):
            return name, table
    raise TypeError(f"no Literal tag field tells {[m.__qualname__ for m in members]} apart")


# --------------------------------------------------------------------------- errors


class _WireError(TypeError):
    """A wire value is unacceptable; ``field`` (if set) extends the error path."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _leaves(exc: BaseException) -> int:
    if isinstance(exc, BaseExceptionGroup):
        return sum(_leaves(e) for e in exc.exceptions)
    return 1


def _format_path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _codec_error(exc: BaseException, what: str) -> CodecError:
    """Turn a (detailed) cattrs failure into one CodecError naming the first bad field.

    cattrs nests failures as exception groups: each level attaches a note naming
    the attribute or index it was structuring. Notes are appended innermost
    first, so each exception's notes are read in reverse.
    """
    total = _leaves(exc)
    parts: list[str | int] = []
    leaf = exc
    while True:
        for note in reversed(getattr(leaf, "__notes__", ())):
            if isinstance(note, AttributeValidationNote):
                parts.append(note.name)
            elif isinstance(note, IterableValidationNote):
                parts.append(note.index)
        if isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        else:
            break
    if isinstance(leaf, _WireError):
        if leaf.field is not None:
            parts.append(leaf.field)
        detail = str(leaf)
    elif isinstance(leaf, ForbiddenExtraKeysError):
        extra = sorted(str(k) for k in leaf.extra_fields)
        parts.append(extra[0])
        detail = f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
    elif isinstance(leaf, KeyError):
        detail = "missing required field"
    else:
        detail = f"{type(leaf).__name__}: {leaf}"
    path = _format_path(parts)
    more = f" (and {total - 1} more problem{'s' if total > 2 else ''})" if total > 1 else ""
    where = f" at {path}" if path else ""
    return CodecError(f"invalid {what}{where}: {detail}{more}", path=path)


# --------------------------------------------------------------------------- converter


def _structure_int(v: Any, _: Any) -> Any:
    if v.__class__ is int:
        return v
    raise _WireError(f"expected int, got {_describe_value(v)}")


def _structure_float(v: Any, _: Any) -> float:
    cls = v.__class__
    if cls is int or (cls is float and math.isfinite(v)):
        return float(v)
    raise _WireError(f"expected a finite number, got {_describe_value(v)}")


def _structure_str(v: Any, _: Any) -> Any:
    if v.__class__ is str:
        return v
    raise _WireError(f"expected string, got {_describe_value(v)}")


def _structure_bool(v: Any, _: Any) -> Any:
    if v.__class__ is bool:
        return v
    raise _WireError(f"expected bool, got {_describe_value(v)}")


def _literal_hook(t: Any) -> _StructureHook:
    # Compare class and value: 1 == True, and an unhashable value must not crash.
    allowed = frozenset((v.__class__, v) for v in get_args(t))
    classes = frozenset(c for c, _ in allowed)
    expected = _describe_type(t)

    def structure_literal(v: Any, _: Any) -> Any:
        if v.__class__ in classes and (v.__class__, v) in allowed:
            return v
        raise _WireError(f"expected {expected}, got {_describe_value(v)}")

    return structure_literal


def _unstructure_float(v: Any) -> Any:
    if v.__class__ is float and not math.isfinite(v):
        raise CodecError(f"non-finite float {v!r} cannot cross the wire")
    return v


def _make_converter(detailed: bool) -> cattrs.Converter:
    """Build the converter that defines the wire form (see the module docstring).

    A plain cattrs Converter would coerce (``int("3")``, ``bool(1)``) and could
    not structure ``tuple[int, ...] | Literal["all"]`` at all; every hook here
    is strict and type-checks with ``__class__`` so bools never pass for ints.
    """
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=detailed)

    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook_factory(_is_literal, _literal_hook)
    conv.register_unstructure_hook(float, _unstructure_float)

    def class_hook(cls: type) -> _StructureHook:
        inner: _StructureHook = make_dict_structure_fn(cls, conv)
        name = cls.__name__

        def structure_class(v: Any, _: Any) -> Any:
            if v.__class__ is dict:
                return inner(v, cls)
            raise _WireError(f"expected {name} object, got {_describe_value(v)}")

        return structure_class

    def tuple_hook(t: Any) -> _StructureHook:
        elem_type = get_args(t)[0]
        elem = conv.get_structure_hook(elem_type)
        expected = _describe_type(t)

        def structure_tuple(v: Any, _: Any) -> tuple[Any, ...]:
            cls = v.__class__
            if cls is not list and cls is not tuple:
                raise _WireError(f"expected {expected}, got {_describe_value(v)}")
            if not detailed:
                return tuple([elem(x, elem_type) for x in v])
            out: list[Any] = []
            errors: list[Exception] = []
            for i, x in enumerate(v):
                try:
                    out.append(elem(x, elem_type))
                except Exception as e:
                    e.add_note(IterableValidationNote(f"Structuring {expected} @ index {i}", i, elem_type))
                    errors.append(e)
            if errors:
                raise cattrs.IterableValidationError(f"While structuring {expected}", errors, tuple)
            return tuple(out)

        return structure_tuple

    def tagged_union_hook(t: Any) -> _StructureHook:
        members = get_args(t)
        tag, table = _discriminator(members)
        hooks = {value: (conv.get_structure_hook(cls), cls) for value, cls in table.items()}
        choices = ", ".join(repr(v) for v in table)

        def structure_tagged(v: Any, _: Any) -> Any:
            if v.__class__ is not dict:
                raise _WireError(f"expected an object with {tag!r}, got {_describe_value(v)}")
            if tag not in v:
                raise _WireError(f"missing {tag!r} (one of {choices})", field=tag)
            value = v[tag]
            entry = hooks.get(value) if value.__class__ is str else None
            if entry is None:
                raise _WireError(f"unknown {tag} {_describe_value(value)} (expected one of {choices})", field=tag)
            hook, cls = entry
            return hook(v, cls)

        return structure_tagged

    def union_hook(t: Any) -> _StructureHook:
        """Scalars and literals pass by exact class; arrays and objects go to their member."""
        scalars: set[type] = set()
        literals: set[tuple[type, object]] = set()
        seq_type: Any = None
        obj_types: list[type] = []
        for member in get_args(t):
            if _is_literal(member):
                literals.update((v.__class__, v) for v in get_args(member))
            elif member in _SCALARS:
                scalars.add(member)
            elif _is_homogeneous_tuple(member):
                seq_type = member
            elif attrs.has(member):
                obj_types.append(member)
            else:
                raise TypeError(f"the wire form has no rule for {member!r} in {t!r}")
        literal_classes = frozenset(c for c, _ in literals)
        if float in scalars:
            scalars.add(int)
        check_float = float in scalars
        seq_hook = conv.get_structure_hook(seq_type) if seq_type is not None else None
        obj_type: Any = None
        if len(obj_types) == 1:
            obj_type = obj_types[0]
        elif obj_types:
            obj_type = Union[tuple(obj_types)]  # noqa: UP007 - built at run time
        obj_hook = conv.get_structure_hook(obj_type) if obj_type is not None else None
        expected = _describe_type(t)

        def structure_union(v: Any, _: Any) -> Any:
            cls = v.__class__
            if cls in scalars:
                if check_float and cls is float and not math.isfinite(v):
                    raise _WireError(f"expected a finite number, got {_describe_value(v)}")
                return v
            if cls in literal_classes and (cls, v) in literals:
                return v
            if seq_hook is not None and (cls is list or cls is tuple):
                return seq_hook(v, seq_type)
            if obj_hook is not None and cls is dict:
                return obj_hook(v, obj_type)
            raise _WireError(f"expected {expected}, got {_describe_value(v)}")

        return structure_union

    conv.register_structure_hook_factory(attrs.has, class_hook)
    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_hook)
    conv.register_structure_hook_factory(_is_union, union_hook)
    conv.register_structure_hook_factory(
        lambda t: _is_union(t) and all(attrs.has(a) for a in get_args(t)), tagged_union_hook
    )

    def tuple_unhook(t: Any) -> _UnstructureHook:
        elem_type = get_args(t)[0]
        if elem_type in _SCALARS and elem_type is not float:
            return list
        elem = conv.get_unstructure_hook(elem_type)
        return lambda v: [elem(x) for x in v]

    def union_unhook(t: Any) -> _UnstructureHook:
        members = get_args(t)
        if all(attrs.has(m) for m in members):
            by_class = {m: conv.get_unstructure_hook(m) for m in members}

            def unstructure_tagged(v: Any) -> Any:
                hook = by_class.get(v.__class__)
                if hook is None:
                    raise CodecError(f"{_describe_value(v)} is not a {_describe_type(t)}")
                return hook(v)

            return unstructure_tagged
        has_float = float in members
        has_seq = any(_is_homogeneous_tuple(m) for m in members)
        if has_float and has_seq:
            raise TypeError(f"the wire form has no rule for {t!r}")
        if has_float:
            return _unstructure_float
        if has_seq:
            return lambda v: list(v) if v.__class__ is tuple else v
        return lambda v: v

    conv.register_unstructure_hook_factory(_is_homogeneous_tuple, tuple_unhook)
    conv.register_unstructure_hook_factory(_is_union, union_unhook)
    # An entry without owner is written in the seed's exact form, {"va", "pa", "size"}: owner
    # fields appear only when set (see MapEntry: a missing owner means the installing PE).
    conv.register_unstructure_hook(MapEntry, make_dict_unstructure_fn(MapEntry, conv, _cattrs_omit_if_default=True))
    return conv


_fast: Final = _make_converter(detailed=False)
_detailed: Final = _make_converter(detailed=True)
_structure_hooks: dict[type, _StructureHook] = {}
_unstructure_hooks: dict[type, _UnstructureHook] = {}


def register(cls: type) -> type:
    """Teach the codec a message class; usable as a class decorator.

    ``cls`` must be an attrs class with a ``msg_type: Literal["tag"] = "tag"``
    field and a tag no other class uses. Its fields should use the types the
    host messages use (int, float, str, bool, None, Literals, tuples of those and
    of attrs classes, unions of them), which the wire form has strict rules for.
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")
    attrs.resolve_types(cls)
    tag = _tag_of(cls, "msg_type")
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__qualname__}.msg_type must be a string tag")
    known = MESSAGE_TYPES.get(tag)
    if known is not None and known is not cls:
        raise ValueError(f"msg_type {tag!r} is already used by {known.__qualname__}")
    # Build the hooks now so a class the wire form cannot express fails here, not on first use.
    _structure_hooks[cls] = _fast.get_structure_hook(cls)
    _unstructure_hooks[cls] = _fast.get_unstructure_hook(cls)
    _detailed.get_structure_hook(cls)
    MESSAGE_TYPES[tag] = cls
    return cls


for _cls in (
    MemoryWriteMsg,
    MemoryReadMsg,
    KernelLaunchMsg,
    ResponseMsg,
    PeDmaMsg,
    MmuMapMsg,
    MmuUnmapMsg,
    DmaCommand,
    Completion,
    SipForward,
):
    register(_cls)
del _cls


# --------------------------------------------------------------------------- public API


def to_wire(msg: object) -> dict[str, Any]:
    """The wire dict of a message: what JSON and msgpack both encode.

    Sequences become lists, so ``to_wire(m)`` equals the decoded JSON of
    ``encode(m)``. Raises CodecError for an unregistered class or a value the
    wire cannot carry.
    """
    hook = _unstructure_hooks.get(msg.__class__)
    if hook is None:
        raise CodecError(f"{type(msg).__qualname__} is not a registered protocol message")
    try:
        return cast(dict[str, Any], hook(msg))
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"cannot encode {type(msg).__qualname__}: {type(e).__name__}: {e}") from e


def from_wire(obj: object) -> AnyMessage:
    """Structure a wire dict into the message class its ``msg_type`` names.

    Raises CodecError (with ``path``) for anything but a valid message.
    """
    if obj.__class__ is not dict:
        raise CodecError(f"a message must be an object, got {_describe_value(obj)}")
    wire = cast(dict[str, Any], obj)
    tag = wire.get("msg_type")
    cls = MESSAGE_TYPES.get(tag) if tag.__class__ is str else None
    if cls is None:
        if "msg_type" not in wire:
            raise CodecError("invalid message: missing 'msg_type'", path="msg_type")
        raise CodecError(
            f"unknown msg_type {_describe_value(tag)} (known: {', '.join(sorted(MESSAGE_TYPES))})",
            path="msg_type",
        )
    try:
        return cast(AnyMessage, _structure_hooks[cls](wire, cls))
    except Exception:
        pass
    # Slow path: structure again with path tracking to say where it went wrong.
    try:
        return cast(AnyMessage, _detailed.structure(wire, cls))
    except Exception as e:  # includes RecursionError
        raise _codec_error(e, cls.__name__) from None


def encode(msg: object, fmt: Format = "json", *, validate: bool = True) -> bytes:
    """Serialize a message to JSON or msgpack bytes; raises CodecError on failure.

    With ``validate`` (the default) the wire form is checked against the
    message's field types first, exactly as :func:`decode` will check it, so a
    message built with a wrong type (``dst_pa=1.5``, ``"0x10"``) fails here,
    naming the field, instead of producing bytes the other side rejects.
    """
    wire = to_wire(msg)
    if validate:
        try:
            from_wire(wire)
        except CodecError as exc:
            raise CodecError(f"cannot encode: {exc}", exc.path) from None
    try:
        if fmt == "json":
            return orjson.dumps(wire)
        if fmt == "msgpack":
            return msgpack.packb(wire)
    except Exception as e:
        raise CodecError(f"cannot encode {type(msg).__qualname__} as {fmt}: {e}") from e
    raise CodecError(f"unknown format {fmt!r} (expected 'json' or 'msgpack')")


def _loads(data: bytes | bytearray | memoryview, fmt: Format) -> object:
    if fmt == "json":
        return orjson.loads(data)
    if fmt == "msgpack":
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    raise CodecError(f"unknown format {fmt!r} (expected 'json' or 'msgpack')")


def decode(data: bytes | bytearray | memoryview, fmt: Format = "json") -> AnyMessage:
    """Parse JSON or msgpack bytes into a message.

    Anything wrong with the input (unreadable bytes, a non-object, an unknown
    ``msg_type``, a missing, extra or mistyped field) raises CodecError and
    nothing else.
    """
    try:
        obj = _loads(data, fmt)
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"malformed {fmt}: {type(e).__name__}: {e}") from None
    return from_wire(obj)


def roundtrip(msg: M, fmt: Format = "json") -> M:
    """Encode and decode ``msg``, and insist that the result equals it.

    The debug "wire" inbox mode passes every hop through this to prove each
    message survives the wire; a message built with the wrong types (a list
    where a tuple belongs, a float address) fails here with a CodecError.
    """
    out = decode(encode(msg, fmt), fmt)
    if out != msg:
        raise CodecError(f"{type(msg).__qualname__} does not survive the wire: sent {msg!r}, got back {out!r}")
    return cast(M, out)


__all__ = [
    "MESSAGE_TYPES",
    "AnyMessage",
    "CodecError",
    "Format",
    "decode",
    "encode",
    "from_wire",
    "register",
    "roundtrip",
    "to_wire",
]
