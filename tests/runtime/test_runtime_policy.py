"""Placement policies: torch.chunk splits, targets, storage offsets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kbus.hw import DeviceConfig
from kbus.runtime import Replicate, Shard, place
from kbus.runtime.policy import chunk_bounds, resolve_targets

TINY = DeviceConfig.preset("tiny")  # 1 SIP x 2 cubes x 4 PEs
DEFAULT = DeviceConfig.preset("default")  # 2 SIPs x 4 cubes x 8 PEs


def torch_chunk(n: int, k: int) -> list[tuple[int, int]]:
    """Reference: what torch.chunk does to range(n)."""
    size = math.ceil(n / k) if n else 0
    out, i = [], 0
    while i < n:
        out.append((i, min(i + size, n)))
        i += size
    return out


@given(st.integers(0, 300), st.integers(1, 70))
def test_chunk_bounds_follow_torch_chunk(n: int, k: int) -> None:
    bounds = chunk_bounds(n, k)
    assert bounds == torch_chunk(n, k)
    assert len(bounds) <= k
    assert sum(b - a for a, b in bounds) == n


def test_chunk_bounds_can_leave_targets_empty() -> None:
    assert chunk_bounds(5, 4) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(0, 4) == []
    with pytest.raises(ValueError, match="0 chunks"):
        chunk_bounds(3, 0)


def test_replicate_has_one_full_copy_per_pe() -> None:
    p = place(Replicate(), (6, 4), 4, TINY)
    assert p.replicated and p.shard_dim == -1
    assert [s.coord for s in p.shards] == list(TINY.pe_coords())
    assert all(s.offset == 0 and s.nbytes == 96 for s in p.shards)


def test_shard_rows_over_pes_uneven() -> None:
    p = place(Shard(dim=0, min_bytes=0), (10, 3), 4, TINY)  # 10 rows over 8 PEs: chunks of 2 -> 5 shards
    assert [(s.start, s.stop) for s in p.shards] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert [s.offset for s in p.shards] == [0, 24, 48, 72, 96]
    assert [s.coord for s in p.shards] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0)]


def test_shard_columns_are_stored_shard_major() -> None:
    p = place(Shard(dim=1, min_bytes=0), (3, 5), 4, TINY)  # 5 columns over 8 PEs: 5 shards of 1 column
    assert p.shard_dim == 1
    assert [s.nbytes for s in p.shards] == [12] * 5
    assert [s.offset for s in p.shards] == [0, 12, 24, 36, 48]


def test_negative_dim_and_out_of_range() -> None:
    assert place(Shard(dim=-1), (2, 3), 4, TINY).shard_dim == 1
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*dim must be in \[-2, 1\]"):
        place(Shard(dim=2), (2, 3), 4, TINY)


def test_over_cube_and_sip_put_chunks_on_pe0() -> None:
    p = place(Shard(over="cube", min_bytes=0), (16,), 4, DEFAULT)
    assert [s.coord for s in p.shards] == [(s, c, 0) for s in range(2) for c in range(4)]
    p = place(Shard(over="sip", min_bytes=4), (16,), 4, DEFAULT)
    assert [s.coord for s in p.shards] == [(0, 0, 0), (1, 0, 0)]


def test_targets_in_every_spelling() -> None:
    assert resolve_targets(Shard(targets=[(0, 1, 2), 3]), TINY) == ((0, 1, 2), (0, 0, 3))
    assert resolve_targets(Shard(over="cube", targets=[(1, 2), 0]), DEFAULT) == ((1, 2, 0), (0, 0, 0))
    assert resolve_targets(Shard(over="sip", targets=[1]), DEFAULT) == ((1, 0, 0),)
    assert resolve_targets(Replicate(targets=[[0, 0, 1]]), TINY) == ((0, 0, 1),)
    assert Replicate(targets=[[0, 0, 1]]) == Replicate(targets=((0, 0, 1),))  # frozen and hashable
    hash(Shard(targets=[(0, 0, 1)]))


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (Shard(targets=[(0, 2, 0)]), r"target \(0, 2, 0\) is off the device: cube 2 is out of range"),
        (Shard(targets=[8]), r"target 8 is not a PE index 0..7"),
        (Shard(targets=[(0, 0, 1), 1]), r"target 1 is listed twice"),
        (Shard(over="sip", targets=[(0, 0)]), "must be a SIP index"),
        (Replicate(targets=["x"]), r"must be a \(sip, cube, pe\) triple"),
    ],
)
def test_bad_targets_are_named(policy: Shard | Replicate, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        place(policy, (4,), 4, TINY)


def test_policy_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="over='row'"):
        Shard(over="row")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dim"):
        Shard(dim=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        Replicate(targets=[])
    with pytest.raises(TypeError, match=r"must be kbus\.Replicate"):
        place("rows", (4,), 4, TINY)  # type: ignore[arg-type]


def test_zero_d_and_empty_tensors() -> None:
    p = place(Shard(targets=[5]), (), 8, TINY)
    assert [(s.coord, s.nbytes) for s in p.shards] == [((0, 1, 1), 8)]
    assert place(Shard(), (0, 3), 4, TINY).shards == ()
    assert place(Replicate(), (0,), 4, TINY).shards == ()


@given(st.sets(st.integers(0, DEFAULT.num_pes - 1), min_size=1))
def test_target_groups_cover_exactly_the_pes(indices: set[int]) -> None:
    from kbus.runtime.mapping import target_groups as _target_groups

    coords = [c for i, c in enumerate(DEFAULT.pe_coords()) if i in indices]
    t = DEFAULT.topology
    covered: list[tuple[int, int, int]] = []
    for sips, cubes, pe in _target_groups(coords, DEFAULT):
        for s in range(t.sips) if sips == "all" else sips:
            for c in range(t.cubes_per_sip) if cubes == "all" else cubes:
                for p in range(t.pes_per_cube) if pe == "all" else (pe,):
                    covered.append((s, c, p))
    assert sorted(covered) == sorted(coords)  # exact cover, nothing twice
    if len(coords) == DEFAULT.num_pes:
        assert _target_groups(coords, DEFAULT) == [("all", "all", "all")]


def _held(p: object, page: int) -> int:
    """Device bytes a placement holds: every shard rounded up to whole pages, as the runtime allocates."""
    return sum(-(-s.nbytes // page) * page for s in p.shards)  # type: ignore[attr-defined]


def test_small_tensors_use_fewer_shards() -> None:
    page = DEFAULT.memory.page_size  # 64 KiB
    p = place(Shard(), (1024,), 4, DEFAULT)  # 4 KiB over 64 PEs: 4096 // 65536 = 0 -> one chunk
    assert [(s.coord, s.nbytes) for s in p.shards] == [((0, 0, 0), 4096)]
    assert _held(p, page) == page  # was 64 pages (4 MiB) with one chunk per PE
    # 200 KiB of float32: 204800 // 65536 = 3 chunks of ceil(51200 / 3) = 17067 rows.
    p = place(Shard(), (51200,), 4, DEFAULT)
    assert [s.nbytes for s in p.shards] == [17067 * 4, 17067 * 4, (51200 - 2 * 17067) * 4]
    assert [s.coord for s in p.shards] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert _held(p, page) == 6 * page <= 2 * 204800 + page
    # 64 pages or more: one chunk per PE, as before.
    p = place(Shard(), (64 * page // 4,), 4, DEFAULT)
    assert len(p.shards) == 64 and _held(p, page) == 64 * page
    # min_bytes=0 keeps one chunk per target; an explicit minimum counts bytes.
    assert len(place(Shard(min_bytes=0), (1024,), 4, DEFAULT).shards) == 64
    assert len(place(Shard(min_bytes=1024), (1024,), 4, DEFAULT).shards) == 4
    assert len(place(Shard(over="cube"), (1024,), 4, DEFAULT).shards) == 1


def test_min_bytes_is_checked_and_shown() -> None:
    with pytest.raises(ValueError, match=r"min_bytes=-1"):
        Shard(min_bytes=-1)
    with pytest.raises(TypeError, match="min_bytes"):
        Shard(min_bytes=1.5)  # type: ignore[arg-type]
    assert repr(Shard()) == "Shard(dim=0, over='pe', targets=None)"
    assert repr(Shard(min_bytes=0)) == "Shard(dim=0, over='pe', targets=None, min_bytes=0)"


@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=3),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2),
    st.sampled_from(["pe", "cube", "sip"]),
    st.integers(1, 6),
)
def test_held_memory_is_at_most_twice_the_bytes_plus_a_page(
    shape: list[int], itemsize: int, dim: int, over: str, scale: int
) -> None:
    page = DEFAULT.memory.page_size
    shape = [n * (page // 64 if i == 0 else 1) * scale for i, n in enumerate(shape)]  # up to a few MiB
    p = place(Shard(dim=dim % len(shape), over=over), tuple(shape), itemsize, DEFAULT)  # type: ignore[arg-type]
    nbytes = math.prod(shape) * itemsize
    assert sum(s.nbytes for s in p.shards) == nbytes
    assert _held(p, page) <= 2 * nbytes + page
    assert all(s.nbytes >= page for s in p.shards[:-1])  # only the last chunk may be below a page
