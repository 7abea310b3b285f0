"""A device-time timeout reads like the user's own error: their lines first, none of kbus's."""

from __future__ import annotations

import textwrap

import pytest


def test_fail_after_traceback_shows_the_users_lines_not_kbus_internals(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_slow=textwrap.dedent(
            """
            import pytest
            import kbus
            from kbus.protocol import PeDmaMsg

            @pytest.mark.asyncio
            async def test_dma_budget(kbus_device):
                dev = kbus_device.device
                with kbus.fail_after(kbus_device, kbus.ns(10)):
                    await dev.request(PeDmaMsg("t", "slow", 0, 0, 0, dev.config.memory.hbm_base, 1 << 20))
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "TimeoutError: deadline of 10ns device time passed" in out
    assert "await dev.request(PeDmaMsg" in out  # where the block was when the deadline hit
    assert "kbus/sim/" not in out and "kbus/hw/" not in out, out
