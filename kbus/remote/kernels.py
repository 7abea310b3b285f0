"""Shipping ``@kbus.kernel`` kernels to a device in another process (or a replay).

A kernel's code blob names the kernel (name, source hash, variant); the PE that
runs a launch resolves that name through its own process's registry (see
:mod:`kbus.lang.kernel`). A served device lives in another process, so before
the blob is written the client sends a *kernel spec*: the kernel's source text
and the values of the globals it uses. The server compiles the source and
registers the kernel under the same identity; recordings keep the specs so a
replay can do the same.

This **executes code the client sends**: that is why a server binds to
loopback by default and wants a token on any other address, and why a
recording should be replayed only if you trust where it came from.

What a spec can carry, per global (or closure variable) the kernel uses:
ints, floats, bools, strings, None and tuples of them; modules and attributes
of ``numpy``, ``math`` and ``kbus`` (``kl.constexpr``, ``np.float32``); other
kernels (shipped too). Anything else is refused, naming the global. A kernel
whose identity has a variant number (the second of two kernels with the same
name and source, built by a factory) cannot be shipped.
"""

from __future__ import annotations
import __future__

import ast
import builtins
import hashlib
import importlib
import inspect
import linecache
import textwrap
import types
from typing import Any, Final

from ..errors import CodecError, RemoteError
from ..lang.kernel import BLOB_MAGIC, MAX_BLOB, Kernel, KernelId, decode_blob, lookup

__all__ = ["blob_kernel", "install_kernels", "kernel_specs"]

SHIPPABLE_PACKAGES: Final = frozenset({"numpy", "math", "kbus"})
"""Top-level packages whose modules and attributes a kernel spec may name."""

_FUTURE_FLAGS: Final = __future__.annotations.compiler_flag


def blob_kernel(data: Any) -> Kernel | None:
    """The live kernel a code blob (bytes of a host buffer being deployed) names, or None if it is not one."""
    raw = bytes(data[: len(BLOB_MAGIC)])
    if raw != BLOB_MAGIC or len(data) > MAX_BLOB:
        return None
    try:
        kid, _ = decode_blob(bytes(data), len(data))
    except ValueError:
        return None
    return lookup(kid)


def _names(fn: types.FunctionType, source: str) -> set[str]:
    """Every name the kernel's source may look up at definition or run time."""
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def _describe(value: Any, where: str, deps: list[dict[str, Any]], seen: set[KernelId]) -> dict[str, Any]:
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    if isinstance(value, tuple) and all(v is None or isinstance(v, bool | int | float | str) for v in value):
        return {"tuple": list(value)}
    if isinstance(value, Kernel):
        deps.extend(kernel_specs(value, seen))
        return {"kernel": [value.id.name, value.id.source_sha256, value.id.variant]}
    if isinstance(value, types.ModuleType):
        if value.__name__.partition(".")[0] in SHIPPABLE_PACKAGES:
            return {"module": value.__name__}
    else:
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        if isinstance(module, str) and isinstance(qualname, str) and module.partition(".")[0] in SHIPPABLE_PACKAGES:
            found: Any = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part, None)
            if found is value:
                return {"attr": [module, qualname]}
    raise RemoteError(
        f"{where} is a {type(value).__name__}, which cannot be sent to a device in another process "
        "(numbers, strings, tuples of them, numpy/math/kbus modules and attributes, and kernels can)"
    )


def kernel_specs(kern: Kernel, seen: set[KernelId] | None = None) -> list[dict[str, Any]]:
    """The specs that let another process register ``kern`` (its kernel dependencies first)."""
    seen = set() if seen is None else seen
    if kern.id in seen:
        return []
    seen.add(kern.id)
    what = f"kernel {kern.name!r}"
    if kern.id.variant:
        raise RemoteError(
            f"{what} is variant {kern.id.variant} of a kernel with the same name and source (built by a factory); "
            "only the first can be sent to a device in another process: give each variant its own function"
        )
    fn = kern.fn
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        source = ""
    if hashlib.sha256(source.encode()).hexdigest() != kern.id.source_sha256:
        raise RemoteError(f"{what} has no readable source (defined in a REPL or by exec?): it cannot be sent")
    deps: list[dict[str, Any]] = []
    env: dict[str, dict[str, Any]] = {}
    closure = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
    for name in sorted(_names(fn, source)):
        if name in closure:
            env[name] = _describe(closure[name], f"{what}: closure variable {name!r}", deps, seen)
        elif name in fn.__globals__:
            env[name] = _describe(fn.__globals__[name], f"{what}: global {name!r}", deps, seen)
    spec = {
        "name": kern.id.name,
        "sha": kern.id.source_sha256,
        "module": fn.__module__,
        "qualname": fn.__qualname__,
        "source": source,
        "future": bool(fn.__code__.co_flags & _FUTURE_FLAGS),
        "globals": env,
    }
    return [*deps, spec]


def _resolve(desc: Any, where: str) -> Any:
    if not isinstance(desc, dict) or len(desc) != 1:
        raise CodecError(f"invalid kernel spec at {where}: expected a one-key map", where)
    ((kind, arg),) = desc.items()
    if kind == "value":
        return arg
    if kind == "tuple" and isinstance(arg, list):
        return tuple(arg)
    if kind == "kernel" and isinstance(arg, list) and len(arg) == 3:
        found = lookup(KernelId(str(arg[0]), str(arg[1]), int(arg[2])))
        if found is None:
            raise CodecError(f"invalid kernel spec at {where}: kernel {arg[0]!r} was not sent first", where)
        return found
    if kind == "module" and isinstance(arg, str) and arg.partition(".")[0] in SHIPPABLE_PACKAGES:
        try:
            return importlib.import_module(arg)
        except ImportError:
            raise CodecError(f"invalid kernel spec at {where}: no module {arg!r} here", where) from None
    if (
        kind == "attr"
        and isinstance(arg, list)
        and len(arg) == 2
        and str(arg[0]).partition(".")[0] in SHIPPABLE_PACKAGES
    ):
        try:
            obj: Any = importlib.import_module(str(arg[0]))
            for part in str(arg[1]).split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise CodecError(f"invalid kernel spec at {where}: no {arg[0]}.{arg[1]} here", where) from None
        return obj
    raise CodecError(f"invalid kernel spec at {where}: cannot rebuild {kind!r} {arg!r}", where)


def install_kernels(specs: Any, keep: list[Kernel]) -> None:
    """Compile and register the kernels of ``specs`` in this process (strong references go to ``keep``).

    The source is compiled with its decorators removed (and the function's
    first line kept where the decorator was, so its source text and hash are
    the sender's), then wrapped in :class:`~kbus.lang.Kernel` under the
    sender's module and qualified name. Raises CodecError naming the spec
    field at fault, or if the result does not have the sender's identity.
    """
    if not isinstance(specs, list):
        raise CodecError("invalid kernel frame at specs: expected a list", "specs")
    for i, spec in enumerate(specs):
        where = f"specs[{i}]"
        try:
            name, sha, module, qualname = (str(spec[k]) for k in ("name", "sha", "module", "qualname"))
            source, env = spec["source"], spec["globals"]
        except (KeyError, TypeError):
            raise CodecError(
                f"invalid kernel spec at {where}: needs name, sha, module, qualname, source, globals", where
            ) from None
        want = KernelId(name, sha, 0)
        if lookup(want) is not None:
            continue
        if not isinstance(source, str) or not isinstance(env, dict):
            raise CodecError(
                f"invalid kernel spec at {where}.source: expected text and a globals map", f"{where}.source"
            )
        if hashlib.sha256(source.encode()).hexdigest() != sha:
            raise CodecError(f"invalid kernel spec at {where}.sha: it is not the SHA-256 of the source", f"{where}.sha")
        ns: dict[str, Any] = {"__name__": module, "__builtins__": builtins}
        for gname, desc in env.items():
            ns[str(gname)] = _resolve(desc, f"{where}.globals.{gname}")
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            raise CodecError(f"invalid kernel spec at {where}.source: {exc}", f"{where}.source") from None
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
            raise CodecError(
                f"invalid kernel spec at {where}.source: expected one function definition", f"{where}.source"
            )
        fdef = tree.body[0]
        if fdef.decorator_list:
            fdef.lineno = fdef.decorator_list[0].lineno  # the code's first line stays the decorator's
            fdef.decorator_list = []
        filename = f"<kbus kernel {name} {sha[:12]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        flags = _FUTURE_FLAGS if spec.get("future") else 0
        exec(compile(tree, filename, "exec", flags=flags, dont_inherit=True), ns)
        fn = ns[fdef.name]
        fn.__qualname__ = qualname
        kern = Kernel(fn)
        if kern.id != want:
            raise CodecError(f"invalid kernel spec at {where}: it compiles to {kern.id}, not {want}", where)
        keep.append(kern)
