"""MemoryStore and the fill-pattern grammar."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbus.mem import MemoryStore, pattern_bytes

NAME = "sip0.cube0.pe2.hbm"
BASE = 0x1_0000_0000


def test_lazy_allocation() -> None:
    s = MemoryStore(NAME, BASE, 16 << 30)  # 16 GiB nominal
    assert s.resident_bytes == 0
    assert not s.read(BASE + (8 << 30), 4096).any()
    assert s.resident_bytes == 0
    s.write(BASE + 10, b"\x01\x02")
    assert s.resident_bytes == MemoryStore.GROW  # only the written prefix of the chunk is backed
    assert s.read(BASE + 9, 4).tolist() == [0, 1, 2, 0]


def test_chunk_grows_with_writes_and_reads_zeros_past_them() -> None:
    s = MemoryStore(NAME, 0, 1 << 20, chunk=1 << 16)
    s.write(100, b"\x01" * 10)
    assert s.resident_bytes == 4096  # bytes 0..4095 of chunk 0
    assert s.read(4090, 12).tolist() == [0] * 12  # past the backed part: zeros
    s.write(5000, b"\x02")  # grows chunk 0, at least doubling: 8192
    assert s.resident_bytes == 8192
    s.write(20000, b"\x03")  # 20001 rounded up to 4 KiB steps: 20480
    assert s.resident_bytes == 20480
    assert s.read(99, 3).tolist() == [0, 1, 1] and s.read(5000, 1).tolist() == [2]
    s.fill(0, 1 << 16, b"\x00")  # zeros never allocate, even past the backed part
    assert s.resident_bytes == 20480 and not s.read(0, 1 << 16).any()
    s.write(1 << 16, np.ones(1 << 16, np.uint8))  # a whole chunk at once: backed whole, no growth
    assert s.resident_bytes == 20480 + (1 << 16)


def test_last_chunk_is_cut_to_size() -> None:
    s = MemoryStore(NAME, 0, 1000, chunk=512)
    s.write(999, b"\x07")
    assert s.resident_bytes == 1000 - 512


def test_write_accepts_buffers() -> None:
    s = MemoryStore(NAME, 0, 1 << 16, chunk=4096)
    arr = np.arange(3000, dtype=np.float32)
    s.write(100, arr)
    assert np.array_equal(s.read(100, arr.nbytes).view(np.float32), arr)
    s.write(0, memoryview(bytearray(b"abc")))
    s.write(3, bytearray(b"de"))
    assert s.read(0, 5).tobytes() == b"abcde"
    # A strided array is accepted (made contiguous first).
    s.write(0, np.arange(10, dtype=np.uint8)[::2])
    assert s.read(0, 5).tolist() == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match=rf"{NAME}.*contiguous"):
        s.write(0, memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError, match=rf"{NAME}.*got str"):
        s.write(0, "text")  # type: ignore[arg-type]


def test_read_is_a_copy_and_read_into() -> None:
    s = MemoryStore(NAME, 0, 1 << 16, chunk=4096)
    s.write(0, b"\x05" * 16)
    r = s.read(0, 16)
    r[:] = 0
    assert s.read(0, 16).tolist() == [5] * 16
    s.write(4090, b"\x05" * 16)
    out = np.empty(2, dtype=np.uint32)
    s.read_into(4094, out)  # spans two chunks
    assert out.tolist() == [0x05050505, 0x05050505]
    with pytest.raises(ValueError, match="writable C-contiguous"):
        s.read_into(0, np.empty(8, dtype=np.uint8)[::2])


@pytest.mark.parametrize(
    ("addr", "n", "op"),
    [(BASE - 1, 4, "read"), (BASE + 4096 - 2, 4, "read"), (BASE, -1, "read"), (BASE + 4095, 2, "write")],
)
def test_out_of_range(addr: int, n: int, op: str) -> None:
    s = MemoryStore(NAME, BASE, 4096)
    with pytest.raises(ValueError, match=NAME) as info:
        if op == "read":
            s.read(addr, n)
        else:
            s.write(addr, bytes(n))
    msg = str(info.value)
    if n >= 0:
        assert f"[{addr:#x}, {addr + n:#x})" in msg and "[0x100000000, 0x100001000)" in msg
    else:
        assert "negative" in msg


def test_fill_and_zero_fill_does_not_allocate() -> None:
    s = MemoryStore(NAME, 0, 1 << 24, chunk=4096)
    s.fill(0, 1 << 24, b"\x00\x00")
    assert s.resident_bytes == 0
    s.fill(4090, 13, b"\x01\x02\x03")
    assert s.read(4088, 17).tolist() == [0, 0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 0, 0]
    s.fill(4090, 13, b"\x00")
    assert not s.read(4088, 17).any()
    assert s.resident_bytes == 2 * 4096
    with pytest.raises(ValueError, match="empty pattern"):
        s.fill(0, 4, b"")
    with pytest.raises(ValueError, match=NAME):
        s.fill((1 << 24) - 2, 4, b"\x01")


def test_big_fill_phase_across_chunks() -> None:
    s = MemoryStore(NAME, 0, 1 << 16, chunk=1024)
    s.fill(3, 10_000, b"\x10\x20\x30\x40\x50\x60\x70")
    expect = np.resize(np.frombuffer(b"\x10\x20\x30\x40\x50\x60\x70", np.uint8), 10_000)
    assert np.array_equal(s.read(3, 10_000), expect)


def test_write_pattern() -> None:
    s = MemoryStore(NAME, 0, 1 << 16, chunk=1024)
    s.write_pattern(1, 6, "0xDEADBEEF")
    assert s.read(0, 8).tolist() == [0, 0xEF, 0xBE, 0xAD, 0xDE, 0xEF, 0xBE, 0]
    s.write_pattern(100, 3000, "seed:7")
    assert np.array_equal(s.read(100, 3000), pattern_bytes("seed:7", 3000))
    s.write_pattern(0, 1 << 16, "zeros")
    assert not s.read(0, 1 << 16).any()
    with pytest.raises(ValueError, match="grammar"):
        s.write_pattern(0, 4, "bogus")


def test_copy_from_other_store_and_unwritten_source() -> None:
    a = MemoryStore("a", 0, 1 << 16, chunk=1024)
    b = MemoryStore("b", 1 << 20, 1 << 16, chunk=1024)
    a.write_pattern(500, 3000, "inc8")
    b.fill(1 << 20, 1 << 16, b"\xff")
    b.copy_from(a, 500, (1 << 20) + 7, 3000)
    assert np.array_equal(b.read((1 << 20) + 7, 3000), pattern_bytes("inc8", 3000))
    assert b.read((1 << 20) + 6, 1).tolist() == [0xFF]
    # An unwritten source zeroes the destination without allocating anything in it.
    c = MemoryStore("c", 0, 1 << 16, chunk=1024)
    b.copy_from(c, 0, 1 << 20, 5000)
    assert not b.read(1 << 20, 5000).any()
    c.copy_from(MemoryStore("d", 0, 1 << 16), 0, 0, 1 << 16)
    assert c.resident_bytes == 0
    with pytest.raises(ValueError, match=r"'?a'?: copy source of \[0xff00, 0x10100\)"):
        b.copy_from(a, 0xFF00, 1 << 20, 0x200)
    with pytest.raises(ValueError, match=r"b: copy destination"):
        b.copy_from(a, 0, 0, 16)


@pytest.mark.parametrize(("src", "dst"), [(0, 700), (700, 0), (100, 101), (101, 100)])
def test_copy_within_store_overlapping(src: int, dst: int) -> None:
    s = MemoryStore(NAME, 0, 8192, chunk=256)
    ref = bytearray(pattern_bytes("seed:1", 8192).tobytes())
    s.write(0, ref)
    s.copy_from(s, src, dst, 3000)
    ref[dst : dst + 3000] = ref[src : src + 3000]
    assert s.read(0, 8192).tobytes() == bytes(ref)


# -- patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expect"),
    [
        ("zeros", [0] * 6),
        ("ones", [0xFF] * 6),
        ("byte:0xAB", [0xAB] * 6),
        ("byte:171", [0xAB] * 6),
        (" Byte:0xab ", [0xAB] * 6),
        ("0xDEADBEEF", [0xEF, 0xBE, 0xAD, 0xDE, 0xEF, 0xBE]),
        ("0xABC", [0xBC, 0x0A, 0xBC, 0x0A, 0xBC, 0x0A]),
        ("0x7", [7] * 6),
        ("word32:0xDEADBEEF", [0xEF, 0xBE, 0xAD, 0xDE, 0xEF, 0xBE]),
        ("word32:1", [1, 0, 0, 0, 1, 0]),
        ("word16:0x0102", [2, 1, 2, 1, 2, 1]),
        ("word64:0x0102030405060708", [8, 7, 6, 5, 4, 3]),
        ("inc8", [0, 1, 2, 3, 4, 5]),
        ("inc32", [0, 0, 0, 0, 1, 0]),
    ],
)
def test_patterns(pattern: str, expect: list[int]) -> None:
    got = pattern_bytes(pattern, 6)
    assert got.dtype == np.uint8 and got.tolist() == expect


def test_pattern_wraparound_and_lengths() -> None:
    assert pattern_bytes("inc8", 258)[-3:].tolist() == [255, 0, 1]
    assert pattern_bytes("inc32", 4 * 300).view("<u4")[-1] == 299
    assert pattern_bytes("inc32", 7).tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert pattern_bytes("zeros", 0).size == 0


def test_seed_pattern_is_deterministic_and_prefix_stable() -> None:
    a = pattern_bytes("seed:42", 1000)
    assert np.array_equal(a, pattern_bytes("seed:42", 1000))
    for n in (1, 7, 8, 333):
        assert np.array_equal(pattern_bytes("seed:42", n), a[:n])
    assert not np.array_equal(a, pattern_bytes("seed:43", 1000))


@pytest.mark.parametrize(
    "pattern",
    ["", "twos", "byte:256", "byte:x", "word32:0x1FFFFFFFF", "word12:1", "0x", "0xG1", "seed:-1", "0x" + "1" * 17],
)
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"pattern"):
        pattern_bytes(pattern, 4)


def test_unknown_pattern_lists_grammar() -> None:
    with pytest.raises(ValueError, match=r"'twos'.*zeros.*ones.*byte:V.*0xHEX.*word32:V.*inc8.*inc32.*seed:N"):
        pattern_bytes("twos", 4)


def test_negative_pattern_length() -> None:
    with pytest.raises(ValueError, match="negative"):
        pattern_bytes("zeros", -1)


# -- property: agrees with a bytearray ---------------------------------------------------

SIZE = 5000
_store_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.binary(max_size=700)),
    st.tuples(st.just("fill"), st.integers(0, SIZE), st.binary(min_size=1, max_size=5), st.integers(0, 1500)),
    st.tuples(st.just("copy"), st.integers(0, SIZE), st.integers(0, SIZE), st.integers(0, 1500)),
    st.tuples(st.just("read"), st.integers(0, SIZE), st.integers(0, 1500)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_store_op, max_size=30), chunk=st.sampled_from([64, 256, 1024]))
def test_store_matches_bytearray(ops: list[tuple[object, ...]], chunk: int) -> None:
    base = 0x8000
    s = MemoryStore("prop", base, SIZE, chunk=chunk)
    ref = bytearray(SIZE)
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, off, data = op
            assert isinstance(off, int) and isinstance(data, bytes)
            off = min(off, SIZE - len(data))
            s.write(base + off, data)
            ref[off : off + len(data)] = data
        elif kind == "fill":
            _, off, pat, n = op
            assert isinstance(off, int) and isinstance(pat, bytes) and isinstance(n, int)
            n = min(n, SIZE - off)
            s.fill(base + off, n, pat)
            ref[off : off + n] = (pat * (n // len(pat) + 1))[:n]
        elif kind == "copy":
            _, src, dst, n = op
            assert isinstance(src, int) and isinstance(dst, int) and isinstance(n, int)
            n = min(n, SIZE - src, SIZE - dst)
            s.copy_from(s, base + src, base + dst, n)
            ref[dst : dst + n] = ref[src : src + n]
        else:
            _, off, n = op
            assert isinstance(off, int) and isinstance(n, int)
            n = min(n, SIZE - off)
            assert s.read(base + off, n).tobytes() == bytes(ref[off : off + n])
        assert s.resident_bytes <= SIZE
    assert s.read(base, SIZE).tobytes() == bytes(ref)
