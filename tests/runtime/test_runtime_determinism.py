"""Same script, same virtual time: on repeat, on uvloop and the default loop, and in wire mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import kbus
from kbus.runtime import Replicate, Runtime, Shard


async def workload(torch: Runtime) -> tuple[int, list[np.ndarray]]:
    """A little of everything: uploads, fills, every op, cross-shard reads, frees, a scope."""
    x = np.arange(48, dtype=np.float32).reshape(12, 4) / 7
    a = torch.tensor(x)
    w = torch.tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), policy=Replicate())
    cols = torch.rand(4, 9, policy=Shard(dim=1))
    async with torch.scope() as scope:
        h = (a * 2 - 1) / (a + 1)
        y = h @ w
        z = -(a @ cols).sum(0)
        m = a.to(Replicate()).sum()
        scope.keep(y, z, m)
    del h
    out = [await y.numpy(), await z.numpy(), await m.numpy(), await cols.to(Shard(dim=0, over="cube")).numpy()]
    for t in (a, w, cols, y, z, m):
        t.free()
    await torch.synchronize()
    return torch.now_ps, out


def run_once(preset: str, *, use_uvloop: bool, wire: bool) -> tuple[int, list[np.ndarray]]:
    async def main() -> tuple[int, list[np.ndarray]]:
        async with kbus.open_device(preset, wire=wire) as torch:
            return await workload(torch)

    return kbus.run(main, use_uvloop=use_uvloop)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_same_script_same_virtual_time(preset: str) -> None:
    t1, out1 = run_once(preset, use_uvloop=False, wire=False)
    t2, out2 = run_once(preset, use_uvloop=False, wire=False)
    t3, out3 = run_once(preset, use_uvloop=True, wire=False)
    assert t1 == t2 == t3 > 0
    for a, b, c in zip(out1, out2, out3, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_wire_mode_end_to_end() -> None:
    """Every inbox round-trips every message through the codec; results and timing are unchanged."""
    t_plain, out_plain = run_once("tiny", use_uvloop=False, wire=False)
    t_wire, out_wire = run_once("tiny", use_uvloop=False, wire=True)
    assert t_wire == t_plain
    x = np.arange(48, dtype=np.float32).reshape(12, 4) / 7
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(out_wire[0], ((x * 2 - 1) / (x + 1)) @ w, rtol=1e-5)
    np.testing.assert_allclose(out_wire[2], x.sum(), rtol=1e-5)
    for a, b in zip(out_plain, out_wire, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.asyncio
async def test_wire_mode_runs_under_pytest_asyncio() -> None:
    async with kbus.open_device("tiny", wire=True) as torch:
        assert torch.device.wire
        a = torch.arange(10, dtype=np.float64)
        b = await (a * 0.5 + torch.full(10, 2.0, dtype=np.float64, policy=Replicate())).numpy()
        np.testing.assert_array_equal(b, np.arange(10) * 0.5 + 2.0)


@pytest.mark.asyncio
async def test_virtual_time_is_independent_of_host_pauses() -> None:
    """Host code between commands takes no virtual time, whatever it does with the loop."""

    async def script(pause: bool) -> int:
        async with kbus.open_device("tiny") as torch:
            a = torch.ones(64)
            await a
            t0 = torch.now_ps
            if pause:
                await asyncio.sleep(0.01)  # real time passes; virtual time does not
            await (a + 1).numpy()
            return torch.now_ps - t0

    assert await script(False) == await script(True)


@pytest.mark.asyncio
@pytest.mark.parametrize("wire", [False, True])
async def test_non_finite_scalars_cross_the_wire(wire: bool) -> None:
    """The codec carries finite floats only; NaN and infinities travel as their IEEE bits."""
    x = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    async with kbus.open_device("tiny", wire=wire) as torch:
        a = torch.tensor(x)
        with np.errstate(all="ignore"):
            cases = [
                (a + float("nan"), x + float("nan")),
                (a * float("inf"), x * float("inf")),
                (a - np.float32("-inf"), x - np.float32("-inf")),
                (torch.full(4, float("nan")), np.full(4, np.nan, np.float32)),
            ]
        for t, want in cases:
            np.testing.assert_array_equal(await t.numpy(), want)
