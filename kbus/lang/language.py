"""The kernel language: what a kernel body calls, imported as ``kl``.

A kernel body is ordinary Python running once per *program instance*; each
instance works on whole blocks of values at a time (numpy arrays), never on one
element per Python step. Values come in three kinds:

* **tiles** (:class:`Tile`): numpy arrays that count their work. Every numpy
  ufunc applied to a tile (``+``, ``*``, ``<``, ``np.exp``, ``.sum()`` ...)
  adds one operation per output element (per input element for reductions) to
  the running instance, which the timing model turns into PE time;
* **pointers** (:class:`Pointer`): a tensor argument's VA and element dtype
  plus a block of element offsets, built by ``ptr + offsets``;
* plain Python scalars: ``program_id``, sizes, constexprs.

Only ufuncs and the ``kl.*`` functions are counted; other numpy functions
(``np.where``, ``np.concatenate``) work on tiles but cost nothing, which is
why ``kl.where`` and friends exist. Integer tiles from :func:`arange` are
``int64`` so that address arithmetic never wraps.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from . import batch as _batch
from .batch import Batched, Unbatchable
from .memory import Layout, current, require

__all__ = [
    "DTYPES",
    "Pointer",
    "Tile",
    "abs",
    "arange",
    "as_dtype",
    "bool_",
    "cdiv",
    "constexpr",
    "dot",
    "dtype_name",
    "exp",
    "float16",
    "float32",
    "float64",
    "full",
    "int8",
    "int16",
    "int32",
    "int64",
    "load",
    "log",
    "max",
    "maximum",
    "min",
    "minimum",
    "num_programs",
    "program_id",
    "sqrt",
    "store",
    "sum",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "where",
    "zeros",
]


class constexpr:
    """Annotation of a kernel parameter whose value is fixed for a launch (a block size, a flag).

    ``def kernel(x_ptr, n, BLOCK: kl.constexpr)``: constexpr values are given
    by keyword at launch (``BLOCK=256``), are visible to a callable grid
    (``lambda meta: (kl.cdiv(n, meta["BLOCK"]),)``) and reach every instance
    as plain Python values. They must be ``int``, ``float`` or ``bool``.
    """


# ------------------------------------------------------------------ dtypes
bool_ = np.dtype(np.bool_)
int8 = np.dtype(np.int8)
int16 = np.dtype(np.int16)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
uint8 = np.dtype(np.uint8)
uint16 = np.dtype(np.uint16)
uint32 = np.dtype(np.uint32)
uint64 = np.dtype(np.uint64)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

DTYPES: dict[str, np.dtype[Any]] = {
    "bool": bool_,
    "i8": int8,
    "i16": int16,
    "i32": int32,
    "i64": int64,
    "u8": uint8,
    "u16": uint16,
    "u32": uint32,
    "u64": uint64,
    "f16": float16,
    "f32": float32,
    "f64": float64,
}
"""Device dtype names (as they appear in ``ScalarArg.dtype``) and their numpy dtypes."""

_NAMES: dict[np.dtype[Any], str] = {dt: name for name, dt in DTYPES.items()}


def as_dtype(dtype: Any, what: str = "dtype") -> np.dtype[Any]:
    """A supported numpy dtype from a numpy dtype, a numpy type or a name (``"f32"`` or ``"float32"``)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: {dtype!r} is not a dtype; use one of {', '.join(DTYPES)}") from None
    if dt.newbyteorder("=") in _NAMES and dt.isnative:
        return dt
    raise TypeError(f"{what}: dtype {dt} is not supported on the device; use one of {', '.join(DTYPES)}")


def dtype_name(dtype: Any) -> str:
    """The device name of ``dtype`` (``float32`` -> ``"f32"``)."""
    return _NAMES[as_dtype(dtype)]


# ------------------------------------------------------------------- tiles
def _raw(x: Any) -> Any:
    """``x`` without the Tile subclass (so numpy work done on it is not counted twice)."""
    return x.view(np.ndarray) if isinstance(x, Tile) else x


def _tile(x: Any) -> Tile:
    return np.asarray(x).view(Tile)


def _count(n: int) -> None:
    ctx = current()
    if ctx is not None:
        ctx.flops += n


class Tile(np.ndarray[Any, np.dtype[Any]]):
    """A block of values inside a program instance: a numpy array that counts its operations.

    Behaves exactly like ``numpy.ndarray``; the only addition is that every
    ufunc it takes part in charges the running instance one operation per
    result element (per input element for ``reduce``/``accumulate``). Results
    of ufuncs are tiles again, including 0-d results, so a chain of
    arithmetic keeps counting.
    """

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method == "__call__" and not kwargs and ufunc.nout == 1:
            # The hot path (``a + b``, ``x < n``): one result, no ``out=``.
            if len(inputs) == 2:
                a, b = inputs
                if type(a) is Batched or type(b) is Batched:  # part of a batched run: counted per instance there
                    return _batch.ufunc(ufunc, method, inputs, kwargs, op=True)
                res = ufunc(a.view(np.ndarray) if type(a) is Tile else a, b.view(np.ndarray) if type(b) is Tile else b)
            else:
                if Batched in map(type, inputs):
                    return _batch.ufunc(ufunc, method, inputs, kwargs, op=True)
                res = ufunc(*[x.view(np.ndarray) if type(x) is Tile else x for x in inputs])
            ctx = current()
            if ctx is not None:
                ctx.flops += res.size if type(res) is np.ndarray else 1
            return res.view(Tile) if type(res) is np.ndarray else np.asarray(res).view(Tile)
        if any(type(x) is Batched for x in inputs):
            return _batch.ufunc(ufunc, method, inputs, kwargs)
        args = [_raw(x) for x in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_raw(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if method == "__call__" or method == "outer":
            first = result[0] if isinstance(result, tuple) else result
            n = int(np.size(first))
        elif method == "at":
            n = int(np.size(args[1])) if len(args) > 1 else 0
        else:  # reduce, accumulate, reduceat
            n = int(np.size(args[0]))
        _count(n)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_tile(r) for r in result)
        return None if result is None else _tile(result)

    def to(self, dtype: Any) -> Tile:
        """This tile converted to ``dtype`` (``x.to(kl.float32)``); costs one operation per element."""
        _count(self.size)
        return _tile(_raw(self).astype(as_dtype(dtype, "Tile.to"), copy=True))


# ----------------------------------------------------------------- pointers
def _offsets(value: Any, what: str) -> npt.NDArray[np.int64]:
    """Integer element offsets from an int, an integer array or tile (a batched value: its data)."""
    if type(value) is Batched:
        if value.dtype.kind not in "iu":
            raise TypeError(f"{what}: pointer offsets must be integers, got {value.dtype} values")
        return np.asarray(value.data, dtype=np.int64)
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{what}: pointer offsets must be integers, got a bool")
    if isinstance(value, int | np.integer):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise TypeError(f"{what}: pointer offsets must be integers, got {value.dtype} values")
        return np.asarray(_raw(value), dtype=np.int64)
    if isinstance(value, Pointer):
        raise TypeError(f"{what}: cannot add two pointers ({value!r})")
    raise TypeError(f"{what}: pointer offsets must be an int or an integer array/tile, got {type(value).__name__}")


class Pointer(_batch._Pointerish):
    """A typed device pointer: a tensor's layout (VA, dtype, shards) plus a block of element offsets.

    A tensor argument arrives in the kernel as a pointer with offset 0.
    ``ptr + offsets`` (offsets an int or an integer tile, any shape; 2-D for
    tiles such as ``rows[:, None] * stride + cols[None, :]``) gives a pointer
    block of the broadcast shape. Offsets count elements of the tensor in
    logical row-major order, whatever its sharding (see
    :class:`~kbus.lang.memory.Layout`). Pointers are immutable; arithmetic on
    them is address generation and is not counted as compute.
    """

    __slots__ = ("_batched", "_layout", "_name", "_offsets")
    __array_ufunc__ = None  # makes ``tile + ptr`` defer to Pointer.__radd__

    def __init__(self, layout: Layout, offsets: Any = 0, name: str = "pointer") -> None:
        if not isinstance(layout, Layout):
            raise TypeError(f"pointer {name!r}: expected a Layout, got {type(layout).__name__}")
        self._layout = layout
        self._name = name
        self._batched = type(offsets) is Batched
        self._offsets = _offsets(offsets, f"pointer {name!r}")

    @classmethod
    def to(cls, va: int, dtype: Any, name: str = "pointer") -> Pointer:
        """A pointer to ``dtype`` elements laid out contiguously from ``va``."""
        return cls(Layout.contiguous(as_dtype(dtype, f"pointer {name!r}"), operator.index(va)), 0, name)

    @property
    def va(self) -> int:
        """Base virtual address (the tensor's VA)."""
        return self._layout.va_base

    @property
    def dtype(self) -> np.dtype[Any]:
        """Element dtype."""
        return self._layout.dtype

    @property
    def layout(self) -> Layout:
        """How offsets map to virtual addresses."""
        return self._layout

    @property
    def name(self) -> str:
        """The kernel parameter this pointer came from (used in error messages)."""
        return self._name

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """Element offsets (a read-only view)."""
        view = self._offsets.view()
        view.flags.writeable = False
        return view

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the pointer block (``()`` for a single address)."""
        return self._offsets.shape[1:] if self._batched else self._offsets.shape

    def _with(self, offsets: npt.NDArray[np.int64], batched: bool = False) -> Pointer:
        new = Pointer.__new__(Pointer)
        new._layout, new._name, new._offsets, new._batched = self._layout, self._name, offsets, batched
        return new

    def _combine(self, other: Any, sign: int, what: str) -> Pointer:
        theirs = _offsets(other, what)
        other_b = type(other) is Batched
        if not (self._batched or other_b):
            return self._with(self._offsets + theirs if sign > 0 else self._offsets - theirs)
        mine = self._offsets
        nd = builtins.max(mine.ndim - self._batched, theirs.ndim - other_b)
        if self._batched:
            mine = mine.reshape(mine.shape[:1] + (1,) * (nd + 1 - mine.ndim) + mine.shape[1:])
        if other_b:
            theirs = theirs.reshape(theirs.shape[:1] + (1,) * (nd + 1 - theirs.ndim) + theirs.shape[1:])
        return self._with(mine + theirs if sign > 0 else mine - theirs, True)

    def __add__(self, other: Any) -> Pointer:
        if not self._batched and type(other) is not Batched:  # one instance: plain offsets
            return self._with(self._offsets + _offsets(other, f"{self._name} + ..."))
        return self._combine(other, 1, f"{self._name} + ...")

    __radd__ = __add__

    def __sub__(self, other: Any) -> Pointer:
        return self._combine(other, -1, f"{self._name} - ...")

    def __repr__(self) -> str:
        return f"<Pointer {self._name} {self.dtype} at VA {self.va:#x}, offsets shape {self.shape}>"


# ------------------------------------------------------------ program ids
def _axis(axis: SupportsIndex, what: str) -> int:
    a = operator.index(axis)
    if a not in (0, 1, 2):
        raise ValueError(f"{what}(axis={a}): axis must be 0, 1 or 2")
    return a


def program_id(axis: SupportsIndex = 0) -> Any:
    """This instance's index along grid ``axis`` (0, 1 or 2).

    An ``int``; in a batched run (see :mod:`kbus.lang.batch`) the ids of all
    the instances of the batch, which behaves as an int in arithmetic.
    """
    ctx: Any = require("kl.program_id")
    if ctx.batched:
        return ctx.program_id(_axis(axis, "kl.program_id"))
    return ctx.pid[_axis(axis, "kl.program_id")]


def num_programs(axis: SupportsIndex = 0) -> int:
    """The grid size along ``axis`` (0, 1 or 2)."""
    return require("kl.num_programs").grid[_axis(axis, "kl.num_programs")]


# ------------------------------------------------------------ construction
def arange(start: SupportsIndex, end: SupportsIndex) -> Tile:
    """``int64`` tile ``[start, start + 1, ..., end - 1]``."""
    a, b = operator.index(start), operator.index(end)
    if b <= a:
        raise ValueError(f"kl.arange({a}, {b}): end must be greater than start")
    return np.arange(a, b, dtype=np.int64).view(Tile)


def _shape(shape: Any, what: str) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    out = tuple(operator.index(d) for d in dims)
    if any(d < 0 for d in out):
        raise ValueError(f"{what}: negative dimension in shape {out}")
    return out


def _fresh(tile: Tile) -> Tile:
    """A new tile as a kernel body gets it: in a batched run, one copy per instance (an accumulator
    updated in place, ``acc += ...``, must stay each instance's own)."""
    ctx: Any = current()
    if getattr(ctx, "batched", False):
        data = np.broadcast_to(tile.view(np.ndarray), (ctx.size, *tile.shape)).copy()
        return Batched(data, _batch._TILE)  # type: ignore[return-value]
    return tile


def zeros(shape: Any, dtype: Any = float32) -> Tile:
    """A tile of zeros (``kl.zeros((BM, BN), kl.float32)``)."""
    return _fresh(np.zeros(_shape(shape, "kl.zeros"), dtype=as_dtype(dtype, "kl.zeros")).view(Tile))


def full(shape: Any, value: Any, dtype: Any = float32) -> Tile:
    """A tile filled with ``value``."""
    return _fresh(np.full(_shape(shape, "kl.full"), value, dtype=as_dtype(dtype, "kl.full")).view(Tile))


# ------------------------------------------------------------------ memory
def _mask(mask: Any, what: str) -> npt.NDArray[np.bool_] | None:
    if mask is None:
        return None
    m = np.asarray(_raw(mask))
    if m.dtype != np.bool_:
        raise TypeError(f"{what}: mask must be boolean (e.g. offs < n), got {m.dtype}")
    return m


def _broadcast(what: str, **arrays: Any) -> list[Any]:
    try:
        return list(np.broadcast_arrays(*arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
        raise ValueError(f"{what}: shapes do not broadcast: {shapes}") from None


def load(pointer: Pointer, mask: Any = None, other: Any = 0) -> Tile:
    """Read the elements ``pointer`` addresses: a tile shaped like the pointer block.

    Lanes where ``mask`` is False are not read (not even translated, so they
    may point anywhere) and hold ``other``. Costs a DMA per physical segment
    touched (see :mod:`kbus.lang.memory`).
    """
    ctx = require("kl.load")
    if not isinstance(pointer, Pointer):
        raise TypeError(f"kl.load needs a pointer (a tensor argument plus offsets), got {type(pointer).__name__}")
    if pointer._batched or type(mask) is Batched or type(other) is Batched:
        return _load_batched(ctx, pointer, mask, other)  # type: ignore[return-value]
    m = _mask(mask, f"kl.load from {pointer.name}")
    offs = pointer._offsets
    if m is not None:
        if m.shape != offs.shape:
            offs, m = _broadcast(f"kl.load from {pointer.name}", pointer=offs, mask=m)
        if m.all():
            m = None  # the common full block: no lane selection needed
    return ctx.load(pointer.layout, offs, m, other, pointer.name).view(Tile)


def _lift(x: Any, nd: int, b: int) -> npt.NDArray[Any]:
    """``x`` (batched or not) as an array with the instance dimension first, ``nd`` logical dimensions."""
    if type(x) is Batched:
        d = x.data
        return d.reshape(d.shape[:1] + (1,) * (nd + 1 - d.ndim) + d.shape[1:])
    a = np.asarray(_raw(x))
    return a.reshape((1,) * (nd + 1 - a.ndim) + a.shape)


def _batched_parts(what: str, b: int, **parts: Any) -> list[npt.NDArray[Any]]:
    """Broadcast the parts of a batched access to one ``(B, *shape)``, as one instance would broadcast them."""
    nd = builtins.max(
        _batch._lnd(v) if type(v) is not Pointer else v._offsets.ndim - v._batched for v in parts.values()
    )
    arrays = []
    for v in parts.values():
        if type(v) is Pointer:
            o = v._offsets
            arrays.append(
                o.reshape(o.shape[:1] + (1,) * (nd + 1 - o.ndim) + o.shape[1:])
                if v._batched
                else o.reshape((1,) * (nd + 1 - o.ndim) + o.shape)
            )
        else:
            arrays.append(_lift(v, nd, b))
    try:
        out = np.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in parts.items())
        raise ValueError(f"{what}: shapes do not broadcast: {shapes}") from None
    shape = (b, *out[0].shape[1:])
    return [np.broadcast_to(a, shape) for a in out]


def _load_batched(ctx: Any, pointer: Pointer, mask: Any, other: Any) -> Batched:
    what = f"kl.load from {pointer.name}"
    if type(other) is Batched or np.ndim(other) != 0:
        raise Unbatchable(f"{what}: other= that is not a scalar")
    b = ctx.size
    if mask is None:
        (offs,) = _batched_parts(what, b, pointer=pointer)
        m = None
    else:
        if type(mask) is not Batched:
            _mask(mask, what)
        elif mask.dtype != np.bool_:
            raise TypeError(f"{what}: mask must be boolean (e.g. offs < n), got {mask.dtype}")
        offs, m = _batched_parts(what, b, pointer=pointer, mask=mask)
        if m.all():
            m = None
    return Batched(ctx.load_batched(pointer.layout, offs, m, other, pointer.name), _batch._TILE)


def store(pointer: Pointer, value: Any, mask: Any = None) -> None:
    """Write ``value`` (broadcast, converted to the pointer's dtype) where ``mask`` is True."""
    ctx = require("kl.store")
    if not isinstance(pointer, Pointer):
        raise TypeError(f"kl.store needs a pointer (a tensor argument plus offsets), got {type(pointer).__name__}")
    what = f"kl.store to {pointer.name}"
    if pointer._batched or type(value) is Batched or type(mask) is Batched:
        _store_batched(ctx, pointer, value, mask, what)
        return
    m = _mask(mask, what)
    vals = np.asarray(_raw(value))
    if vals.dtype.kind not in "biuf":
        raise TypeError(f"{what}: cannot store values of dtype {vals.dtype}")
    arrays: dict[str, Any] = {"pointer": pointer._offsets, "value": vals}
    if m is not None:
        arrays["mask"] = m
    if vals.shape == pointer.shape and (m is None or m.shape == vals.shape):
        offs = pointer._offsets
    else:
        parts = _broadcast(what, **arrays)
        offs, vals = parts[0], parts[1]
        m = parts[2] if m is not None else None
    if m is not None and m.all():
        m = None
    ctx.store(pointer.layout, offs, m, vals.astype(pointer.dtype, copy=False), pointer.name)


def _store_batched(ctx: Any, pointer: Pointer, value: Any, mask: Any, what: str) -> None:
    b = ctx.size
    vdt = value.dtype if type(value) is Batched else np.asarray(_raw(value)).dtype
    if vdt.kind not in "biuf":
        raise TypeError(f"{what}: cannot store values of dtype {vdt}")
    if type(value) is Batched and value.kind == _batch._PY:
        raise Unbatchable(f"{what}: storing a Python scalar that differs per instance")
    if mask is not None and type(mask) is not Batched:
        _mask(mask, what)
    elif type(mask) is Batched and mask.dtype != np.bool_:
        raise TypeError(f"{what}: mask must be boolean (e.g. offs < n), got {mask.dtype}")
    parts = {"pointer": pointer, "value": value} if mask is None else {"pointer": pointer, "value": value, "mask": mask}
    arrays = _batched_parts(what, b, **parts)
    offs, vals = arrays[0], arrays[1]
    m = arrays[2] if mask is not None else None
    if m is not None and m.all():
        m = None
    ctx.store_batched(pointer.layout, offs, m, vals.astype(pointer.dtype, copy=False), pointer.name)


# ------------------------------------------------------------- arithmetic
def where(condition: Any, x: Any, y: Any) -> Tile:
    """Elementwise ``x if condition else y`` (one operation per element)."""
    if Batched in (type(condition), type(x), type(y)):
        return _where_batched(condition, x, y)  # type: ignore[return-value]
    c = np.asarray(_raw(condition))
    if c.dtype != np.bool_:
        raise TypeError(f"kl.where: condition must be boolean, got {c.dtype}")
    out = np.where(c, _raw(x), _raw(y))
    _count(out.size)
    return _tile(out)


def _where_batched(condition: Any, x: Any, y: Any) -> Batched:
    ctx: Any = require("kl.where")
    if any(type(v) is Batched and v.kind == _batch._PY for v in (x, y)):
        raise Unbatchable("kl.where on Python scalars that differ per instance")
    c = condition.data if type(condition) is Batched else np.asarray(_raw(condition))
    if c.dtype != np.bool_:
        raise TypeError(f"kl.where: condition must be boolean, got {c.dtype}")
    nd = builtins.max(_batch._lnd(v) for v in (condition, x, y))
    b = ctx.size
    parts = [_lift(v, nd, b) if type(v) is Batched or isinstance(v, np.ndarray) else _raw(v) for v in (condition, x, y)]
    out = np.where(*parts)
    if out.shape[0] != b:
        out = np.broadcast_to(out, (b, *out.shape[1:])).copy()
    ctx.flops += out.size // b
    return Batched(out, _batch._TILE)


def _reduce(fn: Any, name: str, x: Any, axis: int | None, keep_dims: bool) -> Tile:
    if type(x) is Batched:
        nd = x.ndim
        if axis is not None and not -nd <= axis < builtins.max(nd, 1):
            raise ValueError(f"kl.{name}: axis {axis} is out of range for a tile of shape {x.shape}")
        if x.size == 0 and name in ("max", "min"):
            raise ValueError(f"kl.{name} of an empty tile")
        if nd == 0:
            raise Unbatchable(f"kl.{name} of a 0-d value")
        axes = tuple(range(1, nd + 1)) if axis is None else (axis % nd + 1,)
        require(f"kl.{name}").flops += x.size
        return Batched(np.asarray(fn(x.data, axis=axes, keepdims=keep_dims)), _batch._TILE)  # type: ignore[return-value]
    arr = np.asarray(_raw(x))
    if axis is not None and not -arr.ndim <= axis < builtins.max(arr.ndim, 1):
        raise ValueError(f"kl.{name}: axis {axis} is out of range for a tile of shape {arr.shape}")
    if arr.size == 0 and name in ("max", "min"):
        raise ValueError(f"kl.{name} of an empty tile")
    _count(arr.size)
    return _tile(fn(arr, axis=axis, keepdims=keep_dims))


def sum(x: Any, axis: int | None = None, keep_dims: bool = False) -> Tile:
    """Sum along ``axis`` (all axes when None)."""
    return _reduce(np.sum, "sum", x, axis, keep_dims)


def max(x: Any, axis: int | None = None, keep_dims: bool = False) -> Tile:
    """Maximum along ``axis`` (all axes when None)."""
    return _reduce(np.max, "max", x, axis, keep_dims)


def min(x: Any, axis: int | None = None, keep_dims: bool = False) -> Tile:
    """Minimum along ``axis`` (all axes when None)."""
    return _reduce(np.min, "min", x, axis, keep_dims)


def _accumulator(a: np.dtype[Any], b: np.dtype[Any]) -> np.dtype[Any]:
    """What a matrix unit accumulates in: at least float32 for floats, int64 for integers."""
    rt = np.result_type(a, b)
    if rt.kind == "f":
        return np.dtype(np.float64) if rt.itemsize >= 8 else np.dtype(np.float32)
    return np.dtype(np.int64)


def dot(a: Any, b: Any, acc: Any = None) -> Tile:
    """Matrix product of 2-D tiles ``a`` (M x K) and ``b`` (K x N), plus ``acc`` when given.

    Accumulates in float32 for float inputs (float64 if either is float64) and
    in int64 for integers. Costs ``2*M*N*K`` operations (+ ``M*N`` for acc).
    """
    if Batched in (type(a), type(b), type(acc)):
        return _dot_batched(a, b, acc)  # type: ignore[return-value]
    x, y = np.asarray(_raw(a)), np.asarray(_raw(b))
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"kl.dot needs 2-D tiles, got shapes {x.shape} and {y.shape}")
    if x.shape[1] != y.shape[0]:
        raise ValueError(f"kl.dot: inner dimensions differ: {x.shape} @ {y.shape}")
    dt = _accumulator(x.dtype, y.dtype)
    out = np.matmul(x.astype(dt, copy=False), y.astype(dt, copy=False))
    m, k = x.shape
    n = y.shape[1]
    _count(2 * m * n * k)
    if acc is not None:
        c = np.asarray(_raw(acc))
        if c.shape != out.shape:
            raise ValueError(f"kl.dot: acc has shape {c.shape}, the product has shape {out.shape}")
        out = out + c
        _count(out.size)
    return _tile(out)


def _dot_batched(a: Any, b: Any, acc: Any) -> Batched:
    """``kl.dot`` per instance: one ``matmul`` call per instance, so every product is bit-for-bit
    what the instance alone computes (a stacked matmul may sum in another order)."""
    ctx: Any = require("kl.dot")
    n = ctx.size
    xs = a.data if type(a) is Batched else np.asarray(_raw(a))
    ys = b.data if type(b) is Batched else np.asarray(_raw(b))
    xshape = xs.shape[1:] if type(a) is Batched else xs.shape
    yshape = ys.shape[1:] if type(b) is Batched else ys.shape
    if len(xshape) != 2 or len(yshape) != 2:
        raise ValueError(f"kl.dot needs 2-D tiles, got shapes {xshape} and {yshape}")
    if xshape[1] != yshape[0]:
        raise ValueError(f"kl.dot: inner dimensions differ: {xshape} @ {yshape}")
    dt = _accumulator(xs.dtype, ys.dtype)
    x_of = (lambda i: xs[i]) if type(a) is Batched else (lambda i: xs)
    y_of = (lambda i: ys[i]) if type(b) is Batched else (lambda i: ys)
    out = np.stack([np.matmul(x_of(i).astype(dt, copy=False), y_of(i).astype(dt, copy=False)) for i in range(n)])
    m, k = xshape
    ctx.flops += 2 * m * yshape[1] * k
    if acc is not None:
        c = acc.data if type(acc) is Batched else np.asarray(_raw(acc))
        cshape = c.shape[1:] if type(acc) is Batched else c.shape
        if cshape != out.shape[1:]:
            raise ValueError(f"kl.dot: acc has shape {cshape}, the product has shape {out.shape[1:]}")
        out = out + c
        ctx.flops += out.size // n
    return Batched(out, _batch._TILE)


def _apply(fn: np.ufunc, *args: Any) -> Tile:
    if type(args[0]) is Batched or (len(args) > 1 and type(args[1]) is Batched):
        res = _batch.ufunc(fn, "__call__", args, {})
        if res.kind != _batch._TILE:  # kl.exp(python_scalar) is a counted tile, unlike np.exp
            require(f"kl.{fn.__name__}").flops += res.size
            res.kind = _batch._TILE
        return res  # type: ignore[return-value]
    out = fn(*(_raw(a) for a in args))
    _count(int(np.size(out)))
    return _tile(out)


def exp(x: Any) -> Tile:
    """Elementwise e**x."""
    return _apply(np.exp, x)


def log(x: Any) -> Tile:
    """Elementwise natural logarithm."""
    return _apply(np.log, x)


def sqrt(x: Any) -> Tile:
    """Elementwise square root."""
    return _apply(np.sqrt, x)


def abs(x: Any) -> Tile:
    """Elementwise absolute value."""
    return _apply(np.abs, x)


def maximum(x: Any, y: Any) -> Tile:
    """Elementwise maximum (NaN propagates, as in numpy)."""
    return _apply(np.maximum, x, y)


def minimum(x: Any, y: Any) -> Tile:
    """Elementwise minimum (NaN propagates, as in numpy)."""
    return _apply(np.minimum, x, y)


def cdiv(a: Any, b: Any) -> Any:
    """Ceiling division ``ceil(a / b)`` for integers (and integer tiles); usable on the host too."""
    if isinstance(a, int | np.integer) and isinstance(b, int | np.integer):
        if b == 0:
            raise ZeroDivisionError(f"kl.cdiv({a}, {b}): division by zero")
        return -(-int(a) // int(b))
    return -(-a // b)
