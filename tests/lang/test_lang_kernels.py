"""Kernels against numpy on real runtime tensors, on the tiny and default presets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kbus
import kbus.lang as kl

PRESETS = ["tiny", "default"]


@kbus.kernel
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    x = kl.load(x_ptr + offs, mask=mask)
    y = kl.load(y_ptr + offs, mask=mask)
    kl.store(out_ptr + offs, x + y, mask=mask)


@kbus.kernel
def softmax(x_ptr, out_ptr, n_cols, stride, BLOCK: kl.constexpr):
    row = kl.program_id(0)
    cols = kl.arange(0, BLOCK)
    mask = cols < n_cols
    x = kl.load(x_ptr + row * stride + cols, mask=mask, other=-np.inf)
    num = kl.exp(x - kl.max(x, axis=0))
    kl.store(out_ptr + row * stride + cols, num / kl.sum(num, axis=0), mask=mask)


@kbus.kernel
def matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: kl.constexpr, BN: kl.constexpr, BK: kl.constexpr):
    rm = kl.program_id(0) * BM + kl.arange(0, BM)
    rn = kl.program_id(1) * BN + kl.arange(0, BN)
    rk = kl.arange(0, BK)
    acc = kl.zeros((BM, BN), kl.float32)
    for k in range(0, K, BK):
        kk = k + rk
        a = kl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K))
        b = kl.load(b_ptr + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N))
        acc = kl.dot(a, b, acc)
    kl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@kbus.kernel
def gather(x_ptr, idx_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    idx = kl.load(idx_ptr + offs, mask=mask)
    kl.store(out_ptr + offs, kl.load(x_ptr + idx, mask=mask), mask=mask)


@kbus.kernel
def scatter(src_ptr, idx_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    idx = kl.load(idx_ptr + offs, mask=mask)
    kl.store(out_ptr + idx, kl.load(src_ptr + offs, mask=mask), mask=mask)


@kbus.kernel
def twice(x):
    return x * 2


@kbus.kernel
def scale2d(x_ptr, out_ptr, M, N, alpha, BM: kl.constexpr, BN: kl.constexpr):
    r = kl.program_id(0) * BM + kl.arange(0, BM)
    c = kl.program_id(1) * BN + kl.arange(0, BN)
    mask = (r[:, None] < M) & (c[None, :] < N)
    off = r[:, None] * N + c[None, :]
    kl.store(out_ptr + off, twice(kl.load(x_ptr + off, mask=mask)) * alpha, mask=mask)


@kbus.kernel
def grid_stride_sum(x_ptr, out_ptr, n, BLOCK: kl.constexpr):
    """Persistent style: each instance strides over the tensor by the whole grid's width."""
    pid = kl.program_id(0)
    acc = kl.zeros((BLOCK,), kl.float64)
    for start in range(pid * BLOCK, n, kl.num_programs(0) * BLOCK):
        offs = start + kl.arange(0, BLOCK)
        acc += kl.load(x_ptr + offs, mask=offs < n, other=0)
    kl.store(out_ptr + pid, kl.sum(acc))


def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("placement", ["spread", "owner"])
async def test_vector_add_sharded(preset: str, placement: str) -> None:
    async with kbus.open_device(preset) as torch:
        n = 50_001
        x = rng().standard_normal(n).astype(np.float32)
        y = rng().standard_normal(n).astype(np.float32)
        xt, yt = torch.tensor(x, policy=kbus.Shard(dim=0)), torch.tensor(y, policy=kbus.Shard(dim=0))
        out = torch.empty(n, dtype=np.float32)
        res = await add[lambda meta: (kl.cdiv(meta["n"], meta["BLOCK"]),)](
            xt, yt, out, n, BLOCK=1024, placement=placement
        )
        np.testing.assert_array_equal(await out.numpy(), x + y)
        assert res.instances == kl.cdiv(n, 1024) and res.grid == (res.instances, 1, 1)
        assert res.placement == placement and res.end_ps > res.start_ps


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
async def test_row_softmax(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        x = rng().standard_normal((45, 300)).astype(np.float32)
        xt = torch.tensor(x)
        out = torch.empty(45, 300, dtype=np.float32)
        await softmax[(45,)](xt, out, 300, 300, BLOCK=512, placement="owner")
        e = np.exp(x - x.max(axis=1, keepdims=True))
        np.testing.assert_allclose(await out.numpy(), e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
async def test_tiled_matmul_with_ragged_edges(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        M, N, K = 70, 50, 90
        a = rng().standard_normal((M, K)).astype(np.float32)
        b = rng().standard_normal((K, N)).astype(np.float32)
        at, bt = torch.tensor(a), torch.tensor(b, policy=kbus.Replicate())
        c = torch.zeros(M, N, dtype=np.float32)

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return kl.cdiv(meta["M"], meta["BM"]), kl.cdiv(meta["N"], meta["BN"])

        res = await matmul[grid](at, bt, c, M, N, K, BM=32, BN=16, BK=32, placement="owner")
        assert res.instances == 3 * 4
        np.testing.assert_allclose(await c.numpy(), a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
async def test_gather_and_scatter_with_arbitrary_offsets(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        n, m = 300_000, 4000
        src = rng().standard_normal(n).astype(np.float32)
        idx = rng().integers(0, n, m)  # sparse lanes all over a sharded tensor: the run-by-run path
        xt, it = torch.tensor(src), torch.tensor(idx)
        out = torch.empty(m, dtype=np.float32)
        await gather[(kl.cdiv(m, 1024),)](xt, it, out, m, BLOCK=1024)
        np.testing.assert_array_equal(await out.numpy(), src[idx])
        perm = rng().permutation(m)
        vals = rng().standard_normal(m).astype(np.float32)
        dst = torch.zeros(m, dtype=np.float32)
        await scatter[(kl.cdiv(m, 512),)](torch.tensor(vals), torch.tensor(perm), dst, m, BLOCK=512)
        expect = np.zeros(m, np.float32)
        expect[perm] = vals
        np.testing.assert_array_equal(await dst.numpy(), expect)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    ("policy", "placement"),
    [(kbus.Shard(dim=0), "owner"), (kbus.Shard(dim=1), "spread"), (kbus.Replicate(), "owner")],
    ids=["dim0", "dim1", "replicated"],
)
async def test_2d_tiles_over_every_layout(preset: str, policy: Any, placement: str) -> None:
    async with kbus.open_device(preset) as torch:
        x = rng().standard_normal((37, 53)).astype(np.float32)
        xt = torch.tensor(x, policy=policy)
        out = torch.empty(37, 53, dtype=np.float32, policy=kbus.Shard(dim=1))
        await scale2d[(kl.cdiv(37, 8), kl.cdiv(53, 16))](
            xt, out, 37, 53, np.float32(0.5), BM=8, BN=16, placement=placement
        )
        np.testing.assert_array_equal(await out.numpy(), x)


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.int64, np.uint8])
async def test_dtypes_round_trip(dtype: Any) -> None:
    async with kbus.open_device("tiny") as torch:
        x = (np.arange(3000) % 100).astype(dtype)
        y = (np.arange(3000) % 7).astype(dtype)
        out = torch.empty(3000, dtype=dtype)
        await add[(3,)](torch.tensor(x), torch.tensor(y), out, 3000, BLOCK=1024)
        got = await out.numpy()
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, x + y)


@pytest.mark.asyncio
async def test_launch_function_and_empty_grid() -> None:
    async with kbus.open_device("tiny") as torch:
        x = np.ones(100, np.float32)
        xt, yt, out = torch.tensor(x), torch.tensor(x), torch.zeros(100, dtype=np.float32)
        res = await kl.launch(torch, add, (1,), (xt, yt, out, 100), BLOCK=128)
        assert res.instances == 1 and res.pes == 1
        np.testing.assert_array_equal(await out.numpy(), 2 * x)
        empty = await add[(0,)](xt, yt, out, 100, BLOCK=128)
        assert empty.instances == 0 and empty.pes == 0


@pytest.mark.asyncio
async def test_spread_uses_every_pe_and_owner_uses_the_owners() -> None:
    async with kbus.open_device("default") as torch:
        n = 64 * 1024
        x = torch.tensor(np.ones(n, np.float32), policy=kbus.Shard(dim=0, targets=[(0, 0, 0), (1, 2, 0)]))
        out = torch.empty(n, dtype=np.float32, policy=kbus.Shard(dim=0, targets=[(0, 0, 0), (1, 2, 0)]))
        spread = await add[(64,)](x, x, out, n, BLOCK=1024)
        assert spread.pes == spread.active_pes == 64
        owner = await add[(64,)](x, x, out, n, BLOCK=1024, placement="owner")
        # Owners are sip0.cube0.pe0 and sip1.cube2.pe0: the smallest cover is 2 SIPs x 2 cubes x pe 0.
        assert owner.pes == 4 and owner.active_pes == 2
        np.testing.assert_array_equal(await out.numpy(), np.full(n, 2, np.float32))


@pytest.mark.asyncio
async def test_num_programs_and_python_loops_over_blocks() -> None:
    async with kbus.open_device("tiny") as torch:
        n = 100_000
        x = rng().standard_normal(n)
        partial = torch.zeros(6, dtype=np.float64)
        await grid_stride_sum[(6,)](torch.tensor(x), partial, n, BLOCK=2048)
        got = await partial.numpy()
        assert got.sum() == pytest.approx(x.sum())
        assert got[0] == pytest.approx(sum(x[s : s + 2048].sum() for s in range(0, n, 6 * 2048)))


@kbus.kernel
def fill_value(out_ptr, value, BLOCK: kl.constexpr):
    kl.store(out_ptr + kl.arange(0, BLOCK), kl.full((BLOCK,), value, kl.float32))


@pytest.mark.asyncio
@pytest.mark.parametrize("value", [float("-inf"), float("nan"), np.float32("inf"), np.float16(-2.5), 7])
async def test_scalars_cross_the_wire_including_non_finite(value: Any) -> None:
    async with kbus.open_device("tiny", wire=True) as torch:
        out = torch.empty(8, dtype=np.float32)
        await fill_value[(1,)](out, value, BLOCK=8)
        np.testing.assert_array_equal(await out.numpy(), np.full(8, value, np.float32))
