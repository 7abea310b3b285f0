"""Scopes: free the tensors created inside a block when it exits."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from ..sim import SimFuture
from .tensor import Tensor, _Storage

if TYPE_CHECKING:
    from types import TracebackType

    from .runtime import Runtime

__all__ = ["SCOPES", "Scope"]

SCOPES: contextvars.ContextVar[tuple[Scope, ...]] = contextvars.ContextVar("kbus_runtime_scopes", default=())


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
        stack = SCOPES.get()
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
        self._token = SCOPES.set((*SCOPES.get(), self))
        return self

    def _exit(self) -> list[SimFuture[Any]]:
        self._open = False
        try:
            if self._token is not None:
                SCOPES.reset(self._token)
        except ValueError:  # exited in another context than entered: drop ourselves by hand
            SCOPES.set(tuple(s for s in SCOPES.get() if s is not self))
        self._token = None
        storages = list(self._storages.values())
        self._storages.clear()
        done = []
        for st in storages:
            self._rt.free_storage(st, "scope exit")
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
