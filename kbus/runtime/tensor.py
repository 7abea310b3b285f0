"""``kbus.Tensor``: a host handle on device memory, awaitable and torch-like.

A :class:`Tensor` is returned at once by every factory and operation; the
work that fills it is queued on the runtime's work queue. ``await t`` waits
until it is ready (and raises the device error if its work failed), and
``await t.numpy()`` reads it back. Nothing blocks: ``np.asarray(t)``,
``float(t)``, ``bool(t)``... raise ``TypeError`` pointing at ``await t.numpy()``,
because a synchronous readback would have to stall the event loop that runs
the simulation.

The handle and its memory are separate objects. :class:`_Storage` holds the
allocation (shards, VA range, pending work) and is what queued commands and
scopes refer to, so dropping the last reference to a ``Tensor`` frees its
memory through a ``weakref.finalize`` even while work that reads it is still
queued: the free itself waits for that work.

A tensor asks its runtime for work only through :class:`TensorBackend`, the
small named interface :class:`~kbus.runtime.Runtime` implements (checks,
readback, the arithmetic, copies, freeing); nothing here reaches into the
runtime's private state.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import TensorFreedError
from ..protocol import TensorArg, TensorArgShard
from ..sim import SimFuture
from .builtins import TensorDesc
from .policy import Coord, DPPolicy, Placement
from .queue import observe

if TYPE_CHECKING:
    from types import TracebackType

    from .runtime import Runtime

__all__ = ["ShardInfo", "Tensor", "TensorBackend"]


class TensorBackend(Protocol):
    """What a :class:`Tensor` asks of the runtime that made it (``Runtime`` implements it)."""

    def check_tensor(self, t: Tensor, where: str) -> None:
        """Raise if ``t`` cannot be used here (another device, closed runtime, freed)."""

    def read_tensor(self, t: Tensor) -> SimFuture[npt.NDArray[Any]]:
        """Queue a readback of ``t``; the future resolves to its values."""

    def binary_op(self, op: str, x: object, y: object) -> Tensor:
        """``x <op> y`` for ``op`` in add/sub/mul/div (tensors or scalars, broadcasting)."""

    def neg_op(self, x: Tensor) -> Tensor: ...

    def matmul_op(self, a: object, b: object) -> Tensor: ...

    def sum_op(self, x: Tensor, dim: int | tuple[int, ...] | None) -> Tensor: ...

    def copy_op(self, x: Tensor, policy: DPPolicy | None, dtype: Any, what: str) -> Tensor:
        """A copy of ``x`` (``clone`` or ``to``), placed by ``policy``."""

    def free_storage(self, st: _Storage, by: str) -> None:
        """Free ``st``'s device memory once the work queued on it is done."""

    def schedule_collect(self, st: _Storage) -> None:
        """Free ``st`` from a loop callback (a garbage-collected tensor)."""


@attrs.frozen
class ShardInfo:
    """Where one shard (or replica) of a tensor lives.

    ``offset`` is where the shard's block starts in the tensor's storage,
    ``va`` the virtual address of its first byte, ``index`` the logical
    region it holds (a tuple of slices, usable as ``array[index]``).
    """

    sip: int
    cube: int
    pe: int
    pa: int
    nbytes: int
    offset: int
    va: int
    index: tuple[slice, ...]

    @property
    def coord(self) -> Coord:
        return (self.sip, self.cube, self.pe)

    @property
    def path(self) -> str:
        """The owning PE's block path, ``"sip0.cube1.pe3"``."""
        return f"sip{self.sip}.cube{self.cube}.pe{self.pe}"


class _Storage:
    """The device memory of one tensor and the bookkeeping of the work on it.

    ``ready`` is the future of the last command that wrote it; ``readers``
    the futures of queued commands that read it (a free or a rewrite waits
    for both). ``mapped`` lists the unmap messages that undo the mappings
    that succeeded. Never references a :class:`Tensor`.
    """

    __slots__ = (
        "__weakref__",
        "alloc_kind",
        "desc",
        "dtype",
        "free_done",
        "freed",
        "mapped",
        "name",
        "placement",
        "readers",
        "ready",
        "runtime",
        "shape",
        "shards",
        "va",
        "va_size",
    )

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        placement: Placement,
        dtype: np.dtype[Any],
        va: int,
        va_size: int,
        shards: tuple[ShardInfo, ...],
        alloc_kind: str,
        ready: SimFuture[Any],
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.placement = placement
        self.shape = placement.shape
        self.dtype = dtype
        self.va = va
        self.va_size = va_size
        self.shards = shards
        self.alloc_kind = alloc_kind
        self.ready = ready
        self.readers: dict[SimFuture[Any], None] = {}
        self.mapped: list[Any] = []
        self.freed: str | None = None
        self.free_done: SimFuture[Any] | None = None
        self.desc = TensorDesc(
            dtype,
            self.shape,
            placement.shard_dim,
            va,
            tuple(TensorArgShard(s.sip, s.cube, s.pe, s.pa, s.nbytes, s.offset) for s in shards),
            runtime.config.memory.page_size,
        )

    @property
    def policy(self) -> DPPolicy:
        return self.placement.policy

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        """``'t3' (shape (4, 6), float32, Shard(dim=0, ...))`` for error messages."""
        return f"{self.name!r} (shape {self.shape}, {self.dtype}, {self.policy!r})"


def _no_sync(what: str, t: Tensor) -> NoReturn:
    raise TypeError(
        f"{what} of kbus tensor {t._storage.describe()} would need a blocking readback from the device; "
        "use `await t.numpy()` (or `await t.item()` for one element)"
    )


class Tensor:
    """A tensor in device memory.

    Create tensors with the runtime handle (``torch.tensor``, ``torch.zeros``...).
    Attributes are known at once: ``shape``, ``dtype``, ``policy``, ``addr``
    (the VA base), ``nbytes`` and ``shards``. Operators (``+ - * / @``, unary
    ``-``), ``sum``, ``clone`` and ``to`` queue work and return new tensors.
    """

    __slots__ = ("__weakref__", "_finalizer", "_storage")

    __array_ufunc__ = None  # numpy defers to our reflected operators instead of converting us

    def __init__(self, storage: _Storage) -> None:
        self._storage = storage
        rt_ref = weakref.ref(storage.runtime)
        self._finalizer = weakref.finalize(self, _collect, rt_ref, storage)
        self._finalizer.atexit = False  # never run at interpreter exit: the loop is gone by then

    # -- attributes ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._storage.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self._storage.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._storage.dtype

    @property
    def policy(self) -> DPPolicy:
        return self._storage.policy

    @property
    def shard_dim(self) -> int:
        """The dimension the shards split (``-1`` for a replicated tensor), as in the kernel argument convention."""
        return self._storage.placement.shard_dim

    @property
    def ndim(self) -> int:
        return len(self._storage.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self._storage.shape)

    def numel(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self._storage.nbytes

    @property
    def addr(self) -> int:
        """The VA base of the tensor (0 for a tensor with no elements)."""
        return self._storage.va

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        """One entry per shard (sharded) or per replica (replicated), in storage order."""
        return self._storage.shards

    @property
    def va_contiguous(self) -> bool:
        """True when ``addr + element_offset * itemsize`` addresses every element (row-major order).

        Holds for replicated tensors and for sharded tensors whose storage
        order is row-major and whose shards (all but the last) are whole pages.
        """
        st = self._storage
        if st.placement.replicated or len(st.shards) <= 1:
            return True
        d = st.placement.shard_dim
        if math.prod(st.shape[:d]) != 1:
            return False
        return all(s.va == st.va + s.offset for s in st.shards)

    @property
    def is_freed(self) -> bool:
        return self._storage.freed is not None

    @property
    def device(self) -> Runtime:
        """The runtime handle this tensor belongs to."""
        return self._storage.runtime

    @property
    def _backend(self) -> TensorBackend:
        return self._storage.runtime

    def tensor_arg(self) -> TensorArg:
        """The protocol ``TensorArg`` of this tensor (shards and VA base)."""
        self._backend.check_tensor(self, "tensor_arg()")
        return TensorArg(self._storage.desc.shards, va_base=self._storage.va)

    # -- waiting and readback ------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Tensor]:
        return self._wait().__await__()

    async def _wait(self) -> Tensor:
        self._backend.check_tensor(self, "await")
        try:
            await self._storage.ready
        except Exception as exc:
            observe(exc)  # a failure reported elsewhere (a kernel launch's) has now reached the user
            raise
        return self

    def numpy(self) -> SimFuture[npt.NDArray[Any]]:
        """Queue a readback; ``await t.numpy()`` returns a new numpy array."""
        return self._backend.read_tensor(self)

    def item(self) -> Awaitable[int | float]:
        """``await t.item()``: the value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element; {self._storage.describe()} has {self.size}")
        fut = self.numpy()

        async def get() -> int | float:
            arr = await fut
            value: int | float = arr.reshape(()).item()
            return value

        return get()

    # -- operations -------------------------------------------------------------------

    def __add__(self, other: object) -> Tensor:
        return self._backend.binary_op("add", self, other)

    def __radd__(self, other: object) -> Tensor:
        return self._backend.binary_op("add", other, self)

    def __sub__(self, other: object) -> Tensor:
        return self._backend.binary_op("sub", self, other)

    def __rsub__(self, other: object) -> Tensor:
        return self._backend.binary_op("sub", other, self)

    def __mul__(self, other: object) -> Tensor:
        return self._backend.binary_op("mul", self, other)

    def __rmul__(self, other: object) -> Tensor:
        return self._backend.binary_op("mul", other, self)

    def __truediv__(self, other: object) -> Tensor:
        return self._backend.binary_op("div", self, other)

    def __rtruediv__(self, other: object) -> Tensor:
        return self._backend.binary_op("div", other, self)

    def __neg__(self) -> Tensor:
        return self._backend.neg_op(self)

    def __pos__(self) -> Tensor:
        return self

    def __matmul__(self, other: object) -> Tensor:
        return self._backend.matmul_op(self, other)

    def __rmatmul__(self, other: object) -> Tensor:
        return self._backend.matmul_op(other, self)

    def sum(self, dim: int | tuple[int, ...] | None = None) -> Tensor:
        """Sum over ``dim`` (an int, a tuple, or None for every element) like ``numpy.sum``."""
        return self._backend.sum_op(self, dim)

    def clone(self) -> Tensor:
        """A copy with the same placement."""
        return self._backend.copy_op(self, None, None, "clone")

    def to(self, policy: DPPolicy | None = None, *, dtype: Any = None) -> Tensor:
        """A copy redistributed to ``policy`` and/or cast to ``dtype`` (the data moves device-side)."""
        return self._backend.copy_op(self, policy, dtype, "to")

    # -- lifetime ------------------------------------------------------------------------

    def free(self) -> None:
        """Free the device memory now (queued behind the work that uses it).

        Freeing twice is harmless; using the tensor afterwards raises
        :class:`~kbus.TensorFreedError`.
        """
        self._finalizer.detach()
        self._backend.free_storage(self._storage, "free()")

    def __enter__(self) -> Tensor:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.free()

    async def __aenter__(self) -> Tensor:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.free()
        done = self._storage.free_done
        if done is not None:
            await done

    # -- no synchronous readback -------------------------------------------------------------

    def __array__(self, dtype: Any = None, copy: Any = None) -> NoReturn:
        _no_sync("np.asarray()", self)

    def __float__(self) -> NoReturn:
        _no_sync("float()", self)

    def __int__(self) -> NoReturn:
        _no_sync("int()", self)

    def __index__(self) -> NoReturn:
        _no_sync("using as an index", self)

    def __bool__(self) -> NoReturn:
        _no_sync("bool() (truth value)", self)

    def __complex__(self) -> NoReturn:
        _no_sync("complex()", self)

    def __iter__(self) -> NoReturn:
        _no_sync("iterating", self)

    def __len__(self) -> int:
        if not self._storage.shape:
            raise TypeError(f"len() of a 0-d tensor {self._storage.describe()}")
        return self._storage.shape[0]

    def __repr__(self) -> str:
        st = self._storage
        if st.freed is not None:
            state = "freed"
        elif not st.ready.done():
            state = "pending"
        else:
            try:
                st.ready.result()
                state = "ready"
            except BaseException:
                state = "failed"
        return (
            f"<kbus.Tensor {st.name!r} shape={st.shape} {st.dtype} {st.policy!r} "
            f"{len(st.shards)} shard(s) at VA {st.va:#x} {state}>"
        )


def _collect(rt_ref: weakref.ref[Runtime], storage: _Storage) -> None:
    """``weakref.finalize`` callback of a dropped Tensor: schedule its free on the loop.

    It may run anywhere the garbage collector runs, so it only schedules: the
    free (queue work, allocator updates) happens in a clean loop callback. It
    does nothing once the runtime or its loop is closed (interpreter exit).
    """
    rt = rt_ref()
    if rt is None or storage.freed is not None:
        return
    rt.schedule_collect(storage)


def check_freed(t: Tensor, what: str) -> None:
    """Raise :class:`TensorFreedError` naming ``t`` and how it was freed."""
    st = t._storage
    if st.freed is not None:
        raise TensorFreedError(f"{what}: tensor {st.describe()} was freed by {st.freed} and cannot be used any more")
