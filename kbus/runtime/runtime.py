"""The host runtime: ``open_device`` and the ``torch`` handle.

``async with kbus.open_device("tiny") as torch:`` builds a :class:`~kbus.Sim`
and a device on the running loop and yields a :class:`Runtime`, the torch-like
namespace that creates tensors and runs operations on them.

How work flows
--------------
Every factory and operation is synchronous on the host: it checks its inputs,
allocates device memory from the host-side allocators (so ``t.addr`` and
``t.shards`` are known at once and an out-of-memory error is raised at the
call), and puts a *command* on the runtime's FIFO work queue. One simulated
daemon task takes commands off the queue in order and starts each as a
simulated task; a command first waits for the commands that produce its
inputs, maps its output's VA range, then sends its protocol messages
(MemoryWriteMsg, KernelLaunchMsg, ...) through ``device.request``. Commands
without a dependency between them overlap on the device, and because the
engine breaks ties by insertion order, the same program always takes the same
virtual time.

A command that fails stores its error in its output tensor's future (``await
t`` raises it, naming the operation, the tensors and their shapes); commands
that depend on it fail the same way; everything else, and the device, carry on.

Memory lifetime
---------------
Freeing (``t.free()``, ``del t``, leaving a scope, closing the device) returns
the tensor's physical and virtual ranges to the host allocators *at once* and
queues a command that waits for all queued work touching the tensor, then
unmaps it. A new tensor that reuses any of those ranges waits for that unmap
before it maps or writes anything, so memory is never reused under a reader
and a program that frees in a loop without awaiting does not run out of memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import itertools
import math
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import anyio
import attrs
import numpy as np
import numpy.typing as npt

from ..errors import DeadlockError, DeviceError, KbusError, KernelError, OutOfDeviceMemory
from ..hw import Device, DeviceConfig, build_device
from ..mem import PEMemAllocator, VirtualAllocator, format_bytes
from ..protocol import (
    HostMessage,
    KernelArg,
    KernelLaunchMsg,
    KernelRef,
    MapEntry,
    MemoryReadMsg,
    MemoryWriteMsg,
    MmuMapMsg,
    MmuUnmapMsg,
    PeTarget,
    ResponseMsg,
    Targets,
    UnmapEntry,
)
from ..sim import Inbox, Sim, SimFuture
from . import builtins as _builtins
from .builtins import DTYPE_NAMES, DTYPES_BY_NAME, encode_scalar, encode_tensor, page_round, run_concurrently
from .policy import Coord, DPPolicy, Replicate, Shard, place, resolve_targets
from .tensor import ShardInfo, Tensor, _Storage, check_freed

if TYPE_CHECKING:
    import os
    from types import TracebackType

    from ..hw.device import KernelFn

__all__ = ["MemoryLeakError", "MemoryStats", "PeMemory", "Runtime", "Scope", "open_device"]

T = TypeVar("T")

_SYMBOLS: Final = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_UFUNCS: Final = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide}
_SUPPORTED: Final = ", ".join(str(d) for d in DTYPE_NAMES)


class MemoryLeakError(KbusError, RuntimeError):
    """Device memory or mappings were still held when the device closed (a runtime bug)."""


# ---------------------------------------------------------------------------
# Memory statistics.
# ---------------------------------------------------------------------------


@attrs.frozen
class PeMemory:
    """Bytes in use and free on one PE (allocations are whole pages)."""

    coord: Coord
    hbm_used: int
    hbm_free: int
    sram_used: int
    sram_free: int

    @property
    def used(self) -> int:
        return self.hbm_used + self.sram_used

    @property
    def free(self) -> int:
        return self.hbm_free + self.sram_free


@attrs.frozen
class MemoryStats:
    """A snapshot of device memory use, from the host allocators (see :meth:`Runtime.memory_stats`)."""

    per_pe: dict[Coord, PeMemory]
    used: int
    """Bytes allocated on all PEs (HBM + SRAM)."""
    free: int
    """Bytes free on all PEs (HBM + SRAM)."""
    va_used: int
    va_free: int
    live_tensors: int
    """Tensors not freed yet."""
    pending_frees: int
    """Frees whose unmap is still queued or in flight."""

    def __str__(self) -> str:
        busy = [m for m in self.per_pe.values() if m.used]
        lines = [
            f"{self.live_tensors} live tensor(s); {format_bytes(self.used)} used, {format_bytes(self.free)} free "
            f"on {len(self.per_pe)} PE(s); VA {format_bytes(self.va_used)} used; {self.pending_frees} pending free(s)"
        ]
        lines += [
            f"  sip{m.coord[0]}.cube{m.coord[1]}.pe{m.coord[2]}: hbm {format_bytes(m.hbm_used)}, "
            f"sram {format_bytes(m.sram_used)}"
            for m in busy
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------


class _Command:
    """One unit of queued work; ``done`` resolves with its result or its (wrapped) error."""

    __slots__ = ("creates", "deps", "done", "label", "reads", "soft", "work")

    def __init__(
        self,
        label: str,
        done: SimFuture[Any],
        work: Callable[[], Awaitable[Any]] | None,
        *,
        deps: Sequence[tuple[SimFuture[Any], _Storage]] = (),
        soft: Sequence[SimFuture[Any]] = (),
        creates: Sequence[tuple[_Storage, list[SimFuture[Any]]]] = (),
        reads: Sequence[_Storage] = (),
    ) -> None:
        self.label = label
        self.done = done
        self.work = work
        self.deps = deps
        self.soft = soft
        self.creates = creates
        self.reads = reads


class _InputFailed(Exception):
    def __init__(self, storage: _Storage, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.storage = storage
        self.cause = cause


@attrs.define
class _Released:
    """Ranges handed back to the allocators whose unmap has not finished yet."""

    va: int
    va_size: int
    pas: dict[Coord, list[tuple[int, int]]]
    done: SimFuture[Any] | None = None


def _root(exc: BaseException) -> str:
    root = getattr(exc, "kbus_root", None)
    return root if isinstance(root, str) else f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# Scopes.
# ---------------------------------------------------------------------------

_SCOPES: contextvars.ContextVar[tuple[Scope, ...]] = contextvars.ContextVar("kbus_runtime_scopes", default=())


class Scope:
    """Frees the tensors created inside it when it exits, except those passed to :meth:`keep`.

    Use ``async with torch.scope() as scope:`` (the exit waits until the
    memory is unmapped) or ``with torch.scope() as scope:`` (the frees are
    queued). Scopes nest; a kept tensor belongs to the enclosing scope, if
    any. Scopes follow the current asyncio task (a ``ContextVar``), so two
    tasks opening scopes on one device do not see each other's tensors.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._storages: dict[int, _Storage] = {}
        self._token: contextvars.Token[tuple[Scope, ...]] | None = None
        self._open = False

    def keep(self, *tensors: Tensor) -> None:
        """Keep ``tensors`` alive past this scope (they move to the enclosing scope, if any)."""
        parent = self._parent()
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(f"scope.keep() takes tensors, got {type(t).__name__}")
            st = self._storages.pop(id(t._storage), None)
            if st is not None and parent is not None:
                parent._storages[id(st)] = st

    def _parent(self) -> Scope | None:
        stack = _SCOPES.get()
        if self in stack:
            stack = stack[: stack.index(self)]
        for s in reversed(stack):
            if s._rt is self._rt and s._open:
                return s
        return None

    def _enter(self) -> Scope:
        if self._open:
            raise RuntimeError("a scope cannot be entered twice")
        self._rt._check_open("scope()")
        self._open = True
        self._token = _SCOPES.set((*_SCOPES.get(), self))
        return self

    def _exit(self) -> list[SimFuture[Any]]:
        self._open = False
        try:
            if self._token is not None:
                _SCOPES.reset(self._token)
        except ValueError:  # exited in another context than entered: drop ourselves by hand
            _SCOPES.set(tuple(s for s in _SCOPES.get() if s is not self))
        self._token = None
        storages = list(self._storages.values())
        self._storages.clear()
        done = []
        for st in storages:
            self._rt._free_storage(st, "scope exit")
            if st.free_done is not None:
                done.append(st.free_done)
        return done

    def __enter__(self) -> Scope:
        return self._enter()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._exit()

    async def __aenter__(self) -> Scope:
        return self._enter()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for fut in self._exit():
            try:
                await fut
            except Exception:
                if e is None:
                    raise


# ---------------------------------------------------------------------------
# The runtime handle.
# ---------------------------------------------------------------------------

_runtime_ids = itertools.count(1)


def _target_groups(coords: Iterable[Coord], cfg: DeviceConfig) -> list[tuple[Targets, Targets, PeTarget]]:
    """Cover exactly the PEs ``coords`` with few ``(target_sips, target_cubes, target_pe)`` products.

    A message's targets are ``sips x cubes x pe`` where ``pe`` is one index or
    ``"all"``, so an arbitrary PE set may need several messages: one per PE
    index per SIP pattern, merged to ``"all"`` where a whole level is covered.
    """
    t = cfg.topology
    by_sip: dict[int, set[tuple[int, int]]] = {}
    for s, c, p in coords:
        by_sip.setdefault(s, set()).add((c, p))
    full = t.cubes_per_sip * t.pes_per_cube
    patterns: dict[tuple[tuple[Targets, PeTarget], ...], list[int]] = {}
    for s in sorted(by_sip):
        cps = by_sip[s]
        by_pe: dict[int, list[int]] = {}
        for c, p in sorted(cps):
            by_pe.setdefault(p, []).append(c)
        pattern: tuple[tuple[Targets, PeTarget], ...]

        def cubes(cs: list[int]) -> Targets:
            return "all" if len(cs) == t.cubes_per_sip else tuple(cs)

        if len(cps) == full:
            pattern = (("all", "all"),)
        elif len(by_pe) == t.pes_per_cube and len({tuple(v) for v in by_pe.values()}) == 1:
            pattern = ((cubes(by_pe[0]), "all"),)
        else:
            pattern = tuple((cubes(cs), p) for p, cs in sorted(by_pe.items()))
        patterns.setdefault(pattern, []).append(s)
    out: list[tuple[Targets, Targets, PeTarget]] = []
    for pattern, sips in patterns.items():
        sip_t: Targets = "all" if len(sips) == t.sips else tuple(sips)
        for cube_t, pe_t in pattern:
            out.append((sip_t, cube_t, pe_t))
    return out


def _shape_arg(args: tuple[Any, ...], where: str) -> tuple[int, ...]:
    """``f(2, 3)``, ``f((2, 3))`` and ``f([2, 3])`` all mean shape ``(2, 3)``."""
    if len(args) == 1 and not isinstance(args[0], (int, np.integer)):
        args = tuple(args[0])
    shape = []
    for n in args:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"{where}: shape entries must be ints, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"{where}: negative dimension {int(n)} in shape {tuple(int(x) for x in args)}")
        shape.append(int(n))
    return tuple(shape)


def _dtype(spec: Any, where: str) -> np.dtype[Any]:
    """A supported numpy dtype from a dtype, a type, a numpy name or a device name (``"f32"``)."""
    if isinstance(spec, str) and spec in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[spec]
    try:
        dt: np.dtype[Any] = np.dtype(spec)
    except TypeError:
        raise TypeError(f"{where}: {spec!r} is not a dtype") from None
    if dt not in DTYPE_NAMES:
        raise TypeError(f"{where}: dtype {dt} is not supported by kbus tensors; supported: {_SUPPORTED}")
    return dt


class Runtime:
    """The torch-like handle yielded by :func:`open_device` (by convention named ``torch``).

    Factories: :meth:`tensor`, :meth:`empty`, :meth:`zeros`, :meth:`ones`,
    :meth:`full`, :meth:`arange`, :meth:`rand`. Lifetime: :meth:`scope`,
    :meth:`synchronize`, :meth:`memory_stats`. Custom work: :meth:`launch`.
    Placement defaults to :attr:`default_policy` (``Shard(dim=0)`` over every PE).
    """

    float16: Final = np.dtype(np.float16)
    float32: Final = np.dtype(np.float32)
    float64: Final = np.dtype(np.float64)
    int8: Final = np.dtype(np.int8)
    int16: Final = np.dtype(np.int16)
    int32: Final = np.dtype(np.int32)
    int64: Final = np.dtype(np.int64)
    uint8: Final = np.dtype(np.uint8)
    uint16: Final = np.dtype(np.uint16)
    uint32: Final = np.dtype(np.uint32)
    uint64: Final = np.dtype(np.uint64)

    def __init__(self, device: Device) -> None:
        self.device = device
        self.sim: Sim = device.sim
        self.config: DeviceConfig = device.config
        self.default_policy: DPPolicy = Shard(dim=0)
        """Placement of tensors created without ``policy=``."""
        self.trace: Any = None
        """What ``kbus.trace.attach_from_open_device`` yielded (a trace session), or None."""
        self._cid = f"rt{next(_runtime_ids)}"
        self._rids = itertools.count(1)
        self._tids = itertools.count(1)
        self._bufs = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._closed = False
        self._allocs: dict[Coord, PEMemAllocator] = {}
        mem = self.config.memory
        self._va = VirtualAllocator(mem.va_base, mem.va_size, mem.page_size, name=f"{self._cid}.va")
        self._live: dict[int, _Storage] = {}
        self._released: list[_Released] = []
        self._inflight: dict[SimFuture[Any], None] = {}
        self._host_buffers: set[str] = set()
        self._rng = np.random.default_rng(0)
        self._queue: Inbox[_Command] = Inbox(self.sim, (_Command,), capacity=1 << 40, name=f"{self._cid}.queue")
        _builtins.install(device)
        self._dispatcher = self.sim.spawn(self._dispatch(), name=f"{self._cid}.dispatch", daemon=True)

    # -- clock and identity --------------------------------------------------------

    @property
    def now_ps(self) -> int:
        """Virtual time in integer picoseconds."""
        return self.sim.now

    @property
    def now_ns(self) -> float:
        """Virtual time in nanoseconds."""
        return self.sim.now / 1000

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._live)} live tensor(s)"
        return f"<kbus.Runtime {self._cid} on {self.device!r}, {state}>"

    def manual_seed(self, seed: int) -> None:
        """Seed the generator behind :meth:`rand` (it starts at seed 0, so runs are reproducible)."""
        self._rng = np.random.default_rng(seed)

    # -- factories --------------------------------------------------------------------

    def tensor(
        self,
        data: Any,
        *,
        dtype: Any = None,
        policy: DPPolicy | None = None,
        name: str | None = None,
        memory: str = "hbm",
    ) -> Tensor:
        """Upload ``data`` (array-like; copied at the call) into a new tensor.

        ``dtype`` defaults to numpy's (``np.asarray(data).dtype``). The bytes
        travel from a registered host buffer over PCIe (MemoryWriteMsg with
        ``src_kind="host_buffer_ref"``), one message per shard.
        """
        where = "torch.tensor()"
        self._check_open(where)
        if isinstance(data, Tensor):
            raise TypeError(f"{where}: {data._storage.describe()} is already a kbus tensor; use .clone() or .to()")
        arr = np.asarray(data)
        dt = arr.dtype if dtype is None else _dtype(dtype, where)
        if dtype is None:
            if not dt.isnative:
                dt = dt.newbyteorder("=")
            dt = _dtype(dt, where)
        src = arr.astype(dt, copy=False)

        def work(st: _Storage) -> Callable[[], Awaitable[None]]:
            snapshot = self._storage_bytes(src, st)
            return lambda: self._upload(st, snapshot, None)

        return self._create("tensor", arr.shape, dt, policy, name, memory, where, work, args=[])

    def empty(
        self,
        *shape: Any,
        dtype: Any = np.float32,
        policy: DPPolicy | None = None,
        name: str | None = None,
        memory: str = "hbm",
    ) -> Tensor:
        """An uninitialised tensor: allocated and mapped, nothing written (contents are whatever was there)."""
        where = "torch.empty()"
        return self._create("empty", _shape_arg(shape, where), _dtype(dtype, where), policy, name, memory, where, None)

    def zeros(
        self,
        *shape: Any,
        dtype: Any = np.float32,
        policy: DPPolicy | None = None,
        name: str | None = None,
        memory: str = "hbm",
    ) -> Tensor:
        """A tensor of zeros, filled device-side (pattern ``zeros``; no data crosses PCIe)."""
        where = "torch.zeros()"
        return self._filled("zeros", _shape_arg(shape, where), 0, _dtype(dtype, where), policy, name, memory, where)

    def ones(
        self,
        *shape: Any,
        dtype: Any = np.float32,
        policy: DPPolicy | None = None,
        name: str | None = None,
        memory: str = "hbm",
    ) -> Tensor:
        """A tensor of ones, filled device-side with a word pattern."""
        where = "torch.ones()"
        return self._filled("ones", _shape_arg(shape, where), 1, _dtype(dtype, where), policy, name, memory, where)

    def full(
        self,
        shape: Any,
        fill_value: int | float,
        *,
        dtype: Any = np.float32,
        policy: DPPolicy | None = None,
        name: str | None = None,
        memory: str = "hbm",
    ) -> Tensor:
        """A tensor of ``fill_value`` (converted as ``numpy.full`` does), filled device-side.

        The value's bytes become a fill pattern (``word32:0x40400000`` for
        3.0 in float32), so no data crosses PCIe.
        """
        where = "torch.full()"
        dims = _shape_arg((shape,), where)
        return self._filled("full", dims, fill_value, _dtype(dtype, where), policy, name, memory, where)

    def arange(
        self,
        start: int | float,
        end: int | float | None = None,
        step: int | float = 1,
        *,
        dtype: Any = None,
        policy: DPPolicy | None = None,
        name: str | None = None,
    ) -> Tensor:
        """``numpy.arange(start, end, step)`` as a tensor (numpy's dtype unless ``dtype`` is given)."""
        values = np.arange(start, end, step) if end is not None else np.arange(start, step=step)
        return self.tensor(values, dtype=dtype, policy=policy, name=name)

    def rand(
        self, *shape: Any, dtype: Any = np.float32, policy: DPPolicy | None = None, name: str | None = None
    ) -> Tensor:
        """Uniform floats in ``[0, 1)`` from the runtime's generator (see :meth:`manual_seed`)."""
        where = "torch.rand()"
        dims = _shape_arg(shape, where)
        dt = _dtype(dtype, where)
        if dt.kind != "f":
            raise TypeError(f"{where}: rand() makes floats in [0, 1); dtype {dt} is not a floating type")
        gen_dt = dt if dt != np.float16 else np.dtype(np.float32)
        values = self._rng.random(dims, dtype=gen_dt).astype(dt, copy=False)
        return self.tensor(values, policy=policy, name=name)

    def _filled(
        self,
        label: str,
        shape: tuple[int, ...],
        value: Any,
        dt: np.dtype[Any],
        policy: DPPolicy | None,
        name: str | None,
        memory: str,
        where: str,
    ) -> Tensor:
        self._check_open(where)
        if isinstance(value, Tensor) or not isinstance(value, (int, float, np.number, bool, np.bool_)):
            raise TypeError(f"{where}: the fill value must be a real number, got {type(value).__name__} {value!r}")
        raw = np.full((), value, dtype=dt).tobytes()
        word = int.from_bytes(raw, "little")
        # numpy turned the value into the dtype's bytes; the fill pattern repeats them as one word.
        pattern = f"byte:{word:#x}" if len(raw) == 1 else f"word{8 * len(raw)}:{word:#x}"
        if word == 0:
            pattern = "zeros"  # the store clears resident chunks only: cheaper than writing zeros

        def work(st: _Storage) -> Callable[[], Awaitable[None]]:
            return lambda: self._upload(st, None, pattern)

        return self._create(label, shape, dt, policy, name, memory, where, work)

    # -- operations (called by Tensor) -----------------------------------------------

    def _binary(self, op: str, x: object, y: object) -> Tensor:
        where = f"{_SYMBOLS[op]} ({op})"
        tensors = [v for v in (x, y) if isinstance(v, Tensor)]
        for v in (x, y):
            if isinstance(v, Tensor):
                self._check(v, where)
            elif isinstance(v, np.ndarray) or (hasattr(v, "__array__") and not isinstance(v, np.generic)):
                raise TypeError(
                    f"{where}: cannot combine a kbus tensor with a host {type(v).__name__}; "
                    "upload it first with torch.tensor(...)"
                )
            else:
                try:
                    encode_scalar(v)
                except TypeError as exc:
                    raise TypeError(f"{where}: unsupported operand: {exc}") from None
        probes: list[Any] = [np.empty((0,), v.dtype) if isinstance(v, Tensor) else v for v in (x, y)]
        try:
            with np.errstate(all="ignore"):
                dt = _UFUNCS[op](probes[0], probes[1]).dtype
        except OverflowError as exc:
            raise OverflowError(f"{where} with {self._names(x, y)}: {exc}") from None
        dt = _dtype(dt, where)
        try:
            shape = tuple(np.broadcast_shapes(*(t.shape for t in tensors)))
        except ValueError:
            a, b = tensors
            raise ValueError(
                f"{where}: shapes do not broadcast: {a._storage.describe()} and {b._storage.describe()}"
            ) from None
        same = [t for t in tensors if t.shape == shape]
        sharded = [t for t in same if isinstance(t.policy, Shard)]
        src = sharded[0] if sharded else (same[0] if same else tensors[0])
        policy = self._fit(src.policy, shape)
        label = f"{op}({self._names(x, y)})"
        operands = [x, y]

        def args(out: _Storage) -> list[KernelArg]:
            return [*encode_tensor(out.desc), *self._encode(operands[0]), *self._encode(operands[1])]

        return self._kernel_op(label, op, shape, dt, policy, [t._storage for t in tensors], args, where)

    def _neg(self, x: Tensor) -> Tensor:
        where = "- (neg)"
        self._check(x, where)
        return self._kernel_op(
            f"neg({self._names(x)})",
            "neg",
            x.shape,
            x.dtype,
            x.policy,
            [x._storage],
            lambda out: [*encode_tensor(out.desc), *encode_tensor(x._storage.desc)],
            where,
        )

    def _matmul(self, a: object, b: object) -> Tensor:
        where = "@ (matmul)"
        for v in (a, b):
            if not isinstance(v, Tensor):
                raise TypeError(f"{where}: both operands must be kbus tensors, got {type(v).__name__}")
        assert isinstance(a, Tensor) and isinstance(b, Tensor)
        self._check(a, where)
        self._check(b, where)
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"{where}: only 2-D @ 2-D is supported; got {a._storage.describe()} @ {b._storage.describe()}"
            )
        if a.shape[1] != b.shape[0]:
            raise ValueError(
                f"{where}: inner dimensions differ ({a.shape[1]} != {b.shape[0]}): "
                f"{a._storage.describe()} @ {b._storage.describe()}"
            )
        dt = _dtype(np.matmul(np.empty((0, 0), a.dtype), np.empty((0, 0), b.dtype)).dtype, where)
        shape = (a.shape[0], b.shape[1])
        pa, pb = a.policy, b.policy
        policy: DPPolicy
        if isinstance(pa, Shard):
            policy = Shard(dim=0, over=pa.over, targets=pa.targets)  # rows of the output follow a's owners
        elif isinstance(pb, Shard):
            policy = Shard(dim=1 if pb.dim % 2 == 1 else 0, over=pb.over, targets=pb.targets)
        else:
            policy = pa
        return self._kernel_op(
            f"matmul({self._names(a, b)})",
            "matmul",
            shape,
            dt,
            policy,
            [a._storage, b._storage],
            lambda out: [*encode_tensor(out.desc), *encode_tensor(a._storage.desc), *encode_tensor(b._storage.desc)],
            where,
        )

    def _sum(self, x: Tensor, dim: int | tuple[int, ...] | None) -> Tensor:
        where = "sum()"
        self._check(x, where)
        nd = x.ndim
        if dim is None:
            dims = tuple(range(nd))
        else:
            raw = (dim,) if isinstance(dim, (int, np.integer)) else tuple(dim)
            for d in raw:
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not -nd <= d < max(nd, 1):
                    raise ValueError(f"{where}: dim {d!r} is out of range for {x._storage.describe()}")
            dims = tuple(sorted({int(d) % max(nd, 1) for d in raw})) if nd else ()
        shape = tuple(n for i, n in enumerate(x.shape) if i not in dims)
        dt = _dtype(np.sum(np.empty((0,), x.dtype)).dtype, where)
        pol = x.policy
        st = x._storage
        label = f"sum({self._names(x)}, dim={dim!r})"

        def sum_args(out: _Storage, src: _Storage, mode: int, ds: tuple[int, ...]) -> list[KernelArg]:
            tail = [encode_scalar(mode), encode_scalar(len(ds)), *(encode_scalar(d) for d in ds)]
            return [*encode_tensor(out.desc), *encode_tensor(src.desc), *tail]

        if isinstance(pol, Replicate):
            return self._kernel_op(label, "sum", shape, dt, pol, [st], lambda out: sum_args(out, st, 0, dims), where)
        d = st.placement.shard_dim
        owners = [s.coord for s in st.shards]
        if nd and d not in dims:
            kept = [i for i in range(nd) if i not in dims]
            policy = Shard(dim=kept.index(d), over=pol.over, targets=pol.targets)
            return self._kernel_op(label, "sum", shape, dt, policy, [st], lambda out: sum_args(out, st, 0, dims), where)
        first = owners[0] if owners else resolve_targets(pol, self.config)[0]
        single = Shard(dim=0, targets=(first,))
        if len(owners) <= 1:
            return self._kernel_op(label, "sum", shape, dt, single, [st], lambda out: sum_args(out, st, 0, dims), where)
        # Across shards: each owner sums its own shard locally (phase 1), then
        # the first owner adds the per-shard partials (phase 2).
        partial_policy = Shard(dim=0, targets=tuple(owners))
        partials = self._kernel_op(
            f"{label} [phase 1: partial sums]",
            "sum",
            (len(owners), *shape),
            dt,
            partial_policy,
            [st],
            lambda out: sum_args(out, st, 1, dims),
            where,
            scoped=False,
        )
        pst = partials._storage
        result = self._kernel_op(label, "sum", shape, dt, single, [pst], lambda out: sum_args(out, pst, 0, (0,)), where)
        partials.free()
        return result

    def _copy(self, x: Tensor, policy: DPPolicy | None, dtype: Any, what: str) -> Tensor:
        where = f"{what}()"
        self._check(x, where)
        dt = x.dtype if dtype is None else _dtype(dtype, where)
        pol = x.policy if policy is None else policy
        return self._kernel_op(
            f"{what}({self._names(x)}, {pol!r}, {dt})",
            "copy",
            x.shape,
            dt,
            pol,
            [x._storage],
            lambda out: [*encode_tensor(out.desc), *encode_tensor(x._storage.desc)],
            where,
        )

    def _kernel_op(
        self,
        label: str,
        kernel: str,
        shape: tuple[int, ...],
        dt: np.dtype[Any],
        policy: DPPolicy,
        inputs: list[_Storage],
        make_args: Callable[[_Storage], list[KernelArg]],
        where: str,
        *,
        scoped: bool = True,
    ) -> Tensor:
        """Allocate the output, queue its map and the kernel launch on its owners."""

        def work(st: _Storage) -> Callable[[], Awaitable[None]]:
            args = tuple(make_args(st))
            owners = [s.coord for s in st.shards]

            async def run() -> None:
                if owners:
                    await self._launch(kernel, args, owners)

            return run

        return self._create(label, shape, dt, policy, None, "hbm", where, work, args=inputs, scoped=scoped)

    # -- generic launches ---------------------------------------------------------------

    def launch(
        self,
        name: Any,
        *args: object,
        targets: Sequence[Any] | None = None,
        grid: Any = None,
        placement: str = "spread",
        **constexprs: Any,
    ) -> Awaitable[Any]:
        """Run a kernel: a builtin by ``name``, or a :func:`kbus.kernel` over ``grid``.

        Builtins: ``torch.launch("add", a, b, out, targets=...)``; ``targets``
        is None (every PE) or PE coordinates / global PE indices. Tensor
        arguments are encoded as in :mod:`kbus.runtime.builtins`; the launch
        waits for every tensor argument, and since the kernel may write them,
        later work on them waits for the launch. ``await`` the result for the
        responses; a failure raises :class:`~kbus.KernelError`.

        Kernels of the kernel language: ``await torch.launch(kern, grid=(g0,),
        args=(x, y, out, n), BLOCK=256)`` (``args=`` or positional arguments,
        constexprs as keywords, ``placement="spread" | "owner"``) — the same
        as ``kern[grid](x, y, out, n, BLOCK=256)``.
        """
        if not isinstance(name, str):
            from ..lang import Kernel, queue_launch

            if not isinstance(name, Kernel):
                raise TypeError(
                    f"launch(): expected a builtin kernel name or a @kbus.kernel function, got {type(name).__name__}"
                )
            if grid is None:
                raise TypeError(f"launch({name.short_name}): grid= is required for a kernel launch")
            extra = constexprs.pop("args", ())
            kernel_args = (*tuple(extra), *args)
            return queue_launch(self, name, grid, kernel_args, placement=placement, **constexprs)
        if grid is not None or constexprs:
            bad = ", ".join(["grid", *constexprs] if grid is not None else list(constexprs))
            raise TypeError(f"launch({name!r}): builtin kernels take no {bad} argument(s)")
        return self._launch_builtin(name, *args, targets=targets)

    def kernel_cache_info(self) -> Any:
        """Program cache counters of the kernel language on this device (hits, misses, deployments...)."""
        from ..lang import kernel_cache_info

        return kernel_cache_info(self)

    def _launch_builtin(
        self, name: str, *args: object, targets: Sequence[Any] | None = None
    ) -> SimFuture[tuple[ResponseMsg, ...]]:
        where = f"launch({name!r})"
        self._check_open(where)
        if name not in self.device.builtins:
            known = ", ".join(sorted(self.device.builtins))
            raise ValueError(f"{where}: no builtin kernel {name!r} on this device (known: {known})")
        encoded: list[KernelArg] = []
        storages: list[_Storage] = []
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                self._check(a, where)
                encoded += encode_tensor(a._storage.desc)
                if a._storage not in storages:
                    storages.append(a._storage)
            else:
                try:
                    encoded.append(encode_scalar(a))
                except TypeError as exc:
                    raise TypeError(f"{where}: argument {i}: {exc}") from None
        coords = resolve_targets(Replicate(targets), self.config)
        frozen = tuple(encoded)
        return self._ordered(
            f"launch {name}({self._names(*args)})", lambda: self._launch(name, frozen, list(coords)), [], storages
        )

    def submit(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        reads: Sequence[Tensor] = (),
        writes: Sequence[Tensor] = (),
        label: str = "submit",
    ) -> SimFuture[T]:
        """Run ``fn()`` on the work queue, ordered like an operation on ``reads`` and ``writes``.

        ``fn`` starts once the work producing every tensor in ``reads`` and
        ``writes`` is done and, for ``writes``, once every queued reader of
        them is done too; later work on ``writes`` waits for ``fn``. It runs as
        a simulated task, so it may ``await device.request(...)`` (this is how
        a kernel language launches deployed kernels in queue order). Returns a
        future of ``fn``'s result; a failure fails ``writes`` like a failed
        operation.
        """
        where = f"submit({label!r})"
        self._check_open(where)
        for t in (*reads, *writes):
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: reads/writes take kbus tensors, got {type(t).__name__}")
            self._check(t, where)
        written = list(dict.fromkeys(t._storage for t in writes))
        read = [st for st in dict.fromkeys(t._storage for t in reads) if st not in written]
        return self._ordered(label, fn, read, written)

    def _ordered(
        self, label: str, fn: Callable[[], Awaitable[T]], reads: list[_Storage], writes: list[_Storage]
    ) -> SimFuture[T]:
        done: SimFuture[T] = self.sim.create_future(label)
        cmd = _Command(
            label,
            done,
            fn,
            deps=[(st.ready, st) for st in (*reads, *writes)],
            soft=[r for st in writes for r in st.readers],
            reads=[*reads, *writes],
        )
        self._enqueue(cmd)
        for st in writes:
            st.ready = done
        return done

    def register_builtin(self, name: str, fn: KernelFn) -> None:
        """Make ``fn`` (``async fn(pe_cpu, launch_msg) -> (error or None, value)``) launchable by ``name``."""
        self.device.builtins[name] = fn

    # -- lifetime ---------------------------------------------------------------------------

    def scope(self) -> Scope:
        """A :class:`Scope` that frees the tensors created inside it on exit."""
        return Scope(self)

    async def synchronize(self) -> None:
        """Wait until every queued command (including frees) has finished.

        Failures of commands are not raised here; they stay with the tensors
        they concern. A :class:`~kbus.DeadlockError` (work that can never
        finish) is raised.
        """
        while self._inflight:
            for fut in list(self._inflight):
                try:
                    await fut
                except Exception:
                    if not fut.done():  # not the command's own failure: the wait itself failed
                        raise

    def memory_stats(self) -> MemoryStats:
        """Per-PE bytes used and free, totals, VA use and the number of live tensors."""
        mem = self.config.memory
        per_pe: dict[Coord, PeMemory] = {}
        for coord in self.config.pe_coords():
            a = self._allocs.get(coord)
            if a is None:
                per_pe[coord] = PeMemory(coord, 0, mem.hbm_per_pe, 0, mem.sram_per_pe)
            else:
                per_pe[coord] = PeMemory(
                    coord, a.hbm.used_bytes, a.hbm.free_bytes, a.sram.used_bytes, a.sram.free_bytes
                )
        return MemoryStats(
            per_pe=per_pe,
            used=sum(m.used for m in per_pe.values()),
            free=sum(m.free for m in per_pe.values()),
            va_used=self._va.used_bytes,
            va_free=self._va.free_bytes,
            live_tensors=len(self._live),
            pending_frees=len(self._released),
        )

    def live_tensors(self) -> list[str]:
        """Descriptions of the tensors not freed yet (for leak hunting)."""
        return [st.describe() for st in self._live.values()]

    # -- internals: checks and names --------------------------------------------------------------

    def _check_open(self, where: str) -> None:
        if self._closed:
            raise RuntimeError(f"{where}: device runtime {self._cid} is closed (its open_device block has exited)")

    def _check(self, t: Tensor, where: str) -> None:
        st = t._storage
        if st.runtime is not self:
            raise ValueError(
                f"{where}: tensor {st.describe()} belongs to another device ({st.runtime._cid}, not {self._cid}); "
                "tensors cannot cross devices: read it back with `await t.numpy()` and upload it with torch.tensor()"
            )
        check_freed(t, where)

    def _names(self, *values: object) -> str:
        out = []
        for v in values:
            if isinstance(v, Tensor):
                st = v._storage
                out.append(f"{st.name!r} {st.shape} {st.dtype}")
            else:
                out.append(repr(v))
        return ", ".join(out)

    def _encode(self, v: object) -> list[KernelArg]:
        if isinstance(v, Tensor):
            return encode_tensor(v._storage.desc)
        return [encode_scalar(v)]

    def _fit(self, policy: DPPolicy, shape: tuple[int, ...]) -> DPPolicy:
        """``policy`` adjusted so it applies to ``shape`` (a shard dim beyond its rank falls back to 0)."""
        if isinstance(policy, Shard) and shape and not -len(shape) <= policy.dim < len(shape):
            return Shard(dim=0, over=policy.over, targets=policy.targets)
        return policy

    # -- internals: allocation ------------------------------------------------------------------------

    def _alloc_of(self, coord: Coord) -> PEMemAllocator:
        a = self._allocs.get(coord)
        if a is None:
            mem = self.config.memory
            hbm = mem.hbm_per_pe
            from ..lang import code_region

            code_pe, _pa, code_bytes = code_region(self.config)
            if coord == code_pe:
                hbm -= code_bytes  # the top of this slice holds deployed kernel code
            a = PEMemAllocator("sip{}.cube{}.pe{}".format(*coord), mem.sram_per_pe, hbm, mem.hbm_base)
            self._allocs[coord] = a
        return a

    def _emit_mem(self, name: str, coord: Coord, kind: str, args: dict[str, Any]) -> None:
        tracer = self.sim.tracer
        if tracer is None:
            return
        s, c, p = coord
        path = f"sip{s}.cube{c}.hbm" if kind == "hbm" else f"sip{s}.cube{c}.pe{p}.sram"
        tracer.emit("mem", name, path, self.sim.now, None, {"pe": f"sip{s}.cube{c}.pe{p}", **args})

    def _allocate(
        self,
        shape: tuple[int, ...],
        dt: np.dtype[Any],
        policy: DPPolicy,
        name: str,
        memory: str,
        where: str,
        ready: SimFuture[Any],
    ) -> _Storage:
        if memory not in ("hbm", "sram"):
            raise ValueError(f"{where}: memory must be 'hbm' or 'sram', got {memory!r}")
        placement = place(policy, shape, dt.itemsize, self.config)
        page = self.config.memory.page_size
        if placement.replicated:
            va_size = page_round(placement.nbytes, page) if placement.shards else 0
        else:
            va_size = sum(page_round(s.nbytes, page) for s in placement.shards)
        what = f"tensor {name!r} (shape {shape}, {dt}, {policy!r})"
        try:
            va = self._va.alloc(va_size) if va_size else 0
        except OutOfDeviceMemory as exc:
            raise OutOfDeviceMemory(
                f"{where}: no device virtual address range for {what}: {exc}",
                where=exc.where,
                requested=exc.requested,
                free=exc.free,
                largest=exc.largest,
            ) from None
        done: list[tuple[Coord, int]] = []
        try:
            for sp in placement.shards:
                done.append((sp.coord, self._alloc_of(sp.coord).alloc(page_round(sp.nbytes, page), memory)))
        except OutOfDeviceMemory as exc:
            for coord, pa in done:
                self._allocs[coord].free(pa)
            if va_size:
                self._va.free(va)
            per = "on each of" if placement.replicated else "over"
            raise OutOfDeviceMemory(
                f"{where}: cannot allocate {what}, {format_bytes(placement.nbytes)} {per} "
                f"{len(placement.shards)} PE(s): {exc}",
                where=exc.where,
                requested=exc.requested,
                free=exc.free,
                largest=exc.largest,
            ) from None
        shards = []
        next_va = va
        for sp, (coord, pa) in zip(placement.shards, done, strict=True):
            index = [slice(0, n) for n in shape]
            if placement.replicated:
                sva = va
            else:
                sva = next_va
                next_va += page_round(sp.nbytes, page)
                if shape:
                    index[placement.shard_dim] = slice(sp.start, sp.stop)
            shards.append(ShardInfo(*coord, pa, sp.nbytes, sp.offset, sva, tuple(index)))
            self._emit_mem("alloc", coord, memory, {"tensor": name, "pa": pa, "nbytes": page_round(sp.nbytes, page)})
        return _Storage(self, name, placement, dt, va, va_size, tuple(shards), memory, ready)

    def _overlaps(self, st: _Storage) -> list[SimFuture[Any]]:
        """Unmaps still pending on ranges ``st`` reuses: its map and writes must wait for them."""
        out: list[SimFuture[Any]] = []
        for r in self._released:
            if r.done is None:
                continue
            hit = bool(st.va_size and r.va_size and st.va < r.va + r.va_size and r.va < st.va + st.va_size)
            if not hit:
                for s in st.shards:
                    size = st.runtime.config.memory.page_size
                    end = s.pa + page_round(s.nbytes, size)
                    if any(pa < end and s.pa < pa + n for pa, n in r.pas.get(s.coord, ())):
                        hit = True
                        break
            if hit:
                out.append(r.done)
        return out

    def _create(
        self,
        label: str,
        shape: tuple[int, ...],
        dt: np.dtype[Any],
        policy: DPPolicy | None,
        name: str | None,
        memory: str,
        where: str,
        work: Callable[[_Storage], Callable[[], Awaitable[Any]]] | None,
        *,
        args: Sequence[_Storage] = (),
        scoped: bool = True,
    ) -> Tensor:
        """Allocate a tensor now and queue the command that maps and fills it."""
        self._check_open(where)
        tname = name if name is not None else f"t{next(self._tids)}"
        full_label = f"{tname} = {label}"
        done: SimFuture[Any] = self.sim.create_future(full_label)
        st = self._allocate(shape, dt, self.default_policy if policy is None else policy, tname, memory, where, done)
        try:
            run = work(st) if work is not None else None
        except BaseException:
            self._release(st)
            raise
        cmd = _Command(
            full_label,
            done,
            run,
            deps=[(a.ready, a) for a in args],
            creates=[(st, self._overlaps(st))],
            reads=list(args),
        )
        self._live[id(st)] = st
        self._enqueue(cmd)
        if scoped:
            for scope in reversed(_SCOPES.get()):
                if scope._rt is self and scope._open:
                    scope._storages[id(st)] = st
                    break
        return Tensor(st)

    def _release(self, st: _Storage) -> _Released:
        """Hand ``st``'s ranges back to the allocators (bookkeeping only)."""
        rel = _Released(st.va, st.va_size, {})
        page = self.config.memory.page_size
        for s in st.shards:
            self._allocs[s.coord].free(s.pa)
            rel.pas.setdefault(s.coord, []).append((s.pa, page_round(s.nbytes, page)))
            self._emit_mem("free", s.coord, st.alloc_kind, {"tensor": st.name, "pa": s.pa})
        if st.va_size:
            self._va.free(st.va)
        return rel

    def _free_storage(self, st: _Storage, by: str) -> None:
        """Free ``st`` once: release its ranges now, queue the unmap behind all work on it."""
        if st.freed is not None or (self._closed and by != "device close"):
            return
        st.freed = by
        self._live.pop(id(st), None)
        rel = self._release(st)
        label = f"free {st.name}"
        done: SimFuture[Any] = self.sim.create_future(label)

        async def unmap() -> None:
            try:
                msgs = self._unmap_msgs(st)
                st.mapped.clear()
                if msgs:
                    await self._send(msgs)
            finally:
                self._released.remove(rel)

        rel.done = done
        st.free_done = done
        self._released.append(rel)
        self._enqueue(_Command(label, done, unmap, soft=[st.ready, *st.readers]))

    def _schedule_collect(self, st: _Storage) -> None:
        """From the finalizer of a dropped Tensor: free it from a clean loop callback."""
        if self._closed:
            return
        loop = self._loop
        try:
            if loop.is_closed():
                return
            if threading.get_ident() == self._thread:
                loop.call_soon(self._free_storage, st, "del (garbage collection)")
            else:
                loop.call_soon_threadsafe(self._free_storage, st, "del (garbage collection)")
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # -- internals: the work queue ---------------------------------------------------------------

    def _enqueue(self, cmd: _Command) -> None:
        self._inflight[cmd.done] = None
        for st in cmd.reads:
            st.readers[cmd.done] = None
        self._queue.put_nowait(cmd)

    async def _dispatch(self) -> None:
        get = self._queue.get
        spawn = self.sim.spawn
        while True:
            cmd = await get()
            spawn(self._run(cmd), name=cmd.label)

    async def _run(self, cmd: _Command) -> None:
        error: BaseException | None = None
        result: Any = None
        maps = [self.sim.spawn(self._map(st, waits), name=f"map {st.name}") for st, waits in cmd.creates]
        try:
            for fut, st in cmd.deps:
                try:
                    await fut
                except Exception as exc:
                    raise _InputFailed(st, exc) from exc
            for fut in cmd.soft:
                try:
                    await fut
                except Exception:
                    pass
        except Exception as exc:
            error = exc
        for m in maps:
            err = await m
            if error is None and err is not None:
                error = err
        if error is None and cmd.work is not None:
            try:
                result = await cmd.work()
            except Exception as exc:
                error = exc
        if error is None:
            cmd.done.set_result(result)
        else:
            cmd.done.set_exception(self._wrap(cmd, error))
        self._inflight.pop(cmd.done, None)
        for st in cmd.reads:
            st.readers.pop(cmd.done, None)

    def _wrap(self, cmd: _Command, exc: BaseException) -> BaseException:
        """The error a failed command leaves in its future: names the operation and its tensors."""
        responses: tuple[Any, ...] = ()
        if isinstance(exc, _InputFailed):
            cause = exc.cause
            root = _root(cause)
            msg = (
                f"{cmd.label}: input {exc.storage.describe()} is unavailable because an earlier command failed: {root}"
            )
            kind: type[DeviceError] = type(cause) if isinstance(cause, DeviceError) else DeviceError
            responses = cause.responses if isinstance(cause, DeviceError) else ()
        else:
            kind = type(exc) if isinstance(exc, DeviceError) else DeviceError
            responses = exc.responses if isinstance(exc, DeviceError) else ()
            detail = str(exc) if isinstance(exc, DeviceError) else f"{type(exc).__name__}: {exc}"
            msg = root = f"{cmd.label} failed: {detail}"
        try:
            new = kind(msg, responses)
        except TypeError:
            new = DeviceError(msg, responses)
        new.kbus_root = root  # type: ignore[attr-defined]
        new.__cause__ = exc.cause if isinstance(exc, _InputFailed) else exc
        return new

    async def _send(self, msgs: Sequence[HostMessage]) -> list[ResponseMsg]:
        """Send requests concurrently; raise the first failure (with a count of the others)."""
        results = await run_concurrently(self.sim, [self.device.request(m) for m in msgs])
        return [r for rs in results for r in rs]

    def _rid(self) -> str:
        return str(next(self._rids))

    async def _map(self, st: _Storage, waits: list[SimFuture[Any]]) -> BaseException | None:
        """Map ``st``'s VA range (after the unmaps of ranges it reuses); never raises."""
        try:
            for fut in waits:
                try:
                    await fut
                except Exception:
                    pass
            if not st.shards:
                return None
            page = self.config.memory.page_size
            if st.placement.replicated:
                # Replicate = local: each PE maps the range to its own copy (the entry names its owner).
                size = page_round(st.nbytes, page)
                msgs: list[HostMessage] = [
                    MmuMapMsg(
                        self._cid,
                        self._rid(),
                        (MapEntry(st.va, s.pa, size, s.sip, s.cube, s.pe),),
                        target_sips=(s.sip,),
                        target_cubes=(s.cube,),
                        target_pe=s.pe,
                    )
                    for s in st.shards
                ]
                results = await run_concurrently(self.sim, [self._try_request(m) for m in msgs])
                errors = []
                for s, r in zip(st.shards, results, strict=True):
                    if isinstance(r, BaseException):
                        errors.append(r)
                    else:
                        st.mapped.append(s.coord)
                if errors:
                    raise errors[0]
            else:
                # Shard = broadcast: every PE can translate the whole range.
                entries = tuple(
                    MapEntry(s.va, s.pa, page_round(s.nbytes, page), s.sip, s.cube, s.pe) for s in st.shards
                )
                await self.device.request(MmuMapMsg(self._cid, self._rid(), entries))
                st.mapped.append("all")
        except Exception as exc:
            return exc
        return None

    async def _try_request(self, msg: HostMessage) -> tuple[ResponseMsg, ...] | BaseException:
        try:
            return await self.device.request(msg)
        except Exception as exc:
            return exc

    def _unmap_msgs(self, st: _Storage) -> list[HostMessage]:
        if not st.mapped:
            return []
        entry = (UnmapEntry(st.va, st.va_size),)
        if st.mapped == ["all"]:
            return [MmuUnmapMsg(self._cid, self._rid(), entry)]
        return [
            MmuUnmapMsg(self._cid, self._rid(), entry, target_sips=s, target_cubes=c, target_pe=p)
            for s, c, p in _target_groups(st.mapped, self.config)
        ]

    async def _launch(self, kernel: str, args: tuple[KernelArg, ...], owners: list[Coord]) -> tuple[ResponseMsg, ...]:
        ref = KernelRef(kernel, "builtin")
        msgs = [
            KernelLaunchMsg(self._cid, self._rid(), ref, args, target_cubes=c, target_pe=p, target_sips=s)
            for s, c, p in _target_groups(owners, self.config)
        ]
        try:
            return tuple(await self._send(msgs))
        except DeviceError as exc:
            if isinstance(exc, KernelError):
                raise
            raise KernelError(str(exc), exc.responses) from None

    # -- internals: host <-> device data ------------------------------------------------------------

    def _register(self, buf: npt.NDArray[Any]) -> str:
        name = f"{self._cid}.buf{next(self._bufs)}"
        self.device.register_host_buffer(name, buf)
        self._host_buffers.add(name)
        return name

    def _unregister(self, name: str) -> None:
        self._host_buffers.discard(name)
        self.device.unregister_host_buffer(name)

    @staticmethod
    def _row_major(st: _Storage) -> bool:
        """True when the storage order of ``st`` is the row-major order of the logical tensor."""
        p = st.placement
        return p.replicated or not st.shape or math.prod(st.shape[: p.shard_dim]) == 1

    def _storage_bytes(self, arr: npt.NDArray[Any], st: _Storage) -> npt.NDArray[Any]:
        """A private C-contiguous copy of ``arr`` in ``st``'s storage order (the upload snapshot)."""
        if self._row_major(st):
            return np.array(arr, dtype=st.dtype, order="C", copy=True).reshape(-1)
        return np.concatenate([np.ascontiguousarray(arr[s.index]).reshape(-1) for s in st.shards])

    def _from_storage(self, buf: npt.NDArray[np.uint8], st: _Storage) -> npt.NDArray[Any]:
        if self._row_major(st):
            return buf.view(st.dtype).reshape(st.shape)
        d = st.placement.shard_dim
        blocks = []
        for s in st.shards:
            shape = tuple(ix.stop - ix.start for ix in s.index)
            blocks.append(buf[s.offset : s.offset + s.nbytes].view(st.dtype).reshape(shape))
        return np.concatenate(blocks, axis=d)

    async def _upload(self, st: _Storage, data: npt.NDArray[Any] | None, pattern: str | None) -> None:
        """Write ``data`` (storage order) or fill ``pattern`` into every shard or replica."""
        if not st.shards:
            return
        buf = self._register(data) if data is not None else None
        kind: Literal["pattern", "host_buffer_ref"] = "pattern" if buf is None else "host_buffer_ref"
        try:
            msgs: list[HostMessage] = []
            if st.placement.replicated or buf is None:
                # Every copy (or every shard of a fill) of one size at one PA is one
                # broadcast per SIP: on a fresh device that is one message per SIP
                # instead of one per PE.
                groups: dict[tuple[int, int, int], list[ShardInfo]] = {}
                for s in st.shards:
                    groups.setdefault((s.sip, s.pa, s.nbytes), []).append(s)
                for (sip, pa, nbytes), members in groups.items():
                    first = members[0]
                    offset = 0 if st.placement.replicated else first.offset
                    for _, cubes, pe in _target_groups([m.coord for m in members], self.config):
                        msgs.append(
                            MemoryWriteMsg(
                                self._cid, self._rid(), sip, first.cube, first.pe, pa, nbytes, kind, pattern,
                                target_cubes=cubes, target_pe=pe, host_buffer=buf, host_offset=offset,
                            )
                        )  # fmt: skip
            else:
                for s in st.shards:
                    msgs.append(
                        MemoryWriteMsg(
                            self._cid, self._rid(), s.sip, s.cube, s.pe, s.pa, s.nbytes, kind, pattern,
                            target_cubes=(s.cube,), target_pe=s.pe, host_buffer=buf, host_offset=s.offset,
                        )
                    )  # fmt: skip
            await self._send(msgs)
        finally:
            if buf is not None:
                self._unregister(buf)

    def _read(self, t: Tensor) -> SimFuture[npt.NDArray[Any]]:
        self._check(t, "numpy()")
        st = t._storage
        label = f"numpy({st.name})"
        done: SimFuture[npt.NDArray[Any]] = self.sim.create_future(label)
        self._enqueue(_Command(label, done, lambda: self._readback(st), deps=[(st.ready, st)], reads=[st]))
        return done

    async def _readback(self, st: _Storage) -> npt.NDArray[Any]:
        buf = np.empty(st.nbytes, np.uint8)
        if not st.shards:
            return np.empty(st.shape, st.dtype)
        name = self._register(buf)
        try:
            shards = st.shards[:1] if st.placement.replicated else st.shards
            await self._send(
                [
                    MemoryReadMsg(
                        self._cid, self._rid(), s.sip, s.cube, s.pe, s.pa, s.nbytes,
                        target_cubes=(s.cube,), target_pe=s.pe, host_buffer=name, host_offset=s.offset,
                    )
                    for s in shards
                ]
            )  # fmt: skip
        finally:
            self._unregister(name)
        return self._from_storage(buf, st)

    # -- internals: closing -----------------------------------------------------------------------

    def _leaks(self) -> list[str]:
        out = []
        for _, a in sorted(self._allocs.items()):
            for region in (a.hbm, a.sram):
                if region.used_bytes:
                    out.append(f"{region.name}: {format_bytes(region.used_bytes)} in {region.live} allocation(s)")
        if self._va.used_bytes:
            out.append(f"{self._va.name}: {format_bytes(self._va.used_bytes)} of VA still allocated")
        for node in self.device.iter_pes():
            mapped = node.mmu.table.mapped_bytes
            if mapped:
                out.append(f"{node.mmu.name}: {format_bytes(mapped)} still mapped")
        out += [f"host buffer {name!r} still registered" for name in sorted(self._host_buffers)]
        return out

    async def _close(self, failing: bool) -> None:
        """Wait for the queue, free every tensor, wait again, then check nothing leaked.

        Work that can never finish (a deadlock) makes a clean close impossible:
        the tensors are marked freed and the :class:`~kbus.DeadlockError` is
        raised without a leak check (the stuck work still holds memory).
        """
        try:
            await self.synchronize()
            for st in list(self._live.values()):
                self._free_storage(st, "device close")
            await self.synchronize()
        except DeadlockError:
            for st in list(self._live.values()):
                st.freed = "device close"
            self._live.clear()
            raise
        finally:
            self._closed = True
            for name in list(self._host_buffers):
                self._unregister(name)
        leaks = self._leaks()
        if leaks:
            msg = f"device memory leaked at close of {self._cid}:\n  " + "\n  ".join(leaks)
            if failing:
                warnings.warn(msg, ResourceWarning, stacklevel=2)
            else:
                raise MemoryLeakError(msg)


# ---------------------------------------------------------------------------
# open_device.
# ---------------------------------------------------------------------------


class _DeviceSession:
    """The async context manager returned by :func:`open_device`."""

    def __init__(
        self,
        config: DeviceConfig | str | os.PathLike[str],
        trace: Any,
        trace_ws: Any,
        wire: bool | None,
    ) -> None:
        self._config = config
        self._trace = trace
        self._trace_ws = trace_ws
        self._wire = wire
        self._runtime: Runtime | None = None
        self._trace_cm: Any = None

    async def __aenter__(self) -> Runtime:
        if self._runtime is not None:
            raise RuntimeError("this open_device() context is already in use; call open_device() again")
        cfg = DeviceConfig.load(self._config)
        sim = Sim(name=cfg.name)
        device = build_device(sim, cfg, wire=self._wire, freeze=True)
        try:
            runtime = Runtime(device)
            attach = _trace_attacher()
            if attach is not None:
                cm = attach(device, trace=self._trace, trace_ws=self._trace_ws)
                runtime.trace = await cm.__aenter__()
                self._trace_cm = cm
            elif self._trace is not None or self._trace_ws is not None:
                raise NotImplementedError(
                    "open_device(trace=..., trace_ws=...): tracing is not available yet "
                    "(kbus.trace.attach_from_open_device is missing)"
                )
        except BaseException:
            await _close_device(device)
            raise
        self._runtime = runtime
        return runtime

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        rt = self._runtime
        assert rt is not None
        try:
            try:
                # Shielded: an enclosing cancel scope (anyio re-cancels every await
                # in it) must not cut the close short and skip the frees and leak check.
                with anyio.CancelScope(shield=True):
                    await rt._close(failing=e is not None)
            except Exception as exc:
                if e is None:
                    raise
                warnings.warn(
                    f"error while closing the device after another error: {exc!r}", RuntimeWarning, stacklevel=2
                )
        finally:
            try:
                if self._trace_cm is not None:
                    await self._trace_cm.__aexit__(et, e, tb)
            finally:
                await _close_device(rt.device)


async def _close_device(device: Device) -> None:
    """Stop the device with the collector paused, then hand its objects back to the collector.

    ``open_device`` builds with ``freeze=True`` (see :func:`~kbus.hw.build_device`),
    so the device sits in the permanent generation; stopping its tasks would
    otherwise trigger full collections that walk it again and again.
    ``gc.unfreeze()`` afterwards lets the next collection reclaim it (it also
    unfreezes anything else frozen meanwhile, e.g. another open device: that
    only costs the other device speed, never correctness).
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        await device.aclose()
    finally:
        if paused:
            gc.enable()
        gc.unfreeze()


def _trace_attacher() -> Any:
    try:
        from .. import trace
    except ImportError:  # pragma: no cover - kbus.trace is part of the package
        return None
    return getattr(trace, "attach_from_open_device", None)


def open_device(
    config: DeviceConfig | str | os.PathLike[str] = "default",
    *,
    trace: Any = None,
    trace_ws: Any = None,
    wire: bool | None = None,
) -> _DeviceSession:
    """Open an emulated device: ``async with kbus.open_device("tiny") as torch: ...``.

    ``config`` is a preset name, a TOML path or a :class:`~kbus.hw.DeviceConfig`.
    The simulation runs on the current event loop. ``wire=True`` round-trips
    every message through the codec (slow; proves serializability). ``trace``
    and ``trace_ws`` are handed to ``kbus.trace.attach_from_open_device``.

    On exit the runtime waits for queued work, frees every tensor, checks that
    no device memory or mapping is left (:class:`MemoryLeakError` otherwise)
    and stops every simulated task.
    """
    return _DeviceSession(config, trace, trace_ws, wire)
