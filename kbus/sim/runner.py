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

    It starts a loop, so it cannot be called from code already running on one
    (a notebook cell, an async test, another coroutine): there, ``await
    main()`` directly.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:
        name = getattr(main, "__qualname__", None) or type(main).__name__
        if inspect.iscoroutine(main):
            main.close()  # never started: no "was never awaited" warning on top of this error
        raise RuntimeError(
            f"kbus.run({name}) was called inside a running event loop; it starts a loop of its own. "
            f"In async code (a notebook, an async test, a coroutine) write `await {name.split('.')[-1]}()` instead"
        )
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
