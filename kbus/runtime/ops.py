"""Tensor factories and operations: what ``torch.zeros(...)`` and ``a + b`` queue.

:class:`TensorOps` is the part of :class:`~kbus.runtime.Runtime` that turns a
call into work: it checks the inputs, works out the result's shape, dtype and
placement, allocates it (:class:`~kbus.runtime.mapping.DeviceMemory`) and
queues one command (:class:`~kbus.runtime.queue.CommandQueue`) that maps it
and fills it -- an upload, a device-side fill or a builtin kernel launched on
the owners of the output (:mod:`kbus.runtime.builtins`).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import DeviceError, KernelError
from ..hw import DeviceConfig, HostDevice
from ..protocol import HostMessage, KernelArg, KernelLaunchMsg, KernelRef, ResponseMsg
from ..sim import Sim, SimFuture
from .builtins import DTYPE_NAMES, DTYPES_BY_NAME, encode_scalar, encode_tensor, run_concurrently
from .mapping import DeviceMemory, target_groups
from .policy import Coord, DPPolicy, Replicate, Shard, resolve_targets
from .queue import Command, CommandQueue, FailureReport
from .scope import SCOPES
from .tensor import Tensor, _Storage, check_freed
from .transfer import HostTransfers

__all__ = ["TensorOps"]

T = TypeVar("T")

_SYMBOLS: Final = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_UFUNCS: Final = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide}
_SUPPORTED: Final = ", ".join(str(d) for d in DTYPE_NAMES)


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


class TensorOps:
    """Factories, operations and launches of the runtime (the base of :class:`~kbus.runtime.Runtime`)."""

    device: HostDevice
    sim: Sim
    config: DeviceConfig
    default_policy: DPPolicy
    _cid: str
    _rids: itertools.count[int]
    _tids: itertools.count[int]
    _closed: bool
    _rng: np.random.Generator
    _live: dict[int, _Storage]
    _memory: DeviceMemory
    _queue: CommandQueue
    _transfers: HostTransfers

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
            snapshot = self._transfers.storage_bytes(src, st)
            return lambda: self._transfers.upload(st, snapshot, None)

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
            return lambda: self._transfers.upload(st, None, pattern)

        return self._create(label, shape, dt, policy, name, memory, where, work)

    # -- operations (called by Tensor) -----------------------------------------------

    def binary_op(self, op: str, x: object, y: object) -> Tensor:
        where = f"{_SYMBOLS[op]} ({op})"
        tensors = [v for v in (x, y) if isinstance(v, Tensor)]
        for v in (x, y):
            if isinstance(v, Tensor):
                self.check_tensor(v, where)
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

    def neg_op(self, x: Tensor) -> Tensor:
        where = "- (neg)"
        self.check_tensor(x, where)
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

    def matmul_op(self, a: object, b: object) -> Tensor:
        where = "@ (matmul)"
        for v in (a, b):
            if not isinstance(v, Tensor):
                raise TypeError(f"{where}: both operands must be kbus tensors, got {type(v).__name__}")
        assert isinstance(a, Tensor) and isinstance(b, Tensor)
        self.check_tensor(a, where)
        self.check_tensor(b, where)
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
            # rows of the output follow a's owners
            policy = Shard(dim=0, over=pa.over, targets=pa.targets, min_bytes=pa.min_bytes)
        elif isinstance(pb, Shard):
            policy = Shard(dim=1 if pb.dim % 2 == 1 else 0, over=pb.over, targets=pb.targets, min_bytes=pb.min_bytes)
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

    def sum_op(self, x: Tensor, dim: int | tuple[int, ...] | None) -> Tensor:
        where = "sum()"
        self.check_tensor(x, where)
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
            policy = Shard(dim=kept.index(d), over=pol.over, targets=pol.targets, min_bytes=pol.min_bytes)
            return self._kernel_op(label, "sum", shape, dt, policy, [st], lambda out: sum_args(out, st, 0, dims), where)
        first = owners[0] if owners else resolve_targets(pol, self.config)[0]
        single = Shard(dim=0, targets=(first,))
        if len(owners) <= 1:
            return self._kernel_op(label, "sum", shape, dt, single, [st], lambda out: sum_args(out, st, 0, dims), where)
        # Across shards: each owner sums its own shard locally (phase 1), then
        # the first owner adds the per-shard partials (phase 2).
        partial_policy = Shard(dim=0, targets=tuple(owners), min_bytes=0)  # one row on each owner, however small
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

    def copy_op(self, x: Tensor, policy: DPPolicy | None, dtype: Any, what: str) -> Tensor:
        where = f"{what}()"
        self.check_tensor(x, where)
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

        Builtins: ``torch.launch("add", out, a, b, targets=...)``; ``targets``
        is None (every PE) or PE coordinates / global PE indices. Tensor
        arguments are encoded as in :mod:`kbus.runtime.builtins`, whose
        kernels take their output first: the launch waits for every tensor
        argument, later work on the output (the first tensor argument) waits
        for it, and so do later writes to the others. ``await`` the result
        for the responses; a failure raises :class:`~kbus.KernelError` and
        fails the output only (the inputs stay usable).

        Kernels of the kernel language: ``await torch.launch(kern, grid=(g0,),
        args=(x, y, out, n), BLOCK=256)`` (``args=`` or positional arguments,
        constexprs as keywords, ``placement="spread" | "owner"``,
        ``batch="auto" | "off"``) — the same as
        ``kern[grid](x, y, out, n, BLOCK=256)``.
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
                self.check_tensor(a, where)
                encoded += encode_tensor(a._storage.desc)
                if a._storage not in storages:
                    storages.append(a._storage)
            else:
                try:
                    encoded.append(encode_scalar(a))
                except TypeError as exc:
                    raise TypeError(f"{where}: argument {i}: {exc}") from None
        # Builtins take their output first (``(out, x, y)``): a failed launch fails that tensor only.
        written, read = storages[:1], storages[1:]
        coords = resolve_targets(Replicate(targets), self.config)
        frozen = tuple(encoded)
        return self._ordered(
            f"launch {name}({self._names(*args)})", lambda: self._launch(name, frozen, list(coords)), read, written
        )

    def submit(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        reads: Sequence[Tensor] = (),
        writes: Sequence[Tensor] = (),
        label: str = "submit",
        failure: Callable[[T], tuple[BaseException, Sequence[Tensor]] | None] | None = None,
    ) -> SimFuture[T]:
        """Run ``fn()`` on the work queue, ordered like an operation on ``reads`` and ``writes``.

        ``fn`` starts once the work producing every tensor in ``reads`` and
        ``writes`` is done and, for ``writes``, once every queued reader of
        them is done too; later work on ``writes`` waits for ``fn``. It runs as
        a simulated task, so it may ``await device.request(...)`` (this is how
        a kernel language launches deployed kernels in queue order). Returns a
        future of ``fn``'s result; a failure fails ``writes`` like a failed
        operation.

        ``failure`` is for work that returns its failure as a result (a
        kernel launch): called with the result, it answers None (success) or
        the error and the tensors of ``writes`` the work failed to produce.
        Only those fail (later work on them raises the error); the others
        stay usable. The error is then also reported (see
        :class:`~kbus.runtime.queue.FailureReport`): unless something
        observes it first, ``synchronize()`` and closing the device raise it.
        """
        where = f"submit({label!r})"
        self._check_open(where)
        for t in (*reads, *writes):
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: reads/writes take kbus tensors, got {type(t).__name__}")
            self.check_tensor(t, where)
        written = list(dict.fromkeys(t._storage for t in writes))
        read = [st for st in dict.fromkeys(t._storage for t in reads) if st not in written]
        return self._ordered(label, fn, read, written, failure)

    def _ordered(
        self,
        label: str,
        fn: Callable[[], Awaitable[T]],
        reads: list[_Storage],
        writes: list[_Storage],
        failure: Callable[[T], tuple[BaseException, Sequence[Tensor]] | None] | None = None,
    ) -> SimFuture[T]:
        done: SimFuture[T] = self.sim.create_future(label)
        cmd = Command(
            label,
            done,
            fn,
            deps=[(st.ready, st) for st in (*reads, *writes)],
            soft=[r for st in writes for r in st.readers],
            reads=[*reads, *writes],
        )
        if failure is not None:
            cmd.after = self._settle(label, writes, failure)
        self._queue.enqueue(cmd)
        if failure is None:
            for st in writes:
                st.ready = done
        return done

    def _settle(
        self,
        label: str,
        writes: list[_Storage],
        failure: Callable[[T], tuple[BaseException, Sequence[Tensor]] | None],
    ) -> Callable[[Any, BaseException | None], None]:
        """Give each written tensor its own readiness: failed only if the work failed to produce it."""
        ready: dict[_Storage, SimFuture[Any]] = {st: self.sim.create_future(f"{label}: {st.name}") for st in writes}
        for st, fut in ready.items():
            st.ready = fut

        def after(result: Any, error: BaseException | None) -> None:
            found = failure(result) if error is None else (error, [])
            if found is None:
                for fut in ready.values():
                    fut.set_result(result)
                return
            exc, lost = found
            if error is None:
                FailureReport(self._queue, exc, label)
                bad = {t._storage for t in lost}
            else:
                bad = set(ready)  # the command did not run (an input failed): nothing it writes is there
            for st, fut in ready.items():
                if st in bad:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

        return after

    # -- internals: checks and names --------------------------------------------------------------

    def _check_open(self, where: str) -> None:
        if self._closed:
            raise RuntimeError(f"{where}: device runtime {self._cid} is closed (its open_device block has exited)")

    def check_tensor(self, t: Tensor, where: str) -> None:
        st = t._storage
        if st.runtime is not self:
            raise ValueError(
                f"{where}: tensor {st.describe()} belongs to another device ({st.runtime.device!r}, "
                f"not {self.device!r}); "
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
            return Shard(dim=0, over=policy.over, targets=policy.targets, min_bytes=policy.min_bytes)
        return policy

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
        st = self._memory.allocate(
            shape, dt, self.default_policy if policy is None else policy, tname, memory, where, done
        )
        try:
            run = work(st) if work is not None else None
        except BaseException:
            self._memory.release(st)
            raise
        cmd = Command(
            full_label,
            done,
            run,
            deps=[(a.ready, a) for a in args],
            creates=[(st, self._memory.overlaps(st))],
            reads=list(args),
        )
        self._live[id(st)] = st
        self._queue.enqueue(cmd)
        if scoped:
            for scope in reversed(SCOPES.get()):
                if scope._rt is self and scope._open:
                    scope._storages[id(st)] = st
                    break
        return Tensor(st)

    async def _send(self, msgs: Sequence[HostMessage]) -> list[ResponseMsg]:
        """Send requests concurrently; raise the first failure (with a count of the others)."""
        results = await run_concurrently(self.sim, [self.device.request(m) for m in msgs])
        return [r for rs in results for r in rs]

    def _rid(self) -> str:
        return str(next(self._rids))

    async def _launch(self, kernel: str, args: tuple[KernelArg, ...], owners: list[Coord]) -> tuple[ResponseMsg, ...]:
        ref = KernelRef(kernel, "builtin")
        msgs = [
            KernelLaunchMsg(self._cid, self._rid(), ref, args, target_cubes=c, target_pe=p, target_sips=s)
            for s, c, p in target_groups(owners, self.config)
        ]
        try:
            return tuple(await self._send(msgs))
        except DeviceError as exc:
            if isinstance(exc, KernelError):
                raise
            raise KernelError(str(exc), exc.responses) from None

    def read_tensor(self, t: Tensor) -> SimFuture[npt.NDArray[Any]]:
        self.check_tensor(t, "numpy()")
        st = t._storage
        label = f"numpy({st.name})"
        done: SimFuture[npt.NDArray[Any]] = self.sim.create_future(label)
        self._queue.enqueue(
            Command(label, done, lambda: self._transfers.readback(st), deps=[(st.ready, st)], reads=[st])
        )
        return done
