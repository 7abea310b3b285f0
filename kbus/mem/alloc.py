"""Address-space allocators: a free list, a per-PE physical allocator, a VA allocator.

All three hand out *addresses*, never memory: the bytes live in
:class:`kbus.mem.store.MemoryStore`, and the two are kept apart so that the
host runtime can plan placement (and report out-of-memory) without touching
any backing store, and so that a device with thousands of PEs pays only for the
bookkeeping of the allocations it actually makes.

The code is plain and synchronous: allocators are called from inside block
handlers and from the host runtime, and an allocation is a bookkeeping step
that takes no virtual time by itself.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict

from kbus.errors import AllocatorError, OutOfDeviceMemory

__all__ = ["FreeListAllocator", "PEMemAllocator", "VirtualAllocator", "format_bytes"]

# How many freed addresses to remember so that a double free can be told apart
# from a free of an address that was never handed out. Bounded so that a long
# run does not grow without limit; an older double free is still rejected, it
# just gets the generic message.
_FREED_MEMORY = 4096


def format_bytes(n: int) -> str:
    """Render a byte count for people: ``'3 MiB'``, ``'1.5 KiB (1536 B)'``, ``'100 B'``.

    The exact count is appended whenever the short form is rounded or
    fractional, because an out-of-memory report that hides a few bytes is a
    report that cannot be checked.
    """
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            if n % scale == 0:
                return f"{n // scale} {unit}"
            short = f"{n / scale:.2f}".rstrip("0").rstrip(".")
            return f"{short} {unit} ({n} B)"
    return f"{n} B"


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_int(value: object, what: str, owner: str) -> int:
    # bool is an int subclass; a True size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {what} must be an int, got {type(value).__name__} {value!r}")
    return value


class FreeListAllocator:
    """A best-fit free-list allocator over the address range ``[base, base + size)``.

    Why best fit and not first fit: device memory holds tensors of very mixed
    sizes, and the allocation that fails is almost always the big one. Best
    fit carves small requests out of the smallest hole that holds them and so
    keeps large holes intact for large tensors. It is also the cheaper policy
    here: free blocks are indexed by ``(size, start)`` in a sorted list, so the
    best hole is one ``bisect`` away, whereas first fit must scan the address
    ordered list until something fits. Ties go to the lowest address, so the
    result is deterministic.

    Two sorted indexes describe the free space, kept consistent by
    :meth:`_add_free` and :meth:`_remove_free`:

    * ``_starts`` (sorted block starts) + ``_sizes`` (start -> size): address
      order, used to coalesce a freed block with its neighbours;
    * ``_by_size`` (sorted ``(size, start)``): used by :meth:`alloc`, and
      makes :attr:`largest_free` O(1).

    Insertion and deletion in a Python list are a C ``memmove``, so thousands
    of blocks cost microseconds per operation, not milliseconds.

    Every size is rounded up to the *granule*, the default alignment given at
    construction; a per-call ``align`` larger than the granule only moves the
    start (the gap in front stays free). Because ``base`` must be a multiple of
    the granule and every size is a multiple of it, every block boundary is
    granule aligned and no unusable slivers appear.
    """

    def __init__(self, base: int, size: int, align: int = 64, *, name: str = "alloc") -> None:
        self.name = name
        _check_int(base, "base", repr(name))
        _check_int(size, "size", repr(name))
        _check_int(align, "align", repr(name))
        if base < 0:
            raise ValueError(f"allocator {name!r}: base {base:#x} is negative")
        if size < 0:
            raise ValueError(f"allocator {name!r}: size {size} is negative")
        if not _is_pow2(align):
            raise ValueError(f"allocator {name!r}: alignment {align} is not a power of two")
        if base % align:
            raise ValueError(f"allocator {name!r}: base {base:#x} is not a multiple of the alignment {align}")
        self.base = base
        self.align = align
        self._capacity = size
        self._starts: list[int] = []
        self._sizes: dict[int, int] = {}
        self._by_size: list[tuple[int, int]] = []
        self._live: dict[int, int] = {}
        self._recently_freed: OrderedDict[int, None] = OrderedDict()
        self._free_bytes = 0
        self._used_bytes = 0
        # Bytes past the last whole granule can never be handed out; they
        # still count as free so that used + free == capacity always holds.
        if size:
            self._add_free(base, size)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} [{self.base:#x}, {self.end:#x}) "
            f"used={format_bytes(self._used_bytes)} free={format_bytes(self._free_bytes)} live={len(self._live)}>"
        )

    # -- free-space bookkeeping ------------------------------------------------

    def _add_free(self, start: int, size: int) -> None:
        insort(self._starts, start)
        self._sizes[start] = size
        insort(self._by_size, (size, start))
        self._free_bytes += size

    def _remove_free(self, start: int) -> int:
        del self._starts[bisect_left(self._starts, start)]
        size = self._sizes.pop(start)
        del self._by_size[bisect_left(self._by_size, (size, start))]
        self._free_bytes -= size
        return size

    # -- public API --------------------------------------------------------------

    @property
    def end(self) -> int:
        """One past the last address of the managed range."""
        return self.base + self._capacity

    @property
    def capacity(self) -> int:
        """Size of the managed range in bytes."""
        return self._capacity

    @property
    def free_bytes(self) -> int:
        """Total free bytes (possibly fragmented; see :attr:`largest_free`)."""
        return self._free_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes held by live allocations, counted after rounding to the granule."""
        return self._used_bytes

    @property
    def largest_free(self) -> int:
        """Size of the largest free block: the biggest request that can still succeed."""
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def live(self) -> int:
        """Number of live allocations."""
        return len(self._live)

    def allocations(self) -> list[tuple[int, int]]:
        """Live allocations as ``(addr, size)`` pairs sorted by address."""
        return sorted(self._live.items())

    def free_blocks(self) -> list[tuple[int, int]]:
        """Free blocks as ``(start, size)`` pairs sorted by address (for reports and tests)."""
        return [(s, self._sizes[s]) for s in self._starts]

    def stats(self) -> dict[str, int]:
        """``capacity``, ``used``, ``free``, ``largest`` and ``live``, for ``kbus info`` and reports."""
        return {
            "capacity": self._capacity,
            "used": self._used_bytes,
            "free": self._free_bytes,
            "largest": self.largest_free,
            "live": len(self._live),
        }

    def __contains__(self, addr: object) -> bool:
        """True when ``addr`` lies inside the managed range (not whether it is allocated)."""
        return isinstance(addr, int) and self.base <= addr < self.end

    def size_of(self, addr: int) -> int:
        """Size (after rounding) of the live allocation starting at ``addr``."""
        try:
            return self._live[addr]
        except KeyError:
            raise self._not_live(addr, "size_of") from None

    def alloc(self, nbytes: int, align: int | None = None) -> int:
        """Allocate ``nbytes`` (rounded up to the granule) and return the start address.

        ``align`` overrides the alignment of the start for this call; it must be
        a power of two, and an alignment below the granule changes nothing.
        Raises :class:`~kbus.errors.OutOfDeviceMemory` when no free block can
        hold the request.
        """
        _check_int(nbytes, "nbytes", f"{self.name}.alloc")
        if nbytes <= 0:
            raise ValueError(f"{self.name}: cannot allocate {nbytes} bytes; the size must be > 0")
        if align is None:
            a = self.align
        else:
            _check_int(align, "align", f"{self.name}.alloc")
            if not _is_pow2(align):
                raise ValueError(f"{self.name}: alignment {align} is not a power of two")
            a = max(align, self.align)
        size = -(-nbytes // self.align) * self.align
        by_size = self._by_size
        mask = a - 1
        # Smallest hole first; with a large alignment the smallest hole may be
        # too small once its start is rounded up, so move on to the next size.
        for i in range(bisect_left(by_size, (size, -1)), len(by_size)):
            block_size, start = by_size[i]
            addr = (start + mask) & ~mask
            if addr + size <= start + block_size:
                break
        else:
            raise self._oom(nbytes, size, a)
        self._remove_free(start)
        if addr > start:
            self._add_free(start, addr - start)
        tail = start + block_size - (addr + size)
        if tail:
            self._add_free(addr + size, tail)
        self._live[addr] = size
        self._used_bytes += size
        self._recently_freed.pop(addr, None)
        return addr

    def free(self, addr: int) -> int:
        """Free the allocation starting at ``addr`` and return its size (after rounding).

        The block is merged with free neighbours, so freeing everything leaves
        one free block covering the whole range. Raises
        :class:`~kbus.errors.AllocatorError` for a double free or an address
        that is not the start of a live allocation.
        """
        try:
            size = self._live.pop(addr)
        except (KeyError, TypeError):
            raise self._not_live(addr, "free") from None
        self._used_bytes -= size
        start, end = addr, addr + size
        i = bisect_left(self._starts, addr)
        if i < len(self._starts) and self._starts[i] == end:
            end += self._remove_free(end)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._sizes[prev] == start:
                self._remove_free(prev)
                start = prev
        self._add_free(start, end - start)
        self._recently_freed[addr] = None
        if len(self._recently_freed) > _FREED_MEMORY:
            self._recently_freed.popitem(last=False)
        return size

    # -- error reports ---------------------------------------------------------------

    def _oom(self, nbytes: int, size: int, align: int) -> OutOfDeviceMemory:
        asked = format_bytes(nbytes)
        if size != nbytes:
            asked += f" (rounded to {format_bytes(size)})"
        largest = self.largest_free
        msg = (
            f"{self.name}: out of memory allocating {asked} aligned to {align}: "
            f"{format_bytes(self._free_bytes)} free of {format_bytes(self._capacity)}, "
            f"largest free block {format_bytes(largest)}, {len(self._live)} live allocations"
        )
        if largest >= size:
            msg += f" (no free block can hold it at alignment {align})"
        elif self._free_bytes >= size:
            msg += " (memory is fragmented)"
        return OutOfDeviceMemory(msg, where=self.name, requested=nbytes, free=self._free_bytes, largest=largest)

    def _not_live(self, addr: object, op: str) -> AllocatorError:
        if not isinstance(addr, int) or isinstance(addr, bool):
            return AllocatorError(f"{self.name}: {op}({addr!r}): the address must be an int")
        where = f"{self.name}: {op}({addr:#x})"
        if addr in self._recently_freed:
            return AllocatorError(f"{where}: double free; the block at {addr:#x} was already freed")
        if not self.base <= addr < self.end:
            return AllocatorError(f"{where}: address is outside this allocator's range [{self.base:#x}, {self.end:#x})")
        # Error path only: a linear scan is fine and keeps the hot path lean.
        for start, size in self._live.items():
            if start < addr < start + size:
                return AllocatorError(
                    f"{where}: address is inside the live block [{start:#x}, {start + size:#x}) "
                    f"at offset {addr - start:#x}; pass the block's start address"
                )
        return AllocatorError(f"{where}: no live allocation starts at this address (never allocated, or freed)")


class PEMemAllocator:
    """Physical memory of one PE: SRAM at PA ``[0, sram_bytes)``, HBM at PA ``[hbm_base, hbm_base + hbm_bytes)``.

    Two independent :class:`FreeListAllocator` regions named ``<pe>.sram`` and
    ``<pe>.hbm``, so an out-of-memory report says which memory of which PE ran
    out. :meth:`free` finds the region from the address alone, which is all a
    tensor's physical handle needs to carry.
    """

    KINDS = ("hbm", "sram")

    def __init__(self, name: str, sram_bytes: int, hbm_bytes: int, hbm_base: int, align: int = 64) -> None:
        if hbm_base < sram_bytes:
            raise ValueError(
                f"{name}: HBM base {hbm_base:#x} overlaps SRAM [0x0, {sram_bytes:#x}); hbm_base must be >= sram_bytes"
            )
        self.name = name
        self.sram = FreeListAllocator(0, sram_bytes, align, name=f"{name}.sram")
        self.hbm = FreeListAllocator(hbm_base, hbm_bytes, align, name=f"{name}.hbm")

    def __repr__(self) -> str:
        return f"<PEMemAllocator {self.name} sram={self.sram!r} hbm={self.hbm!r}>"

    def region(self, kind: str) -> FreeListAllocator:
        """The allocator for ``"hbm"`` or ``"sram"``."""
        if kind == "hbm":
            return self.hbm
        if kind == "sram":
            return self.sram
        raise ValueError(f"{self.name}: unknown memory kind {kind!r}; expected one of 'hbm', 'sram'")

    def kind_of(self, pa: int) -> str:
        """``"sram"`` or ``"hbm"``: the region holding physical address ``pa``."""
        if pa in self.sram:
            return "sram"
        if pa in self.hbm:
            return "hbm"
        raise AllocatorError(
            f"{self.name}: PA {pa:#x} is in neither SRAM [{self.sram.base:#x}, {self.sram.end:#x}) "
            f"nor HBM [{self.hbm.base:#x}, {self.hbm.end:#x})"
        )

    def alloc(self, nbytes: int, kind: str = "hbm", align: int | None = None) -> int:
        """Allocate ``nbytes`` of ``kind`` memory (``"hbm"`` or ``"sram"``) and return its PA."""
        return self.region(kind).alloc(nbytes, align)

    def free(self, pa: int) -> int:
        """Free the allocation starting at ``pa``, whichever region it is in; return its size."""
        return self.region(self.kind_of(pa)).free(pa)

    def size_of(self, pa: int) -> int:
        """Size of the live allocation starting at ``pa``."""
        return self.region(self.kind_of(pa)).size_of(pa)

    def stats(self) -> dict[str, dict[str, int]]:
        """``{"sram": {...}, "hbm": {...}}`` with each region's :meth:`FreeListAllocator.stats`."""
        return {"sram": self.sram.stats(), "hbm": self.hbm.stats()}


class VirtualAllocator(FreeListAllocator):
    """The device-wide virtual address space: a free list whose granule is the page.

    Every VA range it hands out starts on a page and covers whole pages, which
    is what :class:`kbus.mem.pagetable.PageTable` requires of a mapping. The
    allocator knows nothing of physical placement; the runtime pairs each VA
    range with physical blocks and maps them.
    """

    def __init__(self, base: int, size: int, page_size: int, name: str = "va") -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not _is_pow2(page_size):
            raise ValueError(f"allocator {name!r}: page size {page_size!r} is not a power of two")
        if isinstance(base, int) and base % page_size:
            raise ValueError(f"allocator {name!r}: base {base:#x} is not page aligned (page size {page_size})")
        super().__init__(base, size, page_size, name=name)

    @property
    def page_size(self) -> int:
        """The page size: every allocation is a whole number of pages."""
        return self.align
