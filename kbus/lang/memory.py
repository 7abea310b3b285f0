"""What one program instance does to device memory, and what it costs.

A :class:`ProgramContext` is the state of one program instance running on one
PE: its program id, the PE's MMU, counters, and a *timeline* of what it did.
An instance runs in two phases:

1. **execute**: the kernel body runs as a plain synchronous Python function.
   Every ``kl.load``/``kl.store`` comes here, translates its addresses with
   the PE's MMU and moves the bytes at once (straight between the memory
   stores and numpy arrays), so the data is right; it appends the DMA
   commands it implies to the timeline, and the numpy work between accesses
   is appended as a compute step (operations counted by
   :class:`~kbus.lang.language.Tile`);
2. **replay** (:meth:`ProgramContext.replay`): the PE walks the timeline in
   virtual time and hands each command to the PE's one DMA engine
   (:class:`kbus.hw.dma.DmaEngine`) *when the instance reaches it*, so the
   transfers of all PEs (and of the PE's other work: host transfers, builtin
   kernels) share links, memory channels and the engine as concurrent
   hardware would.

Why two phases: a kernel body cannot ``await`` (it is ordinary numpy code),
and costing a whole instance ahead of time would put its transfers on the
links before those of instances that run at the same virtual time.

Timing of one access (one DMA command per contiguous physical segment with
active lanes):

* the compute since the previous access costs ``compute.flops_to_ps(ops)``;
* the engine translates the access (``dma.translate``, or the TLB's misses)
  and issues each command in turn, ``processing.pe_dma`` apiece, at most
  ``dma.outstanding`` in flight;
* each command is two flows (see :meth:`kbus.hw.Device.dma_legs`): for a load
  the descriptor to the owner's memory, then the active lanes' bytes (+ the
  completion) back through the memory channel; for a store the bytes (+ the
  descriptor) through the channel, then the completion back. Flows are
  pipelined over their route and share it max-min fairly with all others;
* a load holds the instance until its last segment has arrived; a store holds
  it only until its commands are issued, but the instance ends only when
  every store is acknowledged.

Lanes are grouped by segment, never visited one by one: the unmasked byte
addresses are computed with numpy, the span ``[min, max]`` is translated in one
MMU call when it is compact, otherwise the lanes are cut into runs wherever two
neighbours are more than a page apart and each run is translated. Either way
the bytes land in one buffer that is fancy-indexed once.

Memory model: like Triton, nothing orders program instances against each
other. Here, an instance's loads see memory as it is when its body executes
(the instance's start), its stores are visible at once to itself and to every
instance whose body executes later, in virtual-time order of starts.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..mem import MemoryStore, PageFault, Segment
from ..protocol import TensorArgShard

if TYPE_CHECKING:
    from ..hw.device import Device, PeNode
    from ..hw.dma import DmaEngine, Transfer
    from ..hw.network import NetLink

__all__ = ["Layout", "ProgramContext", "SegmentCache", "current", "require"]

Coord = tuple[int, int, int]
I64Array = npt.NDArray[np.int64]

SPAN_LIMIT = 1 << 20
"""Largest span (bytes) read in one piece regardless of how sparse the lanes are."""

SPAN_SPARSITY = 16
"""A span up to this many times the bytes of the active lanes is still read in one piece."""

_COMPUTE, _LOAD, _STORE = 0, 1, 2
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce  # skip numpy's Python-level min()/max() wrappers

_current: ContextVar[ProgramContext | None] = ContextVar("kbus_lang_program", default=None)


def current() -> ProgramContext | None:
    """The program instance running on this thread of control, or None outside kernels."""
    return _current.get()


def require(what: str) -> ProgramContext:
    """The running program instance; a clear error when ``what`` is used outside a kernel."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            f"{what} can only be used inside a kernel body while it runs on a PE "
            "(decorate the function with @kbus.kernel and launch it with kernel[grid](...))"
        )
    return ctx



def masked_result(
    values: npt.NDArray[Any], shape: tuple[int, ...], mask: npt.NDArray[np.bool_] | None, other: Any, dtype: Any
) -> npt.NDArray[Any]:
    """A load's result of ``shape``: the loaded ``values`` in the unmasked lanes, ``other`` elsewhere."""
    if mask is None:
        return values.reshape(shape)
    out = np.full(shape, other, dtype=dtype)
    out[mask] = values
    return out

class Layout:
    """How a tensor argument's logical elements map to virtual addresses.

    Pointer offsets count elements in the tensor's *logical* row-major order
    (``row * stride + col``), as in Triton. The runtime stores a sharded
    tensor shard-major, each shard starting on a fresh page (shard ``k`` at
    ``va_base + sum(page_round(nbytes_j) for j < k)``, the convention of
    :mod:`kbus.runtime.builtins`), so three cases arise:

    * contiguous (replicated, one shard, or page-multiple shards split along
      the leading dimension): ``va_base + offset * itemsize``, plain pointer
      arithmetic; an offset past the end runs into unmapped memory and faults;
    * row-major with gaps (split along the leading non-1 dimension, shards not
      whole pages): the byte offset picks its shard by ``offset_bytes``; an
      offset past the end extrapolates from the last shard (so it faults too);
    * split along an inner dimension: logical offsets are decomposed
      (outer, index along the split dimension, inner) and relocated into the
      owning shard's block; offsets outside the tensor raise ``IndexError``.

    All three are vectorized over the lanes.
    """

    __slots__ = (
        "_kind",
        "_lens",
        "_offs",
        "_row",
        "_starts",
        "_vas",
        "dtype",
        "itemsize",
        "numel",
        "shape",
        "shard_dim",
        "va_base",
    )

    _CONTIG, _GAPPED, _GENERAL = 0, 1, 2

    def __init__(
        self,
        dtype: np.dtype[Any],
        va_base: int,
        shape: tuple[int, ...] = (),
        shard_dim: int = -1,
        shards: Sequence[TensorArgShard] = (),
        page_size: int = 1,
    ) -> None:
        self.dtype = dtype
        self.itemsize = dtype.itemsize
        self.va_base = va_base
        self.shape = shape
        self.shard_dim = shard_dim
        self.numel = math.prod(shape)
        self._kind = self._CONTIG
        if shard_dim < 0 or len(shards) <= 1 or not shape:
            return
        order = sorted(shards, key=lambda sh: sh.offset_bytes)
        vas, va = [], va_base
        for sh in order:
            vas.append(va)
            va += -(-sh.nbytes // page_size) * page_size
        row_major = math.prod(shape[:shard_dim]) == 1
        if row_major and all(v == va_base + sh.offset_bytes for v, sh in zip(vas, order, strict=True)):
            return
        self._vas = np.array(vas, dtype=np.int64)
        self._offs = np.array([sh.offset_bytes for sh in order], dtype=np.int64)
        if row_major:
            self._kind = self._GAPPED
            return
        n = shape[shard_dim]
        self._row = self.numel * self.itemsize // n  # bytes of one index along the split dimension
        self._starts = self._offs // self._row
        self._lens = np.array([sh.nbytes for sh in order], dtype=np.int64) // self._row
        self._kind = self._GENERAL

    @property
    def is_contiguous(self) -> bool:
        """True when element ``i`` is at ``va_base + i * itemsize``."""
        return self._kind == self._CONTIG

    @classmethod
    def contiguous(cls, dtype: np.dtype[Any], va_base: int) -> Layout:
        """A plain ``va_base + offset * itemsize`` layout."""
        return cls(dtype, va_base)

    def addresses(self, offsets: I64Array, what: str) -> I64Array:
        """Byte VAs of the elements at logical ``offsets`` (1-D, active lanes only)."""
        size = self.itemsize
        if self._kind == self._CONTIG:
            return offsets * size + self.va_base
        if self._kind == self._GAPPED:
            b = offsets * size
            k = np.clip(np.searchsorted(self._offs, b, side="right") - 1, 0, self._offs.size - 1)
            return self._vas[k] + (b - self._offs[k])
        bad = (offsets < 0) | (offsets >= self.numel)
        if bad.any():
            first = int(offsets[np.argmax(bad)])
            raise IndexError(
                f"{what}: element offset {first} is outside the tensor (shape {self.shape}, {self.numel} elements); "
                f"it is sharded along dim {self.shard_dim}, so only in-bounds offsets can be addressed (mask the rest)"
            )
        d = self.shard_dim
        inner_n = math.prod(self.shape[d + 1 :])
        q, inner = np.divmod(offsets, inner_n)
        outer, idx = np.divmod(q, self.shape[d])
        k = np.searchsorted(self._starts, idx, side="right") - 1
        within = (outer * self._lens[k] + idx - self._starts[k]) * inner_n + inner
        return self._vas[k] + within * size

    def __repr__(self) -> str:
        kind = ("contiguous", "row-major with gaps", f"sharded along dim {self.shard_dim}")[self._kind]
        return f"<Layout {self.dtype} shape {self.shape} at VA {self.va_base:#x}, {kind}>"


class _Access:
    """Where the active lanes of one access live: buffer layout, segments, lane positions."""

    __slots__ = ("_addrs", "_layout", "active", "elem_index", "nbytes", "segs")

    def __init__(
        self,
        nbytes: int,
        segs: list[tuple[Segment, int]],
        elem_index: I64Array,
        layout: Layout,
        active: I64Array,
        addrs: I64Array | None,
    ) -> None:
        self.nbytes = nbytes
        """Bytes of the staging buffer (all pieces end to end)."""
        self.segs = segs
        """Each translated segment with its offset in the staging buffer, in VA order."""
        self.elem_index = elem_index
        """For each active lane, its element index in the staging buffer viewed as the dtype."""
        self.active = active
        self._layout = layout
        self._addrs = addrs

    @property
    def addrs(self) -> I64Array:
        """Byte VAs of the active lanes (computed only when several segments need telling apart)."""
        if self._addrs is None:
            self._addrs = self._layout.addresses(self.active, "")
        return self._addrs


class SegmentCache:
    """The segment table of one PE for one launch: translations by VA range, reused across accesses.

    :meth:`translate` answers exactly as :meth:`kbus.hw.dma.DmaEngine.translate`
    does (same segments, same cost, the engine's translation counter moves the
    same way), but looks a range up in the MMU only once: a range inside one
    already translated comes back clipped from the cached segments (the MMU
    merges pieces that continue each other, so a clipped piece is exactly
    what the MMU would return for the smaller range). :meth:`lookup` gives the
    segments without charging a translation (the batched data path, whose
    translations are charged per instance). With a TLB (``dma.tlb_entries``)
    every accounted translation goes to the engine, whose TLB state depends on
    the order of lookups.

    Valid while the page table does not change: one PE's share of one launch
    (the runtime orders frees and maps of a launch's tensors around it).
    """

    __slots__ = ("_his", "_los", "_segs", "engine", "mmu")

    def __init__(self, node: PeNode) -> None:
        self.engine = node.engine
        self.mmu = node.mmu
        self._los: list[int] = []
        self._his: list[int] = []
        self._segs: list[tuple[list[int], list[Segment]]] = []

    def lookup(self, va: int, nbytes: int) -> list[Segment]:
        """Segments of ``[va, va+nbytes)``; raises :class:`~kbus.mem.PageFault` as the MMU does."""
        end = va + nbytes
        k = bisect_right(self._los, va) - 1
        if k >= 0 and end <= self._his[k]:
            vas, segs = self._segs[k]
            if va == self._los[k] and end == self._his[k]:
                return list(segs)
            j = bisect_right(vas, va) - 1
            out = []
            while j < len(segs):
                s = segs[j]
                lo = s.va if s.va > va else va
                hi = s.va + s.nbytes
                if hi > end:
                    hi = end
                out.append(Segment(lo, s.sip, s.cube, s.pe, s.pa + (lo - s.va), hi - lo))
                if hi >= end:
                    break
                j += 1
            return out
        segs = self.mmu.translate(va, nbytes)
        k += 1
        self._los.insert(k, va)
        self._his.insert(k, end)
        self._segs.insert(k, ([s.va for s in segs], segs))
        return list(segs)

    def quiet(self, va: int, nbytes: int) -> tuple[list[Segment], int]:
        """:meth:`lookup` in the form of :meth:`translate`, charging nothing."""
        return self.lookup(va, nbytes), 0

    def translate(self, va: int, nbytes: int) -> tuple[list[Segment], int]:
        """``DmaEngine.translate(va, nbytes)``: the segments and the picoseconds the lookup costs."""
        engine = self.engine
        if engine.tlb_entries:
            return engine.translate(va, nbytes)
        segs = self.lookup(va, nbytes)
        engine.translations += 1
        return segs, engine.translate_ps


class ProgramContext:
    """One program instance on one PE: ids, counters, memory access and its timeline.

    ``start`` is the virtual time (ps) the instance began; ``ops`` the
    timeline for :meth:`replay`; ``flops`` the operations counted since the
    last memory access (see :meth:`flush_compute`).
    """

    batched = False
    """False: one instance at a time (see :class:`kbus.lang.batch.BatchContext` for the batched form)."""

    __slots__ = (
        "_paths",
        "_stores",
        "_token",
        "_translator",
        "_xlate",
        "bytes_loaded",
        "bytes_stored",
        "coord",
        "device",
        "dma_commands",
        "flops",
        "flops_total",
        "grid",
        "kernel",
        "node",
        "ops",
        "path",
        "pid",
        "start",
        "stored",
    )

    def __init__(
        self,
        device: Device,
        node: PeNode,
        kernel: str,
        pid: tuple[int, int, int],
        grid: tuple[int, int, int],
        start_ps: int,
        paths: dict[tuple[Coord, Coord, bool, bool], tuple[list[NetLink], list[NetLink]]],
        stores: dict[tuple[int, int, int, bool], MemoryStore],
        translator: SegmentCache | None = None,
    ) -> None:
        self.device = device
        self.node = node
        self.coord: Coord = node.coord
        self.path = node.cpu.pe_path
        self.kernel = kernel
        self.pid = pid
        self.grid = grid
        self.start = start_ps
        self.ops: list[tuple[int, Any]] = []
        self.flops = 0
        self.flops_total = 0
        self.bytes_loaded = 0
        self.bytes_stored = 0
        self.dma_commands = 0
        self._paths = paths
        self._stores = stores
        self._xlate = 0  # translation cost (ps) of the access being located
        self._token: Any = None
        self.stored: set[str] = set()
        """Names of the pointers this instance stored through."""
        # Translations go to the PE's DMA engine, or to a launch's segment table (same answers and costs).
        self._translator: SegmentCache | DmaEngine = translator if translator is not None else node.engine

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> ProgramContext:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)

    def flush_compute(self) -> None:
        """Close the current stretch of compute: its operations become one step of the timeline.

        Converting per stretch (not per operation) rounds to whole PE cycles
        once between memory accesses, as a pipelined core would.
        """
        if self.flops:
            self.ops.append((_COMPUTE, self.flops))
            self.flops_total += self.flops
            self.flops = 0

    # --------------------------------------------------------------- access
    def load(
        self,
        layout: Layout,
        offsets: I64Array,
        mask: npt.NDArray[np.bool_] | None,
        other: Any,
        what: str,
    ) -> npt.NDArray[Any]:
        """Gather the elements at logical ``offsets`` of ``layout`` (lanes where ``mask``).

        Returns an array shaped like ``offsets``; masked-out lanes hold ``other``
        and are neither translated nor moved.
        """
        dtype = layout.dtype
        active = offsets.reshape(-1) if mask is None else offsets[mask]
        if active.size == 0:
            return np.full(offsets.shape, other, dtype=dtype)
        itemsize = dtype.itemsize
        acc = self._locate(layout, active, f"kl.load from {what}")
        buf = np.empty(acc.nbytes, dtype=np.uint8)
        for seg, off in acc.segs:
            self._store(seg).read_into(seg.pa, buf[off : off + seg.nbytes])
        values = buf.view(dtype)[acc.elem_index]
        self._book(acc, itemsize, write=False)
        self.bytes_loaded += active.size * itemsize
        return masked_result(values, offsets.shape, mask, other, dtype)

    def store(
        self,
        layout: Layout,
        offsets: I64Array,
        mask: npt.NDArray[np.bool_] | None,
        values: npt.NDArray[Any],
        what: str,
    ) -> None:
        """Scatter ``values`` (already cast and broadcast to ``offsets``) to the unmasked lanes.

        The bytes are written at once, so later loads of this instance (and
        instances that run after it) see them; lanes that hit the same
        address leave one of the values, unspecified which.
        """
        if mask is None:
            active, vals = offsets.reshape(-1), values.reshape(-1)
        else:
            active, vals = offsets[mask], values[mask]
        if active.size == 0:
            return
        dtype = layout.dtype
        itemsize = dtype.itemsize
        acc = self._locate(layout, active, f"kl.store to {what}")
        self.stored.add(what)
        # Read-modify-write of the pieces the lanes touch, so bytes between lanes are kept. (Telling a
        # dense store apart costs as much numpy work as the read it would save.)
        buf = np.empty(acc.nbytes, dtype=np.uint8)
        for seg, off in acc.segs:
            self._store(seg).read_into(seg.pa, buf[off : off + seg.nbytes])
        buf.view(dtype)[acc.elem_index] = vals
        n = acc.elem_index.size
        counts = self._lanes_per_segment(acc)
        for (seg, off), k in zip(acc.segs, counts, strict=True):
            if k:
                self._store(seg).write(seg.pa, buf[off : off + seg.nbytes])
        self._book(acc, itemsize, write=True, counts=counts)
        self.bytes_stored += n * itemsize

    # ------------------------------------------------------------ internals
    def _locate(
        self,
        layout: Layout,
        active: I64Array,
        what: str,
        translate: Callable[[int, int], tuple[list[Segment], int]] | None = None,
    ) -> _Access:
        """Translate what the active lanes (element offsets) touch; see the module docstring."""
        mmu = self.node.mmu
        xlate = self._translator.translate if translate is None else translate
        self._xlate = 0
        itemsize = layout.itemsize
        addrs: I64Array | None = None
        if layout.is_contiguous:
            # Work in element offsets: one pass fewer than byte addresses for the common case.
            first = int(_MIN(active))
            lo = layout.va_base + first * itemsize
            span = (int(_MAX(active)) - first) * itemsize + itemsize
        else:
            addrs = layout.addresses(active, what)
            lo = int(_MIN(addrs))
            span = int(_MAX(addrs)) + itemsize - lo
        if span <= SPAN_LIMIT or span <= SPAN_SPARSITY * active.size * itemsize:
            try:
                segs, cost = xlate(lo, span)
                self._xlate += cost
            except PageFault:
                pass  # maybe a hole between lanes; the run-by-run path below tells
            else:
                laid = [(seg, seg.va - lo) for seg in segs]
                index = active - first if addrs is None else (addrs - lo) // itemsize
                return _Access(span, laid, index, layout, active, addrs)
        if addrs is None:
            addrs = layout.addresses(active, what)
        uniq = np.unique(addrs)
        page = mmu.table.page_size
        cut = np.flatnonzero(np.diff(uniq) > page) + 1
        firsts = uniq[np.concatenate(([0], cut))]
        lasts = uniq[np.concatenate((cut - 1, [uniq.size - 1]))]
        lens = lasts - firsts + itemsize
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        laid = []
        for va, n, off in zip(firsts.tolist(), lens.tolist(), starts.tolist(), strict=True):
            try:
                pieces, cost = xlate(va, n)
                self._xlate += cost
            except PageFault as exc:
                raise PageFault(f"{what}: {exc}", va=exc.va, where=exc.where) from None
            laid.extend((seg, off + seg.va - va) for seg in pieces)
        chunk = np.searchsorted(firsts, addrs, side="right") - 1
        elem_index = (starts[chunk] + addrs - firsts[chunk]) // itemsize
        return _Access(int(lens.sum()), laid, elem_index, layout, active, addrs)

    def _locate_data(self, layout: Layout, active: I64Array, what: str, cache: SegmentCache) -> _Access:
        """:meth:`_locate` for moving data only: translations through ``cache``, charged to nobody."""
        return self._locate(layout, active, what, cache.quiet)

    def _store(self, seg: Segment) -> MemoryStore:
        """The byte store holding ``seg`` (cached per owner and memory; the store checks the range)."""
        key = (seg.sip, seg.cube, seg.pe, seg.pa < self.device.config.memory.sram_per_pe)
        store = self._stores.get(key)
        if store is None:
            mem, _ = self.device.memory_of((seg.sip, seg.cube, seg.pe), seg.pa, seg.nbytes)
            store = self._stores[key] = mem.store_for(seg.pe)
        return store

    def _lanes_per_segment(self, acc: _Access) -> list[int]:
        if len(acc.segs) == 1:
            return [int(acc.active.size)]
        seg_va = np.fromiter((seg.va for seg, _ in acc.segs), dtype=np.int64, count=len(acc.segs))
        which = np.searchsorted(seg_va, acc.addrs, side="right") - 1
        counts: list[int] = np.bincount(which, minlength=len(acc.segs)).tolist()
        return counts

    def _links(self, owner: Coord, seg: Segment, write: bool) -> tuple[list[NetLink], list[NetLink]]:
        """(out, back) routes of a DMA between this PE and the memory holding ``seg``, cached per owner/memory."""
        sram = seg.pa < self.device.config.memory.sram_per_pe
        key = (self.coord, owner, sram, write)
        found = self._paths.get(key)
        if found is None:
            (out, _), (back, _) = self.device.dma_legs(self.coord, owner, seg.pa, seg.nbytes, write=write)
            found = self._paths[key] = (list(out), list(back))
        return found

    def _book(self, acc: _Access, itemsize: int, *, write: bool, counts: list[int] | None = None) -> None:
        """Record one DMA command per segment with lanes, for :meth:`replay` to cost."""
        if counts is None:
            counts = self._lanes_per_segment(acc)
        self.flush_compute()
        msg_b = self.device.config.fabric.msg_bytes
        cmds = []
        for (seg, _), k in zip(acc.segs, counts, strict=True):
            if not k:
                continue
            moved = k * itemsize
            out, back = self._links((seg.sip, seg.cube, seg.pe), seg, write)
            if write:
                cmds.append(((out, msg_b + moved), (back, msg_b)))
            else:
                cmds.append(((out, msg_b), (back, msg_b + moved)))
        self.dma_commands += len(cmds)
        self.ops.append((_STORE if write else _LOAD, (cmds, self._xlate)))

    async def replay(self) -> int:
        """Pay the recorded timeline in virtual time through the PE's DMA engine; return the end (ps).

        Called right after the body ran (no virtual time has passed since the
        instance started). Each access is handed to the engine when the
        instance reaches it, so its flows share the fabric with everything
        else in flight; see the module docstring for the cost of each step.
        """
        sim = self.device.sim
        flops_to_ps = self.device.config.compute.flops_to_ps
        engine = self.node.engine
        t = self.start
        stores: list[Transfer] = []
        for kind, payload in self.ops:
            if kind == _COMPUTE:
                t += flops_to_ps(payload)
                continue
            if t > sim.now:
                await sim.sleep(t - sim.now)
            cmds, cost = payload
            what = "kl.store" if kind == _STORE else "kl.load"
            jobs = [engine.submit(legs, extra=cost if i == 0 else 0, what=what) for i, legs in enumerate(cmds)]
            if kind == _STORE:
                stores.extend(jobs)
                if engine.issue_free > t:
                    t = engine.issue_free
            else:
                for job in jobs:
                    await job.done
                if sim.now > t:
                    t = sim.now
        for job in stores:
            await job.done
        end = t if t > sim.now else sim.now
        if end > sim.now:
            await sim.sleep(end - sim.now)
        return end
