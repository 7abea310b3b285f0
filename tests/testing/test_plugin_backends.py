"""kbus needs an asyncio loop: on anyio's trio backend its fixtures say so plainly."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("trio")


def test_trio_backend_gets_a_plain_reason_and_no_stray_coroutine(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_trio=textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def anyio_backend():
                return "trio"

            @pytest.mark.anyio
            async def test_device(kbus_device):
                pass

            @pytest.mark.anyio
            async def test_sim(kbus_sim):
                pass
            """
        )
    )
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "the kbus fixture 'kbus_device' needs an asyncio event loop, but anyio runs this test on 'trio'" in out
    assert "the kbus fixture 'kbus_sim' needs an asyncio event loop" in out
    assert "anyio_backend 'asyncio'" in out
    assert "never awaited" not in out and "no running event loop" not in out
