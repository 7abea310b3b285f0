"""Placement policies: where the bytes of a tensor live on the device.

A policy is a small frozen value that says *how* to place a tensor; it knows
nothing about any particular shape or device. :func:`place` combines a policy
with a shape, an item size and a :class:`~kbus.hw.DeviceConfig` into a
:class:`Placement`: the list of PEs that hold bytes, and which bytes.

* :class:`Replicate` puts a full copy of the tensor on every target PE. Each
  copy is mapped *locally*: a PE's MMU maps the tensor's VA range to its own
  copy, so a kernel on that PE reads it without leaving the PE.
* :class:`Shard` splits the tensor along one dimension the way
  ``torch.chunk`` does (chunk size ``ceil(n / k)``, trailing chunks smaller,
  possibly fewer than ``k`` non-empty chunks) and puts chunk ``j`` on target
  ``j``. The mapping of the whole tensor is broadcast to every PE, so any PE
  can address any shard through its MMU (remote shards cost NOC/SIP hops).

Small tensors stay small
------------------------
MMU mappings and physical allocations are whole pages (``memory.page_size``),
so a shard is never smaller than a page in device memory. :class:`Shard`
therefore splits into ``k = min(targets, nbytes // min_bytes)`` chunks (at
least one), ``min_bytes`` defaulting to the page size, as ttnn ties a shard to
its page/tile granularity: every chunk but the last then holds at least
``min_bytes`` bytes, so rounding it up to whole pages at most doubles it, and
only the last chunk can waste most of a page. A sharded tensor of ``B`` bytes
thus holds at most ``2 * B + page_size`` bytes of device memory (a 4 KiB
tensor: one page on the first target, not one page on each of 64 PEs), while
a tensor of at least ``targets * page_size`` bytes is split over every target
exactly as before. ``Shard(min_bytes=0)`` keeps one chunk per target whatever
the size (each holding a whole page).

Storage order
-------------
A sharded tensor is stored *shard-major*: shard ``k`` is the C-contiguous
block of its slice, and the tensor's storage is the concatenation of the shard
blocks in shard order. ``offset`` (``TensorArgShard.offset_bytes``) is where a
shard's block starts in that storage. When the shard dimension is the first
dimension whose size is not 1 (always the case for ``dim=0``), storage order is
the ordinary row-major order of the logical tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

import attrs

from ..hw.config import DeviceConfig

__all__ = [
    "Coord",
    "DPPolicy",
    "Placement",
    "Replicate",
    "Shard",
    "ShardPlan",
    "chunk_bounds",
    "place",
    "resolve_targets",
    "shard_count",
]

Coord: TypeAlias = tuple[int, int, int]
"""A PE coordinate ``(sip, cube, pe)``."""

Over: TypeAlias = Literal["pe", "cube", "sip"]


def _as_targets(value: Any) -> tuple[Any, ...] | None:
    """Freeze a user's target list (lists of lists become tuples of tuples) so policies stay hashable."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"targets must be None or a sequence of coordinates, got {value!r}")
    out: list[Any] = []
    for item in value:
        if isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
            out.append(tuple(item))
        else:
            out.append(item)
    if not out:
        raise ValueError("targets must not be empty (use None for every PE)")
    return tuple(out)


def _check_dim(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Shard(dim=...) must be an int, got {type(value).__name__} {value!r}")


def _check_over(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if value not in ("pe", "cube", "sip"):
        raise ValueError(f"Shard(over={value!r}): expected 'pe', 'cube' or 'sip'")


def _check_min_bytes(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Shard(min_bytes=...) must be None or an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"Shard(min_bytes={value}): must be >= 0 (0 = one chunk per target)")


@attrs.frozen
class Replicate:
    """A full copy of the tensor on every target PE, each mapped locally.

    ``targets`` is ``None`` (every PE of the device) or a sequence of PE
    coordinates ``(sip, cube, pe)`` or global PE indices (``sip``-major order,
    ``0 .. num_pes-1``).
    """

    targets: tuple[Any, ...] | None = attrs.field(default=None, converter=_as_targets)


@attrs.frozen
class Shard:
    """Split the tensor along ``dim`` with ``torch.chunk`` semantics, one chunk per target.

    ``over`` is the granularity of the split: ``"pe"`` (one chunk per PE),
    ``"cube"`` (one chunk per cube, held by the cube's PE 0) or ``"sip"`` (one
    chunk per SIP, held by its cube 0 PE 0). ``targets`` is ``None`` (every
    PE/cube/SIP in path order) or a sequence naming them: ``(sip, cube, pe)``
    triples or global PE indices for ``"pe"``, ``(sip, cube)`` pairs or global
    cube indices for ``"cube"``, SIP indices for ``"sip"``. Chunk ``j`` goes to
    ``targets[j]``. A 0-d tensor has a single chunk, on the first target.

    ``min_bytes`` is the smallest chunk worth a target: the tensor is split
    into at most ``nbytes // min_bytes`` chunks (at least one), so a tensor
    smaller than ``len(targets) * min_bytes`` uses only the first targets.
    ``None`` (the default) means the device's page size, the granularity of
    device memory; ``0`` means one chunk per target whatever the size.
    """

    dim: int = attrs.field(default=0, validator=_check_dim)
    over: Over = attrs.field(default="pe", validator=_check_over)
    targets: tuple[Any, ...] | None = attrs.field(default=None, converter=_as_targets)
    min_bytes: int | None = attrs.field(default=None, validator=_check_min_bytes)

    def __repr__(self) -> str:
        extra = "" if self.min_bytes is None else f", min_bytes={self.min_bytes}"
        return f"Shard(dim={self.dim}, over={self.over!r}, targets={self.targets!r}{extra})"


DPPolicy: TypeAlias = Replicate | Shard
"""A data-placement policy."""


@attrs.frozen
class ShardPlan:
    """One shard (or replica) of a placement.

    ``start:stop`` is the shard's range along the shard dimension (the whole
    first dimension for a replica), ``offset`` where its block starts in the
    tensor's storage and ``nbytes`` its exact size.
    """

    coord: Coord
    start: int
    stop: int
    offset: int
    nbytes: int


@attrs.frozen
class Placement:
    """A policy applied to a shape on a device: the resolved shards, in storage order."""

    policy: DPPolicy
    shape: tuple[int, ...]
    itemsize: int
    shard_dim: int
    """The dimension shards split (``-1`` for a replicated tensor, ``0`` for a 0-d sharded one)."""
    shards: tuple[ShardPlan, ...]

    @property
    def replicated(self) -> bool:
        return self.shard_dim < 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def chunk_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """``torch.chunk`` split of ``n`` items into at most ``k`` chunks: ``[(start, stop), ...]``.

    The chunk size is ``ceil(n / k)``; the last chunk may be smaller and there
    may be fewer than ``k`` chunks (``chunk_bounds(5, 4) == [(0, 2), (2, 4), (4, 5)]``).
    ``n == 0`` gives no chunks.
    """
    if k <= 0:
        raise ValueError(f"cannot split into {k} chunks")
    if n <= 0:
        return []
    size = -(-n // k)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def shard_count(policy: Shard, nbytes: int, targets: int, cfg: DeviceConfig) -> int:
    """How many chunks ``policy`` asks for a tensor of ``nbytes`` over ``targets`` targets.

    ``min(targets, nbytes // min_bytes)`` and at least 1, ``min_bytes`` being
    the device's page size unless the policy names one (see "Small tensors
    stay small" above). ``torch.chunk`` may still make fewer chunks.
    """
    least = cfg.memory.page_size if policy.min_bytes is None else policy.min_bytes
    if least <= 0:
        return targets
    return max(1, min(targets, nbytes // least))


def _pe_index_to_coord(i: int, cfg: DeviceConfig) -> Coord:
    t = cfg.topology
    per_sip = t.cubes_per_sip * t.pes_per_cube
    return i // per_sip, (i % per_sip) // t.pes_per_cube, i % t.pes_per_cube


def _bad_target(policy: DPPolicy, item: object, why: str, cfg: DeviceConfig) -> ValueError:
    t = cfg.topology
    return ValueError(
        f"{policy!r}: target {item!r} {why} (device {cfg.name!r} has {t.sips} SIP(s) x "
        f"{t.cubes_per_sip} cube(s) x {t.pes_per_cube} PE(s))"
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _coord(policy: DPPolicy, item: object, over: Over, cfg: DeviceConfig) -> Coord:
    """The PE that holds a chunk for one user target at granularity ``over``."""
    t = cfg.topology
    if over == "pe":
        if _is_int(item):
            assert isinstance(item, int)
            if not 0 <= item < t.num_pes:
                raise _bad_target(policy, item, f"is not a PE index 0..{t.num_pes - 1}", cfg)
            return _pe_index_to_coord(item, cfg)
        if isinstance(item, tuple) and len(item) == 3 and all(_is_int(v) for v in item):
            try:
                cfg.check_coords(*item)
            except ValueError as exc:
                raise _bad_target(policy, item, f"is off the device: {exc}", cfg) from None
            return (int(item[0]), int(item[1]), int(item[2]))
        raise _bad_target(policy, item, "must be a (sip, cube, pe) triple or a global PE index", cfg)
    if over == "cube":
        if _is_int(item):
            assert isinstance(item, int)
            if not 0 <= item < t.num_cubes:
                raise _bad_target(policy, item, f"is not a cube index 0..{t.num_cubes - 1}", cfg)
            return item // t.cubes_per_sip, item % t.cubes_per_sip, 0
        if isinstance(item, tuple) and len(item) == 2 and all(_is_int(v) for v in item):
            try:
                cfg.check_coords(item[0], item[1])
            except ValueError as exc:
                raise _bad_target(policy, item, f"is off the device: {exc}", cfg) from None
            return (int(item[0]), int(item[1]), 0)
        raise _bad_target(policy, item, "must be a (sip, cube) pair or a global cube index", cfg)
    if _is_int(item):
        assert isinstance(item, int)
        if not 0 <= item < t.sips:
            raise _bad_target(policy, item, f"is not a SIP index 0..{t.sips - 1}", cfg)
        return item, 0, 0
    raise _bad_target(policy, item, "must be a SIP index", cfg)


def resolve_targets(policy: DPPolicy, cfg: DeviceConfig) -> tuple[Coord, ...]:
    """The PEs that hold chunks (or copies) under ``policy``, in chunk order.

    Raises ``ValueError`` naming the policy and the offending target when a
    target is off the device or listed twice (two chunks of one tensor on one
    PE would need two mappings of one VA range).
    """
    t = cfg.topology
    over: Over = policy.over if isinstance(policy, Shard) else "pe"
    if policy.targets is None:
        if over == "pe":
            coords = tuple(cfg.pe_coords())
        elif over == "cube":
            coords = tuple((s, c, 0) for s in range(t.sips) for c in range(t.cubes_per_sip))
        else:
            coords = tuple((s, 0, 0) for s in range(t.sips))
        return coords
    coords = tuple(_coord(policy, item, over, cfg) for item in policy.targets)
    seen: dict[Coord, object] = {}
    for item, c in zip(policy.targets, coords, strict=True):
        if c in seen:
            raise _bad_target(policy, item, f"is listed twice (same PE as {seen[c]!r})", cfg)
        seen[c] = item
    return coords


def place(policy: DPPolicy, shape: Sequence[int], itemsize: int, cfg: DeviceConfig) -> Placement:
    """Resolve ``policy`` for a tensor of ``shape`` and ``itemsize`` on device ``cfg``.

    Raises ``ValueError`` naming the policy and the shape for a shard dimension
    out of range, ``TypeError`` for something that is not a policy.
    """
    shape = tuple(shape)
    if not isinstance(policy, (Replicate, Shard)):
        raise TypeError(f"policy must be kbus.Replicate(...) or kbus.Shard(...), got {type(policy).__name__}")
    coords = resolve_targets(policy, cfg)
    nbytes = math.prod(shape) * itemsize
    if isinstance(policy, Replicate):
        first = shape[0] if shape else 1
        shards = () if nbytes == 0 else tuple(ShardPlan(c, 0, first, 0, nbytes) for c in coords)
        return Placement(policy, shape, itemsize, -1, shards)
    if not shape:
        shards = () if nbytes == 0 else (ShardPlan(coords[0], 0, 1, 0, nbytes),)
        return Placement(policy, shape, itemsize, 0, shards)
    nd = len(shape)
    if not -nd <= policy.dim < nd:
        raise ValueError(f"{policy!r} cannot split a tensor of shape {shape}: dim must be in [{-nd}, {nd - 1}]")
    dim = policy.dim % nd
    n = shape[dim]
    row = nbytes // n if n else 0  # bytes of one index along dim
    plans = []
    for (start, stop), c in zip(chunk_bounds(n, shard_count(policy, nbytes, len(coords), cfg)), coords, strict=False):
        if row:
            plans.append(ShardPlan(c, start, stop, start * row, (stop - start) * row))
    return Placement(policy, shape, itemsize, dim, tuple(plans))
