"""The host side: deploying kernels, launching them, and the program cache.

``await kernel[grid](*args, **constexprs)`` and :func:`launch` do the same:

1. bind the arguments to the kernel's signature and evaluate the grid (a
   tuple, or a callable of the arguments by name, Triton style);
2. order the launch after the work producing its tensor arguments: on the
   runtime's work queue (``torch.submit``) when there is one, else by
   awaiting each tensor (see :func:`start`);
3. make sure the kernel's code blob is deployed on this device: the first
   launch writes it with a ``MemoryWriteMsg`` from a host buffer into the code
   region (:func:`~kbus.lang.runner.code_region`), later launches reuse it
   (the *program cache*, keyed by kernel identity, one per device);
4. send one ``KernelLaunchMsg`` naming the blob by location, with the
   arguments in the convention of :mod:`kbus.runtime.builtins` (a tensor is a
   ``TensorArg`` plus ``ScalarArg``s for its dtype, shape and shard dimension;
   a scalar or constexpr one ``ScalarArg``), then the grid and the placement,
   to the PEs that run instances; every PE answers with how many it ran.

A failed PE answer becomes :class:`kbus.KernelError` (the device stays usable).
If a PE found the deployed blob corrupt, the program cache forgets that
deployment so the next launch deploys a fresh copy.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from ..errors import DeviceError, KernelError, OutOfDeviceMemory
from ..hw.device import HostDevice
from ..protocol import KernelLaunchMsg, MemoryWriteMsg, ResponseMsg, ScalarArg, TensorArg, TensorArgShard
from ..runtime.queue import observe
from .kernel import Kernel
from .language import dtype_name
from .runner import (
    BATCH_MODES,
    PLACEMENTS,
    Deployment,
    DeviceState,
    owner_of_programs,
    owner_targets,
    spread_targets,
    state_of,
)

if TYPE_CHECKING:
    from ..sim import SimFuture

__all__ = [
    "KernelCacheInfo",
    "LaunchHandle",
    "LaunchResult",
    "Launcher",
    "deploy",
    "device_of",
    "kernel_cache_info",
    "launch",
    "queue_launch",
    "start",
]

_RUNTIME_ATTRS = ("device", "runtime", "_runtime", "torch")
"""Attributes of a tensor that may hold the runtime handle (``kbus.Tensor.device``) or the Device."""

GridSpec = tuple[int, ...] | int | Callable[[dict[str, Any]], Any]


@attrs.frozen
class LaunchResult:
    """What a launch did: where, how many instances, and when (virtual ps)."""

    kernel: str
    grid: tuple[int, int, int]
    placement: str
    pes: int
    """PEs the launch message targeted (some may have had no instance)."""
    active_pes: int
    """PEs that ran at least one instance."""
    instances: int
    start_ps: int
    """When the launch began, its tensor arguments ready (a deployment, if any, comes after)."""
    end_ps: int
    """When the last PE's answer reached the host."""
    deployed: bool
    """True if this launch wrote the code blob (a program cache miss)."""

    @property
    def duration_ps(self) -> int:
        return self.end_ps - self.start_ps


@attrs.frozen
class KernelCacheInfo:
    """Program cache counters of one device.

    ``hits``/``misses``: launches that found / did not find their kernel
    deployed; ``deployments``: code blobs written; ``pe_fetches``: blobs a PE
    read from device memory (once per PE and deployment); ``pe_hits``:
    launches a PE served from its code cache; ``kernels``: deployments live;
    ``batched``: PE shares of launches whose instances ran as one batched run
    of the body; ``per_instance``: PE shares run one instance at a time;
    ``fallbacks``: for each kernel (short name) that could have batched but
    ran per instance, the reason of its latest fallback (see
    :mod:`kbus.lang.batch`).
    """

    hits: int
    misses: int
    deployments: int
    pe_fetches: int
    pe_hits: int
    kernels: int
    batched: int = 0
    per_instance: int = 0
    fallbacks: dict[str, str] = attrs.field(factory=dict)


def device_of(target: Any) -> HostDevice:
    """The :class:`~kbus.hw.Device` of a runtime handle (``torch.device``), or ``target`` if it is one."""
    if isinstance(target, HostDevice):
        return target
    dev = getattr(target, "device", None)
    if isinstance(dev, HostDevice):
        return dev
    raise TypeError(f"expected a runtime handle (from kbus.open_device) or a kbus Device, got {type(target).__name__}")


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "addr") and hasattr(value, "shards") and hasattr(value, "dtype")


def _find_target(values: dict[str, Any]) -> Any:
    """The runtime handle (or Device) the first tensor argument belongs to, or None."""
    for v in values.values():
        if not _is_tensor(v):
            continue
        for attr in _RUNTIME_ATTRS:
            handle = getattr(v, attr, None)
            if isinstance(handle, HostDevice) or isinstance(getattr(handle, "device", None), HostDevice):
                return handle
    return None


def kernel_cache_info(target: Any) -> KernelCacheInfo:
    """Program cache counters of the device of ``target`` (a runtime handle or a Device)."""
    st = state_of(device_of(target))
    return KernelCacheInfo(
        st.hits,
        st.misses,
        st.deployments,
        st.pe_fetches,
        st.pe_hits,
        len(st.programs),
        st.batched,
        st.per_instance,
        dict(st.fallbacks),
    )


# ------------------------------------------------------------------ deploy
async def _write_blob(device: HostDevice, st: DeviceState, kern: Kernel) -> Deployment:
    blob = np.frombuffer(kern.blob(), dtype=np.uint8).copy()
    pa = st.alloc_code(blob.size)
    s, c, p = st.code_coord
    n = next(st.request_ids)
    name = f"kbus.lang.code.{kern.short_name}.{n}"
    device.register_host_buffer(name, blob)
    try:
        await device.request(
            MemoryWriteMsg(
                "kbus.lang",
                f"deploy-{n}",
                s,
                c,
                p,
                pa,
                int(blob.size),
                src_kind="host_buffer_ref",
                target_cubes=(c,),
                target_pe=p,
                host_buffer=name,
            )
        )
    finally:
        device.unregister_host_buffer(name)
    st.deployments += 1
    return Deployment(kern.id, st.code_coord, pa, int(blob.size), hashlib.sha256(blob.tobytes()).hexdigest())


async def _deployment(device: HostDevice, st: DeviceState, kern: Kernel) -> tuple[Deployment, bool]:
    """The kernel's deployment on ``device`` and whether it had to be written now."""
    found = st.programs.get(kern.id)
    if found is not None:
        return found, False
    pending: SimFuture[Deployment] | None = st.deploying.get(kern.id)
    if pending is not None:  # another launch is writing it right now
        return await pending, False
    fut: SimFuture[Deployment] = device.sim.create_future(f"deployment of {kern.id}")
    st.deploying[kern.id] = fut
    try:
        dep = await _write_blob(device, st, kern)
    except BaseException as exc:
        fut.set_exception(exc)
        raise
    finally:
        del st.deploying[kern.id]
    st.programs[kern.id] = dep
    fut.set_result(dep)
    return dep, True


async def deploy(target: Any, kern: Kernel) -> Deployment:
    """Deploy ``kern``'s code blob on the device of ``target`` now (launches do it on first use).

    Returns the :class:`~kbus.lang.runner.Deployment` (where the blob is);
    deploying an already deployed kernel returns the existing deployment.
    """
    if not isinstance(kern, Kernel):
        raise TypeError(f"deploy() takes a @kbus.kernel, got {type(kern).__name__}")
    device = device_of(target)
    dep, _ = await _deployment(device, state_of(device), kern)
    return dep


# ------------------------------------------------------------------ launch
def _grid(spec: Any, meta: dict[str, Any], name: str) -> tuple[int, int, int]:
    g = spec(dict(meta)) if callable(spec) else spec
    dims = (g,) if isinstance(g, int | np.integer) else g
    if not isinstance(dims, tuple | list) or not 1 <= len(dims) <= 3:
        raise TypeError(f"kernel {name!r}: grid must be an int or a tuple of 1 to 3 ints, got {g!r}")
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, bool) or not isinstance(d, int | np.integer):
            raise TypeError(f"kernel {name!r}: grid[{i}] must be an int, got {type(d).__name__} {d!r}")
        v = operator.index(d)
        if not 0 <= v < 2**32:
            raise ValueError(f"kernel {name!r}: grid[{i}]={v} is outside [0, 2**32)")
        out.append(v)
    out += [1] * (3 - len(out))
    return out[0], out[1], out[2]


_INT_OF_SIZE: dict[int, np.dtype[Any]] = {2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)}


def _bits(name: str, value: np.floating[Any]) -> ScalarArg:
    """A NaN or infinity as ``ScalarArg("<name>.bits", ieee_bits)``: the wire form carries finite floats only."""
    return ScalarArg(name + ".bits", int(np.asarray(value).view(_INT_OF_SIZE[value.dtype.itemsize])))


def _scalar(value: Any, where: str) -> ScalarArg:
    """One scalar, as :func:`kbus.runtime.builtins.encode_scalar` does: numpy scalars keep their dtype,
    Python numbers travel as weak ``"int"``/``"float"``, non-finite floats as their IEEE bits."""
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        try:
            name = dtype_name(value.dtype)
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from None
        if isinstance(value, np.floating) and not np.isfinite(value):
            return _bits(name, value)
        return ScalarArg(name, value.item())
    if isinstance(value, bool | np.bool_):
        return ScalarArg("int", int(value))
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{where}: {value} does not fit in a 64-bit integer")
        return ScalarArg("int", value)
    if isinstance(value, float):
        return ScalarArg("float", value) if math.isfinite(value) else _bits("float", np.float64(value))
    raise TypeError(f"{where}: expected a kbus tensor or an int/float/bool scalar, got {type(value).__name__}")


def _shard_dim(value: Any, shape: tuple[int, ...]) -> int:
    """The split dimension of a tensor (-1 when replicated), from ``shard_dim`` or its policy."""
    sd = getattr(value, "shard_dim", None)
    if sd is not None:
        return int(sd)
    policy = getattr(value, "policy", None)
    dim = getattr(policy, "dim", None)
    if policy is None or dim is None:
        return -1 if policy is not None or len(value.shards) <= 1 else 0
    return int(dim) % len(shape) if shape else 0


def _tensor_args(value: Any, where: str) -> tuple[list[Any], TensorArg]:
    """The argument group of a tensor (see :mod:`kbus.lang.runner`)."""
    shards = []
    for s in value.shards:
        if isinstance(s, TensorArgShard):
            shards.append(s)
            continue
        offset = getattr(s, "offset_bytes", None)
        if offset is None:
            offset = s.offset
        shards.append(TensorArgShard(int(s.sip), int(s.cube), int(s.pe), int(s.pa), int(s.nbytes), int(offset)))
    try:
        elem = dtype_name(value.dtype)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None
    shape = tuple(int(n) for n in value.shape)
    ta = TensorArg(tuple(shards), va_base=int(value.addr))
    group: list[Any] = [ta, ScalarArg(elem, len(shape))]
    group += [ScalarArg("i64", n) for n in shape]
    group.append(ScalarArg("i64", _shard_dim(value, shape)))
    return group, ta


def _pack(kern: Kernel, values: dict[str, Any]) -> tuple[list[Any], TensorArg | None]:
    args: list[Any] = []
    first: TensorArg | None = None
    for p in kern.params:
        v = values[p.name]
        where = f"kernel {kern.short_name!r} argument {p.name!r}"
        if p.constexpr:
            args.append(_scalar(v, where + " (constexpr)"))
        elif _is_tensor(v):
            group, ta = _tensor_args(v, where)
            args += group
            if first is None:
                first = ta
        else:
            args.append(_scalar(v, where))
    return args, first


def _default_batch() -> str:
    """The batch mode of launches and kernels that name none: ``$KBUS_LANG_BATCH``, else ``"auto"``."""
    return os.environ.get("KBUS_LANG_BATCH", "auto") or "auto"


def _failure(kern: Kernel, exc: DeviceError) -> KernelError:
    responses: tuple[ResponseMsg, ...] = exc.responses
    failed = [r for r in responses if not r.success]
    if not failed:
        return KernelError(f"kernel {kern.short_name!r} launch failed: {exc}", responses)
    shown = "; ".join(r.error or "(no reason given)" for r in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return KernelError(
        f"kernel {kern.short_name!r} failed on {len(failed)} of {len(responses)} PE(s): {shown}{more}", responses
    )


def queue_launch(
    target: Any,
    kern: Kernel,
    grid: GridSpec,
    args: tuple[Any, ...] | list[Any] = (),
    *,
    placement: str = "spread",
    batch: str | None = None,
    **constexprs: Any,
) -> Awaitable[LaunchResult]:
    """Check a launch of ``kern`` over ``grid`` now and queue it; ``await`` the result for its :class:`LaunchResult`.

    ``target`` is a runtime handle (``kbus.open_device``) or a Device.
    ``args`` are the kernel's arguments in order (tensors and scalars);
    constexprs (and any argument) may also be given by keyword. ``grid`` is an
    int, a tuple of up to three ints, or a callable receiving the arguments by
    name. ``placement`` is ``"spread"`` (round-robin over the PEs) or
    ``"owner"`` (each instance on the PE owning its block of the first tensor
    argument; see :mod:`kbus.lang.runner`). ``batch`` is ``"auto"`` (a PE runs
    its instances as one batched run of the body when the kernel allows it,
    see :mod:`kbus.lang.batch`) or ``"off"`` (one instance at a time); None
    takes the kernel's own setting (``@kbus.kernel(batch=...)``), else the
    environment variable ``KBUS_LANG_BATCH``, else ``"auto"``. Results and virtual times are the same
    either way. Host-side mistakes raise here;
    awaiting raises :class:`kbus.KernelError` if any instance failed. See
    :func:`start` for how the launch is ordered with other work.
    """
    if not isinstance(kern, Kernel):
        raise TypeError(f"launch() takes a @kbus.kernel, got {type(kern).__name__}")
    return start(target, kern, grid, kern.bind(tuple(args), constexprs), placement, batch)


async def launch(
    target: Any,
    kern: Kernel,
    grid: GridSpec,
    args: tuple[Any, ...] | list[Any] = (),
    *,
    placement: str = "spread",
    batch: str | None = None,
    **constexprs: Any,
) -> LaunchResult:
    """``await queue_launch(...)``: run ``kern`` over ``grid`` and return its :class:`LaunchResult`."""
    return await queue_launch(target, kern, grid, args, placement=placement, batch=batch, **constexprs)


def start(
    target: Any, kern: Kernel, grid: GridSpec, values: dict[str, Any], placement: str, batch: str | None = None
) -> Awaitable[LaunchResult]:
    """Check and queue a launch of ``kern`` with bound ``values``; return an awaitable of its result.

    Everything that can be checked on the host (grid, placement, argument
    types) is checked here, at the call. With a runtime handle that offers
    ``submit`` (``kbus.open_device``), the launch joins the runtime's work
    queue at once, ordered like an operation that *writes every tensor
    argument* (a kernel may store through any pointer): it starts after the
    work producing them, later work on them waits for it, and a free waits for
    it. A kernel failure is raised by awaiting the returned
    :class:`LaunchHandle` and does not fail the tensor arguments: they stay
    usable, holding whatever the instances stored before the failure. With a
    bare Device the returned coroutine awaits each tensor argument that is
    awaitable, then launches.
    """
    name = kern.short_name
    if placement not in PLACEMENTS:
        raise ValueError(f"kernel {name!r}: placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    mode = batch if batch is not None else kern.batch if kern.batch is not None else _default_batch()
    if mode not in BATCH_MODES:
        raise ValueError(f"kernel {name!r}: batch must be one of {', '.join(BATCH_MODES)}, got {mode!r}")
    device = device_of(target)
    dims = _grid(grid, values, name)
    params, first = _pack(kern, values)
    tensors = [v for v in values.values() if _is_tensor(v)]
    submit = None if isinstance(target, HostDevice) else getattr(target, "submit", None)
    if not callable(submit):
        return _after_inputs(tensors, _send(device, kern, dims, params, first, placement, mode))
    label = f"kernel {name}[{', '.join(map(str, dims))}]"

    async def work() -> LaunchResult | BaseException:
        try:
            return await _send(device, kern, dims, params, first, placement, mode)
        except (DeviceError, OutOfDeviceMemory) as exc:
            return exc  # the launch's own failure: its awaiter and the tensors it stored to get it

    def failure(outcome: LaunchResult | BaseException) -> tuple[BaseException, list[Any]] | None:
        if not isinstance(outcome, BaseException):
            return None
        stored = getattr(outcome, "kbus_stored", ())
        return outcome, [values[p] for p in stored if p in values and _is_tensor(values[p])]

    writes = list({id(t): t for t in tensors}.values())
    return LaunchHandle(submit(work, writes=writes, label=label, failure=failure), label)


class LaunchHandle:
    """A launch queued on a runtime's work queue: ``await`` it for the :class:`LaunchResult`.

    Awaiting raises the launch's :class:`kbus.KernelError` if it failed. A
    failed launch also fails the tensors its instances stored to (awaiting
    one raises the same error; work queued on one fails naming it); the
    other tensor arguments stay usable. A failure nobody observed this way
    is raised by ``torch.synchronize()`` and at device close, and warns
    (``RuntimeWarning``) if it is never observed at all.
    """

    __slots__ = ("_future", "label")

    def __init__(self, future: Any, label: str) -> None:
        self._future = future
        self.label = label

    def done(self) -> bool:
        """True once the launch has finished (successfully or not)."""
        return bool(self._future.done())

    def __await__(self) -> Generator[Any, None, LaunchResult]:
        return self._wait().__await__()

    async def _wait(self) -> LaunchResult:
        try:
            outcome = await self._future
        except Exception as exc:  # the command itself failed (an input was unavailable)
            observe(exc)
            raise
        if isinstance(outcome, BaseException):
            observe(outcome)
            raise outcome
        result: LaunchResult = outcome
        return result

    def __repr__(self) -> str:
        return f"<LaunchHandle {self.label} {'done' if self.done() else 'pending'}>"


async def _after_inputs(tensors: list[Any], launch: Coroutine[Any, Any, LaunchResult]) -> LaunchResult:
    try:
        for t in tensors:
            if hasattr(t, "__await__"):
                await t
    except BaseException:
        launch.close()
        raise
    return await launch


async def _send(
    device: HostDevice,
    kern: Kernel,
    grid: tuple[int, int, int],
    params: list[Any],
    first: TensorArg | None,
    placement: str,
    batch: str = "auto",
) -> LaunchResult:
    """Deploy if needed, send the KernelLaunchMsg, check the answers."""
    sim = device.sim
    name = kern.short_name
    start_ps = sim.now
    st = state_of(device)
    n = grid[0] * grid[1] * grid[2]
    if n == 0:
        return LaunchResult(name, grid, placement, 0, 0, 0, start_ps, sim.now, False)
    dep, wrote = await _deployment(device, st, kern)
    if wrote:
        st.misses += 1
    else:
        st.hits += 1
    cfg = device.config
    if placement == "owner" and first is not None and first.shards:
        owners = owner_of_programs(first.shards, grid[0], cfg)
        sips, cubes, pe = owner_targets(owners, cfg)
    else:
        placement = "spread"
        sips, cubes, pe = spread_targets(cfg, n)
    trailer = [ScalarArg("i64", g) for g in grid] + [ScalarArg("i64", PLACEMENTS[placement])]
    if batch != "auto":
        trailer.append(ScalarArg("i64", BATCH_MODES[batch]))
    rid = f"launch-{next(st.request_ids)}"
    msg = KernelLaunchMsg("kbus.lang", rid, dep.ref(), (*params, *trailer), cubes, pe, sips)
    try:
        responses = await device.request(msg)
    except DeviceError as exc:
        corrupt = any("bad code blob" in (r.error or "") for r in exc.responses if not r.success)
        if corrupt and st.programs.get(kern.id) is dep:
            del st.programs[kern.id]  # the next launch deploys a fresh copy
        err = _failure(kern, exc)
        err.kbus_stored = tuple(sorted(st.written.get(rid, ())))  # type: ignore[attr-defined]
        raise err from None
    finally:
        st.written.pop(rid, None)
    ran = sum(int(r.value or 0) for r in responses)
    if ran != n:
        raise KernelError(f"kernel {name!r}: the PEs ran {ran} program instances, the grid {grid} has {n}", responses)
    active = sum(1 for r in responses if r.value)
    return LaunchResult(name, grid, placement, len(responses), active, n, start_ps, sim.now, wrote)


class Launcher:
    """``kernel[grid]``: call it with the kernel's arguments to get an awaitable launch.

    ``torch=`` names the runtime handle (or Device) when no tensor argument
    leads to it; ``placement=`` and ``batch=`` are as for :func:`launch`. Every other keyword
    is a kernel argument (typically the constexprs).
    """

    __slots__ = ("grid", "kernel")

    def __init__(self, kern: Kernel, grid: Any) -> None:
        self.kernel = kern
        self.grid = grid

    def __call__(
        self, *args: Any, torch: Any = None, placement: str = "spread", batch: str | None = None, **kwargs: Any
    ) -> Awaitable[LaunchResult]:
        values = self.kernel.bind(args, kwargs)
        target = torch if torch is not None else _find_target(values)
        if target is None:
            raise TypeError(
                f"kernel {self.kernel.short_name!r}: cannot tell which device to run on: no tensor argument "
                "refers to a runtime; pass torch=<handle from kbus.open_device> (or a Device)"
            )
        return start(target, self.kernel, self.grid, values, placement, batch)

    def __repr__(self) -> str:
        return f"<Launcher {self.kernel.short_name}[{self.grid!r}]>"
