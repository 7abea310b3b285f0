"""pytest plugin of kbus, registered through the ``pytest11`` entry point.

Installing kbus is enough; no ``conftest.py`` is needed. It provides:

* ``kbus_device``: an open runtime handle (``kbus.open_device(...)``) on the
  test's event loop, closed after the test;
* ``kbus_sim``: a fresh :class:`kbus.Sim`, shut down after the test;
* the ``kbus`` marker, ``@pytest.mark.kbus(config="tiny", **open_device_options)``;
* the ``--kbus-config`` option and the ``kbus_config`` ini key (default ``tiny``).

Which config a test gets: the marker's, else ``--kbus-config``, else the ini
key, else ``"tiny"``.

One fixture, two async plugins
------------------------------
The fixtures are async generators, and pytest runs none by itself: the plugin
that runs the *test* must run them, on the same loop (a Sim is bound to the loop
it first ran on). pytest-asyncio in strict mode only runs fixtures marked by
``pytest_asyncio.fixture``, and runs them on the loop of their ``loop_scope``,
fixed at definition time; anyio's plugin runs any async fixture requested by a
test that uses ``anyio_backend``. A fixture fixed at definition would therefore
break one of: strict mode, module-scoped loops, or anyio.

So the fixtures are plain ``@pytest.fixture`` async generators and this
module's ``pytest_fixture_setup`` wrapper (``tryfirst``, so it runs before both
plugins see the fixture) decides per test:

* the test is a pytest-asyncio test (``pytest_asyncio.is_async_test``): hand
  pytest-asyncio a copy of the fixture marked as an asyncio fixture whose loop
  scope is the *test's* loop scope, so both run on one loop in strict and auto
  mode alike;
* the test uses ``anyio_backend``: leave the fixture unmarked; anyio's plugin
  runs it in its runner, on the test's backend (uvloop included). kbus needs
  an asyncio loop, so on anyio's trio backend the setup fails at once with a
  message saying so, instead of an obscure "no running event loop";
* neither: fail with a message saying how to mark the test.

``kbus`` is imported lazily inside the fixtures, not at plugin load, so that
coverage tools started by pytest still see kbus's module-level code run.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import AsyncIterator, Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import os

    from kbus.hw import DeviceConfig
    from kbus.runtime import Runtime
    from kbus.sim import Sim

    ConfigSpec = str | os.PathLike[str] | DeviceConfig

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["DEFAULT_CONFIG", "device_options", "kbus_device", "kbus_sim"]

DEFAULT_CONFIG = "tiny"
"""Device config used when neither the marker, ``--kbus-config`` nor ``kbus_config`` names one."""

_MARKER_HELP = (
    "kbus(config=None, **options): device config (preset name or TOML path) and extra "
    "kbus.open_device() keyword arguments for the kbus_device fixture"
)
_FIXTURE_FLAG = "_kbus_async_fixture"
_LOOP_SCOPES = ("function", "class", "module", "package", "session")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kbus", "kbus device emulator")
    group.addoption(
        "--kbus-config",
        dest="kbus_config",
        default=None,
        metavar="CONFIG",
        help=f"device config for the kbus_device fixture: preset name or TOML path (default: ini kbus_config, "
        f"else {DEFAULT_CONFIG!r})",
    )
    parser.addini(
        "kbus_config",
        help=f"device config for the kbus_device fixture (default {DEFAULT_CONFIG!r})",
        default=DEFAULT_CONFIG,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)


def device_options(node: pytest.Item | pytest.Collector, config: pytest.Config) -> tuple[ConfigSpec, dict[str, Any]]:
    """The ``(config, extra open_device kwargs)`` the ``kbus_device`` fixture uses for ``node``.

    ``config`` is whatever the marker, option or ini key gave: a preset name,
    a TOML path, or (from a marker) a ``DeviceConfig``. Public so a project's
    own fixture can open a device the same way.
    """
    marker = node.get_closest_marker("kbus")
    options: dict[str, Any] = {}
    chosen: ConfigSpec | None = None
    if marker is not None:
        if len(marker.args) > 1:
            raise TypeError(
                f"{node.nodeid}: @pytest.mark.kbus takes at most one positional argument (the config), "
                f"got {len(marker.args)}: {marker.args!r}"
            )
        options = dict(marker.kwargs)
        if marker.args:
            if "config" in options:
                raise TypeError(
                    f"{node.nodeid}: @pytest.mark.kbus got the config both positionally "
                    f"({marker.args[0]!r}) and as config={options['config']!r}"
                )
            chosen = marker.args[0]
        else:
            chosen = options.pop("config", None)
    if chosen is None:
        chosen = str(config.getoption("kbus_config", None) or config.getini("kbus_config") or DEFAULT_CONFIG)
    return chosen, options


def _mark_for_pytest_asyncio(func: Callable[..., Any], loop_scope: str | None) -> None:
    """Set what ``pytest_asyncio.fixture(loop_scope=...)`` sets on a fixture function."""
    func._force_asyncio_fixture = True  # type: ignore[attr-defined]
    func._loop_scope = loop_scope  # type: ignore[attr-defined]


def _async_fixture(func: Callable[..., Any]) -> Any:
    """``pytest.fixture``, plus the flag our ``pytest_fixture_setup`` routes by.

    The function itself is also marked as a pytest-asyncio fixture: strict
    mode checks the marks of a test's fixtures again when the test *runs*
    (after setup) and warns about any unmarked async one.
    """
    setattr(func, _FIXTURE_FLAG, True)
    _mark_for_pytest_asyncio(func, None)
    return pytest.fixture(func)


@_async_fixture
async def kbus_sim() -> AsyncIterator[Sim]:
    """A fresh :class:`kbus.Sim` on the test's loop; every simulated task is cancelled afterwards."""
    from kbus import Sim

    sim = Sim(name="kbus_sim")
    try:
        yield sim
    finally:
        await sim.shutdown()


@_async_fixture
async def kbus_device(request: pytest.FixtureRequest) -> AsyncIterator[Runtime]:
    """An open runtime handle, ``async with kbus.open_device(config=...) as torch``, closed after the test.

    Configure with ``@pytest.mark.kbus(config="default", **open_device_options)``,
    ``--kbus-config`` or the ``kbus_config`` ini key. Closing checks that no
    device memory is left (``MemoryLeakError``), so a leak fails the test.
    """
    from kbus.runtime import open_device

    config, options = device_options(request.node, request.config)
    async with open_device(config, **options) as torch:
        yield torch


def _loop_scope(item: pytest.Item) -> str:
    """The loop scope pytest-asyncio runs ``item`` in: its asyncio marker's, else the ini default."""
    marker = item.get_closest_marker("asyncio")
    scope: object = None
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope is None:
        try:
            scope = item.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # an old pytest-asyncio without that ini key
            scope = None
    scope = scope or "function"
    if scope not in _LOOP_SCOPES:
        raise ValueError(f"{item.nodeid}: unknown asyncio loop scope {scope!r} (expected one of {_LOOP_SCOPES})")
    return str(scope)


def _clone(func: Callable[..., Any], loop_scope: str | None) -> Callable[..., Any]:
    """A copy of fixture ``func``, marked for pytest-asyncio with ``loop_scope``, or unmarked if None.

    A copy, because the mark differs per test (loop scopes differ, anyio must
    not see it) while the fixture function is shared by all of them.
    """
    assert isinstance(func, types.FunctionType)
    clone = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    clone.__qualname__ = func.__qualname__
    clone.__module__ = func.__module__
    if loop_scope is not None:
        _mark_for_pytest_asyncio(clone, loop_scope)
    return clone


def _unsupported(item: pytest.Item, argname: str) -> Callable[..., Any]:
    """A stand-in fixture function that fails the setup, saying how to make the test async."""
    if inspect.iscoroutinefunction(getattr(item, "obj", None)):
        problem = "but no async plugin runs this async test"
        fix = ""
    else:
        problem = "and this test is not async"
        fix = "make it 'async def' and "
    message = (
        f"{item.nodeid}: the kbus fixture {argname!r} is async, {problem}: {fix}"
        "mark it @pytest.mark.asyncio (pytest-asyncio) or @pytest.mark.anyio (anyio), "
        "or set asyncio_mode = auto"
    )

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail(message, pytrace=False)

    return fail


def _not_asyncio(item: pytest.Item, argname: str, backend: str) -> Callable[..., Any]:
    """A stand-in fixture function for a test anyio runs on a backend other than asyncio."""
    message = (
        f"{item.nodeid}: the kbus fixture {argname!r} needs an asyncio event loop, but anyio runs this test "
        f"on {backend!r}. kbus's engine runs on asyncio (the default loop or uvloop): give the test "
        "anyio_backend 'asyncio' (or ('asyncio', {'use_uvloop': True}))"
    )

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail(message, pytrace=False)

    return fail


def _anyio_backend_name(request: pytest.FixtureRequest) -> str:
    backend = request.getfixturevalue("anyio_backend")
    name = backend if isinstance(backend, str) else backend[0]
    return str(name)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Route kbus's async fixtures to whichever plugin runs the requesting test (see module docstring)."""
    func = fixturedef.func
    if not getattr(func, _FIXTURE_FLAG, False):
        return (yield)
    item = request.node
    assert isinstance(item, pytest.Function), "kbus fixtures are function-scoped"
    if pytest_asyncio is not None and pytest_asyncio.is_async_test(item):
        replacement = _clone(func, _loop_scope(item))
    elif "anyio_backend" in item.fixturenames and inspect.iscoroutinefunction(getattr(item, "obj", None)):
        backend = _anyio_backend_name(request)
        # Unmarked, pytest-asyncio leaves the fixture to anyio's plugin; other backends cannot run kbus.
        asyncio_ok = backend == "asyncio"
        replacement = _clone(func, None) if asyncio_ok else _not_asyncio(item, fixturedef.argname, backend)
    else:
        replacement = _unsupported(item, fixturedef.argname)
    # Swapped for this setup only, the way pytest-asyncio swaps in its own runner.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fixturedef, "func", replacement)
        return (yield)
