"""Kernels: the ``@kbus.kernel`` decorator, kernel identity, the registry and the code blob.

A :class:`Kernel` wraps a plain Python function. Launching it never sends the
function anywhere: the launch names a *code blob* deployed in device memory,
and the PE that receives the launch reads that blob, checks it, and resolves it
to the kernel through this process's registry. The blob therefore holds the
kernel's identity, never its code:

=======  =====  ===============================================================
offset   bytes  field
=======  =====  ===============================================================
0        8      magic ``b"KBUSKERN"``
8        2      format version (little-endian u16), currently 1
10       2      header size (u16), 64
12       4      payload length (u32)
16       32     SHA-256 of the payload
48       16     reserved, zero
64       n      payload: UTF-8 JSON ``{"abi", "name", "source_sha256",
                "variant", "params"}``
=======  =====  ===============================================================

Nothing in it is executable (no pickle, no marshalled code objects), so
corrupting device memory can make a launch fail but can never run foreign code.

Identity is ``(name, source_sha256, variant)``: the dotted name
``module.qualname``, the SHA-256 of the function's source text, and a variant
number that tells apart live kernels with the same name and source but
different function objects (a kernel defined in a factory closes over
different values each time).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
import textwrap
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

import attrs

from .language import constexpr
from .memory import current

if TYPE_CHECKING:
    from .launch import Launcher

__all__ = ["BLOB_HEADER", "BLOB_MAGIC", "BLOB_VERSION", "BlobError", "Kernel", "KernelId", "Param", "kernel"]

BLOB_MAGIC = b"KBUSKERN"
BLOB_VERSION = 1
BLOB_HEADER = 64
_HEADER = struct.Struct("<8sHHI32s16x")
ABI = 1
MAX_BLOB = 1 << 16
"""Largest code blob a PE accepts (a blob is a few hundred bytes; anything bigger is garbage)."""


class BlobError(ValueError):
    """A code blob read from device memory is not a valid kbus kernel blob (says which check failed)."""


@attrs.frozen
class KernelId:
    """What identifies a kernel across host and device: name, source hash, variant."""

    name: str
    source_sha256: str
    variant: int = 0

    def __str__(self) -> str:
        tag = f"#{self.variant}" if self.variant else ""
        return f"{self.name}{tag} (source {self.source_sha256[:12]})"


@attrs.frozen
class Param:
    """One kernel parameter: its name, whether it is a constexpr, and its default if any."""

    name: str
    constexpr: bool
    default: Any = inspect.Parameter.empty

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty


_REGISTRY: weakref.WeakValueDictionary[KernelId, Kernel] = weakref.WeakValueDictionary()


def lookup(kid: KernelId) -> Kernel | None:
    """The live kernel with identity ``kid`` in this process, or None."""
    return _REGISTRY.get(kid)


def _is_constexpr(annotation: Any) -> bool:
    if annotation is constexpr:
        return True
    # ``from __future__ import annotations`` leaves the annotation as text ("kl.constexpr").
    return isinstance(annotation, str) and annotation.strip("'\" ").rsplit(".", 1)[-1] == "constexpr"


def _source_sha256(fn: Callable[..., Any]) -> str:
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        # No source file (exec, REPL): hash what the code object says instead.
        code = fn.__code__
        text = repr((code.co_code, code.co_consts, code.co_names, code.co_varnames))
    return hashlib.sha256(text.encode()).hexdigest()


class Kernel:
    """A kernel: a Python function run once per program instance on the device's PEs.

    Create one with :func:`kernel` (``@kbus.kernel``). Launch it with
    ``await kernel[grid](*args, **constexprs)`` or
    :func:`kbus.lang.launch`. Called from inside another kernel it runs as a
    plain helper function.
    """

    def __init__(self, fn: Callable[..., Any], batch: str | None = None) -> None:
        if batch not in (None, "auto", "off"):
            raise ValueError(f"@kbus.kernel: batch must be 'auto' or 'off', got {batch!r}")
        self.batch = batch
        """Batch mode of its launches unless a launch says otherwise (``"auto"``, ``"off"``, or None:
        ``$KBUS_LANG_BATCH``, else ``"auto"``; see :mod:`kbus.lang.batch`)."""
        if not inspect.isfunction(fn):
            raise TypeError(f"@kbus.kernel decorates a plain Python function, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@kbus.kernel: {fn.__qualname__} must be a plain (synchronous) function; kernel bodies do not "
                "await: kl.load/kl.store account device time for them"
            )
        self.fn = fn
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.short_name = fn.__name__
        self.signature = inspect.signature(fn)
        params = []
        for p in self.signature.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise TypeError(
                    f"@kbus.kernel {fn.__qualname__}: parameter {p.name!r} is {p.kind.description}; kernel "
                    "parameters must be named (no *args, **kwargs or positional-only)"
                )
            params.append(Param(p.name, _is_constexpr(p.annotation), p.default))
        self.params: tuple[Param, ...] = tuple(params)
        sha = _source_sha256(fn)
        variant = 0
        while True:
            other = _REGISTRY.get(KernelId(self.name, sha, variant))
            if other is None or other.fn is fn:
                break
            variant += 1
        self.id = KernelId(self.name, sha, variant)
        _REGISTRY[self.id] = self
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def constexprs(self) -> tuple[str, ...]:
        """Names of the constexpr parameters."""
        return tuple(p.name for p in self.params if p.constexpr)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments by parameter name, in signature order, defaults applied; TypeError names what is wrong."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            sig = f"{self.short_name}{self.signature}"
            raise TypeError(f"kernel {self.short_name!r}: {exc} (signature {sig})") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def __getitem__(self, grid: Any) -> Launcher:
        """``kernel[grid]``: a launcher; call it with the kernel's arguments to get an awaitable launch."""
        from .launch import Launcher

        return Launcher(self, grid)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if current() is None:
            raise TypeError(
                f"kernel {self.short_name!r} is launched with {self.short_name}[grid](...) or "
                "kbus.lang.launch(torch, kernel, grid, args), not called directly "
                "(calling it is allowed only from inside another kernel)"
            )
        return self.fn(*args, **kwargs)

    def blob(self) -> bytes:
        """The code blob deployed for this kernel (see the module docstring)."""
        payload = json.dumps(
            {
                "abi": ABI,
                "name": self.id.name,
                "source_sha256": self.id.source_sha256,
                "variant": self.id.variant,
                "params": [[p.name, p.constexpr] for p in self.params],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        header = _HEADER.pack(BLOB_MAGIC, BLOB_VERSION, BLOB_HEADER, len(payload), hashlib.sha256(payload).digest())
        return header + payload

    def __repr__(self) -> str:
        return f"<kbus.Kernel {self.short_name}{self.signature} id={self.id}>"


@overload
def kernel(fn: Callable[..., Any], *, batch: str | None = None) -> Kernel: ...


@overload
def kernel(fn: None = None, *, batch: str | None = None) -> Callable[[Callable[..., Any]], Kernel]: ...


def kernel(
    fn: Callable[..., Any] | None = None, *, batch: str | None = None
) -> Kernel | Callable[[Callable[..., Any]], Kernel]:
    """Decorator: turn a plain function into a launchable :class:`Kernel` (``@kbus.kernel``).

    ``@kbus.kernel(batch="off")`` makes its launches run one instance at a
    time unless a launch says otherwise; without it, the environment variable
    ``KBUS_LANG_BATCH`` (``auto`` or ``off``) decides, else ``"auto"`` (see
    :mod:`kbus.lang.batch`).
    """
    if fn is None:
        return lambda f: Kernel(f, batch)
    return Kernel(fn, batch)


def decode_blob(data: bytes, expected_nbytes: int) -> tuple[KernelId, list[tuple[str, bool]]]:
    """Check a blob read from device memory and return its kernel identity and parameter list.

    Raises :class:`BlobError` naming the failed check: length, magic, version,
    header size, payload length, checksum, payload format.
    """
    if len(data) != expected_nbytes:
        raise BlobError(f"read {len(data)} bytes, the launch says the code is {expected_nbytes} bytes")
    if len(data) < BLOB_HEADER:
        raise BlobError(f"{len(data)} bytes is shorter than the {BLOB_HEADER}-byte header")
    magic, version, header, length, digest = _HEADER.unpack_from(data)
    if magic != BLOB_MAGIC:
        raise BlobError(f"bad magic {magic!r} (expected {BLOB_MAGIC!r}): this is not a kbus kernel blob")
    if version != BLOB_VERSION:
        raise BlobError(f"unsupported blob version {version} (this PE understands version {BLOB_VERSION})")
    if header != BLOB_HEADER:
        raise BlobError(f"header size {header}, expected {BLOB_HEADER}")
    if BLOB_HEADER + length != len(data):
        raise BlobError(f"header says {length} payload bytes, the blob holds {len(data) - BLOB_HEADER}")
    payload = data[BLOB_HEADER:]
    actual = hashlib.sha256(payload).digest()
    if actual != digest:
        raise BlobError(
            f"payload checksum mismatch (SHA-256 {actual.hex()[:16]}..., header says {digest.hex()[:16]}...): "
            "the deployed code was corrupted"
        )
    try:
        meta = json.loads(payload.decode())
        if meta["abi"] != ABI:
            raise BlobError(f"kernel ABI {meta['abi']} is not supported (expected {ABI})")
        kid = KernelId(str(meta["name"]), str(meta["source_sha256"]), int(meta["variant"]))
        params = [(str(n), bool(c)) for n, c in meta["params"]]
    except BlobError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BlobError(f"payload is not a kernel description: {exc!r}") from None
    return kid, params
