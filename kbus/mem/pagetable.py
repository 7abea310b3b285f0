"""Page table of a PE's MMU: virtual address ranges -> physical memory on some PE.

A mapping sends whole pages of the device-wide VA space to a physical address
on a PE named by ``(sip, cube, pe)``; that PE may be the local one (replicated
tensors) or another one (a sharded tensor broadcasts its mapping so that any
PE can translate the whole contiguous VA range). PE_DMA calls
:meth:`PageTable.translate` synchronously to turn a VA range into the physical
pieces it must move.

Mappings are stored as *extents* -- maximal runs of pages that are contiguous
in VA and in PA on one PE -- in a list sorted by VA start and searched with
``bisect``. Translating a gigabyte-long range that was mapped in one call
therefore costs one lookup and returns one :class:`Segment`, instead of
walking 262144 pages in Python; a translation is split only where the extent
changes.

Shared mappings
---------------
A sharded tensor over P PEs is one map message of P entries broadcast to all
P PEs. Copying the entries into every PE's table would cost O(P x P) for one
tensor (16.7 million extents on 4096 PEs). Instead the message is decoded and
validated once into a :class:`SharedMapping` -- immutable :class:`SharedRun`
objects, each a gap-free run of extents -- and every target PE's table
inserts a *reference* to each run (:meth:`PageTable.install`): O(P + E) per
broadcast. A PE translates through a run with a second ``bisect`` inside it.

Precedence: there is none to decide, because no two mappings of one PE may
overlap. :meth:`PageTable.map` and :meth:`PageTable.install` both reject a
range that overlaps anything the PE already maps, its own (replicate-local)
mappings and the shared runs alike, and name the existing range. So a
translation finds at most one mapping per byte, and a PE's own mapping can
never hide, or be hidden by, a shared one. Unmapping a whole run drops the
PE's reference (the run lives on in the other PEs); unmapping part of a run
copies the part that stays into that PE's own extents, so other PEs never see
the change.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import attrs

from kbus.errors import KbusError

__all__ = [
    "MapConflict",
    "MapSpec",
    "PageFault",
    "PageTable",
    "Segment",
    "SharedMapping",
    "SharedMappingCache",
    "SharedRun",
]


class PageFault(KbusError, LookupError):
    """A virtual address with no mapping was translated.

    ``where`` is the path of the PE whose MMU faulted and ``va`` the first
    unmapped virtual address.
    """

    def __init__(self, message: str, *, va: int, where: str) -> None:
        super().__init__(message)
        self.va = va
        self.where = where


@attrs.frozen
class Segment:
    """``nbytes`` of virtual memory at ``va`` backed by physical memory at ``pa`` on PE ``(sip, cube, pe)``.

    Used both for the stored extents of a :class:`PageTable` and for the pieces
    :meth:`PageTable.translate` returns.
    """

    va: int
    sip: int
    cube: int
    pe: int
    pa: int
    nbytes: int

    @property
    def va_end(self) -> int:
        """One past the last virtual address."""
        return self.va + self.nbytes

    @property
    def pa_end(self) -> int:
        """One past the last physical address."""
        return self.pa + self.nbytes

    @property
    def pe_path(self) -> str:
        """The owning PE as a block path: ``"sip0.cube1.pe3"``."""
        return f"sip{self.sip}.cube{self.cube}.pe{self.pe}"

    def continues(self, other: Segment) -> bool:
        """True when this segment starts exactly where ``other`` ends, in VA and in PA, on the same PE."""
        return (
            self.va == other.va + other.nbytes
            and self.pa == other.pa + other.nbytes
            and self.pe == other.pe
            and self.cube == other.cube
            and self.sip == other.sip
        )

    def __str__(self) -> str:
        return f"VA [{self.va:#x}, {self.va_end:#x}) -> {self.pe_path} PA {self.pa:#x}"


def _check_nonneg_int(value: object, field: str, where: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {op}: {field} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {op}: {field} {value} is negative")
    return value


class MapSpec(Protocol):
    """What a map entry must provide (``kbus.protocol.MapEntry`` does)."""

    @property
    def va(self) -> int: ...
    @property
    def pa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def sip(self) -> int: ...
    @property
    def cube(self) -> int: ...
    @property
    def pe(self) -> int: ...


class MapConflict(ValueError):
    """A map of shared entries failed on one PE; ``index`` is the first entry at fault."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class SharedRun:
    """A gap-free run of extents installed by one map message, referenced by every PE that maps it.

    Immutable after construction, so one object can sit in thousands of page
    tables: a PE that unmaps part of it copies what it keeps instead of
    changing it.
    """

    __slots__ = ("exts", "starts", "va", "va_end")

    def __init__(self, exts: Sequence[Segment]) -> None:
        if not exts:
            raise ValueError("a shared run needs at least one extent")
        self.exts = tuple(exts)
        self.starts = [e.va for e in self.exts]
        self.va = self.exts[0].va
        self.va_end = self.exts[-1].va_end

    @property
    def nbytes(self) -> int:
        return self.va_end - self.va

    def extent_at(self, va: int) -> Segment:
        """The extent holding ``va`` (which must lie in the run)."""
        return self.exts[bisect_right(self.starts, va) - 1]

    def pieces(self, lo: int, hi: int) -> list[Segment]:
        """The extents clipped to ``[lo, hi)`` (a sub-range of the run), in VA order."""
        out = []
        i = bisect_right(self.starts, lo) - 1
        exts = self.exts
        cur = lo
        while cur < hi:
            e = exts[i]
            n = min(hi, e.va_end) - cur
            out.append(Segment(cur, e.sip, e.cube, e.pe, e.pa + (cur - e.va), n))
            cur += n
            i += 1
        return out

    def __repr__(self) -> str:
        return f"<SharedRun VA [{self.va:#x}, {self.va_end:#x}) in {len(self.exts)} extent(s)>"


# Stands for the PE path in problems found once for all PEs; each PE puts its own path in.
_WHERE = "\x00pe\x00"


class SharedMapping:
    """The entries of one map message, validated and decoded once for every target PE.

    ``runs`` are the gap-free runs the entries form (entries that continue each
    other in VA and PA are merged). ``problem`` is the first entry that is bad
    on every PE alike -- an owner off the device, a PA outside its memory, a
    misaligned range, an overlap with an earlier entry of the same message --
    as ``(index, message)``; such a mapping installs nowhere. Overlaps with what
    a PE already maps are found per PE by :meth:`PageTable.install`.
    """

    __slots__ = ("problem", "runs", "spans")

    def __init__(
        self, runs: tuple[SharedRun, ...], spans: tuple[tuple[int, int], ...], problem: tuple[int, str] | None
    ) -> None:
        self.runs = runs
        self.spans = spans
        """``(va, size)`` of each entry before ``problem``, in message order."""
        self.problem = problem

    @classmethod
    def build(
        cls,
        entries: Sequence[MapSpec],
        page_size: int,
        check: Callable[[MapSpec], str | None] | None = None,
    ) -> SharedMapping:
        """Validate ``entries`` in order (``check`` adds the device's own checks) and merge them into runs."""
        scratch = PageTable(_WHERE, page_size)
        problem: tuple[int, str] | None = None
        spans: list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            why = check(e) if check is not None else None
            if why is None:
                try:
                    scratch.map(e.va, e.pa, e.size, sip=e.sip, cube=e.cube, pe=e.pe)
                except ValueError as exc:
                    why = str(exc)
            if why is not None:
                problem = (i, why)
                break
            spans.append((e.va, e.size))
        runs: list[SharedRun] = []
        group: list[Segment] = []
        for ext in scratch._items:  # a scratch table holds local extents only
            assert isinstance(ext, Segment)
            if group and group[-1].va_end != ext.va:
                runs.append(SharedRun(group))
                group = []
            group.append(ext)
        if group:
            runs.append(SharedRun(group))
        return cls(tuple(runs), tuple(spans), problem)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)


class SharedMappingCache:
    """Each map message decoded once: its :class:`SharedMapping`, kept while the message lives.

    A broadcast delivers the *same* message object to every target PE, so the
    message's identity is the key; a weak reference drops the entry when the
    last PE is done with the message. (In wire mode every hop decodes a fresh
    copy, so each PE builds its own mapping: correct, only slower.)
    :meth:`of` gives one cache per owner (a device), because validation
    depends on the owner's configuration.
    """

    _by_owner: ClassVar[weakref.WeakKeyDictionary[object, SharedMappingCache]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[object], SharedMapping]] = {}

    @classmethod
    def of(cls, owner: object) -> SharedMappingCache:
        """The cache of ``owner`` (created on first use)."""
        cache = cls._by_owner.get(owner)
        if cache is None:
            cache = cls._by_owner[owner] = cls()
        return cache

    def __len__(self) -> int:
        return len(self._by_id)

    def peek(self, msg: object) -> SharedMapping | None:
        """The mapping already built for ``msg``, or ``None``: the PEs after the first skip all per-entry work."""
        hit = self._by_id.get(id(msg))
        if hit is not None and hit[0]() is msg:
            return hit[1]
        return None

    def get(
        self,
        msg: object,
        entries: Sequence[MapSpec],
        page_size: int,
        check: Callable[[MapSpec], str | None] | None = None,
    ) -> SharedMapping:
        """The mapping of ``entries`` (the entries of ``msg``), built on the first call for ``msg``."""
        key = id(msg)
        hit = self._by_id.get(key)
        if hit is not None and hit[0]() is msg:
            return hit[1]
        shared = SharedMapping.build(entries, page_size, check)
        by_id = self._by_id

        def drop(ref: weakref.ref[object], key: int = key) -> None:
            cur = by_id.get(key)
            if cur is not None and cur[0] is ref:
                del by_id[key]

        by_id[key] = (weakref.ref(msg, drop), shared)
        return shared


_Item = Segment | SharedRun


class PageTable:
    """The VA -> (PE, PA) mappings seen by one PE's MMU.

    ``where`` is the owning PE's path (``"sip0.cube1.pe3"``) and appears in
    every error. Mappings are whole pages: ``va`` and ``size`` must be multiples
    of ``page_size``. The physical address need not be page aligned, because
    physical memory is handed out by a byte-granular allocator
    (:class:`kbus.mem.alloc.PEMemAllocator`) while the page is the unit of the
    VA space only.

    The table holds the PE's own extents and references to shared runs side by
    side in one sorted list; their VA spans never overlap (see the module
    docstring on precedence).
    """

    def __init__(self, where: str, page_size: int = 4096) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"{where}: page size {page_size!r} must be a positive int")
        if page_size & (page_size - 1):
            raise ValueError(f"{where}: page size {page_size} is not a power of two")
        self.where = where
        self.page_size = page_size
        # Parallel lists: _starts[i] == _items[i].va; sorted, spans disjoint.
        self._starts: list[int] = []
        self._items: list[_Item] = []
        self._mapped = 0

    def __repr__(self) -> str:
        return f"<PageTable {self.where} page={self.page_size} items={len(self._items)} mapped={self._mapped} B>"

    def __len__(self) -> int:
        """Number of extents (maximal runs of contiguous pages)."""
        return len(self.extents())

    @property
    def mapped_bytes(self) -> int:
        """Total mapped virtual memory in bytes."""
        return self._mapped

    def extents(self) -> list[Segment]:
        """The extents, sorted by VA and maximal (shared runs included, merged where they continue)."""
        out: list[Segment] = []
        for it in self._items:
            for seg in it.exts if isinstance(it, SharedRun) else (it,):
                if out and seg.continues(out[-1]):
                    prev = out[-1]
                    out[-1] = Segment(prev.va, prev.sip, prev.cube, prev.pe, prev.pa, prev.nbytes + seg.nbytes)
                else:
                    out.append(seg)
        return out

    def shared_runs(self) -> list[SharedRun]:
        """The shared runs this PE references (the same objects as on every other PE that installed them)."""
        return [it for it in self._items if isinstance(it, SharedRun)]

    def _check_range(self, va: int, size: int, op: str) -> None:
        _check_nonneg_int(va, "va", self.where, op)
        _check_nonneg_int(size, "size", self.where, op)
        page = self.page_size
        if va % page:
            raise ValueError(f"{self.where}: {op}: va {va:#x} is not a multiple of the page size {page:#x}")
        if size <= 0 or size % page:
            raise ValueError(
                f"{self.where}: {op}: size {size:#x} must be a positive multiple of the page size {page:#x}"
            )

    def _overlap(self, va: int, end: int) -> Segment | None:
        """The first extent this PE maps inside ``[va, end)``, or None."""
        starts, items = self._starts, self._items
        i = bisect_right(starts, va) - 1
        if i >= 0 and items[i].va_end > va:
            it = items[i]
        elif i + 1 < len(items) and starts[i + 1] < end:
            it = items[i + 1]
        else:
            return None
        if isinstance(it, SharedRun):
            return it.extent_at(max(va, it.va))
        return it

    def map(self, va: int, pa: int, size: int, *, sip: int, cube: int, pe: int) -> None:
        """Map ``[va, va + size)`` to ``[pa, pa + size)`` on PE ``(sip, cube, pe)``, as this PE's own mapping.

        Raises ``ValueError`` naming the field for a misaligned or negative
        argument, and naming the existing VA range when the new one overlaps
        a mapping (remapping requires an :meth:`unmap` first, so that a stale
        mapping can never be overwritten by accident).
        """
        self._check_range(va, size, "map")
        _check_nonneg_int(pa, "pa", self.where, "map")
        for field, value in (("sip", sip), ("cube", cube), ("pe", pe)):
            _check_nonneg_int(value, field, self.where, "map")
        end = va + size
        clash = self._overlap(va, end)
        if clash is not None:
            raise ValueError(
                f"{self.where}: map of VA [{va:#x}, {end:#x}) overlaps the existing mapping {clash}; unmap it first"
            )
        starts, items = self._starts, self._items
        i = bisect_left(starts, va)
        new = Segment(va, sip, cube, pe, pa, size)
        lo, hi = i, i
        if i > 0:
            prev = items[i - 1]
            if isinstance(prev, Segment) and new.continues(prev):
                lo = i - 1
                new = Segment(prev.va, prev.sip, prev.cube, prev.pe, prev.pa, prev.nbytes + size)
        if i < len(items):
            nxt = items[i]
            if isinstance(nxt, Segment) and nxt.continues(new):
                hi = i + 1
                new = Segment(new.va, new.sip, new.cube, new.pe, new.pa, new.nbytes + nxt.nbytes)
        starts[lo:hi] = [new.va]
        items[lo:hi] = [new]
        self._mapped += size

    def install(self, shared: SharedMapping) -> None:
        """Reference every run of ``shared`` from this table: all or nothing.

        Costs O(runs x log n) when nothing clashes, whatever the number of
        entries. Raises :class:`MapConflict` with the index of the first entry
        at fault: an entry overlapping what this PE already maps, or the
        mapping's own ``problem``, whichever comes first in message order.
        """
        limit = shared.problem[0] if shared.problem is not None else len(shared.spans)
        if self._items and any(self._overlap(r.va, r.va_end) is not None for r in shared.runs):
            for i, (va, size) in enumerate(shared.spans[:limit]):
                clash = self._overlap(va, va + size)
                if clash is not None:
                    raise MapConflict(
                        f"{self.where}: map of VA [{va:#x}, {va + size:#x}) overlaps the existing mapping {clash}; "
                        "unmap it first",
                        i,
                    )
        if shared.problem is not None:
            index, why = shared.problem
            raise MapConflict(why.replace(_WHERE, self.where), index)
        starts, items = self._starts, self._items
        for run in shared.runs:
            i = bisect_left(starts, run.va)
            starts.insert(i, run.va)
            items.insert(i, run)
            self._mapped += run.nbytes

    def unmap(self, va: int, size: int) -> None:
        """Remove the mapping of ``[va, va + size)``; an extent only partly covered is split.

        Every page in the range must be mapped, otherwise ``ValueError`` names
        the first unmapped VA and nothing changes. Dropping a whole shared run
        only drops this PE's reference; the part of a run that stays mapped
        after a partial unmap becomes this PE's own extents.
        """
        self._check_range(va, size, "unmap")
        end = va + size
        starts, items = self._starts, self._items
        i = bisect_right(starts, va) - 1
        cur = va
        j = i
        # Validate the whole range before touching anything, so a failed unmap is a no-op.
        while True:
            if j < 0 or j >= len(items) or items[j].va > cur or items[j].va_end <= cur:
                raise ValueError(f"{self.where}: unmap of VA [{va:#x}, {end:#x}): VA {cur:#x} is not mapped")
            cur = items[j].va_end
            if cur >= end:
                break
            j += 1
        first, last = items[i], items[j]
        keep: list[_Item] = []
        if first.va < va:
            if isinstance(first, SharedRun):
                keep += first.pieces(first.va, va)
            else:
                keep.append(Segment(first.va, first.sip, first.cube, first.pe, first.pa, va - first.va))
        if last.va_end > end:
            if isinstance(last, SharedRun):
                keep += last.pieces(end, last.va_end)
            else:
                cut = end - last.va
                keep.append(Segment(end, last.sip, last.cube, last.pe, last.pa + cut, last.nbytes - cut))
        starts[i : j + 1] = [s.va for s in keep]
        items[i : j + 1] = keep
        self._mapped -= size

    def is_mapped(self, va: int, nbytes: int = 1) -> bool:
        """True when every byte of ``[va, va + nbytes)`` is mapped."""
        try:
            self.translate(va, nbytes)
        except PageFault:
            return False
        return True

    def translate(self, va: int, nbytes: int) -> list[Segment]:
        """Physical pieces of ``[va, va + nbytes)``, in VA order.

        A new piece starts only where the backing changes PE or jumps in PA,
        so a range mapped contiguously comes back as one :class:`Segment`.
        ``va`` need not be aligned. Raises :class:`PageFault` at the first
        unmapped byte; ``nbytes == 0`` gives ``[]``.
        """
        if nbytes < 0:
            raise ValueError(f"{self.where}: translate at VA {va:#x} with negative length {nbytes}")
        if nbytes == 0:
            return []
        end = va + nbytes
        items = self._items
        i = bisect_right(self._starts, va) - 1
        out: list[Segment] = []
        cur = va
        while cur < end:
            if i < 0 or i >= len(items) or items[i].va > cur or items[i].va_end <= cur:
                raise self._fault(cur, va, end)
            it = items[i]
            if isinstance(it, SharedRun):
                exts = it.exts
                k = bisect_right(it.starts, cur) - 1
                stop = min(end, it.va_end)
            else:
                exts = (it,)
                k = 0
                stop = min(end, it.va_end)
            while cur < stop:
                ext = exts[k]
                n = min(stop, ext.va_end) - cur
                pa = ext.pa + (cur - ext.va)
                # Pieces that continue each other (across extents or runs) come back as one.
                if out:
                    prev = out[-1]
                    if (
                        prev.pa + prev.nbytes == pa
                        and prev.pe == ext.pe
                        and prev.cube == ext.cube
                        and prev.sip == ext.sip
                    ):
                        out[-1] = Segment(prev.va, prev.sip, prev.cube, prev.pe, prev.pa, prev.nbytes + n)
                        cur += n
                        k += 1
                        continue
                out.append(Segment(cur, ext.sip, ext.cube, ext.pe, pa, n))
                cur += n
                k += 1
            i += 1
        return out

    def _fault(self, cur: int, va: int, end: int) -> PageFault:
        page = cur - cur % self.page_size
        in_page = f" (in page {page:#x})" if page != cur else ""
        msg = f"page fault on {self.where}: VA {cur:#x}{in_page} is not mapped"
        if (va, end) != (cur, cur + 1):
            msg += f" while translating [{va:#x}, {end:#x})"
        # Point at the nearest mappings: it is usually an off-by-one or a freed tensor.
        items = self._items
        j = bisect_right(self._starts, cur) - 1
        near = []
        if j >= 0:
            below = items[j]
            near.append(f"below: {below.exts[-1] if isinstance(below, SharedRun) else below}")
        if j + 1 < len(items):
            above = items[j + 1]
            near.append(f"above: {above.exts[0] if isinstance(above, SharedRun) else above}")
        if near:
            msg += "; nearest mappings " + ", ".join(near)
        else:
            msg += "; nothing is mapped on this PE"
        return PageFault(msg, va=cur, where=self.where)
