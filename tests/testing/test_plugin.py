"""The pytest plugin under every harness it supports, each run in a fresh pytest subprocess.

Combinations: pytest-asyncio strict and auto mode, function and module loop
scopes (by marker and by ini), and uvloop through its loop-factory hook;
anyio's plugin on the asyncio backend with and without uvloop, with
pytest-asyncio loaded and without it. Every inner run uses
``-W error`` and ``--strict-markers``, so a deprecation warning from either
async plugin (for example about an unmarked async fixture) fails it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None

STRICT = "asyncio_mode = strict"
AUTO = "asyncio_mode = auto"
MODULE_LOOPS = "asyncio_default_test_loop_scope = module"
ANYIO_BACKEND = """
@pytest.fixture(scope="module")
def anyio_backend():
    return {backend!r}
"""

SUITE = """
import asyncio

import pytest

import kbus

LOOPS = []
SIMS = []
{backend_fixture}

{mark}
async def test_sim_runs_on_the_test_loop(kbus_sim):
    loop = asyncio.get_running_loop()
    LOOPS.append(loop)
    SIMS.append(kbus_sim)
    assert isinstance(kbus_sim, kbus.Sim) and kbus_sim.now == 0
    kbus_sim.spawn(kbus_sim.sleep(kbus.us(1)), name="daemon-left-running", daemon=True)
    await kbus_sim.sleep(kbus.ns(5))
    assert kbus_sim.now == kbus.ns(5)
    assert kbus_sim._loop is loop
    if {uvloop!r}:
        assert type(loop).__module__.startswith("uvloop"), type(loop)
    with kbus.move_on_after(kbus_sim, kbus.ns(1)) as scope:
        await kbus_sim.sleep(kbus.ns(10))
    assert scope.expired and kbus_sim.now == kbus.ns(6)


{mark}
async def test_each_test_gets_a_fresh_sim(kbus_sim):
    LOOPS.append(asyncio.get_running_loop())
    assert kbus_sim.now == 0 and kbus_sim is not SIMS[0]
    assert SIMS[0].tasks() == [], "the previous test's sim was not shut down"
    with pytest.raises(TimeoutError):
        with kbus.fail_after(kbus_sim, "2ns"):
            await kbus_sim.sleep(kbus.ns(3))


def test_loops_shared_as_configured():
    shared = {shared!r}
    if shared is not None:
        assert (LOOPS[0] is LOOPS[1]) is shared
"""

DEVICE_SUITE = """

{mark}
@pytest.mark.kbus(config="default")
async def test_device_fixture(kbus_device):
    loop = asyncio.get_running_loop()
    assert kbus_device.sim._loop is loop
    assert kbus_device.device.config.name == "default"
    t = kbus_device.tensor([1.0, 2.0, 3.0])
    assert (await t.numpy()).tolist() == [1.0, 2.0, 3.0]
    with kbus.fail_after(kbus_device, kbus.ms(1)):
        await t


{mark}
async def test_device_fixture_default_config(kbus_device):
    assert kbus_device.device.config.name == "tiny"
"""

UVLOOP_FACTORY = """
import uvloop

def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
"""
USE_UVLOOP = ("asyncio", {"use_uvloop": True})
NO_PYTEST_ASYNCIO = ["-p", "no:asyncio"]


@dataclasses.dataclass(frozen=True)
class Harness:
    """One way of running async tests: ini lines, the tests' mark, pytest args, what to expect."""

    ini: list[str]
    mark: str
    args: list[str] = dataclasses.field(default_factory=list)
    shared_loop: bool | None = None
    """Whether the suite's two tests run on one loop (None: not checked)."""
    uvloop: bool = False
    anyio_backend: object = None
    conftest: str = ""


HARNESSES: dict[str, Harness] = {
    "asyncio-strict-function": Harness([STRICT], "@pytest.mark.asyncio", shared_loop=False),
    "asyncio-strict-module-marker": Harness([STRICT], '@pytest.mark.asyncio(loop_scope="module")', shared_loop=True),
    "asyncio-strict-module-ini": Harness([STRICT, MODULE_LOOPS], "@pytest.mark.asyncio", shared_loop=True),
    "asyncio-auto-function": Harness([AUTO], "", shared_loop=False),
    "asyncio-auto-module": Harness([AUTO, MODULE_LOOPS], "", shared_loop=True),
    "asyncio-strict-uvloop-factory": Harness(
        [STRICT], "@pytest.mark.asyncio", shared_loop=False, uvloop=True, conftest=UVLOOP_FACTORY
    ),
    "anyio-asyncio": Harness([STRICT], "@pytest.mark.anyio", anyio_backend="asyncio"),
    "anyio-uvloop": Harness([STRICT], "@pytest.mark.anyio", uvloop=True, anyio_backend=USE_UVLOOP),
    "anyio-asyncio-no-pytest-asyncio": Harness([], "@pytest.mark.anyio", NO_PYTEST_ASYNCIO, anyio_backend="asyncio"),
    "anyio-uvloop-no-pytest-asyncio": Harness(
        [], "@pytest.mark.anyio", NO_PYTEST_ASYNCIO, uvloop=True, anyio_backend=USE_UVLOOP
    ),
}


def _ini(pytester: pytest.Pytester, lines: list[str], *, pytest_asyncio: bool = True) -> None:
    # pytest-asyncio warns (an error under -W error) when this key is unset;
    # without pytest-asyncio loaded the key itself is unknown, also a warning.
    if pytest_asyncio:
        lines = [*lines, "asyncio_default_fixture_loop_scope = function"]
    pytester.makeini("[pytest]\n" + "\n".join(lines) + "\n")


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-W", "error", "--strict-markers", "-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("name", list(HARNESSES))
def test_fixtures_under_each_harness(pytester: pytest.Pytester, name: str) -> None:
    h = HARNESSES[name]
    if h.uvloop and not HAS_UVLOOP:
        pytest.skip("uvloop is not installed")
    backend_fixture = ANYIO_BACKEND.format(backend=h.anyio_backend) if h.anyio_backend is not None else ""
    source = SUITE.format(mark=h.mark, uvloop=h.uvloop, shared=h.shared_loop, backend_fixture=backend_fixture)
    source += DEVICE_SUITE.format(mark=h.mark)
    _ini(pytester, h.ini, pytest_asyncio="no:asyncio" not in h.args)
    if h.conftest:
        pytester.makeconftest(h.conftest)
    pytester.makepyfile(test_suite=source)
    result = _run(pytester, *h.args)
    result.assert_outcomes(passed=5)


def test_asyncio_and_anyio_tests_share_one_module(pytester: pytest.Pytester) -> None:
    _ini(pytester, [STRICT])
    pytester.makepyfile(
        test_mixed=textwrap.dedent(
            """
            import asyncio
            import pytest
            import kbus

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            @pytest.mark.asyncio
            async def test_asyncio(kbus_sim):
                await kbus_sim.sleep(1)
                assert kbus_sim._loop is asyncio.get_running_loop()

            @pytest.mark.anyio
            async def test_anyio(kbus_sim):
                await kbus_sim.sleep(1)
                assert kbus_sim._loop is asyncio.get_running_loop()

            @pytest.mark.asyncio(loop_scope="module")
            async def test_asyncio_module_loop(kbus_sim):
                await kbus_sim.sleep(1)
                assert kbus_sim._loop is asyncio.get_running_loop()
            """
        )
    )
    _run(pytester).assert_outcomes(passed=3)


def test_sync_test_gets_a_clear_error(pytester: pytest.Pytester) -> None:
    _ini(pytester, [STRICT])
    pytester.makepyfile(
        test_sync=textwrap.dedent(
            """
            import pytest

            def test_sync(kbus_sim):
                pass

            async def test_unmarked_async(kbus_sim):
                pass
            """
        )
    )
    result = _run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_sync.py::test_sync: the kbus fixture 'kbus_sim' is async, and this test is not async: "
            "make it 'async def' and mark it @pytest.mark.asyncio*",
            "*test_unmarked_async: the kbus fixture 'kbus_sim' is async, but no async plugin runs this async test*",
        ]
    )


CONFIG_SUITE = """
import pytest
from kbus.testing.plugin import device_options

def test_unmarked(request):
    assert device_options(request.node, request.config) == ({unmarked!r}, {{}})

@pytest.mark.kbus(config="default")
def test_marker_keyword(request):
    assert device_options(request.node, request.config) == ("default", {{}})

@pytest.mark.kbus("large", wire=True)
def test_marker_positional_with_options(request):
    assert device_options(request.node, request.config) == ("large", {{"wire": True}})

@pytest.mark.kbus(config="default")
class TestClassMarker:
    def test_inherits(self, request):
        assert device_options(request.node, request.config) == ("default", {{}})

    @pytest.mark.kbus(config="tiny")
    def test_closest_wins(self, request):
        assert device_options(request.node, request.config) == ("tiny", {{}})
"""


@pytest.mark.parametrize(
    ("ini", "args", "unmarked"),
    [
        ([], [], "tiny"),
        (["kbus_config = large"], [], "large"),
        (["kbus_config = large"], ["--kbus-config", "presets/mine.toml"], "presets/mine.toml"),
    ],
    ids=["default", "ini", "command-line-beats-ini"],
)
def test_config_resolution(pytester: pytest.Pytester, ini: list[str], args: list[str], unmarked: str) -> None:
    _ini(pytester, ini)
    pytester.makepyfile(test_config=CONFIG_SUITE.format(unmarked=unmarked))
    _run(pytester, *args).assert_outcomes(passed=5)


def test_bad_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    _ini(pytester, [])
    pytester.makepyfile(
        test_bad=textwrap.dedent(
            """
            import pytest
            from kbus.testing.plugin import device_options

            @pytest.mark.kbus("tiny", config="default")
            def test_twice(request):
                device_options(request.node, request.config)

            @pytest.mark.kbus("tiny", "default")
            def test_two_positional(request):
                device_options(request.node, request.config)
            """
        )
    )
    result = _run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*got the config both positionally ('tiny') and as config='default'*",
            "*takes at most one positional argument (the config), got 2*",
        ]
    )


def test_marker_and_option_are_registered(pytester: pytest.Pytester) -> None:
    _ini(pytester, [])
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.kbus(config=None, **options):*"])
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--kbus-config=CONFIG*", "*kbus_config*"])


def test_device_fixture_follows_command_line_and_marker_options(pytester: pytest.Pytester) -> None:
    _ini(pytester, [STRICT, "kbus_config = large"])
    pytester.makepyfile(
        test_options=textwrap.dedent(
            """
            import pytest

            @pytest.mark.asyncio
            async def test_command_line_config(kbus_device):
                assert kbus_device.config.name == "default"
                assert not kbus_device.device.wire

            @pytest.mark.asyncio
            @pytest.mark.kbus("tiny", wire=True)
            async def test_marker_options_reach_open_device(kbus_device):
                assert kbus_device.config.name == "tiny"
                assert kbus_device.device.wire
                t = kbus_device.ones(16)
                assert (await t.sum().item()) == 16.0

            @pytest.mark.asyncio
            @pytest.mark.kbus(config="no-such-preset")
            async def test_bad_config_fails_setup(kbus_device):
                pass
            """
        )
    )
    result = _run(pytester, "--kbus-config", "default")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ConfigError: 'no-such-preset' is neither a preset nor a TOML file*"])


def test_tensors_alive_at_the_end_are_freed_by_teardown(pytester: pytest.Pytester) -> None:
    """kbus_device closes the device after the test: live tensors are freed, the leak check passes."""
    _ini(pytester, [STRICT])
    pytester.makepyfile(
        test_leak=textwrap.dedent(
            """
            import pytest

            @pytest.mark.asyncio
            async def test_everything_freed(kbus_device):
                kept = kbus_device.zeros(1024)
                await kept
            """
        )
    )
    _run(pytester).assert_outcomes(passed=1)


def test_the_example_in_docs_testing_md_passes(pytester: pytest.Pytester) -> None:
    """The first code block of docs/testing.md is a test module: it must pass as written."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```", doc, re.DOTALL)
    assert match is not None, "docs/testing.md has no python code block"
    _ini(pytester, [STRICT])
    pytester.makepyfile(test_doc=match.group(1))
    _run(pytester).assert_outcomes(passed=2)
