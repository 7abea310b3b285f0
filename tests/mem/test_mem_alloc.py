"""FreeListAllocator, PEMemAllocator and VirtualAllocator: behaviour, errors, properties."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbus.errors import AllocatorError, KbusError, OutOfDeviceMemory
from kbus.mem import FreeListAllocator, PEMemAllocator, VirtualAllocator, format_bytes

HBM = "sip0.cube1.pe3.hbm"


def test_alloc_rounds_and_aligns() -> None:
    a = FreeListAllocator(0x1000, 1 << 20, 64, name=HBM)
    x = a.alloc(1)
    assert x == 0x1000
    assert a.size_of(x) == 64
    y = a.alloc(100, align=4096)
    assert y % 4096 == 0
    assert a.size_of(y) == 128
    assert a.used_bytes == 192
    assert a.used_bytes + a.free_bytes == a.capacity == 1 << 20
    assert a.live == 2
    assert a.allocations() == [(x, 64), (y, 128)]
    # The gap left by the 4 KiB alignment stays free and is reused.
    z = a.alloc(64)
    assert x < z < y


def test_alignment_below_granule_is_granule() -> None:
    a = FreeListAllocator(0, 4096, 64)
    a.alloc(64)
    assert a.alloc(8, align=8) % 64 == 0


def test_best_fit_prefers_smallest_hole() -> None:
    a = FreeListAllocator(0, 64 * 100, 64)
    blocks = [a.alloc(n) for n in (64 * 10, 64, 64 * 2, 64, 64 * 50)]
    a.free(blocks[0])  # 640-byte hole at 0
    a.free(blocks[2])  # 128-byte hole
    assert a.alloc(128) == blocks[2]
    assert a.alloc(64) == 0


def test_free_returns_size_and_coalesces() -> None:
    a = FreeListAllocator(0, 4096, 64)
    xs = [a.alloc(64) for _ in range(64)]
    assert a.free_bytes == 0 and a.largest_free == 0
    for x in xs[::2]:
        assert a.free(x) == 64
    assert len(a.free_blocks()) == 32
    assert a.largest_free == 64
    for x in xs[1::2]:
        a.free(x)
    assert a.free_blocks() == [(0, 4096)]
    assert a.live == 0


def test_stats() -> None:
    a = FreeListAllocator(0, 1024, 64)
    a.alloc(100)
    assert a.stats() == {"capacity": 1024, "used": 128, "free": 896, "largest": 896, "live": 1}


@pytest.mark.parametrize("n", [0, -1])
def test_nonpositive_size(n: int) -> None:
    a = FreeListAllocator(0, 1024, name=HBM)
    with pytest.raises(ValueError, match=rf"{HBM}.*{n} bytes"):
        a.alloc(n)


def test_bad_alignment() -> None:
    with pytest.raises(ValueError, match="power of two"):
        FreeListAllocator(0, 1024, 48, name=HBM)
    with pytest.raises(ValueError, match="not a multiple of the alignment"):
        FreeListAllocator(32, 1024, 64, name=HBM)
    a = FreeListAllocator(0, 1024, name=HBM)
    with pytest.raises(ValueError, match=rf"{HBM}.*alignment 3"):
        a.alloc(8, align=3)


def test_double_free_names_address_and_allocator() -> None:
    a = FreeListAllocator(0x4000, 1 << 16, name=HBM)
    x = a.alloc(256)
    a.free(x)
    with pytest.raises(AllocatorError, match=rf"{HBM}.*0x4000.*double free") as info:
        a.free(x)
    assert isinstance(info.value, KbusError)


def test_free_unknown_address() -> None:
    a = FreeListAllocator(0x4000, 1 << 16, name=HBM)
    x = a.alloc(256)
    with pytest.raises(AllocatorError, match=rf"{HBM}.*0x4040.*inside the live block \[0x4000"):
        a.free(x + 0x40)
    with pytest.raises(AllocatorError, match=rf"{HBM}.*0x8000.*no live allocation"):
        a.free(0x8000)
    with pytest.raises(AllocatorError, match=rf"{HBM}.*0x10.*outside"):
        a.free(0x10)
    with pytest.raises(AllocatorError, match=rf"{HBM}.*size_of\(0x8000\)"):
        a.size_of(0x8000)


def test_double_free_after_reuse_is_plain_free() -> None:
    a = FreeListAllocator(0, 1024)
    x = a.alloc(64)
    a.free(x)
    assert a.alloc(64) == x  # reused: no longer "recently freed"
    assert a.free(x) == 64


def test_out_of_memory_report() -> None:
    a = FreeListAllocator(0, 4 << 20, name=HBM)
    x = a.alloc(1 << 20)
    a.alloc(1 << 20)
    a.free(x)
    with pytest.raises(OutOfDeviceMemory) as info:
        a.alloc(3 << 20)
    e = info.value
    assert (e.where, e.requested, e.free, e.largest) == (HBM, 3 << 20, 3 << 20, 2 << 20)
    msg = str(e)
    assert HBM in msg and "3 MiB" in msg and "largest free block 2 MiB" in msg and "fragmented" in msg
    assert isinstance(e, MemoryError) and isinstance(e, KbusError)


def test_out_of_memory_because_of_alignment() -> None:
    a = FreeListAllocator(0, 8192, 64, name=HBM)
    a.alloc(64)
    with pytest.raises(OutOfDeviceMemory, match="alignment 8192"):
        a.alloc(4096, align=8192)


def test_zero_capacity_and_unusable_tail() -> None:
    a = FreeListAllocator(0, 0, name="empty")
    assert a.largest_free == 0
    with pytest.raises(OutOfDeviceMemory, match="empty"):
        a.alloc(1)
    b = FreeListAllocator(0, 100, 64)
    assert b.alloc(1) == 0
    with pytest.raises(OutOfDeviceMemory):
        b.alloc(1)  # 36 bytes left: less than one granule
    assert b.used_bytes + b.free_bytes == 100


def test_format_bytes() -> None:
    assert format_bytes(100) == "100 B"
    assert format_bytes(3 << 20) == "3 MiB"
    assert format_bytes(1536) == "1.5 KiB (1536 B)"


def test_many_blocks_are_fast_enough() -> None:
    # Not a timing assertion: just thousands of operations that an O(n^2)
    # implementation would make take noticeably long.
    a = FreeListAllocator(0, 1 << 30, 64)
    xs = [a.alloc(64 * (1 + i % 7)) for i in range(20000)]
    for x in xs[::2]:
        a.free(x)
    for x in xs[1::2]:
        a.free(x)
    assert a.free_blocks() == [(0, 1 << 30)]


# -- PEMemAllocator -----------------------------------------------------------------


def test_pe_mem_regions() -> None:
    pe = PEMemAllocator("sip0.cube1.pe3", sram_bytes=1 << 20, hbm_bytes=1 << 30, hbm_base=1 << 32)
    h = pe.alloc(1000)
    s = pe.alloc(1000, kind="sram")
    assert h >= 1 << 32 and s < 1 << 20
    assert pe.kind_of(h) == "hbm" and pe.kind_of(s) == "sram"
    assert pe.size_of(h) == 1024
    st_ = pe.stats()
    assert st_["hbm"]["used"] == 1024 and st_["sram"]["live"] == 1
    assert set(st_["hbm"]) == {"capacity", "used", "free", "largest", "live"}
    assert pe.free(h) == 1024 and pe.free(s) == 1024
    assert pe.stats()["hbm"]["live"] == 0


def test_pe_mem_errors() -> None:
    pe = PEMemAllocator("sip0.cube1.pe3", 1 << 16, 1 << 20, 1 << 20)
    with pytest.raises(ValueError, match=r"sip0\.cube1\.pe3.*'dram'"):
        pe.alloc(8, kind="dram")
    with pytest.raises(AllocatorError, match=r"sip0.cube1.pe3.*0x10000.*neither SRAM"):
        pe.free(0x10000)
    with pytest.raises(OutOfDeviceMemory, match=r"sip0.cube1.pe3.sram") as info:
        pe.alloc(1 << 17, kind="sram")
    assert info.value.where == "sip0.cube1.pe3.sram"
    with pytest.raises(AllocatorError, match=r"sip0.cube1.pe3.hbm.*0x100000"):
        pe.free(1 << 20)
    with pytest.raises(ValueError, match="overlaps SRAM"):
        PEMemAllocator("sip0.cube0.pe0", 1 << 20, 1 << 20, 1 << 10)


# -- VirtualAllocator -------------------------------------------------------------------


def test_virtual_allocator_pages() -> None:
    va = VirtualAllocator(1 << 40, 1 << 30, 4096)
    assert va.page_size == 4096
    x = va.alloc(1)
    y = va.alloc(4097)
    assert x == 1 << 40 and y == x + 4096
    assert va.size_of(y) == 8192
    assert va.free(x) == 4096
    assert va.stats()["used"] == 8192
    with pytest.raises(OutOfDeviceMemory, match=r"\bva: out of memory"):
        va.alloc(2 << 30)


def test_virtual_allocator_validation() -> None:
    with pytest.raises(ValueError, match="page size 3000 is not a power of two"):
        VirtualAllocator(0, 1 << 20, 3000)
    with pytest.raises(ValueError, match="not page aligned"):
        VirtualAllocator(100, 1 << 20, 4096, name="dev.va")


# -- properties --------------------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, 3000), st.sampled_from([None, 64, 128, 1024, 4096])),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.none()),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(_op, max_size=80),
    base_pages=st.integers(0, 4),
    size=st.integers(0, 40_000),
    align=st.sampled_from([1, 8, 64, 256]),
)
def test_random_alloc_free_invariants(
    ops: list[tuple[str, int, int | None]], base_pages: int, size: int, align: int
) -> None:
    base = base_pages * 4096
    a = FreeListAllocator(base, size, align, name="prop")
    live: dict[int, int] = {}
    for op, n, al in ops:
        if op == "alloc":
            try:
                addr = a.alloc(n, align=al)
            except OutOfDeviceMemory as e:
                assert e.largest == a.largest_free and e.free == a.free_bytes
                continue
            eff = max(al or align, align)
            assert addr % eff == 0
            got = a.size_of(addr)
            assert got >= n and got % align == 0 and got - n < align
            assert base <= addr and addr + got <= base + size
            live[addr] = got
        elif live:
            addr = sorted(live)[n % len(live)]
            assert a.free(addr) == live.pop(addr)
        # Invariants after every step.
        allocs = a.allocations()
        assert allocs == sorted(live.items())
        for (x, sx), (y, _) in pairwise(allocs):
            assert x + sx <= y, "overlapping live allocations"
        assert a.used_bytes + a.free_bytes == a.capacity
        assert a.used_bytes == sum(live.values())
        blocks = a.free_blocks()
        assert a.largest_free == max((s for _, s in blocks), default=0)
        # Free blocks are coalesced (never adjacent) and disjoint from live blocks.
        for (x, sx), (y, _) in pairwise(blocks):
            assert x + sx < y
        spans = sorted(blocks + allocs)
        for (x, sx), (y, _) in pairwise(spans):
            assert x + sx <= y
    for addr in list(live):
        a.free(addr)
    assert a.free_blocks() == ([(base, size)] if size else [])
    assert a.live == 0 and a.used_bytes == 0
