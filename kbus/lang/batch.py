"""Batched execution: all program instances a PE runs, as one vectorized run of the kernel body.

Running a kernel body once per program instance costs the same Python work
per instance whatever the block size: a 1024-element vector add spends most
of its wall time outside numpy. When a PE has several instances of a launch,
:func:`kbus.lang.runner.run_deployed` first tries to run the body **once** for
all of them:

* ``kl.program_id(axis)`` returns a :class:`Batched` value holding the ids of
  every instance (one per instance), and every value derived from it carries
  a leading *instance* dimension. The body sees the *logical* shape
  (``x.shape`` without the instance dimension): ``x[:, None]``,
  ``kl.sum(x, axis=0)``, broadcasting against unbatched tiles and pointer
  arithmetic all mean what they mean for one instance;
* ``kl.load``/``kl.store`` move the lanes of every instance with one gather or
  scatter, and then book each instance's DMA commands exactly as that
  instance alone would have (its own lanes, its own translation, its own
  segments): :class:`BatchContext` keeps one
  :class:`~kbus.lang.memory.ProgramContext` per instance for that, and the
  runner replays them one after another in virtual time as before, so virtual
  times are the same to the picosecond in both modes;
* operations are counted per instance (a batched ``x + y`` on ``(B, 1024)``
  adds 1024 operations to each instance's compute step, as it did alone).

Anything the batched form cannot reproduce exactly raises :class:`Unbatchable`
(Python control flow on a per-instance value: ``bool()``, ``int()``,
``range(pid)``; indexing with arrays; numpy functions other than ufuncs;
instances that touch memory another instance of the batch writes; any
exception at all, a page fault included). The runner then undoes the batch's
stores, forgets its bookings and runs the instances one by one, recording the
reason (``kernel_cache_info(...).fallbacks`` and a ``kernel`` trace event), so
a kernel that does not batch gets the per-instance result and error messages,
never a different one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..mem import PageFault, Segment
from .memory import SPAN_LIMIT, SPAN_SPARSITY, Layout, ProgramContext, SegmentCache, _Access, _current, masked_result

if TYPE_CHECKING:
    from ..mem import MemoryStore

__all__ = ["BatchContext", "Batched", "Overlap", "Unbatchable", "is_batched"]

I64Array = npt.NDArray[np.int64]

_PY, _ARR, _TILE = 0, 1, 2
"""What a batched value is in each instance: a Python scalar (weak type, free arithmetic), a plain
numpy scalar or array (free), or a :class:`~kbus.lang.language.Tile` (counted)."""

_NO_INDEX = np.empty(0, dtype=np.int64)

PRECISE_LIMIT = 4_000_000
"""Above this many interval pairs, the conflict check compares the addresses of every access."""


class Unbatchable(Exception):
    """The kernel body did something the batched form cannot reproduce exactly; the message says what."""


class Overlap(Unbatchable):
    """Instances of the batch touch memory another one writes (depends on the data, not only the code)."""


def is_batched(x: object) -> bool:
    return type(x) is Batched


def _ctx() -> BatchContext:
    ctx: Any = _current.get()
    if not isinstance(ctx, BatchContext):
        raise RuntimeError("a batched value was used outside the batched run of its kernel")
    return ctx


def _lnd(x: Any) -> int:
    """Logical number of dimensions."""
    if type(x) is Batched:
        return x.data.ndim - 1
    return int(np.ndim(x))


def _align(x: Any, nd: int) -> Any:
    """``x`` ready to broadcast against values of ``nd`` logical dimensions (instance axis first)."""
    if type(x) is Batched:
        d = x.data
        extra = nd - (d.ndim - 1)
        return d.reshape(d.shape[:1] + (1,) * extra + d.shape[1:]) if extra else d
    if isinstance(x, np.ndarray):
        return x.view(np.ndarray) if type(x) is not np.ndarray else x
    return x


def _weak(x: Batched, strong: Sequence[np.dtype[Any]], what: str) -> npt.NDArray[Any]:
    """The data of a Python-scalar value converted as numpy converts a Python scalar next to ``strong``."""
    d = x.data
    if not strong:
        return d
    sample: Any = {"b": False, "i": 0, "u": 0, "f": 0.0}.get(d.dtype.kind, 0)
    target = np.result_type(sample, *strong)
    if target == d.dtype:
        return d
    out = d.astype(target)
    if target.kind in "iub" and not np.array_equal(out, d):
        raise Unbatchable(f"{what}: a Python integer is out of range for {target}")
    return out


def ufunc(uf: np.ufunc, method: str, inputs: Sequence[Any], kwargs: dict[str, Any], op: bool = False) -> Batched:
    """Apply ``uf`` to inputs of which at least one is :class:`Batched`, counting as per instance."""
    ctx = _ctx()
    what = f"np.{uf.__name__}" + ("" if method == "__call__" else f".{method}")
    if method == "reduce":
        return _reduce(uf, inputs, kwargs, what)
    if method != "__call__" or uf.nout != 1 or kwargs or uf.signature is not None:
        raise Unbatchable(f"{what} with {sorted(kwargs) or 'this form'} is not supported batched")
    kinds = []
    strong: list[np.dtype[Any]] = []
    for x in inputs:
        if type(x) is Batched:
            kinds.append(x.kind)
            if x.kind != _PY:
                strong.append(x.data.dtype)
        elif isinstance(x, np.ndarray):
            from .language import Tile

            kinds.append(_TILE if isinstance(x, Tile) else _ARR)
            strong.append(x.dtype)
        elif isinstance(x, np.generic):
            kinds.append(_ARR)
            strong.append(x.dtype)
        elif isinstance(x, bool | int | float):
            kinds.append(_PY)
        else:
            raise Unbatchable(f"{what} on a {type(x).__name__}")
    nd = max(_lnd(x) for x in inputs)
    args = []
    for x in inputs:
        if type(x) is Batched and x.kind == _PY and strong:
            args.append(_align(Batched(_weak(x, strong, what), _PY), nd))
        else:
            args.append(_align(x, nd))
    if all(k == _PY for k in kinds):
        if not op:
            kind = _ARR  # np.exp(python_int) is a numpy scalar
        else:
            kind = _PY
            if uf in (np.floor_divide, np.remainder, np.true_divide) and not np.all(args[1]):
                raise Unbatchable(f"{what}: Python division by zero")
            if uf is np.power and np.any(np.asarray(args[1]) < 0) and np.asarray(args[1]).dtype.kind in "iu":
                raise Unbatchable(f"{what}: Python integer to a negative power")
            if uf is np.invert and any(type(x) is Batched and x.data.dtype == np.bool_ for x in inputs):
                raise Unbatchable(f"{what}: ~ on a Python bool")
    else:
        kind = _TILE if _TILE in kinds else _ARR
    res = uf(*args)
    b = ctx.size
    if kind == _TILE:
        ctx.flops += res.size // b
    return Batched(res, kind)


def _reduce(uf: np.ufunc, inputs: Sequence[Any], kwargs: dict[str, Any], what: str) -> Batched:

    x = inputs[0]
    if len(inputs) != 1 or type(x) is not Batched or set(kwargs) - {"axis", "keepdims", "dtype"}:
        raise Unbatchable(f"{what} with {sorted(kwargs)} is not supported batched")
    kw = dict(kwargs)
    axis = kw.pop("axis", 0)
    kw.pop("out", None)
    nd = x.data.ndim - 1
    return Batched(_reduce_data(uf.reduce, x, _axes(axis, nd, what), kw), x.kind if x.kind == _TILE else _ARR)


def _axes(axis: Any, nd: int, what: str) -> tuple[int, ...]:
    if nd == 0:
        raise Unbatchable(f"{what} of a 0-d value")
    if axis is None:
        return tuple(range(1, nd + 1))
    items = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in items:
        a = operator.index(a)
        if not -nd <= a < nd:
            raise Unbatchable(f"{what}: axis {a} is out of range")
        out.append(a % nd + 1)
    return tuple(out)


def _reduce_data(fn: Callable[..., Any], x: Batched, axes: tuple[int, ...], kw: dict[str, Any]) -> npt.NDArray[Any]:
    if x.kind == _TILE:
        _ctx().flops += x.data.size // x.data.shape[0]
    return np.asarray(fn(x.data, axis=axes, **kw))


_BINOPS: dict[str, tuple[np.ufunc, bool]] = {
    "add": (np.add, False),
    "sub": (np.subtract, False),
    "mul": (np.multiply, False),
    "truediv": (np.true_divide, False),
    "floordiv": (np.floor_divide, False),
    "mod": (np.remainder, False),
    "pow": (np.power, False),
    "lshift": (np.left_shift, False),
    "rshift": (np.right_shift, False),
    "and": (np.bitwise_and, False),
    "or": (np.bitwise_or, False),
    "xor": (np.bitwise_xor, False),
    "lt": (np.less, True),
    "le": (np.less_equal, True),
    "eq": (np.equal, True),
    "ne": (np.not_equal, True),
    "gt": (np.greater, True),
    "ge": (np.greater_equal, True),
}


def _unbatchable(what: str) -> Callable[..., Any]:
    def refuse(self: Batched, *args: Any, **kwargs: Any) -> Any:
        raise Unbatchable(f"{what} on a value that differs per instance (Python control flow or conversion)")

    refuse.__name__ = what
    return refuse


class Batched:
    """A value of every instance of a batch: ``data`` has the instance dimension first.

    Kernel code never names this class: it is what ``kl.program_id`` and
    everything computed from it look like in a batched run. Its ``shape`` is
    the shape one instance sees.
    """

    __slots__ = ("data", "kind")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, data: npt.NDArray[Any], kind: int) -> None:
        self.data = data
        self.kind = kind

    # ----------------------------------------------------------- numpy protocol
    def __array_ufunc__(self, uf: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return ufunc(uf, method, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise Unbatchable(f"np.{getattr(func, '__name__', func)} is not supported batched")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise Unbatchable("converting a per-instance value to a plain numpy array")

    # --------------------------------------------------------------- shape
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    @property
    def ndim(self) -> int:
        return self.data.ndim - 1

    @property
    def size(self) -> int:
        return int(self.data.size // self.data.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def T(self) -> Batched:
        nd = self.data.ndim
        return Batched(self.data.transpose(0, *range(nd - 1, 0, -1)), self.kind)

    def __len__(self) -> int:
        if self.data.ndim < 2:
            raise TypeError("len() of unsized object")
        return int(self.data.shape[1])

    def reshape(self, *shape: Any) -> Batched:
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return Batched(self.data.reshape((self.data.shape[0], *dims)), self.kind)

    def astype(self, dtype: Any, copy: bool = True) -> Batched:
        return Batched(self.data.astype(dtype, copy=copy), self.kind)

    def to(self, dtype: Any) -> Batched:
        if self.kind != _TILE:
            raise Unbatchable(".to() on a value that is not a tile")
        from .language import as_dtype

        ctx = _ctx()
        ctx.flops += self.size
        return Batched(self.data.astype(as_dtype(dtype, "Tile.to"), copy=True), _TILE)

    def _red(
        self, uf: np.ufunc, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False
    ) -> Batched:
        if out is not None:
            raise Unbatchable(f"np.{uf.__name__}.reduce with out=")
        kw: dict[str, Any] = {"keepdims": keepdims}
        if dtype is not None:
            kw["dtype"] = dtype
        return _reduce(uf, (self,), {"axis": axis, **kw}, f"np.{uf.__name__}.reduce")

    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False) -> Batched:
        return self._red(np.add, axis, dtype, out, keepdims)

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Batched:
        return self._red(np.maximum, axis, None, out, keepdims)

    def min(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> Batched:
        return self._red(np.minimum, axis, None, out, keepdims)

    # ------------------------------------------------------------ indexing
    def __getitem__(self, key: Any) -> Batched:
        items = key if isinstance(key, tuple) else (key,)
        ints = 0
        for k in items:
            if k is None or k is Ellipsis or isinstance(k, slice):
                continue
            if isinstance(k, bool | np.bool_) or not isinstance(k, int | np.integer):
                raise Unbatchable(f"indexing with {type(k).__name__} (advanced indexing) is not supported batched")
            ints += 1
        res = self.data[(slice(None), *items)]
        kind = self.kind
        if kind == _TILE and ints == len(items) and ints == self.data.ndim - 1:
            kind = _ARR  # tile[i, j] of an n-d tile is a numpy scalar, not a tile
        return Batched(res, kind)

    __setitem__ = _unbatchable("item assignment")
    __bool__ = _unbatchable("bool()")
    __int__ = _unbatchable("int()")
    __float__ = _unbatchable("float()")
    __complex__ = _unbatchable("complex()")
    __index__ = _unbatchable("use as an index (range(), slicing)")
    __iter__ = _unbatchable("iteration")
    item = _unbatchable(".item()")
    tolist = _unbatchable(".tolist()")
    __matmul__ = __rmatmul__ = _unbatchable("the @ operator (use kl.dot)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise Unbatchable(f"attribute .{name} is not supported batched")

    # ----------------------------------------------------------- operators
    def __neg__(self) -> Batched:
        return ufunc(np.negative, "__call__", (self,), {}, op=True)

    def __pos__(self) -> Batched:
        return ufunc(np.positive, "__call__", (self,), {}, op=True)

    def __abs__(self) -> Batched:
        return ufunc(np.absolute, "__call__", (self,), {}, op=True)

    def __invert__(self) -> Batched:
        return ufunc(np.invert, "__call__", (self,), {}, op=True)

    def __repr__(self) -> str:
        return f"<batched {self.data.dtype} value of shape {self.shape} in {self.data.shape[0]} instances>"


def _inplace(uf: np.ufunc, target: Batched, other: Any) -> Batched:
    """``target <op>= other``: in place, as numpy does it for each instance's own array (aliases see it)."""
    res = ufunc(uf, "__call__", (target, other), {}, op=True)
    if target.kind == _PY:
        return res  # Python numbers are immutable: ``pid += 1`` rebinds
    what = f"np.{uf.__name__} in place"
    if res.data.shape != target.data.shape:
        raise Unbatchable(f"{what}: the result does not have the target's shape")
    if not np.can_cast(res.data.dtype, target.data.dtype, "same_kind"):
        raise Unbatchable(f"{what}: {res.data.dtype} cannot be cast to {target.data.dtype}")
    target.data[...] = res.data
    return target


def _install_binops() -> None:
    for name, (uf, cmp) in _BINOPS.items():

        def fwd(self: Batched, other: Any, _uf: np.ufunc = uf) -> Any:
            if isinstance(other, _Pointerish):
                return NotImplemented
            return ufunc(_uf, "__call__", (self, other), {}, op=True)

        def rev(self: Batched, other: Any, _uf: np.ufunc = uf) -> Any:
            return ufunc(_uf, "__call__", (other, self), {}, op=True)

        def inp(self: Batched, other: Any, _uf: np.ufunc = uf) -> Any:
            if isinstance(other, _Pointerish):
                return NotImplemented
            return _inplace(_uf, self, other)

        setattr(Batched, f"__{name}__", fwd)
        if not cmp:
            setattr(Batched, f"__r{name}__", rev)
            setattr(Batched, f"__i{name}__", inp)


class _Pointerish:
    """Marker base: values that handle ``batched + value`` themselves (pointers)."""


_install_binops()


# ------------------------------------------------------------------ context
class BatchContext:
    """The batched run of several program instances on one PE (see the module docstring).

    Plays the part of :class:`~kbus.lang.memory.ProgramContext` for the body:
    ``flops`` collects the operations counted since the last access (per
    instance: every instance of the batch did the same work), ``load``/
    ``store`` (unbatched values: every instance the same) and
    ``load_batched``/``store_batched`` move data and book every instance's
    commands in its own context (``contexts``).
    """

    batched = True

    def __init__(
        self,
        contexts: list[ProgramContext],
        pids: npt.NDArray[np.int64],
        cache: SegmentCache,
        data: ProgramContext,
    ) -> None:
        self.contexts = contexts
        self.size = len(contexts)
        self.pids = pids
        """``(B, 3)`` program ids."""
        self.grid = contexts[0].grid
        self.flops = 0
        self.cache = cache
        self._data = data
        """The context whose helpers locate and move the data (its counters are not used)."""
        self._undo: list[tuple[MemoryStore, int, npt.NDArray[np.uint8]]] = []
        self._spans: list[tuple[bool, I64Array, I64Array, I64Array, int]] = []
        """Per access: (write, instance of each span, lo, hi, access number)."""
        self._lanes: list[tuple[Layout, I64Array, npt.NDArray[np.bool_] | None]] = []
        """Per access: its layout, each instance's lane offsets and which are active (for the lane check)."""
        self._translations = cache.engine.translations
        self.stored: set[str] = set()
        """Names of the pointers stored through."""
        self.lanes = 0
        """The most lanes (active or not) one instance's access had."""
        self._token: Any = None

    def __enter__(self) -> BatchContext:
        self._token = _current.set(self)  # type: ignore[arg-type]
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)

    # ---------------------------------------------------------- program ids
    def program_id(self, axis: int) -> Batched:
        return Batched(np.ascontiguousarray(self.pids[:, axis]), _PY)

    # -------------------------------------------------------------- access
    def _flush(self) -> None:
        if self.flops:
            f = self.flops
            for c in self.contexts:
                c.flops += f
            self.flops = 0

    def finish(self) -> None:
        """End of the body: the last compute stretch of every instance, then the conflict check."""
        self._flush()
        for c in self.contexts:
            c.flush_compute()
        reason = self._conflict()
        if reason is not None:
            raise Overlap(reason)

    def abort(self) -> None:
        """Undo every store of the batch (newest first) and the translations it charged."""
        for store, pa, old in reversed(self._undo):
            store.write(pa, old)
        self._undo.clear()
        self.cache.engine.translations = self._translations

    def load(
        self, layout: Layout, offsets: I64Array, mask: npt.NDArray[np.bool_] | None, other: Any, what: str
    ) -> npt.NDArray[Any]:
        """An access that is the same in every instance: read once, booked for each instance."""
        dtype = layout.dtype
        active = offsets.reshape(-1) if mask is None else offsets[mask]
        if active.size == 0:
            return np.full(offsets.shape, other, dtype=dtype)
        values = self._gather(layout, active, f"kl.load from {what}")
        b = self.size
        flat = np.broadcast_to(offsets.reshape(1, -1), (b, offsets.size))
        fm = None if mask is None else np.broadcast_to(mask.reshape(1, -1), (b, mask.size))
        self._book_all(layout, flat, fm, False, f"kl.load from {what}")
        return masked_result(values, offsets.shape, mask, other, dtype)

    def store(
        self,
        layout: Layout,
        offsets: I64Array,
        mask: npt.NDArray[np.bool_] | None,
        values: npt.NDArray[Any],
        what: str,
    ) -> None:
        b = self.size
        offs = np.broadcast_to(offsets, (b, *offsets.shape))
        m = None if mask is None else np.broadcast_to(mask, (b, *mask.shape))
        self.store_batched(layout, offs, m, np.broadcast_to(values, (b, *values.shape)), what)

    def _gather(self, layout: Layout, active: I64Array, what: str) -> npt.NDArray[Any]:
        """The values at logical offsets ``active`` (translated through the segment table, charged to nobody)."""
        data = self._data
        acc = data._locate_data(layout, active, what, self.cache)
        buf = np.empty(acc.nbytes, dtype=np.uint8)
        for seg, off in acc.segs:
            data._store(seg).read_into(seg.pa, buf[off : off + seg.nbytes])
        values: npt.NDArray[Any] = buf.view(layout.dtype)[acc.elem_index]
        return values

    def _book_all(
        self,
        layout: Layout,
        flat: I64Array,
        fm: npt.NDArray[np.bool_] | None,
        write: bool,
        what: str,
    ) -> None:
        """Book every instance's commands as its own run would (same lanes, translation, segments).

        ``flat`` holds each instance's lane offsets (one row per instance),
        ``fm`` which lanes are active.
        """
        self._flush()
        itemsize = layout.itemsize
        b, width = flat.shape
        if width > self.lanes:
            self.lanes = width
        counts = np.full(b, width, dtype=np.intp) if fm is None else np.count_nonzero(fm, axis=1)
        nz = np.flatnonzero(counts)
        if layout.is_contiguous:  # spans from the offsets alone: no per-lane addresses
            if fm is None:
                lo_off, hi_off = flat.min(axis=1), flat.max(axis=1)
            else:
                lo_off = np.where(fm, flat, np.iinfo(np.int64).max).min(axis=1)[nz]
                hi_off = np.where(fm, flat, np.iinfo(np.int64).min).max(axis=1)[nz]
            lo = lo_off * itemsize + layout.va_base
            hi = hi_off * itemsize + (layout.va_base + itemsize)
        else:
            active = flat.reshape(-1) if fm is None else flat[fm]
            addrs = layout.addresses(active, what)
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[nz]
            lo = np.minimum.reduceat(addrs, starts)
            hi = np.maximum.reduceat(addrs, starts) + itemsize
        self._spans.append((write, nz.astype(np.int64), lo, hi, len(self._spans)))
        self._lanes.append((layout, flat, fm))
        cache = self.cache
        span = hi - lo
        # An instance's own run translates its span in one piece when it is compact (see
        # ProgramContext._locate): then its segments are the span's, and its lanes need no sorting.
        compact = (span <= SPAN_LIMIT) | (span <= SPAN_SPARSITY * counts[nz] * itemsize)
        for j, i in enumerate(nz.tolist()):
            ctx = self.contexts[i]
            n = int(counts[i])
            segs: list[Segment] | None = None
            if compact[j]:
                try:
                    segs, cost = cache.translate(int(lo[j]), int(span[j]))
                except PageFault:
                    segs = None  # a hole between lanes: the instance's own path sorts it out
            if segs is None:
                lanes = flat[i] if fm is None else flat[i][fm[i]]
                ctx._book(ctx._locate(layout, lanes, what), itemsize, write=write)
            elif len(segs) == 1:
                ctx._xlate = cost
                ctx._book(
                    _Access(int(span[j]), [(segs[0], 0)], _NO_INDEX, layout, _NO_INDEX, None),
                    itemsize,
                    write=write,
                    counts=[n],
                )
            else:
                ctx._xlate = cost
                lanes = flat[i] if fm is None else flat[i][fm[i]]
                acc = _Access(int(span[j]), [(seg, 0) for seg in segs], _NO_INDEX, layout, lanes, None)
                ctx._book(acc, itemsize, write=write)
            if write:
                ctx.bytes_stored += n * itemsize
            else:
                ctx.bytes_loaded += n * itemsize

    def load_batched(
        self, layout: Layout, offsets: I64Array, mask: npt.NDArray[np.bool_] | None, other: Any, what: str
    ) -> npt.NDArray[Any]:
        """Gather for every instance: ``offsets`` and ``mask`` have the instance dimension first."""
        b = self.size
        flat = offsets.reshape(b, -1)
        fm = None if mask is None else mask.reshape(b, -1)
        active = flat.reshape(-1) if fm is None else flat[fm]
        if active.size == 0:
            return np.full(offsets.shape, other, dtype=layout.dtype)
        values = self._gather(layout, active, f"kl.load from {what}")
        self._book_all(layout, flat, fm, False, f"kl.load from {what}")
        return masked_result(values, offsets.shape, mask, other, layout.dtype)

    def store_batched(
        self,
        layout: Layout,
        offsets: I64Array,
        mask: npt.NDArray[np.bool_] | None,
        values: npt.NDArray[Any],
        what: str,
    ) -> None:
        """Scatter for every instance (``values`` cast and broadcast to ``offsets``)."""
        b = self.size
        flat = offsets.reshape(b, -1)
        fm = None if mask is None else mask.reshape(b, -1)
        active = flat.reshape(-1) if fm is None else flat[fm]
        if active.size == 0:
            return
        vals = values.reshape(-1) if mask is None else values[mask]
        dtype = layout.dtype
        data = self._data
        acc = data._locate_data(layout, active, f"kl.store to {what}", self.cache)
        buf = np.empty(acc.nbytes, dtype=np.uint8)
        for seg, off in acc.segs:
            data._store(seg).read_into(seg.pa, buf[off : off + seg.nbytes])
        old = buf.copy()
        buf.view(dtype)[acc.elem_index] = vals
        lanes = data._lanes_per_segment(acc)
        for (seg, off), k in zip(acc.segs, lanes, strict=True):
            if k:
                store = data._store(seg)
                self._undo.append((store, seg.pa, old[off : off + seg.nbytes]))
                store.write(seg.pa, buf[off : off + seg.nbytes])
        self.stored.add(what)
        self._book_all(layout, flat, fm, True, f"kl.store to {what}")

    # ------------------------------------------------------------ conflicts
    def _conflict(self) -> str | None:
        """Why the batched run may differ from one instance after another, or None.

        Instances run one after another see each other's stores; run as a
        batch, every instance's statement k runs before any instance's
        statement k+1. The two agree exactly when no byte written by one
        instance is read or written by another, which is checked here: first
        on each access's span per instance, then, where spans of different
        instances meet a write, lane by lane.
        """
        if not any(s[0] for s in self._spans):
            return None
        write = np.concatenate([np.full(s[1].size, s[0]) for s in self._spans])
        inst = np.concatenate([s[1] for s in self._spans])
        lo = np.concatenate([s[2] for s in self._spans])
        hi = np.concatenate([s[3] for s in self._spans])
        access = np.concatenate([np.full(s[1].size, s[4]) for s in self._spans])
        w = np.flatnonzero(write)
        if w.size * lo.size <= PRECISE_LIMIT:
            meet = (lo[None, :] < hi[w, None]) & (hi[None, :] > lo[w, None]) & (inst[None, :] != inst[w, None])
            if not meet.any():
                return None
            involved = set(access[meet.any(axis=0)].tolist()) | set(access[w[meet.any(axis=1)]].tolist())
        else:
            involved = set(access.tolist())
        writes = {s[4] for s in self._spans if s[0]}
        unit = min(self._lanes[a][0].itemsize for a in involved)
        addr_parts, inst_parts, w_parts = [], [], []
        for a in sorted(involved):
            layout, flat, fm = self._lanes[a]
            itemsize = layout.itemsize
            n = flat.shape[0]
            counts = np.full(n, flat.shape[1]) if fm is None else np.count_nonzero(fm, axis=1)
            addrs = layout.addresses(flat.reshape(-1) if fm is None else flat[fm], "")
            owner = np.repeat(np.arange(n, dtype=np.int64), counts)
            if itemsize != unit:
                k = itemsize // unit
                addrs = (addrs[:, None] + np.arange(k, dtype=np.int64) * unit).reshape(-1)
                owner = np.repeat(owner, k)
            addr_parts.append(addrs)
            inst_parts.append(owner)
            w_parts.append(np.full(addrs.size, a in writes))
        addrs = np.concatenate(addr_parts)
        owner = np.concatenate(inst_parts)
        wr = np.concatenate(w_parts)
        order = np.lexsort((owner, addrs))
        addrs, owner, wr = addrs[order], owner[order], wr[order]
        starts = np.flatnonzero(np.concatenate(([True], addrs[1:] != addrs[:-1])))
        ends = np.concatenate((starts[1:], [addrs.size])) - 1
        clash = (owner[starts] != owner[ends]) & np.maximum.reduceat(wr, starts)
        if not clash.any():
            return None
        g = int(np.argmax(clash))
        va = int(addrs[starts[g]])
        a, b = int(owner[starts[g]]), int(owner[ends[g]])
        pa_, pb = tuple(int(v) for v in self.pids[a]), tuple(int(v) for v in self.pids[b])
        return f"programs {pa_} and {pb} both access VA {va:#x} and at least one writes it"
