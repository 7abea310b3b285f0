"""``kbus.run``: start an event loop (uvloop when available) for a coroutine function."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run"]


def run(main: Callable[..., Coroutine[Any, Any, T]] | Coroutine[Any, Any, T], *args: Any, use_uvloop: bool = True) -> T:
    """Run ``main(*args)`` to completion on a new event loop and return its result.

    Uses uvloop when ``use_uvloop`` is true and uvloop is installed, otherwise
    the default asyncio loop. Virtual time behaves identically on both.
    """
    coro: Coroutine[Any, Any, T]
    if inspect.iscoroutine(main):
        if args:
            raise TypeError("kbus.run: pass either a coroutine function with args or a coroutine object")
        coro = main
    elif callable(main):
        made = main(*args)
        if not inspect.iscoroutine(made):
            raise TypeError(f"kbus.run: {getattr(main, '__name__', main)!r} did not return a coroutine")
        coro = made
    else:
        raise TypeError(f"kbus.run needs a coroutine function, got {type(main).__name__}")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - platform without uvloop
            pass
        else:
            result: T = uvloop.run(coro)
            return result
    out: T = asyncio.run(coro)
    return out
