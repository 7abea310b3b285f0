"""``torch.launch(kernel, grid=..., args=...)`` and ``torch.kernel_cache_info()``."""

from __future__ import annotations

import numpy as np
import pytest

import kbus
import kbus.lang as kl


@kbus.kernel
def scale(x_ptr, out_ptr, n, factor, BLOCK: kl.constexpr):  # type: ignore[no-untyped-def]
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


@pytest.mark.asyncio
async def test_runtime_launch_runs_kernels_and_reports_cache() -> None:
    async with kbus.open_device("tiny") as torch:
        x_np = np.arange(1000, dtype=np.float32)
        x = torch.tensor(x_np, policy=kbus.Shard(dim=0))
        out = torch.empty((1000,), dtype=np.float32, policy=kbus.Shard(dim=0))
        await torch.launch(scale, grid=(kl.cdiv(1000, 128),), args=(x, out, 1000, 3.0), BLOCK=128)
        assert np.allclose(await out.numpy(), x_np * 3)
        await torch.launch(scale, x, out, 1000, 0.5, grid=lambda meta: (kl.cdiv(1000, meta["BLOCK"]),), BLOCK=256)
        assert np.allclose(await out.numpy(), x_np * 0.5)
        info = torch.kernel_cache_info()
        assert info.deployments == 1 and info.hits >= 1
        with pytest.raises(TypeError, match="grid= is required"):
            torch.launch(scale, x, out, 1000, 1.0, BLOCK=128)
        with pytest.raises(TypeError, match="builtin kernels take no grid"):
            torch.launch("add", x, x, out, grid=(1,))
