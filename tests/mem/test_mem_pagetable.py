"""PageTable: map/unmap/translate, errors, and agreement with a page-dict model."""

from __future__ import annotations

from itertools import pairwise

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbus.errors import KbusError
from kbus.mem import PageFault, PageTable, Segment

PE = "sip0.cube1.pe3"
P = 4096


def test_contiguous_mapping_translates_to_one_segment() -> None:
    t = PageTable(PE, P)
    t.map(0x100000, 0x2000, 1 << 20, sip=0, cube=1, pe=3)
    assert t.translate(0x100000, 1 << 20) == [Segment(0x100000, 0, 1, 3, 0x2000, 1 << 20)]
    # Unaligned sub-range.
    assert t.translate(0x100010, 100) == [Segment(0x100010, 0, 1, 3, 0x2010, 100)]
    assert t.translate(0x100000, 0) == []
    assert t.mapped_bytes == 1 << 20 and len(t) == 1


def test_huge_mapping_is_one_extent() -> None:
    t = PageTable(PE, P)
    t.map(0, 0, 1 << 40, sip=1, cube=0, pe=0)  # 2**28 pages; must not be O(pages)
    segs = t.translate(5, (1 << 40) - 10)
    assert len(segs) == 1 and segs[0].pa == 5


def test_map_merges_neighbours_and_translate_splits_where_backing_changes() -> None:
    t = PageTable(PE, P)
    t.map(0x0000, 0x10000, P, sip=0, cube=0, pe=1)
    t.map(0x2000, 0x12000, P, sip=0, cube=0, pe=1)
    t.map(0x1000, 0x11000, P, sip=0, cube=0, pe=1)  # fills the hole: all three merge
    assert len(t) == 1 and t.extents() == [Segment(0, 0, 0, 1, 0x10000, 3 * P)]
    t.map(0x3000, 0x13000, P, sip=0, cube=0, pe=2)  # other PE: no merge
    t.map(0x4000, 0x99000, P, sip=0, cube=0, pe=2)  # PA jump: no merge
    assert len(t) == 3
    segs = t.translate(0x2800, 0x2000)
    assert segs == [
        Segment(0x2800, 0, 0, 1, 0x12800, 0x800),
        Segment(0x3000, 0, 0, 2, 0x13000, 0x1000),
        Segment(0x4000, 0, 0, 2, 0x99000, 0x800),
    ]
    assert segs[1].pe_path == "sip0.cube0.pe2"
    assert segs[0].va_end == 0x3000 and segs[0].pa_end == 0x13000
    assert "sip0.cube0.pe1" in str(segs[0])


def test_unmap_splits_extent() -> None:
    t = PageTable(PE, P)
    t.map(0x10000, 0x0, 8 * P, sip=0, cube=1, pe=3)
    t.unmap(0x12000, 2 * P)
    assert t.extents() == [Segment(0x10000, 0, 1, 3, 0, 2 * P), Segment(0x14000, 0, 1, 3, 0x4000, 4 * P)]
    assert t.mapped_bytes == 6 * P
    t.unmap(0x10000, 2 * P)
    t.unmap(0x14000, 4 * P)
    assert len(t) == 0 and t.mapped_bytes == 0


def test_unmap_across_extents() -> None:
    t = PageTable(PE, P)
    t.map(0, 0, 2 * P, sip=0, cube=0, pe=0)
    t.map(2 * P, 0, 2 * P, sip=0, cube=0, pe=1)
    t.unmap(P, 2 * P)
    assert t.extents() == [Segment(0, 0, 0, 0, 0, P), Segment(3 * P, 0, 0, 1, P, P)]


def test_page_fault() -> None:
    t = PageTable(PE, P)
    t.map(0x10000, 0, 2 * P, sip=0, cube=1, pe=3)
    with pytest.raises(PageFault) as info:
        t.translate(0x11FF0, 0x20)
    e = info.value
    assert e.va == 0x12000 and e.where == PE
    assert isinstance(e, KbusError) and isinstance(e, LookupError)
    msg = str(e)
    assert PE in msg and "0x12000" in msg and "[0x11ff0, 0x12010)" in msg and "VA [0x10000, 0x12000)" in msg
    with pytest.raises(PageFault, match=rf"{PE}.*0x5 \(in page 0x0\).*nearest mappings above"):
        t.translate(5, 1)
    with pytest.raises(PageFault, match="nothing is mapped"):
        PageTable(PE).translate(0, 1)
    assert t.is_mapped(0x10000, 2 * P) and not t.is_mapped(0x10000, 2 * P + 1)
    with pytest.raises(ValueError, match="negative length"):
        t.translate(0x10000, -1)


@pytest.mark.parametrize(
    ("va", "pa", "size", "match"),
    [
        (0x10, 0, P, "va 0x10 is not a multiple"),
        (0, 0, 100, "size 0x64 must be a positive multiple"),
        (0, 0, 0, "size 0x0 must be a positive multiple"),
        (-P, 0, P, "va -4096 is negative"),
        (0, -1, P, "pa -1 is negative"),
    ],
)
def test_map_validation(va: int, pa: int, size: int, match: str) -> None:
    t = PageTable(PE, P)
    with pytest.raises(ValueError, match=rf"{PE}: map: {match}"):
        t.map(va, pa, size, sip=0, cube=0, pe=0)


def test_map_bad_coordinates_and_page_size() -> None:
    t = PageTable(PE, P)
    with pytest.raises(ValueError, match="cube -1"):
        t.map(0, 0, P, sip=0, cube=-1, pe=0)
    with pytest.raises(ValueError, match="not a power of two"):
        PageTable(PE, 3000)


def test_map_overlap_names_existing_range() -> None:
    t = PageTable(PE, P)
    t.map(0x10000, 0, 4 * P, sip=0, cube=1, pe=3)
    for va in (0xF000, 0x13000, 0x11000):
        with pytest.raises(ValueError, match=r"overlaps the existing mapping VA \[0x10000, 0x14000\)"):
            t.map(va, 0x100000, 2 * P, sip=0, cube=1, pe=3)
    assert t.mapped_bytes == 4 * P


def test_unmap_unmapped_names_first_hole_and_changes_nothing() -> None:
    t = PageTable(PE, P)
    t.map(0x10000, 0, 2 * P, sip=0, cube=1, pe=3)
    t.map(0x13000, 0x3000, P, sip=0, cube=1, pe=3)
    before = t.extents()
    with pytest.raises(ValueError, match=rf"{PE}: unmap of VA \[0x10000, 0x14000\): VA 0x12000 is not mapped"):
        t.unmap(0x10000, 4 * P)
    with pytest.raises(ValueError, match="VA 0xf000 is not mapped"):
        t.unmap(0xF000, 2 * P)
    with pytest.raises(ValueError, match="VA 0x20000 is not mapped"):
        t.unmap(0x20000, P)
    with pytest.raises(ValueError, match="va 0x10001 is not a multiple"):
        t.unmap(0x10001, P)
    assert t.extents() == before


def test_segment_is_frozen() -> None:
    s = Segment(0, 0, 0, 0, 0, 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.va = 1  # type: ignore[misc]


# -- property: agrees with a dict-per-page model -------------------------------------------

NPAGES = 64
PS = 256  # small pages keep the reference model cheap
_pt_op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, NPAGES - 1), st.integers(1, 8), st.integers(0, 2), st.integers(0, 40)),
    st.tuples(st.just("unmap"), st.integers(0, NPAGES - 1), st.integers(1, 8), st.just(0), st.just(0)),
)

Loc = tuple[int, int, int, int]  # (sip, cube, pe, pa)


def _model_translate(pages: dict[int, Loc], va: int, n: int) -> list[Segment] | int:
    """Reference: walk bytes page by page, merge contiguous pieces; an int is the faulting VA."""
    out: list[Segment] = []
    cur, end = va, va + n
    while cur < end:
        page = cur // PS
        if page not in pages:
            return cur
        sip, cube, pe, pa = pages[page]
        take = min(end, (page + 1) * PS) - cur
        seg = Segment(cur, sip, cube, pe, pa + cur % PS, take)
        if out and seg.continues(out[-1]):
            prev = out[-1]
            out[-1] = attrs.evolve(prev, nbytes=prev.nbytes + take)
        else:
            out.append(seg)
        cur += take
    return out


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(_pt_op, max_size=40),
    queries=st.lists(st.tuples(st.integers(0, NPAGES * PS), st.integers(0, 6 * PS)), min_size=1, max_size=10),
)
def test_pagetable_matches_page_model(
    ops: list[tuple[str, int, int, int, int]], queries: list[tuple[int, int]]
) -> None:
    t = PageTable(PE, PS)
    pages: dict[int, Loc] = {}
    for op, first, count, pe, pa_page in ops:
        count = min(count, NPAGES - first)
        va, size = first * PS, count * PS
        if op == "map":
            pa = pa_page * PS + 8  # PA need not be page aligned
            if any(p in pages for p in range(first, first + count)):
                with pytest.raises(ValueError, match="overlaps"):
                    t.map(va, pa, size, sip=0, cube=0, pe=pe)
                continue
            t.map(va, pa, size, sip=0, cube=0, pe=pe)
            for k in range(count):
                pages[first + k] = (0, 0, pe, pa + k * PS)
        else:
            hole = next((p for p in range(first, first + count) if p not in pages), None)
            if hole is not None:
                with pytest.raises(ValueError, match=f"VA {hole * PS:#x} is not mapped"):
                    t.unmap(va, size)
                continue
            t.unmap(va, size)
            for k in range(count):
                del pages[first + k]
        assert t.mapped_bytes == len(pages) * PS
        exts = t.extents()
        # Extents are sorted, disjoint and maximal (no extent continues its predecessor).
        for a, b in pairwise(exts):
            assert a.va_end <= b.va and not b.continues(a)
    for va, n in [*queries, (0, NPAGES * PS)]:
        expect = _model_translate(pages, va, n)
        if isinstance(expect, int):
            with pytest.raises(PageFault) as info:
                t.translate(va, n)
            assert info.value.va == expect
        else:
            assert t.translate(va, n) == expect
