"""kbus.lang without a device: tiles count work, pointers, layouts, the decorator and the code blob."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import pytest

import kbus
import kbus.lang as kl
from kbus.lang.kernel import BLOB_HEADER, BlobError, decode_blob, lookup
from kbus.lang.memory import Layout, _current
from kbus.protocol import TensorArgShard


class _Counter:
    """Stands in for a running program instance: only ``flops`` is touched by tiles."""

    def __init__(self) -> None:
        self.flops = 0


def _counting() -> tuple[_Counter, Any]:
    c = _Counter()
    return c, _current.set(c)  # type: ignore[arg-type]


def test_tiles_count_one_operation_per_element() -> None:
    c, token = _counting()
    try:
        x = kl.arange(0, 8).to(kl.float32)  # .to: 8
        y = x * 2 + 1  # 8 + 8
        assert isinstance(y, kl.Tile)
        m = y > 3  # 8
        s = y.sum()  # reduce over 8
        z = kl.where(m, y, 0.0)  # 8
        w = kl.maximum(z, 1.0)  # 8
        assert c.flops == 8 * 7
        d = kl.dot(np.ones((4, 3), np.float32), np.ones((3, 5), np.float32), acc=kl.zeros((4, 5)))
        assert c.flops == 8 * 7 + 2 * 4 * 5 * 3 + 4 * 5
        assert float(s) == float((np.arange(8) * 2 + 1).sum())
        assert w.dtype == np.float32 and d.dtype == np.float32 and d.shape == (4, 5)
        assert kl.max(np.arange(6).reshape(2, 3), axis=1).tolist() == [2, 5]
        assert kl.sum(np.ones((2, 3)), axis=0, keep_dims=True).shape == (1, 3)
    finally:
        _current.reset(token)


def test_dot_accumulates_in_float32_and_checks_shapes() -> None:
    a = np.ones((2, 3), np.float16)
    assert kl.dot(a, np.ones((3, 2), np.float16)).dtype == np.float32
    assert kl.dot(np.ones((2, 3), np.int8), np.ones((3, 2), np.int8)).dtype == np.int64
    with pytest.raises(ValueError, match=r"kl.dot needs 2-D tiles, got shapes \(3,\)"):
        kl.dot(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        kl.dot(np.ones((2, 3)), np.ones((4, 2)))


def test_outside_a_kernel_the_device_calls_explain_themselves() -> None:
    with pytest.raises(RuntimeError, match=r"kl.program_id can only be used inside a kernel"):
        kl.program_id(0)
    with pytest.raises(RuntimeError, match=r"kl.load can only be used inside a kernel"):
        kl.load(kl.Pointer.to(0x1000, kl.float32))
    # Arithmetic outside kernels still works (and counts nothing).
    assert (kl.arange(0, 4) + 1).tolist() == [1, 2, 3, 4]
    assert kl.cdiv(10, 4) == 3 and kl.cdiv(8, 4) == 2


def test_pointer_arithmetic_broadcasts_and_rejects_non_integers() -> None:
    p = kl.Pointer.to(0x10000, "f32", name="x_ptr")
    rows, cols = kl.arange(0, 3), kl.arange(0, 4)
    q = p + rows[:, None] * 4 + cols[None, :]
    assert q.shape == (3, 4) and q.offsets.tolist()[2] == [8, 9, 10, 11]
    r = cols + p  # tile + pointer defers to the pointer
    assert isinstance(r, kl.Pointer) and r.offsets.tolist() == [0, 1, 2, 3]
    assert (q - 1).offsets[0, 0] == -1
    assert p.dtype == np.float32 and p.va == 0x10000
    with pytest.raises(TypeError, match=r"x_ptr \+ \.\.\.: pointer offsets must be integers, got float32"):
        p + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="cannot add two pointers"):
        p + p
    with pytest.raises(TypeError, match="got a bool"):
        p + True
    with pytest.raises(TypeError, match="not supported on the device"):
        kl.Pointer.to(0, np.complex64)


def _shards(sizes: list[int], coords: list[tuple[int, int, int]]) -> tuple[TensorArgShard, ...]:
    out, off = [], 0
    for n, (s, c, p) in zip(sizes, coords, strict=True):
        out.append(TensorArgShard(s, c, p, 0, n, off))
        off += n
    return tuple(out)


def test_layouts_map_logical_offsets_to_shard_vas() -> None:
    page, va, f4 = 4096, 0x100000, np.dtype(np.float32)
    # Row-major, shards of 1000 floats (not whole pages): shard k starts on page k.
    lay = Layout(f4, va, (3000,), 0, _shards([4000, 4000, 4000], [(0, 0, 0), (0, 0, 1), (0, 0, 2)]), page)
    off = np.array([0, 999, 1000, 2999, 3000])
    assert lay.addresses(off, "t").tolist() == [va, va + 3996, va + page, va + 2 * page + 3996, va + 2 * page + 4000]
    # Whole-page shards split on dim 0 are contiguous.
    lay = Layout(f4, va, (2048,), 0, _shards([4096, 4096], [(0, 0, 0), (0, 0, 1)]), page)
    assert lay.addresses(np.array([1024, 5000]), "t").tolist() == [va + 4096, va + 20000]
    # A (4, 6) matrix split along dim 1 into column blocks of 3: shard k holds a C-contiguous (4, 3) block.
    lay = Layout(f4, va, (4, 6), 1, _shards([48, 48], [(0, 0, 0), (0, 0, 1)]), page)
    logical = np.arange(24).reshape(4, 6)
    got = (lay.addresses(logical.reshape(-1), "t") - va) // 4
    row, col = logical // 6, logical % 6
    block = np.where(col < 3, row * 3 + col, page // 4 + row * 3 + col - 3)
    assert got.tolist() == block.reshape(-1).tolist()
    with pytest.raises(IndexError, match=r"element offset 24 is outside the tensor \(shape \(4, 6\)"):
        lay.addresses(np.array([3, 24]), "kl.load from x")


def test_kernel_decorator_reads_the_signature() -> None:
    @kbus.kernel
    def k(x_ptr, n, BLOCK: kl.constexpr, FLAG: "kl.constexpr" = True):  # noqa: UP037
        pass

    assert isinstance(k, kl.Kernel) and k.constexprs == ("BLOCK", "FLAG")
    assert [p.name for p in k.params] == ["x_ptr", "n", "BLOCK", "FLAG"]
    assert k.bind((1, 2), {"BLOCK": 4}) == {"x_ptr": 1, "n": 2, "BLOCK": 4, "FLAG": True}
    with pytest.raises(TypeError, match=r"kernel 'k': missing a required argument: 'BLOCK'"):
        k.bind((1, 2), {})
    assert lookup(k.id) is k
    assert kbus.kernel is kl.kernel is kl.jit


def test_kernel_decorator_rejects_what_it_cannot_run() -> None:
    async def coro(x):
        pass

    def star(*args):
        pass

    with pytest.raises(TypeError, match="must be a plain \\(synchronous\\) function"):
        kbus.kernel(coro)
    with pytest.raises(TypeError, match=r"parameter 'args' is variadic positional"):
        kbus.kernel(star)
    with pytest.raises(TypeError, match="decorates a plain Python function"):
        kbus.kernel(print)  # type: ignore[arg-type]


def test_calling_a_kernel_directly_points_at_the_launch_syntax() -> None:
    @kbus.kernel
    def k(x):
        return x + 1

    with pytest.raises(TypeError, match=r"launched with k\[grid\]\(\.\.\.\)"):
        k(1)
    _, token = _counting()
    try:
        assert k(1) == 2  # inside a kernel it is a helper function
    finally:
        _current.reset(token)


def test_same_source_different_function_gets_a_new_variant() -> None:
    def make(scale: float) -> kl.Kernel:
        @kbus.kernel
        def scaled(x):
            return x * scale

        return scaled

    a, b = make(1.0), make(2.0)
    assert a.id.name == b.id.name and a.id.source_sha256 == b.id.source_sha256
    assert a.id.variant != b.id.variant
    assert lookup(a.id) is a and lookup(b.id) is b


def test_blob_round_trip_and_every_integrity_check() -> None:
    @kbus.kernel
    def k(x_ptr, BLOCK: kl.constexpr):
        pass

    blob = k.blob()
    assert blob[:8] == b"KBUSKERN"
    kid, params = decode_blob(blob, len(blob))
    assert kid == k.id and params == [("x_ptr", False), ("BLOCK", True)]
    assert b"def k" not in blob and b"pass" not in blob  # identity only, never code

    def corrupt(at: int, value: bytes) -> bytes:
        return blob[:at] + value + blob[at + len(value) :]

    cases = {
        "bad magic": corrupt(0, b"XXXX"),
        "unsupported blob version 7": corrupt(8, struct.pack("<H", 7)),
        "header size 65": corrupt(10, struct.pack("<H", 65)),
        "header says 999 payload bytes": corrupt(12, struct.pack("<I", 999)),
        "payload checksum mismatch": corrupt(BLOB_HEADER + 3, b"#"),
    }
    for reason, data in cases.items():
        with pytest.raises(BlobError, match=reason):
            decode_blob(data, len(data))
    with pytest.raises(BlobError, match="the launch says the code is 10 bytes"):
        decode_blob(blob, 10)
    payload = b'{"abi": 1}'
    header = struct.pack("<8sHHI32s16x", b"KBUSKERN", 1, 64, len(payload), hashlib.sha256(payload).digest())
    with pytest.raises(BlobError, match="payload is not a kernel description"):
        decode_blob(header + payload, 64 + len(payload))


def test_dtype_names() -> None:
    assert kl.language.dtype_name(np.float32) == "f32"
    assert kl.language.as_dtype("f16") == np.float16
    assert kl.language.as_dtype("int64") == np.int64
    with pytest.raises(TypeError, match="is not a dtype"):
        kl.language.as_dtype("nope")
