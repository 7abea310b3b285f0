"""Builtin kernels: the device side of every tensor operation.

Each runtime operation is one ``KernelLaunchMsg`` with
``KernelRef(kind="builtin", name=...)``, sent through the fabric to the PEs
that own the output. A PE_CPU looks the name up in ``device.builtins`` and
runs the function here on the bytes in device memory: it reads its inputs
through its own MMU (:meth:`Device.read_va` from its coordinates; a local
shard costs the local DMA path, a remote shard the NOC/SIP hops of the route),
computes with numpy, sleeps the compute time and writes the part of the output
it owns (*owner computes*). Nothing here touches host state: the arguments
carry everything a PE needs.

Argument convention
-------------------
A tensor argument is a :class:`TensorArg` followed by scalar arguments that
describe it (the protocol's ``TensorArg`` carries only shards and a VA)::

    TensorArg(shards, va_base)
    ScalarArg(<dtype name>, ndim)      # element dtype ("f32", "i64", ...); value = rank
    ScalarArg("i64", size) x ndim      # the shape
    ScalarArg("i64", shard_dim)        # split dimension; -1 = replicated

A scalar operand is one ``ScalarArg``: ``dtype`` is a device dtype name
(``"f32"``...) for a numpy scalar, or ``"float"``/``"int"`` for a Python
number, which numpy then treats as *weak* (``f32_tensor + 2.0`` stays f32, as
in numpy). A NaN or infinity travels as ``ScalarArg("<name>.bits", ieee_bits)``
since the wire form carries finite floats only. Further kernel parameters are
``ScalarArg("i64", n)``.

Replicated tensors list one shard per copy (``offset_bytes == 0``, full
``nbytes``); sharded tensors list their shards in storage order.

Virtual addresses
-----------------
Shard ``k`` of a tensor starts at ``va_base + sum(page_round(nbytes_j) for j < k)``
(:meth:`TensorDesc.shard_va`). MMU mappings are whole pages, so each shard
starts on a page. When every shard but the last is a whole number of pages
(typical of large tensors), this is ``va_base + offset_bytes``: the tensor is
*VA-contiguous* and ``va_base + element_offset * itemsize`` addresses every
element. Otherwise there is a gap after each shard's last page and kernels
address a shard from its own VA, as the helpers below do.

Timing model
------------
A kernel on a PE costs, in order: ``compute.kernel_launch`` (charged by
PE_CPU); its input reads (DMA over the route from the owner's memory to this
PE; several pieces are read concurrently, queueing on shared links); the
compute time ``compute.flops_to_ps(flops)`` (busy time of the PE_CPU); the
write of its output block (local DMA). The FLOP counts are per kernel below.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided
from threadpoolctl import ThreadpoolController

from ..mem import Segment
from ..protocol import KernelArg, KernelLaunchMsg, ScalarArg, TensorArg, TensorArgShard

if TYPE_CHECKING:
    from ..hw.blocks import PeCpu
    from ..hw.device import Device, HostDevice, KernelFn
    from ..sim import Sim

__all__ = [
    "BUILTINS",
    "DTYPE_NAMES",
    "ArgReader",
    "LaunchMemo",
    "Scalar",
    "TensorDesc",
    "encode_scalar",
    "encode_tensor",
    "gather",
    "host_threads",
    "install",
    "run_concurrently",
    "write_block",
]

Coord: TypeAlias = tuple[int, int, int]
Box: TypeAlias = tuple[tuple[int, int], ...]
"""A hyper-rectangle of a tensor: ``(start, stop)`` per dimension."""
Scalar: TypeAlias = int | float | np.generic

DTYPE_NAMES: Final[dict[np.dtype[Any], str]] = {
    np.dtype(np.float16): "f16",
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.uint16): "u16",
    np.dtype(np.uint32): "u32",
    np.dtype(np.uint64): "u64",
}
"""Supported element dtypes and their device names."""

DTYPES_BY_NAME: Final[dict[str, np.dtype[Any]]] = {v: k for k, v in DTYPE_NAMES.items()}


def page_round(n: int, page: int) -> int:
    """``n`` rounded up to a whole number of pages."""
    return -(-n // page) * page


# ---------------------------------------------------------------------------
# Tensor descriptors: the same object on both sides of the launch message.
# ---------------------------------------------------------------------------


class TensorDesc:
    """What a kernel knows about one tensor argument (decoded from its args).

    ``shard_dim`` is ``-1`` for a replicated tensor. The runtime builds one to
    encode a launch; a PE decodes one with :class:`ArgReader`.
    """

    __slots__ = ("_bounds", "_lo", "_owners", "_vas", "dtype", "page_size", "shape", "shard_dim", "shards", "va_base")

    def __init__(
        self,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        shard_dim: int,
        va_base: int,
        shards: tuple[TensorArgShard, ...],
        page_size: int,
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.shard_dim = shard_dim
        self.va_base = va_base
        self.shards = shards
        self.page_size = page_size
        # Decoded once per launch message (see ArgReader) and shared by every
        # PE it reaches: O(shards) here, O(1)/O(log shards) per PE after.
        self._owners: dict[Coord, int] | None = None
        if shard_dim < 0:
            self._vas = [va_base] * len(shards)
            self._bounds = [(0, shape[0] if shape else 1)] * len(shards)
        else:
            n = shape[shard_dim] if shape else 1
            row = (math.prod(shape) * dtype.itemsize) // n if n else 1
            mask = page_size - 1
            sizes = [(sh.nbytes + mask) & ~mask for sh in shards[:-1]]
            self._vas = list(accumulate(sizes, initial=va_base)) if shards else []
            self._bounds = [(sh.offset_bytes // row, (sh.offset_bytes + sh.nbytes) // row) for sh in shards]
        self._lo = [b[0] for b in self._bounds]

    @property
    def replicated(self) -> bool:
        return self.shard_dim < 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def shard_va(self, k: int) -> int:
        """VA of shard ``k``'s first byte (the copy's VA, ``va_base``, for a replica)."""
        return self._vas[k]

    def shard_range(self, k: int) -> tuple[int, int]:
        """``(start, stop)`` of shard ``k`` along the shard dimension."""
        return self._bounds[k]

    def shard_box(self, k: int) -> Box:
        """The logical region of shard ``k`` (the whole tensor for a replica)."""
        box = [(0, n) for n in self.shape]
        if self.shard_dim >= 0 and self.shape:
            box[self.shard_dim] = self._bounds[k]
        return tuple(box)

    def owned_by(self, coord: Coord) -> int | None:
        """Index of the shard (or copy) held by PE ``coord``, or None (a dict lookup, built on first use)."""
        owners = self._owners
        if owners is None:
            owners = {}
            for k, sh in enumerate(self.shards):
                owners.setdefault((sh.sip, sh.cube, sh.pe), k)
            self._owners = owners
        return owners.get(coord)

    def shards_between(self, lo: int, hi: int) -> range:
        """Indices of the shards whose range along the shard dimension meets ``[lo, hi)`` (a bisect)."""
        first = max(bisect_right(self._lo, lo) - 1, 0)
        last = bisect_left(self._lo, hi)
        return range(first, last)

    def __repr__(self) -> str:
        layout = "replicated" if self.shard_dim < 0 else f"sharded dim {self.shard_dim}"
        return f"<tensor {self.shape} {self.dtype} {layout}, {len(self.shards)} shard(s) at VA {self.va_base:#x}>"


def encode_tensor(desc: TensorDesc) -> list[KernelArg]:
    """The launch arguments describing ``desc`` (see the module docstring)."""
    args: list[KernelArg] = [TensorArg(desc.shards, va_base=desc.va_base)]
    args.append(ScalarArg(DTYPE_NAMES[desc.dtype], len(desc.shape)))
    args.extend(ScalarArg("i64", int(n)) for n in desc.shape)
    args.append(ScalarArg("i64", desc.shard_dim))
    return args


_BITS: Final = ".bits"
_INT_OF_SIZE: Final[dict[int, np.dtype[Any]]] = {2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)}


def _as_bits(name: str, value: np.floating[Any]) -> ScalarArg:
    """A non-finite float as the integer of its IEEE bits: the wire form has no NaN or infinity."""
    return ScalarArg(name + _BITS, int(np.asarray(value).view(_INT_OF_SIZE[value.dtype.itemsize])))


def encode_scalar(value: object) -> ScalarArg:
    """One scalar operand: numpy scalars keep their dtype, Python numbers stay weak.

    NaN and infinities travel as ``ScalarArg("<dtype>.bits", ieee_bits)``
    (``"float.bits"`` for a Python float) because JSON and the codec only
    carry finite floats. Raises ``TypeError`` naming the value for anything
    else (complex, strings, unsupported numpy dtypes).
    """
    if isinstance(value, np.generic):
        name = DTYPE_NAMES.get(value.dtype)
        if name is None:
            raise TypeError(f"scalar {value!r} has unsupported dtype {value.dtype}")
        if isinstance(value, np.floating) and not np.isfinite(value):
            return _as_bits(name, value)
        return ScalarArg(name, value.item())
    if isinstance(value, bool):
        return ScalarArg("int", int(value))
    if isinstance(value, int):
        return ScalarArg("int", value)
    if isinstance(value, float):
        return ScalarArg("float", value) if math.isfinite(value) else _as_bits("float", np.float64(value))
    raise TypeError(f"expected a tensor or a real number, got {type(value).__name__} {value!r}")


def decode_scalar(arg: ScalarArg) -> Scalar:
    """The operand :func:`encode_scalar` encoded (a Python number for ``"float"``/``"int"``)."""
    name = arg.dtype
    if name.endswith(_BITS):
        base = name[: -len(_BITS)]
        dt = np.dtype(np.float64) if base == "float" else DTYPES_BY_NAME.get(base)
        if dt is None or dt.kind != "f":
            raise ValueError(f"scalar argument has unknown dtype {name!r}")
        value: np.generic = dt.type(np.asarray(int(arg.value), _INT_OF_SIZE[dt.itemsize]).view(dt))
        return float(value) if base == "float" else value
    if name == "float":
        return float(arg.value)
    if name == "int":
        return int(arg.value)
    dt = DTYPES_BY_NAME.get(name)
    if dt is None:
        raise ValueError(f"scalar argument has unknown dtype {name!r}")
    scalar: np.generic = dt.type(arg.value)
    return scalar


class ArgReader:
    """Reads a launch's arguments in order, following the convention above.

    Every method raises ``ValueError`` naming the argument position when the
    argument there is not what the kernel expects.
    """

    __slots__ = ("_args", "_i", "_memo", "page_size")

    def __init__(self, msg: KernelLaunchMsg, page_size: int, memo: dict[int, TensorDesc] | None = None) -> None:
        self._args = msg.args
        self._i = 0
        self.page_size = page_size
        self._memo = memo

    def _next(self) -> KernelArg:
        if self._i >= len(self._args):
            raise ValueError(f"missing argument {self._i} (the launch has {len(self._args)})")
        arg = self._args[self._i]
        self._i += 1
        return arg

    def _scalar(self, what: str) -> ScalarArg:
        pos = self._i
        arg = self._next()
        if not isinstance(arg, ScalarArg):
            raise ValueError(f"argument {pos}: expected a scalar ({what}), got a tensor")
        return arg

    def int(self, what: str = "integer") -> int:
        """The next argument as an integer parameter."""
        pos = self._i
        arg = self._scalar(what)
        if not isinstance(arg.value, int) or isinstance(arg.value, bool):
            raise ValueError(f"argument {pos}: expected an integer ({what}), got {arg.value!r}")
        return arg.value

    def at_tensor(self) -> bool:
        return self._i < len(self._args) and isinstance(self._args[self._i], TensorArg)

    def tensor(self) -> TensorDesc:
        """The next tensor argument with its descriptor scalars."""
        pos = self._i
        memo = self._memo
        if memo is not None:
            hit = memo.get(pos)
            if hit is not None:
                self._i += 3 + len(hit.shape)  # the TensorArg and its descriptor scalars
                return hit
        arg = self._next()
        if not isinstance(arg, TensorArg):
            raise ValueError(f"argument {pos}: expected a tensor, got a scalar")
        head = self._scalar("tensor dtype/rank")
        dt = DTYPES_BY_NAME.get(head.dtype)
        if dt is None:
            raise ValueError(f"argument {pos + 1}: unknown tensor dtype {head.dtype!r}")
        ndim = int(head.value)
        shape = tuple(self.int("tensor shape") for _ in range(ndim))
        shard_dim = self.int("shard dim")
        desc = TensorDesc(dt, shape, shard_dim, arg.va_base, arg.shards, self.page_size)
        if memo is not None:
            memo[pos] = desc
        return desc

    def operand(self) -> TensorDesc | Scalar:
        """The next tensor or scalar operand."""
        if self.at_tensor():
            return self.tensor()
        return decode_scalar(self._scalar("operand"))


class LaunchMemo:
    """Tensor arguments decoded once per launch message, for every PE the message reaches.

    A broadcast launch delivers the same message object to every target PE, so
    the message's identity is the key (held by a weak reference that drops the
    entry with the message). Without it every PE would rebuild a descriptor of
    every tensor argument: O(PEs x shards) per operation. In wire mode each PE
    receives its own copy and decodes it itself.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[KernelLaunchMsg], int, dict[int, TensorDesc]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def reader(self, msg: KernelLaunchMsg, page_size: int) -> ArgReader:
        """An :class:`ArgReader` for ``msg`` whose tensor descriptors are shared with the other PEs."""
        key = id(msg)
        hit = self._by_id.get(key)
        if hit is not None and hit[0]() is msg and hit[1] == page_size:
            return ArgReader(msg, page_size, hit[2])
        memo: dict[int, TensorDesc] = {}
        by_id = self._by_id

        def drop(ref: weakref.ref[KernelLaunchMsg], key: int = key) -> None:
            cur = by_id.get(key)
            if cur is not None and cur[0] is ref:
                del by_id[key]

        by_id[key] = (weakref.ref(msg, drop), page_size, memo)
        return ArgReader(msg, page_size, memo)


LAUNCHES: Final = LaunchMemo()
"""The builtin kernels' shared decode memo (keys are message identities, so one serves every device)."""


# ---------------------------------------------------------------------------
# Device-side data movement.
# ---------------------------------------------------------------------------


async def run_concurrently(sim: Sim, coros: Sequence[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run ``coros`` as simulated tasks at once and return their results in order.

    The first exception is re-raised after all have finished. Children are
    simulated tasks (not ``asyncio.gather``): a plain asyncio task waiting on
    engine primitives would freeze virtual time.
    """
    if len(coros) == 1:
        return [await coros[0]]

    async def capture(c: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
        try:
            return True, await c
        except Exception as exc:
            return False, exc

    handles = [sim.spawn(capture(c), name="kbus.runtime.part") for c in coros]
    results = [await h for h in handles]
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def _span(shape: tuple[int, ...], box: Box) -> tuple[int, int, tuple[int, ...]]:
    """Element offsets ``[lo, hi)`` of the smallest C-order run covering ``box`` in a ``shape`` array.

    Also returns the C strides (in elements) of ``shape``.
    """
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    strides.reverse()
    lo = sum(s * st for (s, _), st in zip(box, strides, strict=True))
    hi = sum((e - 1) * st for (_, e), st in zip(box, strides, strict=True)) + 1
    return lo, hi, tuple(strides)


def _nearest(me: Coord, shards: tuple[TensorArgShard, ...]) -> TensorArgShard:
    """The replica closest to ``me``: same cube, else same SIP, else the first."""
    s, c, _ = me
    for sh in shards:
        if sh.sip == s and sh.cube == c:
            return sh
    for sh in shards:
        if sh.sip == s:
            return sh
    return shards[0]


async def _read_block(
    dev: Device,
    me: Coord,
    desc: TensorDesc,
    k: int,
    block_shape: tuple[int, ...],
    box: Box,
) -> npt.NDArray[Any]:
    """Read ``box`` of shard ``k``'s block (a C array of ``block_shape``) into PE ``me``.

    Reads the smallest contiguous byte run that covers the box (one DMA, exact
    for row ranges) and views it with the block's strides, so no element is
    copied twice. Replicas that are not on ``me`` are read from the nearest
    copy by physical address, since their VA is only mapped on their own PEs.
    """
    isz = desc.dtype.itemsize
    out_shape = tuple(e - s for s, e in box)
    lo, hi, strides = _span(block_shape, box)
    nbytes = (hi - lo) * isz
    if desc.replicated and (desc.shards[k].sip, desc.shards[k].cube, desc.shards[k].pe) != me:
        sh = desc.shards[k]
        seg = Segment(desc.va_base + lo * isz, sh.sip, sh.cube, sh.pe, sh.pa + lo * isz, nbytes)
        raw = await dev.read_physical(me, seg)
    else:
        raw = await dev.read_va(me, desc.shard_va(k) + lo * isz, nbytes)
    if not raw.flags.owndata:  # not a private copy: never let a kernel compute into it
        raw = raw.view()
        raw.flags.writeable = False
    flat = raw.view(desc.dtype)
    if hi - lo == math.prod(out_shape):
        return flat.reshape(out_shape)
    return as_strided(flat, shape=out_shape, strides=tuple(st * isz for st in strides), writeable=False)


async def gather(cpu: PeCpu, desc: TensorDesc, box: Box) -> npt.NDArray[Any]:
    """The region ``box`` of a tensor, read into PE ``cpu`` through its MMU.

    Works for any layout: a replicated tensor is read from the local copy (or
    the nearest one), a sharded one from every shard the box intersects, those
    reads running concurrently. The result is either a private array the
    kernel may overwrite (``flags.writeable``; kernels compute into it to save
    an allocation) or a read-only view.
    """
    out_shape = tuple(e - s for s, e in box)
    if math.prod(out_shape) == 0 or not desc.shards:
        return np.zeros(out_shape, desc.dtype)
    dev = cpu.device
    me = (cpu.sip, cpu.cube, cpu.pe)
    if desc.replicated:
        k = desc.owned_by(me)
        if k is None:
            nearest = _nearest(me, desc.shards)
            k = desc.shards.index(nearest)
        return await _read_block(dev, me, desc, k, desc.shape, box)
    d = desc.shard_dim
    if not desc.shape:  # a 0-d sharded tensor: one shard holding the element
        return await _read_block(dev, me, desc, 0, (), ())
    lo, hi = box[d]
    reads = []
    for k in desc.shards_between(lo, hi):
        s, e = desc.shard_range(k)
        a, b = max(lo, s), min(hi, e)
        if a >= b:
            continue
        block_shape = (*desc.shape[:d], e - s, *desc.shape[d + 1 :])
        sub = (*box[:d], (a - s, b - s), *box[d + 1 :])
        reads.append(_read_block(dev, me, desc, k, block_shape, sub))
    pieces = await run_concurrently(cpu.sim, reads)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=d)


async def write_block(cpu: PeCpu, desc: TensorDesc, k: int, data: npt.NDArray[Any]) -> None:
    """Write ``data`` (the whole of shard ``k``, cast to the tensor's dtype) through PE ``cpu``'s MMU."""
    arr = np.ascontiguousarray(data, dtype=desc.dtype)
    if arr.size == 0:
        return
    await cpu.device.write_va((cpu.sip, cpu.cube, cpu.pe), desc.shard_va(k), arr)


_POOLS: Any = None  # a threadpoolctl.ThreadpoolController (the library ships no type hints)


def host_threads(threads: int) -> contextlib.AbstractContextManager[Any]:
    """Cap numpy's BLAS/OpenMP pools at ``threads`` for the compute inside a kernel.

    Every simulated PE runs its kernels on the same host, so BLAS's default
    (one thread per core) oversubscribes it: on a busy 2-core machine a
    512 x 512 sharded matmul ran 5-7x slower than with one thread. The
    controller that finds the loaded libraries is built once (it scans the
    process); each limit only sets and restores their thread counts.
    """
    global _POOLS
    if _POOLS is None:
        _POOLS = ThreadpoolController()
    limiter: contextlib.AbstractContextManager[Any] = _POOLS.limit(limits=threads)
    return limiter


async def compute(cpu: PeCpu, flops: int, label: str) -> None:
    """Spend the PE time of ``flops`` operations at peak (busy time of the PE_CPU)."""
    await cpu.busy(cpu.device.config.compute.flops_to_ps(flops), label)


def _operand_box(shape: tuple[int, ...], out_box: Box) -> Box:
    """The region of a broadcast operand of ``shape`` that feeds ``out_box`` (numpy rules)."""
    lead = len(out_box) - len(shape)
    return tuple((0, 1) if n == 1 else out_box[lead + i] for i, n in enumerate(shape))


def _scratch(dtype: np.dtype[Any], shape: tuple[int, ...], *inputs: object) -> npt.NDArray[Any] | None:
    """An input buffer the result can overwrite (private, writable, right dtype and shape), or None.

    Computing in place saves one fresh allocation per kernel; fresh buffers
    of a megabyte cost page faults that rival the arithmetic itself.
    """
    for a in inputs:
        if (
            isinstance(a, np.ndarray)
            and a.flags.writeable
            and a.flags.c_contiguous
            and a.dtype == dtype
            and a.shape == shape
        ):
            return a
    return None


async def _operand(cpu: PeCpu, x: TensorDesc | Scalar, out_box: Box) -> npt.NDArray[Any] | Scalar:
    if isinstance(x, TensorDesc):
        return await gather(cpu, x, _operand_box(x.shape, out_box))
    return x


# ---------------------------------------------------------------------------
# The kernels.
# ---------------------------------------------------------------------------

KernelBody: TypeAlias = Callable[["PeCpu", ArgReader], Awaitable[None]]


def _kernel(name: str, body: KernelBody) -> KernelFn:
    """Wrap a kernel body: decode errors and exceptions become the PE's failed response."""

    async def run(cpu: PeCpu, msg: KernelLaunchMsg) -> tuple[str | None, int | float | None]:
        try:
            await body(cpu, LAUNCHES.reader(msg, cpu.device.config.memory.page_size))
        except Exception as exc:
            return f"{cpu.name}: builtin kernel {name!r} failed: {exc}", None
        return None, None

    run.__name__ = run.__qualname__ = f"builtin_{name}"
    return run


_UFUNCS: Final[dict[str, np.ufunc]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
}


def _binary(name: str) -> KernelBody:
    """``out = x <op> y`` elementwise, numpy broadcasting; args ``(out, x, y)``, x/y tensors or scalars.

    Timing: 1 FLOP per output element; reads the operand regions that feed
    the owned output block (local when the operands share its layout).
    """
    ufunc = _UFUNCS[name]

    async def body(cpu: PeCpu, args: ArgReader) -> None:
        out, x, y = args.tensor(), args.operand(), args.operand()
        k = out.owned_by((cpu.sip, cpu.cube, cpu.pe))
        if k is None:
            return
        box = out.shard_box(k)
        xa, ya = await run_concurrently(cpu.sim, [_operand(cpu, x, box), _operand(cpu, y, box)])
        shape = tuple(e - s for s, e in box)
        with np.errstate(all="ignore"):
            r = ufunc(xa, ya, out=_scratch(out.dtype, shape, xa, ya))
        await compute(cpu, math.prod(shape), name)
        await write_block(cpu, out, k, np.broadcast_to(r, shape))

    return body


async def _neg(cpu: PeCpu, args: ArgReader) -> None:
    """``out = -x``; args ``(out, x)``. Timing: 1 FLOP per element."""
    out, x = args.tensor(), args.tensor()
    k = out.owned_by((cpu.sip, cpu.cube, cpu.pe))
    if k is None:
        return
    box = out.shard_box(k)
    xa = await gather(cpu, x, box)
    with np.errstate(all="ignore"):
        r = np.negative(xa, out=_scratch(out.dtype, xa.shape, xa))
    await compute(cpu, r.size, "neg")
    await write_block(cpu, out, k, r)


async def _copy(cpu: PeCpu, args: ArgReader) -> None:
    """``out = x`` with any change of layout or dtype; args ``(out, x)``.

    Used by ``clone()`` and ``to()``. Timing: DMA only (no FLOPs): the owner
    reads its block from wherever ``x`` keeps it and writes it locally.
    """
    out, x = args.tensor(), args.tensor()
    k = out.owned_by((cpu.sip, cpu.cube, cpu.pe))
    if k is None:
        return
    xa = await gather(cpu, x, out.shard_box(k))
    with np.errstate(all="ignore"):
        await write_block(cpu, out, k, xa.astype(out.dtype, copy=False))


async def _matmul(cpu: PeCpu, args: ArgReader) -> None:
    """``out = a @ b`` for 2-D tensors; args ``(out, a, b)``.

    The owner of output block ``rows x cols`` reads ``a[rows, :]`` and
    ``b[:, cols]`` (remote shards of ``b`` cross the fabric) and computes the
    block. Timing: ``2 * m * k * n`` FLOPs for an ``m x n`` block.
    """
    out, a, b = args.tensor(), args.tensor(), args.tensor()
    k = out.owned_by((cpu.sip, cpu.cube, cpu.pe))
    if k is None:
        return
    (r0, r1), (c0, c1) = out.shard_box(k)
    kk = a.shape[1]
    aa, bb = await run_concurrently(cpu.sim, [gather(cpu, a, ((r0, r1), (0, kk))), gather(cpu, b, ((0, kk), (c0, c1)))])
    with np.errstate(all="ignore"), host_threads(cpu.device.config.compute.host_threads):
        r = np.matmul(aa, bb)
    await compute(cpu, 2 * (r1 - r0) * kk * (c1 - c0), "matmul")
    await write_block(cpu, out, k, r)


async def _sum(cpu: PeCpu, args: ArgReader) -> None:
    """Sum over some dimensions; args ``(out, x, mode, ndims, dim...)``.

    ``mode`` 0 (*direct*): the owner of an output block reads the input
    region that reduces into it (whole reduced dimensions) and sums it.
    ``mode`` 1 (*partial*): the first phase of a sum across shards; ``out`` has
    one row per shard of ``x`` and the PE holding shard ``j`` writes the sum of
    its own shard, read locally, to row ``j``. Timing: 1 FLOP per input element read.
    """
    out, x = args.tensor(), args.tensor()
    mode = args.int("mode")
    dims = tuple(args.int("dim") for _ in range(args.int("number of dims")))
    me = (cpu.sip, cpu.cube, cpu.pe)
    k = out.owned_by(me)
    if k is None:
        return
    if mode == 1:
        j = x.owned_by(me)
        if j is None:
            raise ValueError(f"partial sum: {x} has no shard on this PE")
        xa = await gather(cpu, x, x.shard_box(j))
        r = np.sum(xa, axis=dims, dtype=out.dtype).reshape((1, *out.shape[1:]))
    else:
        box = out.shard_box(k)
        it = iter(box)
        in_box = tuple((0, n) if i in dims else next(it) for i, n in enumerate(x.shape))
        xa = await gather(cpu, x, in_box)
        r = np.sum(xa, axis=dims, dtype=out.dtype)
    await compute(cpu, xa.size, "sum")
    await write_block(cpu, out, k, np.asarray(r))


BUILTINS: Final[dict[str, KernelFn]] = {
    **{name: _kernel(name, _binary(name)) for name in _UFUNCS},
    "neg": _kernel("neg", _neg),
    "copy": _kernel("copy", _copy),
    "matmul": _kernel("matmul", _matmul),
    "sum": _kernel("sum", _sum),
}
"""The runtime's builtin kernels by name."""


def install(device: HostDevice) -> None:
    """Register :data:`BUILTINS` in ``device.builtins`` (an existing entry of the same name is replaced)."""
    device.builtins.update(BUILTINS)
