"""Byte backing store of a memory region, and the fill-pattern grammar.

:class:`MemoryStore` holds the bytes of one SRAM or HBM region. It is chunked
and lazy: nothing is allocated until a chunk is first written, and reading a
never-written chunk yields zeros without allocating it. A device with 4096 PEs
and gigabytes of nominal memory per PE therefore costs a few dictionaries until
a program actually stores data, and then only as much as it touched.

Fill patterns
-------------
Bulk data never rides inside a protocol message; a ``MemoryWriteMsg`` names a
*pattern* instead, and :func:`pattern_bytes` expands it. Names are
case-insensitive and surrounding blanks are ignored. Numbers after ``:`` may be
written in any Python integer notation (``0xAB``, ``171``, ``0b1010_1011``).

================  ==============================================================
``zeros``         every byte 0x00
``ones``          every byte 0xFF (all bits set)
``byte:V``        the byte ``V`` (0..255) repeated
``0xHEX``         the word ``HEX`` repeated, little-endian in memory; its width is
                  the number of hex digits / 2, rounded up (1..8 bytes):
                  ``0xDEADBEEF`` -> ``EF BE AD DE EF BE ...``
``wordN:V``       the N-bit word ``V`` repeated, little-endian, N in 8/16/32/64:
                  ``word32:0x1`` -> ``01 00 00 00 01 00 ...``
``inc8``          bytes 0, 1, 2, ..., 255, 0, 1, ...
``inc32``         uint32 words 0, 1, 2, ... little-endian, one per 4 bytes
``seed:N``        pseudo-random bytes, ``numpy.random.default_rng(N).bytes(n)``;
                  the same N always gives the same bytes, and a shorter fill is
                  a prefix of a longer one
================  ==============================================================

Every pattern starts at its first byte at the first address written; when the
length is not a multiple of the word width the last word is cut short.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from numpy.random import default_rng

__all__ = ["PATTERN_GRAMMAR", "MemoryStore", "pattern_bytes", "periodic_unit"]

U8Array: TypeAlias = npt.NDArray[np.uint8]
Buffer: TypeAlias = bytes | bytearray | memoryview | npt.NDArray[Any]

PATTERN_GRAMMAR = (
    "zeros | ones (0xFF bytes) | byte:V | 0xHEX (word of len(HEX)/2 bytes, little-endian) | "
    "word8:V | word16:V | word32:V | word64:V | inc8 | inc32 | seed:N"
)

_WORD_RE = re.compile(r"^word(8|16|32|64):(.+)$")
_HEX_RE = re.compile(r"^0x([0-9a-f]{1,16})$")


def _parse_int(text: str, pattern: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"fill pattern {pattern!r}: {text.strip()!r} is not an integer") from None


def _word(value: int, width: int, pattern: str) -> U8Array:
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"fill pattern {pattern!r}: value {value:#x} does not fit in {width} byte(s)")
    return np.frombuffer(value.to_bytes(width, "little"), dtype=np.uint8)


def periodic_unit(pattern: str) -> U8Array | None:
    """The repeating unit of ``pattern``, or ``None`` when the pattern does not repeat (``inc32``, ``seed:N``).

    :meth:`MemoryStore.write_pattern` uses it to fill a large range through
    :meth:`MemoryStore.fill` without materialising the whole range first.
    Raises ``ValueError`` for a pattern outside the grammar.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"fill pattern must be a str, got {type(pattern).__name__}")
    p = pattern.strip().lower()
    if p == "zeros":
        return np.zeros(1, dtype=np.uint8)
    if p == "ones":
        return np.full(1, 0xFF, dtype=np.uint8)
    if p == "inc8":
        return np.arange(256, dtype=np.uint8)
    if p == "inc32" or p.startswith("seed:"):
        if p.startswith("seed:"):
            seed = _parse_int(p[5:], pattern)
            if seed < 0:
                raise ValueError(f"fill pattern {pattern!r}: the seed must be >= 0")
        return None
    if p.startswith("byte:"):
        return _word(_parse_int(p[5:], pattern), 1, pattern)
    m = _WORD_RE.match(p)
    if m:
        return _word(_parse_int(m.group(2), pattern), int(m.group(1)) // 8, pattern)
    m = _HEX_RE.match(p)
    if m:
        digits = m.group(1)
        return _word(int(digits, 16), (len(digits) + 1) // 2, pattern)
    raise ValueError(f"unknown fill pattern {pattern!r}; the grammar is: {PATTERN_GRAMMAR}")


def pattern_bytes(pattern: str, nbytes: int) -> U8Array:
    """Expand fill ``pattern`` (see the module docstring) into ``nbytes`` uint8 bytes.

    Raises ``ValueError`` for an unknown pattern (the message lists the
    grammar) or a negative length.
    """
    if nbytes < 0:
        raise ValueError(f"fill pattern {pattern!r}: length {nbytes} is negative")
    unit = periodic_unit(pattern)
    if unit is not None:
        if len(unit) == 1:
            return np.full(nbytes, unit[0], dtype=np.uint8)
        return np.resize(unit, nbytes)
    p = pattern.strip().lower()
    if p == "inc32":
        words = np.arange(-(-nbytes // 4), dtype="<u4")
        return words.view(np.uint8)[:nbytes].copy() if nbytes % 4 else words.view(np.uint8)
    seed = _parse_int(p[5:], pattern)
    return np.frombuffer(default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()


def _as_u8(data: Buffer, owner: str) -> U8Array:
    """A flat uint8 view of ``data`` without copying when it is contiguous."""
    if isinstance(data, np.ndarray):
        # A non-contiguous array costs one extra copy here; accepted for convenience.
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (BufferError, ValueError) as e:
        raise ValueError(f"{owner}: data must be a contiguous buffer ({e})") from None
    except TypeError:
        raise TypeError(
            f"{owner}: data must be bytes, bytearray, memoryview or a numpy array, got {type(data).__name__}"
        ) from None


class MemoryStore:
    """The bytes of the memory region ``[base, base + size)``, allocated lazily in chunks.

    Addresses are absolute (the region's own PA space), so the device model
    can hand a physical address straight to the store of the region it lies
    in. ``chunk`` must be a power of two. The default, 64 KiB, is the MMU
    page of the presets: the runtime hands out physical memory in whole pages,
    so each shard starts a chunk of its own and the backing below follows
    what each shard uses (with 1 MiB chunks, 16 small shards sharing a chunk
    backed it up to the highest one: ``kbus demo --preset large`` held 1.1 GiB
    for a few MiB of data). A 4 MiB transfer is then 64 slice copies.

    A chunk is backed only as far as it has been written: its array covers
    the chunk's first bytes up to the highest byte written, in steps of
    ``GROW`` (4 KiB), and grows (at least doubling) when a write reaches
    further. So resident memory tracks what the device actually stores: a
    256-byte shard costs 4 KiB, not a chunk (with whole 1 MiB chunks a small
    tensor sharded over 4096 PEs pinned 4 GiB), while a transfer that fills a
    chunk allocates it whole at once, with no growth copies.

    All data moves with numpy slice assignment, one copy per chunk touched;
    nothing loops over elements in Python.
    """

    GROW = 4096
    """Granule of a chunk's backing array (bytes)."""

    def __init__(self, name: str, base: int, size: int, chunk: int = 1 << 16) -> None:
        if base < 0 or size < 0:
            raise ValueError(f"store {name!r}: base {base:#x} and size {size} must be >= 0")
        if chunk <= 0 or chunk & (chunk - 1):
            raise ValueError(f"store {name!r}: chunk size {chunk} is not a power of two")
        self.name = name
        self.base = base
        self.size = size
        self.chunk = chunk
        self._shift = chunk.bit_length() - 1
        self._chunks: dict[int, U8Array] = {}
        self._resident = 0

    def __repr__(self) -> str:
        return (
            f"<MemoryStore {self.name} [{self.base:#x}, {self.end:#x}) "
            f"resident={self._resident} B in {len(self._chunks)} chunk(s)>"
        )

    @property
    def end(self) -> int:
        """One past the last address of the region."""
        return self.base + self.size

    @property
    def resident_bytes(self) -> int:
        """Bytes of backing memory actually allocated (touched chunks only)."""
        return self._resident

    # -- internals -----------------------------------------------------------------

    def _check(self, addr: int, nbytes: int, op: str) -> int:
        """Validate ``[addr, addr + nbytes)`` and return its offset from ``base``."""
        if nbytes < 0:
            raise ValueError(f"{self.name}: {op} at {addr:#x} with negative length {nbytes}")
        if addr < self.base or addr + nbytes > self.base + self.size:
            raise ValueError(
                f"{self.name}: {op} of [{addr:#x}, {addr + nbytes:#x}) is outside the store's bounds "
                f"[{self.base:#x}, {self.base + self.size:#x})"
            )
        return addr - self.base

    def _spans(self, off: int, nbytes: int) -> list[tuple[int, int, int, int]]:
        """Split ``[off, off + nbytes)`` at chunk boundaries: ``(chunk index, offset in chunk, pos, length)``.

        ``pos`` is the position of the piece within the requested range.
        """
        spans = []
        pos = 0
        mask = self.chunk - 1
        while pos < nbytes:
            cur = off + pos
            inner = cur & mask
            n = min(self.chunk - inner, nbytes - pos)
            spans.append((cur >> self._shift, inner, pos, n))
            pos += n
        return spans

    def _chunk_for_write(self, idx: int, end: int) -> U8Array:
        """Chunk ``idx`` backed at least up to byte ``end`` of the chunk (grown if needed)."""
        arr = self._chunks.get(idx)
        have = 0 if arr is None else arr.size
        if arr is not None and have >= end:
            return arr
        # The last chunk is cut to the region so resident_bytes never exceeds size.
        full = min(self.chunk, self.size - (idx << self._shift))
        grow = self.GROW
        size = min(full, max(-(-end // grow) * grow, 2 * have))
        new = np.zeros(size, dtype=np.uint8)
        if arr is not None:
            new[:have] = arr
        self._chunks[idx] = new
        self._resident += size - have
        return new

    def _is_unwritten(self, off: int, nbytes: int) -> bool:
        """True when no chunk overlapping ``[off, off + nbytes)`` was ever written (so it reads as zeros)."""
        if nbytes <= 0 or not self._chunks:
            return True
        first, last = off >> self._shift, (off + nbytes - 1) >> self._shift
        if last - first + 1 > len(self._chunks):
            return not any(first <= i <= last for i in self._chunks)
        return not any(i in self._chunks for i in range(first, last + 1))

    def _zero(self, off: int, nbytes: int) -> None:
        # Zeroing never allocates: an unwritten chunk already reads as zeros.
        for idx, inner, _pos, n in self._spans(off, nbytes):
            arr = self._chunks.get(idx)
            if arr is not None:
                arr[inner : inner + n] = 0  # a slice past the backed part is empty: those bytes read as zeros

    # -- public API --------------------------------------------------------------------

    def write(self, addr: int, data: Buffer) -> None:
        """Copy ``data`` (any contiguous buffer; arrays are taken byte-for-byte) to ``addr``."""
        src = _as_u8(data, f"{self.name}: write")
        off = self._check(addr, src.size, "write")
        for idx, inner, pos, n in self._spans(off, src.size):
            self._chunk_for_write(idx, inner + n)[inner : inner + n] = src[pos : pos + n]

    def read(self, addr: int, nbytes: int) -> U8Array:
        """A new uint8 array with the ``nbytes`` bytes at ``addr`` (zeros where never written).

        Always a copy, so the caller may keep or modify it freely; use
        :meth:`read_into` to land the bytes in a buffer you already own.
        """
        out = np.empty(nbytes if nbytes > 0 else 0, dtype=np.uint8)
        self._read(addr, nbytes, out, "read")
        return out

    def read_into(self, addr: int, out: npt.NDArray[Any]) -> None:
        """Read ``out.nbytes`` bytes at ``addr`` straight into ``out`` (one copy, no temporary).

        ``out`` must be a writable C-contiguous array of any dtype; its bytes
        are overwritten, so reading into a ``float32`` array reinterprets the
        memory as little-endian floats.
        """
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"{self.name}: read_into needs a writable C-contiguous array")
        self._read(addr, out.nbytes, out.reshape(-1).view(np.uint8), "read")

    def _read(self, addr: int, nbytes: int, out: U8Array, op: str) -> None:
        off = self._check(addr, nbytes, op)
        for idx, inner, pos, n in self._spans(off, nbytes):
            arr = self._chunks.get(idx)
            if arr is None:
                out[pos : pos + n] = 0
            elif inner + n <= arr.size:
                out[pos : pos + n] = arr[inner : inner + n]
            else:  # partly past the backed part of the chunk: zeros there
                got = max(0, arr.size - inner)
                out[pos : pos + got] = arr[inner : inner + got]
                out[pos + got : pos + n] = 0

    def fill(self, addr: int, nbytes: int, pattern: Buffer) -> None:
        """Repeat the byte ``pattern`` over ``[addr, addr + nbytes)``, its first byte at ``addr``.

        The pattern is tiled once to at most one chunk plus one period and each
        chunk gets a slice of that tile, so a fill of gigabytes needs no
        gigabyte temporary. An all-zero pattern only clears chunks that are
        already resident: filling with zeros never allocates.
        """
        pat = _as_u8(pattern, f"{self.name}: fill")
        off = self._check(addr, nbytes, "fill")
        if pat.size == 0:
            raise ValueError(f"{self.name}: fill at {addr:#x} with an empty pattern")
        if nbytes == 0:
            return
        if not pat.any():
            self._zero(off, nbytes)
            return
        period = pat.size
        # bytes * n repeats by doubling memcpy; np.resize concatenates n copies
        # in Python and cost 150 us per 4 KiB fill (a fill per shard per PE).
        length = min(nbytes, self.chunk) + period - 1
        tile = np.frombuffer(pat.tobytes() * -(-length // period), dtype=np.uint8)
        for idx, inner, pos, n in self._spans(off, nbytes):
            phase = pos % period
            self._chunk_for_write(idx, inner + n)[inner : inner + n] = tile[phase : phase + n]

    def write_pattern(self, addr: int, nbytes: int, pattern: str) -> None:
        """Write fill ``pattern`` (see the module docstring) over ``[addr, addr + nbytes)``.

        Repeating patterns go through :meth:`fill` (no temporary of the full
        length, and ``zeros`` never allocates); ``inc32`` and ``seed:N`` are
        expanded with :func:`pattern_bytes` and written.
        """
        unit = periodic_unit(pattern)
        if unit is not None:
            self.fill(addr, nbytes, unit)
        else:
            self._check(addr, nbytes, "write_pattern")
            self.write(addr, pattern_bytes(pattern, nbytes))

    def copy_from(self, other: MemoryStore, src_addr: int, dst_addr: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``other`` at ``src_addr`` to this store at ``dst_addr``.

        ``other`` may be this store, with overlapping ranges (memmove semantics).
        The copy goes one chunk at a time, so its temporary is at most one
        chunk, and a source range that was never written is copied by zeroing,
        which allocates nothing.
        """
        other._check(src_addr, nbytes, "copy source")
        dst_off = self._check(dst_addr, nbytes, "copy destination")
        step = self.chunk
        starts = range(0, nbytes, step)
        # Copying forwards onto an overlapping later range would read bytes
        # already overwritten; go backwards then, like memmove.
        if other is self and src_addr < dst_addr < src_addr + nbytes:
            starts = starts[::-1]
        for pos in starts:
            n = min(step, nbytes - pos)
            if other._is_unwritten(src_addr + pos - other.base, n):
                self._zero(dst_off + pos, n)
            else:
                self.write(dst_addr + pos, other.read(src_addr + pos, n))
