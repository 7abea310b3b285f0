"""Every tensor operation against numpy, for replicated and sharded layouts, on ``tiny`` and ``default``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kbus
from kbus.runtime import Replicate, Runtime, Shard, Tensor

LAYOUTS: dict[str, kbus.runtime.DPPolicy] = {
    "replicated": Replicate(),
    "rows": Shard(dim=0),
    "cols": Shard(dim=1),
    "cubes": Shard(dim=0, over="cube"),
    "subset": Shard(dim=-2, targets=[(0, 1, 3), (0, 0, 0), 2]),
}
PRESETS = ["tiny", "default"]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


async def fetch(t: Tensor) -> Any:
    return await t.numpy()


def close(got: Any, want: Any, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_elementwise_and_unary(preset: str, layout: str) -> None:
    pol = LAYOUTS[layout]
    x = rng(1).standard_normal((7, 5)).astype(np.float32)
    y = rng(2).uniform(0.5, 2.0, (7, 5)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x, policy=pol)
        b = torch.tensor(y, policy=pol)
        results = {
            "a+b": (a + b, x + y),
            "a-b": (a - b, x - y),
            "a*b": (a * b, x * y),
            "a/b": (a / b, x / y),
            "a+2.5": (a + 2.5, x + 2.5),
            "2*a": (2 * a, 2 * x),
            "1-a": (1 - a, 1 - x),
            "3/b": (3 / b, 3 / y),
            "-a": (-a, -x),
            "chain": ((a + b) * (a - 1.5) / b, (x + y) * (x - 1.5) / y),
            "f32 scalar": (a * np.float32(0.5), x * np.float32(0.5)),
        }
        for name, (t, want) in results.items():
            assert t.shape == want.shape and t.dtype == want.dtype, name
            close(await fetch(t), want)
            assert t.policy == pol or isinstance(t.policy, Shard), name


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", ["replicated", "rows", "cols"])
async def test_mixed_layout_operands_cross_shards(preset: str, layout: str) -> None:
    x = rng(3).standard_normal((9, 4)).astype(np.float32)
    y = rng(4).standard_normal((9, 4)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x, policy=LAYOUTS[layout])
        for other in ("replicated", "rows", "cols", "subset"):
            b = torch.tensor(y, policy=LAYOUTS[other])
            close(await fetch(a + b), x + y)
            close(await fetch(b * a), y * x)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("la", "lb"), [("rows", "replicated"), ("rows", "rows"), ("rows", "cols"),
                                        ("replicated", "cols"), ("replicated", "rows"), ("replicated", "replicated"),
                                        ("cols", "rows"), ("subset", "cubes")])  # fmt: skip
async def test_matmul(preset: str, la: str, lb: str) -> None:
    x = rng(5).standard_normal((6, 5)).astype(np.float32)
    w = rng(6).standard_normal((5, 3)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x, policy=LAYOUTS[la])
        b = torch.tensor(w, policy=LAYOUTS[lb])
        c = a @ b
        assert c.shape == (6, 3)
        close(await fetch(c), x @ w, rtol=1e-4)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_sum(preset: str, layout: str) -> None:
    x = rng(7).standard_normal((7, 5)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x, policy=LAYOUTS[layout])
        for dim in (None, 0, 1, -1, (0, 1)):
            s = a.sum(dim)
            want = x.sum(axis=dim)
            got = await fetch(s)
            close(np.asarray(got), np.asarray(want, dtype=np.float32), rtol=1e-4)
        assert await a.sum().item() == pytest.approx(float(x.sum()), rel=1e-4)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout", ["replicated", "rows", "cols", "subset"])
async def test_clone_and_redistribute(preset: str, layout: str) -> None:
    x = rng(8).standard_normal((5, 6)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x, policy=LAYOUTS[layout])
        c = a.clone()
        assert c.policy == a.policy and c.addr != a.addr
        close(await fetch(c), x)
        for target in LAYOUTS.values():
            moved = a.to(target)
            assert moved.policy == target
            close(await fetch(moved), x)
        d = a.to(dtype=np.float64)
        close(await fetch(d), x.astype(np.float64))


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.int64, np.uint8, np.int8, np.uint32, np.int16])
async def test_dtypes_match_numpy(dtype: Any) -> None:
    if np.dtype(dtype).kind == "f":
        x = rng(9).uniform(-3, 3, (6, 4)).astype(dtype)
        y = rng(10).uniform(0.5, 3, (6, 4)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng(9).integers(max(info.min, -50), min(info.max, 50), (6, 4)).astype(dtype)
        y = rng(10).integers(1, min(info.max, 20), (6, 4)).astype(dtype)
    rtol = 1e-2 if dtype == np.float16 else 1e-6
    async with kbus.open_device("tiny") as torch:
        a, b = torch.tensor(x), torch.tensor(y, policy=Replicate())
        with np.errstate(all="ignore"):
            cases = {
                "add": (a + b, x + y),
                "sub": (a - b, x - y),
                "mul": (a * b, x * y),
                "div": (a / b, x / y),
                "scalar": (a + 3, x + 3),
                "neg": (-a, -x),
                "sum": (a.sum(), np.sum(x)),
                "sum0": (a.sum(0), np.sum(x, axis=0)),
                "matmul": (a @ torch.tensor(y.T.copy()), x @ y.T),
            }
        for name, (t, want) in cases.items():
            want = np.asarray(want)
            assert t.dtype == want.dtype, (name, t.dtype, want.dtype)
            got = await fetch(t)
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=rtol, err_msg=name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.asyncio
async def test_mixed_dtypes_promote_like_numpy() -> None:
    async with kbus.open_device("tiny") as torch:
        i = torch.arange(6, dtype=np.int32)
        f = torch.ones(6, dtype=np.float16)
        cases = [(i + f, np.arange(6, dtype=np.int32) + np.ones(6, np.float16)),
                 (i / 2, np.arange(6, dtype=np.int32) / 2),
                 (i + 2.5, np.arange(6, dtype=np.int32) + 2.5),
                 (f * 2.0, np.ones(6, np.float16) * 2.0),
                 (i * np.int64(3), np.arange(6, dtype=np.int32) * np.int64(3))]  # fmt: skip
        for t, want in cases:
            assert t.dtype == want.dtype
            np.testing.assert_allclose(await fetch(t), want)


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", PRESETS)
async def test_broadcasting(preset: str) -> None:
    x = rng(11).standard_normal((6, 3)).astype(np.float32)
    row = rng(12).standard_normal(3).astype(np.float32)
    col = rng(13).standard_normal((6, 1)).astype(np.float32)
    async with kbus.open_device(preset) as torch:
        a = torch.tensor(x)
        r = torch.tensor(row, policy=Replicate())
        c = torch.tensor(col, policy=Shard(dim=0))
        s = torch.tensor(np.float32(2.5))
        close(await fetch(a + r), x + row)
        close(await fetch(r * a), row * x)
        close(await fetch(a - c), x - col)
        close(await fetch(c * torch.tensor(row.reshape(1, 3))), col * row.reshape(1, 3))
        close(await fetch(a / s), x / np.float32(2.5))


@pytest.mark.asyncio
async def test_factories() -> None:
    async with kbus.open_device("tiny") as torch:
        np.testing.assert_array_equal(await fetch(torch.zeros(3, 4)), np.zeros((3, 4), np.float32))
        in_sram = torch.ones(16, memory="sram", policy=Replicate(targets=[1]))
        assert in_sram.shards[0].pa < torch.config.memory.sram_per_pe
        np.testing.assert_array_equal(await fetch(in_sram * 3), np.full(16, 3, np.float32))
        np.testing.assert_array_equal(await fetch(torch.ones((2, 5), dtype=np.int64)), np.ones((2, 5), np.int64))
        np.testing.assert_array_equal(await fetch(torch.full((4,), 3.0)), np.full(4, 3.0, np.float32))
        np.testing.assert_array_equal(await fetch(torch.full(5, -7, dtype="i16")), np.full(5, -7, np.int16))
        np.testing.assert_array_equal(await fetch(torch.full(3, 200, dtype=np.uint8)), np.full(3, 200, np.uint8))
        np.testing.assert_array_equal(await fetch(torch.full((3,), 1.5, dtype=np.float16)), np.full(3, 1.5, np.float16))
        np.testing.assert_array_equal(await fetch(torch.arange(10)), np.arange(10))
        np.testing.assert_array_equal(await fetch(torch.arange(1.0, 2.0, 0.25)), np.arange(1.0, 2.0, 0.25))
        torch.manual_seed(3)
        r = await fetch(torch.rand(4, 4))
        torch.manual_seed(3)
        assert r.dtype == np.float32 and ((r >= 0) & (r < 1)).all()
        np.testing.assert_array_equal(await fetch(torch.rand(4, 4)), r)
        e = torch.empty(2, 3, dtype=np.float64, policy=Replicate())
        assert (await e).shape == (2, 3)
        lst = torch.tensor([[1, 2], [3, 4]])
        assert lst.dtype == np.int64
        np.testing.assert_array_equal(await fetch(lst), [[1, 2], [3, 4]])


@pytest.mark.asyncio
async def test_zero_d_and_empty_tensors() -> None:
    async with kbus.open_device("tiny") as torch:
        s = torch.tensor(3.5)
        assert s.shape == () and len(s.shards) == 1
        assert await (s + 1).item() == 4.5
        assert await (s * s).item() == 12.25
        e = torch.zeros(0, 3)
        assert e.shards == () and e.nbytes == 0
        got = await fetch(e + 1)
        assert got.shape == (0, 3)
        assert await e.sum().item() == 0.0
        np.testing.assert_array_equal(await fetch(e.sum(0)), np.zeros(3, np.float32))
        m = torch.zeros(4, 0) @ torch.zeros(0, 2)
        np.testing.assert_array_equal(await fetch(m), np.zeros((4, 2), np.float32))


@pytest.mark.asyncio
async def test_tensor_attributes_and_va_layout() -> None:
    async with kbus.open_device("tiny") as torch:
        page = torch.config.memory.page_size
        big = torch.zeros(8 * page // 4)  # one page per PE: VA-contiguous
        assert big.nbytes == 8 * page and len(big.shards) == 8
        assert big.va_contiguous
        assert [s.va for s in big.shards] == [big.addr + s.offset for s in big.shards]
        assert big.tensor_arg().va_base == big.addr
        tiny = torch.zeros(10, 3)  # 120 bytes, less than a page: one shard (min_bytes = page)
        assert len(tiny.shards) == 1 and tiny.va_contiguous and tiny.shards[0].nbytes == 120
        small = torch.zeros(10, 3, policy=Shard(min_bytes=0))  # 24-byte shards: each starts on its own page
        assert not small.va_contiguous
        assert [s.va - small.addr for s in small.shards] == [k * page for k in range(5)]
        assert [s.index for s in small.shards][1] == (slice(2, 4), slice(0, 3))
        assert [s.path for s in small.shards][:2] == ["sip0.cube0.pe0", "sip0.cube0.pe1"]
        rep = torch.zeros(3, policy=Replicate())
        assert rep.va_contiguous and {s.va for s in rep.shards} == {rep.addr}
        assert len(rep) == 3 and rep.ndim == 1 and rep.size == 3 and rep.numel() == 3
        assert "pending" in repr(torch.zeros(2)) or "ready" in repr(torch.zeros(2))
        assert "ready" in repr(await rep)
        assert rep.device is torch
        assert torch.now_ns == torch.now_ps / 1000 and torch.now_ps > 0


@pytest.mark.asyncio
async def test_generic_launch_reaches_builtins() -> None:
    async with kbus.open_device("tiny") as torch:
        seen: list[tuple[int, int, int]] = []

        async def probe(cpu: Any, msg: Any) -> tuple[str | None, int | float | None]:
            seen.append((cpu.sip, cpu.cube, cpu.pe))
            return None, len(msg.args)

        torch.register_builtin("probe", probe)
        t = torch.zeros(4)
        responses = await torch.launch("probe", t, 2.0, 7, targets=[(0, 1, 2), 0])
        assert sorted(seen) == [(0, 0, 0), (0, 1, 2)]
        assert {r.value for r in responses} == {1 + 1 + 1 + 1 + 2}  # tensor (4 args) + two scalars
        await torch.launch("nop")
        # A launch is ordered after the tensor's producer and before later readers.
        b = await (t + 1).numpy()
        np.testing.assert_array_equal(b, np.ones(4, np.float32))


@pytest.mark.asyncio
async def test_operations_queue_in_order_without_awaiting() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.arange(16, dtype=np.float32)
        acc = torch.zeros(16)
        for i in range(5):
            acc = acc + a * i
        assert not isinstance(acc, np.ndarray)
        np.testing.assert_array_equal(await fetch(acc), np.arange(16, dtype=np.float32) * 10)
        assert isinstance(torch, Runtime)


@pytest.mark.asyncio
async def test_submit_orders_custom_work_on_the_queue() -> None:
    async with kbus.open_device("tiny") as torch:
        a = torch.zeros(8, name="a")
        seen: list[int] = []

        async def fill() -> str:
            # Custom device work: overwrite a with 5.0 through a plain MemoryWriteMsg per shard.
            for s in a.shards:
                msg = kbus.protocol.MemoryWriteMsg(
                    "test", f"w{s.pe}{s.cube}", s.sip, s.cube, s.pe, s.pa, s.nbytes, "pattern", "word32:0x40a00000",
                    target_cubes=(s.cube,), target_pe=s.pe,
                )  # fmt: skip
                await torch.device.request(msg)
            seen.append(torch.now_ps)
            return "filled"

        before = a + 1  # queued before the write: must see zeros
        done = torch.submit(fill, writes=[a], label="fill a")
        after = a + 1  # queued after: must see 5.0
        assert await done == "filled"
        np.testing.assert_array_equal(await before.numpy(), np.ones(8, np.float32))
        np.testing.assert_array_equal(await after.numpy(), np.full(8, 6.0, np.float32))
        assert a.shard_dim == 0 and torch.zeros(2, policy=Replicate()).shard_dim == -1
        with pytest.raises(TypeError, match="reads/writes take kbus tensors"):
            torch.submit(fill, reads=[np.zeros(2)])  # type: ignore[list-item]
