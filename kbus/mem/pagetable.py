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
changes. :meth:`PageTable.map` merges a new mapping with neighbours it
continues, so the extents stay maximal and translations stay minimal.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import attrs

from kbus.errors import KbusError

__all__ = ["PageFault", "PageTable", "Segment"]


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


class PageTable:
    """The VA -> (PE, PA) mappings seen by one PE's MMU.

    ``where`` is the owning PE's path (``"sip0.cube1.pe3"``) and appears in
    every error. Mappings are whole pages: ``va`` and ``size`` must be multiples
    of ``page_size``. The physical address need not be page aligned, because
    physical memory is handed out by a byte-granular allocator
    (:class:`kbus.mem.alloc.PEMemAllocator`) while the page is the unit of the
    VA space only.
    """

    def __init__(self, where: str, page_size: int = 4096) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"{where}: page size {page_size!r} must be a positive int")
        if page_size & (page_size - 1):
            raise ValueError(f"{where}: page size {page_size} is not a power of two")
        self.where = where
        self.page_size = page_size
        # Parallel lists: _starts[i] == _exts[i].va; sorted, non-overlapping.
        self._starts: list[int] = []
        self._exts: list[Segment] = []
        self._mapped = 0

    def __repr__(self) -> str:
        return f"<PageTable {self.where} page={self.page_size} extents={len(self._exts)} mapped={self._mapped} B>"

    def __len__(self) -> int:
        """Number of extents (maximal runs of contiguous pages)."""
        return len(self._exts)

    @property
    def mapped_bytes(self) -> int:
        """Total mapped virtual memory in bytes."""
        return self._mapped

    def extents(self) -> list[Segment]:
        """The extents, sorted by VA."""
        return list(self._exts)

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

    def map(self, va: int, pa: int, size: int, *, sip: int, cube: int, pe: int) -> None:
        """Map ``[va, va + size)`` to ``[pa, pa + size)`` on PE ``(sip, cube, pe)``.

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
        starts, exts = self._starts, self._exts
        i = bisect_left(starts, va)  # first extent starting at or after va
        clash = None
        if i > 0 and exts[i - 1].va_end > va:
            clash = exts[i - 1]
        elif i < len(exts) and starts[i] < end:
            clash = exts[i]
        if clash is not None:
            raise ValueError(
                f"{self.where}: map of VA [{va:#x}, {end:#x}) overlaps the existing mapping {clash}; unmap it first"
            )
        new = Segment(va, sip, cube, pe, pa, size)
        lo, hi = i, i
        if i > 0 and new.continues(exts[i - 1]):
            lo = i - 1
            new = attrs.evolve(exts[lo], nbytes=exts[lo].nbytes + size)
        if i < len(exts) and exts[i].continues(new):
            hi = i + 1
            new = attrs.evolve(new, nbytes=new.nbytes + exts[i].nbytes)
        starts[lo:hi] = [new.va]
        exts[lo:hi] = [new]
        self._mapped += size

    def unmap(self, va: int, size: int) -> None:
        """Remove the mapping of ``[va, va + size)``; an extent only partly covered is split.

        Every page in the range must be mapped, otherwise ``ValueError`` names
        the first unmapped VA and nothing changes.
        """
        self._check_range(va, size, "unmap")
        end = va + size
        starts, exts = self._starts, self._exts
        i = bisect_right(starts, va) - 1
        cur = va
        j = i
        # Validate the whole range before touching anything, so a failed unmap is a no-op.
        while True:
            if j < 0 or j >= len(exts) or exts[j].va > cur or exts[j].va_end <= cur:
                raise ValueError(f"{self.where}: unmap of VA [{va:#x}, {end:#x}): VA {cur:#x} is not mapped")
            cur = exts[j].va_end
            if cur >= end:
                break
            j += 1
        first, last = exts[i], exts[j]
        keep: list[Segment] = []
        if first.va < va:
            keep.append(attrs.evolve(first, nbytes=va - first.va))
        if last.va_end > end:
            cut = end - last.va
            keep.append(attrs.evolve(last, va=end, pa=last.pa + cut, nbytes=last.nbytes - cut))
        starts[i : j + 1] = [s.va for s in keep]
        exts[i : j + 1] = keep
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
        exts = self._exts
        i = bisect_right(self._starts, va) - 1
        out: list[Segment] = []
        cur = va
        while cur < end:
            if i < 0 or i >= len(exts) or exts[i].va > cur or exts[i].va_end <= cur:
                raise self._fault(cur, va, end)
            ext = exts[i]
            n = min(end, ext.va_end) - cur
            seg = Segment(cur, ext.sip, ext.cube, ext.pe, ext.pa + (cur - ext.va), n)
            # Extents are kept maximal, so this merge only matters if a caller
            # built the table in a way that defeated merging; it is cheap insurance.
            if out and seg.continues(out[-1]):
                prev = out[-1]
                seg = Segment(prev.va, prev.sip, prev.cube, prev.pe, prev.pa, prev.nbytes + n)
                out[-1] = seg
            else:
                out.append(seg)
            cur += n
            i += 1
        return out

    def _fault(self, cur: int, va: int, end: int) -> PageFault:
        page = cur - cur % self.page_size
        in_page = f" (in page {page:#x})" if page != cur else ""
        msg = f"page fault on {self.where}: VA {cur:#x}{in_page} is not mapped"
        if (va, end) != (cur, cur + 1):
            msg += f" while translating [{va:#x}, {end:#x})"
        # Point at the nearest mappings: it is usually an off-by-one or a freed tensor.
        j = bisect_right(self._starts, cur) - 1
        near = []
        if j >= 0:
            near.append(f"below: {self._exts[j]}")
        if j + 1 < len(self._exts):
            near.append(f"above: {self._exts[j + 1]}")
        if near:
            msg += "; nearest mappings " + ", ".join(near)
        else:
            msg += "; nothing is mapped on this PE"
        return PageFault(msg, va=cur, where=self.where)
