"""Seed compatibility, wire form and error behaviour of the protocol codec."""

from __future__ import annotations

import copy
from typing import Any, Literal

import attrs
import msgpack
import orjson
import pytest

from kbus.errors import CodecError
from kbus.protocol import (
    MESSAGE_TYPES,
    KernelArg,
    KernelLaunchMsg,
    KernelRef,
    MapEntry,
    MemoryReadMsg,
    MemoryWriteMsg,
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    ResponseMsg,
    ScalarArg,
    TensorArg,
    TensorArgShard,
    UnmapEntry,
    decode,
    encode,
    from_wire,
    register,
    roundtrip,
    to_wire,
)

R = attrs.NOTHING  # "required": the seed field has no default
TARGETS = tuple[int, ...] | Literal["all"]
PE_TARGET = int | Literal["all"]

# The seed protocol (kernbench2 runtime_api/kernel.py) IS the spec: field names,
# order, types and defaults, per class. ``entries`` was ``tuple[dict, ...]`` in
# the seed; kbus types it (MapEntry/UnmapEntry) with the same wire form.
SEED: dict[type, list[tuple[str, Any, Any]]] = {
    MemoryWriteMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("dst_sip", int, R),
        ("dst_cube", int, R),
        ("dst_pe", int, R),
        ("dst_pa", int, R),
        ("nbytes", int, R),
        ("src_kind", Literal["pattern", "host_buffer_ref"], "pattern"),
        ("pattern", str | None, None),
        ("target_cubes", TARGETS, "all"),
        ("target_pe", PE_TARGET, "all"),
        ("msg_type", Literal["memory_write"], "memory_write"),
    ],
    MemoryReadMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("src_sip", int, R),
        ("src_cube", int, R),
        ("src_pe", int, R),
        ("src_pa", int, R),
        ("nbytes", int, R),
        ("target_cubes", TARGETS, "all"),
        ("target_pe", PE_TARGET, "all"),
        ("msg_type", Literal["memory_read"], "memory_read"),
    ],
    KernelRef: [
        ("name", str, R),
        ("kind", Literal["deployed", "builtin"], R),
        ("deploy_pa", int | None, None),
        ("deploy_sip", int, 0),
        ("deploy_cube", int, 0),
        ("deploy_pe", int, 0),
        ("nbytes_code", int, 0),
    ],
    TensorArgShard: [
        ("sip", int, R),
        ("cube", int, R),
        ("pe", int, R),
        ("pa", int, R),
        ("nbytes", int, R),
        ("offset_bytes", int, R),
    ],
    TensorArg: [
        ("shards", tuple[TensorArgShard, ...], R),
        ("arg_kind", Literal["tensor"], "tensor"),
        ("va_base", int, 0),
    ],
    ScalarArg: [
        ("dtype", str, R),
        ("value", float | int, R),
        ("arg_kind", Literal["scalar"], "scalar"),
    ],
    KernelLaunchMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("kernel_ref", KernelRef, R),
        ("args", tuple[KernelArg, ...], R),
        ("target_cubes", TARGETS, "all"),
        ("target_pe", PE_TARGET, "all"),
        ("msg_type", Literal["kernel_launch"], "kernel_launch"),
    ],
    ResponseMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("src_cube", int, R),
        ("src_pe", int, R),
        ("success", bool, R),
        ("msg_type", Literal["response"], "response"),
    ],
    PeDmaMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("src_sip", int, R),
        ("src_cube", int, R),
        ("src_pe", int, R),
        ("dst_pa", int, R),
        ("nbytes", int, R),
        ("is_write", bool, False),
        ("msg_type", Literal["pe_dma"], "pe_dma"),
    ],
    MmuMapMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("entries", tuple[MapEntry, ...], R),
        ("target_sips", TARGETS, "all"),
        ("target_cubes", TARGETS, "all"),
        ("target_pe", PE_TARGET, "all"),
        ("msg_type", Literal["mmu_map"], "mmu_map"),
    ],
    MmuUnmapMsg: [
        ("correlation_id", str, R),
        ("request_id", str, R),
        ("entries", tuple[UnmapEntry, ...], R),
        ("target_sips", TARGETS, "all"),
        ("target_cubes", TARGETS, "all"),
        ("target_pe", PE_TARGET, "all"),
        ("msg_type", Literal["mmu_unmap"], "mmu_unmap"),
    ],
}

# kbus additions: optional, with defaults.
ADDITIONS: dict[type, list[tuple[str, Any, Any]]] = {
    MemoryWriteMsg: [("host_buffer", str | None, None), ("host_offset", int, 0)],
    MemoryReadMsg: [("host_buffer", str | None, None), ("host_offset", int, 0)],
    KernelLaunchMsg: [("target_sips", TARGETS, "all")],
    ResponseMsg: [("error", str | None, None), ("src_sip", int, 0), ("value", int | float | None, None)],
}


def fields_of(cls: type) -> list[tuple[str, Any, Any]]:
    return [(f.name, f.type, f.default) for f in attrs.fields(cls)]


@pytest.mark.parametrize("cls", list(SEED), ids=lambda c: c.__name__)
def test_seed_fields(cls: type) -> None:
    added = {name for name, _, _ in ADDITIONS.get(cls, [])}
    actual = fields_of(cls)
    assert [f for f in actual if f[0] not in added] == SEED[cls]
    assert [f for f in actual if f[0] in added] == ADDITIONS.get(cls, [])
    # msg_type, when present, stays the last field.
    if actual[-1][0] != "msg_type":
        assert "msg_type" not in {name for name, _, _ in actual}


def test_eleven_seed_classes() -> None:
    assert len(SEED) == 11


def _seed_wire(cls: type) -> dict[str, Any]:
    """A wire dict holding only seed fields, required ones filled in."""
    samples: dict[Any, Any] = {str: "x", int: 3, bool: True, float | int: 1.5}
    out: dict[str, Any] = {}
    for name, t, default in SEED[cls]:
        if default is not R:
            continue
        if t in samples:
            out[name] = samples[t]
        elif name == "kind":
            out[name] = "builtin"
        elif name == "kernel_ref":
            out[name] = _seed_wire(KernelRef)
        elif name == "args":
            tensor = _seed_wire(TensorArg)
            out[name] = [tensor | {"arg_kind": "tensor"}, _seed_wire(ScalarArg) | {"arg_kind": "scalar"}]
        elif name == "shards":
            out[name] = [_seed_wire(TensorArgShard)]
        elif name == "entries":
            out[name] = [{"va": 1, "pa": 2, "size": 3}] if cls is MmuMapMsg else [{"va": 1, "size": 3}]
        else:  # pragma: no cover
            raise AssertionError(name)
    if SEED[cls][-1][0] == "msg_type":
        out["msg_type"] = SEED[cls][-1][2]
    return out


@pytest.mark.parametrize("cls", [c for c in SEED if c in MESSAGE_TYPES.values()], ids=lambda c: c.__name__)
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_seed_peer_message_decodes(cls: type, fmt: Literal["json", "msgpack"]) -> None:
    wire = _seed_wire(cls)
    data = orjson.dumps(wire) if fmt == "json" else msgpack.packb(wire)
    msg = decode(data, fmt)
    assert type(msg) is cls
    for name, _, default in SEED[cls]:
        if default is not R:
            assert getattr(msg, name) == default


def test_map_entry_wire_form() -> None:
    msg = MmuMapMsg("c", "r", (MapEntry(va=0x1000, pa=2**63 + 5, size=4096),))
    entry = to_wire(msg)["entries"][0]
    assert set(entry) >= {"va", "pa", "size"}
    assert entry == {"va": 0x1000, "pa": 2**63 + 5, "size": 4096}  # no owner: the seed's exact form
    owned = to_wire(MmuMapMsg("c", "r", (MapEntry(0x1000, 5, 4096, 1, 2, 3),)))["entries"][0]
    assert owned == {"va": 0x1000, "pa": 5, "size": 4096, "sip": 1, "cube": 2, "pe": 3}
    unmap = to_wire(MmuUnmapMsg("c", "r", (UnmapEntry(va=0x1000, size=4096),)))["entries"][0]
    assert unmap == {"va": 0x1000, "size": 4096}


def test_seed_form_map_entry_decodes() -> None:
    data = b'{"msg_type":"mmu_map","correlation_id":"c","request_id":"r","entries":[{"va":1,"pa":2,"size":3}]}'
    msg = decode(data)
    assert msg == MmuMapMsg("c", "r", (MapEntry(1, 2, 3),))
    assert msg.entries[0] == MapEntry(va=1, pa=2, size=3, sip=None, cube=None, pe=None)


def test_memory_write_wire_form() -> None:
    msg = MemoryWriteMsg("c1", "r1", 0, 1, 2, 0x4000, 256, pattern="zeros", target_cubes=(1,), target_pe=2)
    assert orjson.loads(encode(msg)) == {
        "correlation_id": "c1",
        "request_id": "r1",
        "dst_sip": 0,
        "dst_cube": 1,
        "dst_pe": 2,
        "dst_pa": 0x4000,
        "nbytes": 256,
        "src_kind": "pattern",
        "pattern": "zeros",
        "target_cubes": [1],
        "target_pe": 2,
        "host_buffer": None,
        "host_offset": 0,
        "msg_type": "memory_write",
    }


def test_targets_decode_as_tuple_or_all() -> None:
    base = to_wire(MemoryReadMsg("c", "r", 0, 0, 0, 0, 8))
    assert from_wire(base | {"target_cubes": [0, 1]}).target_cubes == (0, 1)  # type: ignore[union-attr]
    assert from_wire(base | {"target_cubes": "all"}).target_cubes == "all"  # type: ignore[union-attr]
    assert from_wire(base | {"target_pe": 3}).target_pe == 3  # type: ignore[union-attr]
    assert from_wire(base | {"target_cubes": []}).target_cubes == ()  # type: ignore[union-attr]


def test_scalar_value_keeps_int_or_float() -> None:
    for value in (3, 2.5, -7, 2**64 - 1):
        msg = KernelLaunchMsg("c", "r", KernelRef("k", "builtin"), (ScalarArg("f32", value),))
        for fmt in ("json", "msgpack"):
            back = decode(encode(msg, fmt), fmt)
            assert back == msg
            assert type(back.args[0].value) is type(value)  # type: ignore[union-attr]


def launch() -> KernelLaunchMsg:
    def tensor(pe: int) -> TensorArg:
        shards = tuple(TensorArgShard(0, c, pe, 2**40 + c * 2**20, 4096, c * 4096) for c in range(4))
        return TensorArg(shards, va_base=2**47)

    return KernelLaunchMsg(
        "corr",
        "req",
        KernelRef("matmul", "deployed", deploy_pa=2**40),
        (tensor(0), tensor(1), ScalarArg("f32", 0.5)),
        target_cubes=(0, 1),
        target_pe=3,
    )


def test_launch_roundtrip_both_formats() -> None:
    msg = launch()
    for fmt in ("json", "msgpack"):
        assert decode(encode(msg, fmt), fmt) == msg
        assert roundtrip(msg, fmt) == msg


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(launch(), "msgpack")
    assert decode(bytearray(data), "msgpack") == launch()
    assert decode(memoryview(encode(launch())), "json") == launch()


# ----------------------------------------------------------------------------- errors


def bad(wire: Any, path: str, *words: str) -> CodecError:
    """Decode ``wire`` from both formats and from the dict; all must fail alike."""
    errors = []
    for fmt, data in (("json", orjson.dumps(wire)), ("msgpack", msgpack.packb(wire))):
        with pytest.raises(CodecError) as info:
            decode(data, fmt)  # type: ignore[arg-type]
        errors.append(info.value)
    with pytest.raises(CodecError) as info:
        from_wire(wire)
    errors.append(info.value)
    for error in errors:
        assert error.path == path, str(error)
        assert path in str(error)
        for word in words:
            assert word in str(error)
    return errors[0]


def mutated(**changes: Any) -> dict[str, Any]:
    wire = copy.deepcopy(to_wire(launch()))
    return wire | changes


def test_malformed_json() -> None:
    for data in (b"", b"{", b'{"msg_type": "response",', b"\xff\xfe", b"nul", b"[" * 5000):
        with pytest.raises(CodecError) as info:
            decode(data, "json")
        assert info.value.path == ""
        assert "malformed json" in str(info.value)


def test_malformed_msgpack() -> None:
    good = encode(launch(), "msgpack")
    for data in (b"", good[:-3], b"\xc1", good + b"\x00", b"\x91" * 100_000, b"\xdb\xff\xff\xff\xff"):
        with pytest.raises(CodecError) as info:
            decode(data, "msgpack")
        assert info.value.path == ""
        assert "malformed msgpack" in str(info.value)


def test_wrong_format_name_and_input_type() -> None:
    with pytest.raises(CodecError, match="unknown format"):
        decode(b"{}", "yaml")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown format"):
        encode(launch(), "yaml")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode("not bytes", "msgpack")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode(None, "json")  # type: ignore[arg-type]


@pytest.mark.parametrize("top", [[1, 2], "memory_write", 3, None, 1.5, True])
def test_top_level_must_be_object(top: Any) -> None:
    error = bad(top, "", "must be an object")
    assert "got" in str(error)


def test_unknown_msg_type() -> None:
    error = bad(mutated(msg_type="teleport"), "msg_type", "teleport", "unknown msg_type")
    assert "kernel_launch" in str(error)  # lists the known tags
    bad(mutated(msg_type=7), "msg_type", "unknown msg_type")
    wire = mutated()
    del wire["msg_type"]
    bad(wire, "msg_type", "missing")


def test_missing_field() -> None:
    wire = mutated()
    del wire["request_id"]
    bad(wire, "request_id", "missing required field", "KernelLaunchMsg")
    wire = mutated()
    del wire["args"][0]["shards"][2]["nbytes"]
    bad(wire, "args[0].shards[2].nbytes", "missing required field")


def test_wrong_type_nested_in_args_and_shards() -> None:
    wire = mutated()
    wire["args"][1]["shards"][0]["pa"] = "0x1000"
    error = bad(wire, "args[1].shards[0].pa", "expected int", "'0x1000'")
    assert "KernelLaunchMsg" in str(error)
    wire = mutated()
    wire["args"][1]["shards"] = {"0": 1}
    bad(wire, "args[1].shards", "expected array")
    wire = mutated()
    wire["args"][0] = [1]
    bad(wire, "args[0]", "expected an object")
    wire = mutated()
    wire["kernel_ref"]["kind"] = "jit"
    bad(wire, "kernel_ref.kind", "'deployed' or 'builtin'", "'jit'")


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, [1], {"a": 1}])
def test_int_field_is_strict(value: Any) -> None:
    wire = mutated()
    wire["args"][0]["shards"][3]["offset_bytes"] = value
    bad(wire, "args[0].shards[3].offset_bytes", "expected int")


def test_bool_for_int_at_top_level() -> None:
    wire = to_wire(PeDmaMsg("c", "r", 0, 0, 0, 0x100, 64))
    bad(wire | {"nbytes": True}, "nbytes", "expected int", "bool")
    # ...and int for bool.
    bad(wire | {"is_write": 1}, "is_write", "expected bool")


def test_targets_are_strict() -> None:
    bad(mutated(target_cubes="al"), "target_cubes", "'all'")
    bad(mutated(target_cubes=[0, True]), "target_cubes[1]", "expected int")
    bad(mutated(target_cubes=3), "target_cubes", "array of int")
    bad(mutated(target_pe="0"), "target_pe", "expected int or 'all'")
    bad(mutated(target_pe=None), "target_pe", "null")
    bad(mutated(target_pe=[1]), "target_pe")


@pytest.mark.parametrize("value", [True, "1.5", None, [1.5]])
def test_scalar_value_rejects_non_numbers(value: Any) -> None:
    wire = mutated()
    wire["args"][2]["value"] = value
    bad(wire, "args[2].value", "expected number")


def test_arg_kind_dispatch_errors() -> None:
    wire = mutated()
    wire["args"][1]["arg_kind"] = "vector"
    bad(wire, "args[1].arg_kind", "'vector'", "'tensor'", "'scalar'")
    wire = mutated()
    del wire["args"][2]["arg_kind"]
    bad(wire, "args[2].arg_kind", "missing")


def test_unknown_extra_field_rejected() -> None:
    bad(mutated(priority=3), "priority", "unknown field", "'priority'")
    wire = mutated()
    wire["kernel_ref"]["checksum"] = "abc"
    bad(wire, "kernel_ref.checksum", "unknown field")
    wire = to_wire(MmuMapMsg("c", "r", (MapEntry(1, 2, 3),)))
    wire["entries"][0]["perm"] = "rw"
    bad(wire, "entries[0].perm", "unknown field")


def test_several_problems_reports_the_first_and_counts() -> None:
    wire = mutated(request_id=5, target_pe="x")
    error = bad(wire, "request_id", "expected string")
    assert "(and 1 more problem)" in str(error)


def test_json_number_out_of_range() -> None:
    with pytest.raises(CodecError, match="malformed json"):
        decode(b'{"msg_type": "response", "src_pe": 1e400}')


def test_json_huge_int_is_not_silently_a_float() -> None:
    data = encode(launch()).replace(str(2**40).encode(), b"18446744073709551616", 1)
    with pytest.raises(CodecError) as info:
        decode(data)
    assert info.value.path == "kernel_ref.deploy_pa"


# ----------------------------------------------------------------------------- encoding errors


def test_encode_rejects_unregistered_objects() -> None:
    for obj in ({"msg_type": "response"}, KernelRef("k", "builtin"), object(), None):
        with pytest.raises(CodecError, match="not a registered protocol message"):
            encode(obj)


def test_encode_rejects_unrepresentable_values() -> None:
    with pytest.raises(CodecError, match="non-finite"):
        encode(KernelLaunchMsg("c", "r", KernelRef("k", "builtin"), (ScalarArg("f32", float("nan")),)))
    with pytest.raises(CodecError, match="non-finite"):
        encode(ResponseMsg("c", "r", 0, 0, True, value=float("inf")), "msgpack")
    too_big = MemoryReadMsg("c", "r", 0, 0, 0, 2**64, 8)
    for fmt in ("json", "msgpack"):
        with pytest.raises(CodecError):
            encode(too_big, fmt)
    with pytest.raises(CodecError):
        encode(KernelLaunchMsg("c", "r", KernelRef("k", "builtin"), (KernelRef("x", "builtin"),)))  # type: ignore[arg-type]


def test_roundtrip_catches_wrongly_built_messages() -> None:
    with pytest.raises(CodecError, match="does not survive the wire"):
        roundtrip(MemoryReadMsg("c", "r", 0, 0, 0, 0, 8, target_cubes=[0, 1]))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="expected int"):
        roundtrip(MemoryReadMsg("c", "r", 0, 0, 0, 1.5, 8))  # type: ignore[arg-type]


def test_non_finite_float_on_the_wire_rejected() -> None:
    wire = to_wire(ResponseMsg("c", "r", 0, 0, True, value=1.0))
    data = msgpack.packb(wire | {"value": float("nan")})
    with pytest.raises(CodecError) as info:
        decode(data, "msgpack")
    assert info.value.path == "value"


# ----------------------------------------------------------------------------- register


def test_register_new_class() -> None:
    @register
    @attrs.frozen
    class Probe:
        correlation_id: str
        hops: tuple[int, ...] = ()
        msg_type: Literal["test_probe"] = "test_probe"

    try:
        msg = Probe("c", (1, 2))
        back: object = decode(encode(msg, "msgpack"), "msgpack")
        assert back == msg
        with pytest.raises(CodecError) as info:
            from_wire({"msg_type": "test_probe", "correlation_id": "c", "hops": [1, 2.0]})
        assert info.value.path == "hops[1]"
    finally:
        del MESSAGE_TYPES["test_probe"]


def test_register_rejects_bad_classes() -> None:
    @attrs.frozen
    class NoTag:
        x: int

    @attrs.frozen
    class Clash:
        msg_type: Literal["response"] = "response"

    with pytest.raises(TypeError):
        register(NoTag)
    with pytest.raises(ValueError, match="already used"):
        register(Clash)
    with pytest.raises(TypeError):
        register(int)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("bad", [1.5, "0x10"])
def test_encode_refuses_what_decode_would_refuse_naming_the_field(fmt: str, bad: object) -> None:
    from kbus.protocol import MemoryWriteMsg

    msg = MemoryWriteMsg("c", "r", 0, 0, 0, bad, 64, pattern="zeros")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"cannot encode: invalid MemoryWriteMsg at dst_pa: expected int") as info:
        encode(msg, fmt)  # type: ignore[arg-type]
    assert info.value.path == "dst_pa"
    raw = encode(msg, fmt, validate=False)  # type: ignore[arg-type]  # what used to go out
    with pytest.raises(CodecError, match="dst_pa"):
        decode(raw, fmt)  # type: ignore[arg-type]
