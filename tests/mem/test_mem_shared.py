"""Shared mappings: one decoded map installed by reference on many page tables.

The property test drives several PEs' tables with local maps, broadcast
(shared) maps and unmaps, and checks every table against a per-PE page-dict
model, including which entry a failed map names.
"""

from __future__ import annotations

import gc
from itertools import pairwise

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbus.mem import MapConflict, PageFault, PageTable, Segment, SharedMapping, SharedMappingCache

P = 4096


@attrs.frozen
class Entry:
    va: int
    pa: int
    size: int
    sip: int = 0
    cube: int = 0
    pe: int = 0


def _tables(n: int, page: int = P) -> list[PageTable]:
    return [PageTable(f"sip0.cube0.pe{i}", page) for i in range(n)]


def test_broadcast_installs_one_run_object_on_every_pe() -> None:
    # Four shards of two pages each, owned by PEs 0..3, VA-contiguous: one run.
    entries = [Entry(0x100000 + k * 2 * P, 0x8000, 2 * P, pe=k) for k in range(4)]
    shared = SharedMapping.build(entries, P)
    assert len(shared.runs) == 1 and shared.problem is None
    tables = _tables(4)
    for t in tables:
        t.install(shared)
    assert all(t.shared_runs()[0] is shared.runs[0] for t in tables)
    assert all(t.mapped_bytes == 8 * P for t in tables)
    # Byte 0x100 of shard 2 lives on PE 2 at PA 0x8100, seen from any PE.
    for t in tables:
        assert t.translate(0x100000 + 4 * P + 0x100, 8) == [Segment(0x100000 + 4 * P + 0x100, 0, 0, 2, 0x8100, 8)]


def test_entries_that_continue_each_other_merge_and_gaps_split_runs() -> None:
    entries = [Entry(0, 0x10000, P), Entry(P, 0x10000 + P, P), Entry(4 * P, 0, P, pe=1)]
    shared = SharedMapping.build(entries, P)
    assert [(r.va, r.va_end, len(r.exts)) for r in shared.runs] == [(0, 2 * P, 1), (4 * P, 5 * P, 1)]


def test_install_overlapping_a_local_mapping_names_pe_entry_and_range() -> None:
    t0, t1 = _tables(2)
    t1.map(0x3000, 0, P, sip=0, cube=0, pe=1)
    shared = SharedMapping.build([Entry(0, 0, 2 * P), Entry(2 * P, 0x10000, 2 * P)], P)
    t0.install(shared)
    with pytest.raises(MapConflict) as info:
        t1.install(shared)
    assert info.value.index == 1
    assert "sip0.cube0.pe1: map of VA [0x2000, 0x4000) overlaps the existing mapping VA [0x3000, 0x4000)" in str(
        info.value
    )
    assert t1.mapped_bytes == P  # all or nothing
    assert t0.mapped_bytes == 4 * P


def test_problem_found_once_names_each_pe() -> None:
    shared = SharedMapping.build([Entry(0, 0, P), Entry(0x1001, 0, P)], P)
    assert shared.problem is not None and shared.problem[0] == 1
    for t in _tables(2):
        with pytest.raises(MapConflict, match=rf"^{t.where}: map: va 0x1001 is not a multiple"):
            t.install(shared)
        assert t.mapped_bytes == 0


def test_check_callback_problem_is_reported_at_its_entry() -> None:
    def check(e: object) -> str | None:
        return "owner: pe 9 is off the device" if getattr(e, "pe", 0) == 9 else None

    shared = SharedMapping.build([Entry(0, 0, P), Entry(P, 0, P, pe=9)], P, check)
    with pytest.raises(MapConflict, match="owner: pe 9") as info:
        _tables(1)[0].install(shared)
    assert info.value.index == 1


def test_partial_unmap_of_a_shared_run_is_private_to_that_pe() -> None:
    shared = SharedMapping.build([Entry(0, 0x40000, 4 * P, pe=k) for k in range(1)], P)
    t0, t1 = _tables(2)
    t0.install(shared)
    t1.install(shared)
    t0.unmap(P, 2 * P)
    assert t0.extents() == [Segment(0, 0, 0, 0, 0x40000, P), Segment(3 * P, 0, 0, 0, 0x40000 + 3 * P, P)]
    assert t1.extents() == [Segment(0, 0, 0, 0, 0x40000, 4 * P)]
    assert shared.runs[0].exts == (Segment(0, 0, 0, 0, 0x40000, 4 * P),)
    with pytest.raises(PageFault, match=r"page fault on sip0\.cube0\.pe0: VA 0x1000"):
        t0.translate(P, 1)


def test_unmap_not_mapped_names_pe_and_va() -> None:
    t = _tables(1)[0]
    t.install(SharedMapping.build([Entry(0, 0, 2 * P)], P))
    with pytest.raises(ValueError, match=r"sip0.cube0.pe0: unmap of VA \[0x0, 0x3000\): VA 0x2000 is not mapped"):
        t.unmap(0, 3 * P)
    assert t.mapped_bytes == 2 * P


def test_cache_builds_once_per_message_and_forgets_dead_messages() -> None:
    class Msg:
        def __init__(self, entries: list[Entry]) -> None:
            self.entries = entries

    builds = 0

    def check(e: object) -> None:
        nonlocal builds
        builds += 1

    cache = SharedMappingCache()
    msg = Msg([Entry(0, 0, P), Entry(P, 0, P, pe=1)])
    assert cache.peek(msg) is None  # nothing built yet
    first = cache.get(msg, msg.entries, P, check)
    assert cache.get(msg, msg.entries, P, check) is first
    assert cache.peek(msg) is first  # later PEs skip every per-entry step
    assert cache.peek(Msg(list(msg.entries))) is None  # keyed by the message object, not its value
    assert builds == 2  # each entry checked once, not once per PE
    del msg
    gc.collect()
    assert len(cache) == 0


# -- property: shared tables agree with a per-PE page model --------------------------------

NPE = 3
NPAGES = 48
PS = 256
Loc = tuple[int, int, int, int]

_entry = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 6), st.integers(0, 3), st.integers(0, 30))
_pes = st.sets(st.integers(0, NPE - 1), min_size=1)
_op = st.one_of(
    st.tuples(st.just("local"), _pes, st.lists(_entry, min_size=1, max_size=1)),
    st.tuples(st.just("shared"), _pes, st.lists(_entry, min_size=1, max_size=5)),
    st.tuples(st.just("unmap"), _pes, st.lists(_entry, min_size=1, max_size=1)),
)


def _model_translate(pages: dict[int, Loc], va: int, n: int) -> list[Segment] | int:
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


def _model_map(pages: dict[int, Loc], entries: list[Entry]) -> int | None:
    """Apply ``entries`` in order, all or nothing; the index of the first overlapping entry, or None."""
    new: dict[int, Loc] = {}
    for i, e in enumerate(entries):
        first, count = e.va // PS, e.size // PS
        if any(p in pages or p in new for p in range(first, first + count)):
            return i
        for k in range(count):
            new[first + k] = (e.sip, e.cube, e.pe, e.pa + k * PS)
    pages.update(new)
    return None


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=30))
def test_shared_tables_match_per_pe_page_model(
    ops: list[tuple[str, set[int], list[tuple[int, int, int, int]]]],
) -> None:
    tables = [PageTable(f"sip0.cube0.pe{i}", PS) for i in range(NPE)]
    models: list[dict[int, Loc]] = [{} for _ in range(NPE)]
    for kind, pes, raw in ops:
        entries = [
            Entry(first * PS, pa_page * PS + 8, min(count, NPAGES - first) * PS, pe=owner)
            for first, count, owner, pa_page in raw
        ]
        if kind == "unmap":
            e = entries[0]
            for p in sorted(pes):
                first, count = e.va // PS, e.size // PS
                hole = next((q for q in range(first, first + count) if q not in models[p]), None)
                if hole is not None:
                    with pytest.raises(ValueError, match=f"{tables[p].where}: unmap .*VA {hole * PS:#x} is not mapped"):
                        tables[p].unmap(e.va, e.size)
                    continue
                tables[p].unmap(e.va, e.size)
                for q in range(first, first + count):
                    del models[p][q]
            continue
        shared = SharedMapping.build(entries, PS)
        for p in sorted(pes):
            expect = _model_map(models[p], entries)
            if kind == "local":
                e = entries[0]
                if expect is not None:
                    with pytest.raises(ValueError, match=f"{tables[p].where}: map of .* overlaps"):
                        tables[p].map(e.va, e.pa, e.size, sip=e.sip, cube=e.cube, pe=e.pe)
                else:
                    tables[p].map(e.va, e.pa, e.size, sip=e.sip, cube=e.cube, pe=e.pe)
                continue
            if expect is not None:
                with pytest.raises(MapConflict, match=f"{tables[p].where}: map of .* overlaps") as info:
                    tables[p].install(shared)
                assert info.value.index == expect
            else:
                tables[p].install(shared)
    for t, pages in zip(tables, models, strict=True):
        assert t.mapped_bytes == len(pages) * PS
        exts = t.extents()
        for a, b in pairwise(exts):
            assert a.va_end <= b.va and not b.continues(a)
        for va, n in ((0, NPAGES * PS), (PS // 2, 5 * PS), (7 * PS, PS)):
            expect_t = _model_translate(pages, va, n)
            if isinstance(expect_t, int):
                with pytest.raises(PageFault) as fault:
                    t.translate(va, n)
                assert fault.value.va == expect_t and fault.value.where == t.where
            else:
                assert t.translate(va, n) == expect_t
        # Page by page too, so every mapped byte's owner and PA are checked.
        for page in range(NPAGES):
            got = t.is_mapped(page * PS, PS)
            assert got == (page in pages)
