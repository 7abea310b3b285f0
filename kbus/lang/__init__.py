"""kbus.lang: a small Triton-like kernel language for the emulated device.

Write a kernel as a plain function over blocks of values, launch it over a
grid of program instances, and each instance runs (vectorized, with numpy) on
a PE of the device, moving its data through the device's links in virtual
time::

    import kbus
    import kbus.lang as kl

    @kbus.kernel
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
        offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
        mask = offs < n
        kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask) + kl.load(y_ptr + offs, mask), mask)

    await add[(kl.cdiv(n, 256),)](x, y, out, n, BLOCK=256)

Modules: :mod:`~kbus.lang.language` (what a kernel body calls),
:mod:`~kbus.lang.memory` (loads, stores and their timing),
:mod:`~kbus.lang.batch` (a PE's instances as one vectorized run),
:mod:`~kbus.lang.kernel` (the decorator, identity, code blob),
:mod:`~kbus.lang.launch` (host side: deploy, launch, program cache),
:mod:`~kbus.lang.runner` (device side: resolver, placement). See README.md.
"""

from .kernel import BlobError, Kernel, KernelId, kernel
from .language import (
    DTYPES,
    Pointer,
    Tile,
    abs,
    arange,
    bool_,
    cdiv,
    constexpr,
    dot,
    exp,
    float16,
    float32,
    float64,
    full,
    int8,
    int16,
    int32,
    int64,
    load,
    log,
    max,
    maximum,
    min,
    minimum,
    num_programs,
    program_id,
    sqrt,
    store,
    sum,
    uint8,
    uint16,
    uint32,
    uint64,
    where,
    zeros,
)
from .launch import (
    KernelCacheInfo,
    Launcher,
    LaunchHandle,
    LaunchResult,
    deploy,
    kernel_cache_info,
    launch,
    queue_launch,
)
from .runner import Deployment, code_region

jit = kernel
"""Alias of :func:`kernel`, for readers who know Triton's ``@triton.jit``."""

__all__ = [
    "DTYPES",
    "BlobError",
    "Deployment",
    "Kernel",
    "KernelCacheInfo",
    "KernelId",
    "LaunchHandle",
    "LaunchResult",
    "Launcher",
    "Pointer",
    "Tile",
    "abs",
    "arange",
    "bool_",
    "cdiv",
    "code_region",
    "constexpr",
    "deploy",
    "dot",
    "exp",
    "float16",
    "float32",
    "float64",
    "full",
    "int8",
    "int16",
    "int32",
    "int64",
    "jit",
    "kernel",
    "kernel_cache_info",
    "launch",
    "load",
    "log",
    "max",
    "maximum",
    "min",
    "minimum",
    "num_programs",
    "program_id",
    "queue_launch",
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
