"""Batched execution: every example kernel and test kernel gives the same bytes and virtual times both ways."""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import kbus
import kbus.lang as kl

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX30 = _load(ROOT / "examples" / "30_vector_add.py", "ex30_vector_add")
EX31 = _load(ROOT / "examples" / "31_row_softmax.py", "ex31_row_softmax")
EX32 = _load(ROOT / "examples" / "32_tiled_matmul.py", "ex32_tiled_matmul")
EX33 = _load(ROOT / "examples" / "33_attention.py", "ex33_attention")
EX34 = _load(ROOT / "examples" / "34_tree_reduce.py", "ex34_tree_reduce")
TK = _load(Path(__file__).parent / "test_lang_kernels.py", "lang_test_kernels")


@pytest.fixture(autouse=True)
def batch_mode() -> str:
    """This module picks the mode of every launch itself (overrides the conftest's parametrization)."""
    return "explicit"


def rng(seed: int = 7) -> np.random.Generator:
    return np.random.default_rng(seed)


Scenario = Callable[[Any, str], Awaitable[tuple[list[Any], list[Any]]]]


async def _ex30(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    n = 100_003
    x, y = rng().standard_normal(n).astype(np.float32), rng(8).standard_normal(n).astype(np.float32)
    xt, yt, out = torch.tensor(x), torch.tensor(y), torch.empty(n, dtype=np.float32)
    results = []
    for placement in ("spread", "owner"):
        results.append(await EX30.add[(kl.cdiv(n, 1024),)](xt, yt, out, n, BLOCK=1024, placement=placement, batch=mode))
    got = await out.numpy()
    np.testing.assert_array_equal(got, x + y)
    return [got], results


async def _ex31(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    x = rng().standard_normal((300, 1000)).astype(np.float32)
    xt, out = torch.tensor(x), torch.empty(300, 1000, dtype=np.float32)
    r = await EX31.softmax[(300,)](xt, out, 1000, 1000, BLOCK=1024, placement="owner", batch=mode)
    got = await out.numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    return [got], [r]


async def _ex32(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    M, N, K = 150, 100, 130
    a, b = rng().standard_normal((M, K)).astype(np.float32), rng(9).standard_normal((K, N)).astype(np.float32)
    at, bt, c = torch.tensor(a), torch.tensor(b, policy=kbus.Replicate()), torch.zeros(M, N, dtype=np.float32)
    results, outs = [], []
    for placement in ("owner", "spread"):
        grid = (kl.cdiv(M, 32), kl.cdiv(N, 32))
        results.append(
            await EX32.matmul[grid](at, bt, c, M, N, K, BM=32, BN=32, BK=64, placement=placement, batch=mode)
        )
        outs.append(await c.numpy())
        np.testing.assert_allclose(outs[-1], a @ b, rtol=1e-4, atol=1e-3)
    return outs, results


async def _ex33(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    S, D = 300, 32
    q, k, v = (rng(s).standard_normal((S, D)).astype(np.float32) for s in (1, 2, 3))
    qt, kt, vt = torch.tensor(q), torch.tensor(k, policy=kbus.Replicate()), torch.tensor(v, policy=kbus.Replicate())
    out = torch.empty(S, D, dtype=np.float32)
    r = await EX33.attention[(kl.cdiv(S, 16),)](
        qt, kt, vt, out, S, 1 / math.sqrt(D), D=D, BM=16, BN=64, placement="spread", batch=mode
    )
    got = await out.numpy()
    np.testing.assert_allclose(got, EX33.reference(q, k, v), rtol=1e-4, atol=1e-5)
    return [got], [r]


async def _ex34(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    n = 200_001
    x = rng().standard_normal(n).astype(np.float32)
    xt = torch.tensor(x)
    leaves = kl.cdiv(n, 1024)
    mids = kl.cdiv(leaves, 16)
    partial, middle, total = (torch.empty(k, dtype=np.float64) for k in (leaves, mids, 1))
    r0 = await EX34.block_sum[(leaves,)](xt, partial, n, BLOCK=1024, placement="owner", batch=mode)
    r1 = await EX34.combine[(mids,)](partial, middle, leaves, FAN=16, batch=mode)
    r2 = await EX34.combine[(1,)](middle, total, mids, FAN=16, batch=mode)
    got = await total.numpy()
    assert got[0] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-9, abs=1e-6)
    return [await partial.numpy(), await middle.numpy(), got], [r0, r1, r2]


async def _tk_add_softmax_matmul(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    n = 30_001
    x = rng().standard_normal(n).astype(np.float32)
    xt, out = torch.tensor(x), torch.empty(n, dtype=np.float32)
    r1 = await TK.add[(kl.cdiv(n, 512),)](xt, xt, out, n, BLOCK=512, batch=mode)
    s = rng().standard_normal((40, 300)).astype(np.float32)
    st, so = torch.tensor(s), torch.empty(40, 300, dtype=np.float32)
    r2 = await TK.softmax[(40,)](st, so, 300, 300, BLOCK=512, placement="owner", batch=mode)
    a, b = rng().standard_normal((70, 90)).astype(np.float32), rng(3).standard_normal((90, 50)).astype(np.float32)
    at, bt, c = torch.tensor(a), torch.tensor(b, policy=kbus.Replicate()), torch.zeros(70, 50, dtype=np.float32)
    r3 = await TK.matmul[(3, 4)](at, bt, c, 70, 50, 90, BM=32, BN=16, BK=32, placement="owner", batch=mode)
    return [await out.numpy(), await so.numpy(), await c.numpy()], [r1, r2, r3]


async def _tk_gather_scatter(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    n, m = 100_000, 3000
    src = rng().standard_normal(n).astype(np.float32)
    idx = rng().integers(0, n, m)
    xt, it, out = torch.tensor(src), torch.tensor(idx), torch.empty(m, dtype=np.float32)
    r1 = await TK.gather[(kl.cdiv(m, 256),)](xt, it, out, m, BLOCK=256, batch=mode)
    np.testing.assert_array_equal(await out.numpy(), src[idx])
    perm = rng().permutation(m)
    vals = rng().standard_normal(m).astype(np.float32)
    dst = torch.zeros(m, dtype=np.float32)
    r2 = await TK.scatter[(kl.cdiv(m, 128),)](torch.tensor(vals), torch.tensor(perm), dst, m, BLOCK=128, batch=mode)
    return [await out.numpy(), await dst.numpy()], [r1, r2]


async def _tk_2d_and_helpers(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    x = rng().standard_normal((37, 53)).astype(np.float32)
    outs, results = [], []
    for policy in (kbus.Shard(dim=0), kbus.Shard(dim=1)):
        xt = torch.tensor(x, policy=policy)
        out = torch.empty(37, 53, dtype=np.float32, policy=kbus.Shard(dim=1))
        results.append(
            await TK.scale2d[(kl.cdiv(37, 8), kl.cdiv(53, 16))](
                xt, out, 37, 53, np.float32(0.5), BM=8, BN=16, placement="spread", batch=mode
            )
        )
        outs.append(await out.numpy())
        np.testing.assert_array_equal(outs[-1], x)
    return outs, results


async def _tk_python_loops(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    n = 50_000
    x = rng().standard_normal(n)
    partial = torch.zeros(12, dtype=np.float64)
    r = await TK.grid_stride_sum[(12,)](torch.tensor(x), partial, n, BLOCK=1024, batch=mode)
    got = await partial.numpy()
    assert got.sum() == pytest.approx(x.sum())
    return [got], [r]


@kbus.kernel
def mix(x_ptr, w_ptr, out_ptr, stats_ptr, n_rows, alpha, R: kl.constexpr, C: kl.constexpr):
    """Much of the language at once: program-id arithmetic, weak Python scalars, 2-D tiles, reductions,
    transposes, reshapes, basic indexing, numpy ufuncs, kl.where/dot/minimum, helper kernels."""
    pid = kl.program_id(0)
    row0 = (pid * R) % (n_rows + R) - (pid // 7) * 0  # Python-int arithmetic on the id: free, weakly typed
    rows = row0 + kl.arange(0, R)
    cols = kl.arange(0, C)
    ok = rows[:, None] < n_rows
    x = kl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=ok, other=0.0)
    w = kl.load(w_ptr + cols[:, None] * C + cols[None, :])  # the same for every instance
    y = kl.dot(x, w.T) * alpha + pid  # float32 stays float32 next to Python scalars
    y = np.maximum(y, -y.max(axis=1, keepdims=True)) + np.exp(-abs(x))
    s = y.sum(axis=1) + kl.sum(y, axis=0)[:R] + kl.sum(x * x)  # float sums along either axis, and of all
    m = kl.max(y, axis=0, keep_dims=True)
    z = kl.where(y > m * 0.5, y, kl.minimum(y, 0.25)).reshape(R * C).reshape(R, C)
    first = z[0, 0] + z[:, None][1, 0, 2]  # numpy scalars: free
    z = twice_helper(z) - first + (kl.cdiv(pid + 1, 2) + 0.5)
    kl.store(out_ptr + rows[:, None] * C + cols[None, :], z.to(kl.float32), mask=ok)
    kl.store(stats_ptr + pid * R + kl.arange(0, R), (s - s.min()).astype(np.float32))


@kbus.kernel
def twice_helper(t):
    return t + t


async def _tk_language_mix(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    R, C, n_rows = 8, 16, 45
    x = rng().standard_normal((n_rows, C)).astype(np.float32)
    w = rng(5).standard_normal((C, C)).astype(np.float32)
    grid = kl.cdiv(n_rows, R)
    pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
    xt, wt = torch.tensor(x, policy=pe0), torch.tensor(w, policy=pe0)
    out, stats = torch.zeros(n_rows, C, dtype=np.float32), torch.zeros(grid * R, dtype=np.float32, policy=pe0)
    r = await mix[(grid,)](xt, wt, out, stats, n_rows, 0.5, R=R, C=C, placement="owner", batch=mode)
    got = await out.numpy()
    assert np.isfinite(got).all() and got.any()
    return [got, await stats.numpy()], [r]


@kbus.kernel
def accumulate(x_ptr, out_ptr, K: kl.constexpr, BLOCK: kl.constexpr):
    """Triton's accumulator idiom: ``acc += ...`` in place, with an alias that must see every update."""
    pid = kl.program_id(0)
    acc = kl.zeros((BLOCK,), kl.float32)
    seen = acc  # the same array: in place updates show through it
    for k in range(K):
        acc += kl.load(x_ptr + (pid * K + k) * BLOCK + kl.arange(0, BLOCK))
        acc *= 0.5
    hits = kl.full((BLOCK,), 0, kl.int32)
    hits += (acc > 0).to(kl.int32)
    kl.store(out_ptr + pid * BLOCK + kl.arange(0, BLOCK), seen + hits)


async def _tk_inplace(torch: Any, mode: str) -> tuple[list[Any], list[Any]]:
    K, B, grid = 3, 256, 12
    x = rng().standard_normal(grid * K * B).astype(np.float32)
    out = torch.zeros(grid * B, dtype=np.float32)
    r = await accumulate[(grid,)](torch.tensor(x), out, K=K, BLOCK=B, batch=mode)
    got = await out.numpy()
    acc = np.zeros((grid, B), np.float32)
    for k in range(K):
        acc = (acc + x.reshape(grid, K, B)[:, k]) * np.float32(0.5)
    np.testing.assert_array_equal(got, (acc + (acc > 0)).reshape(-1))
    return [got], [r]


SCENARIOS: dict[str, tuple[str, Scenario, bool]] = {
    "ex30_vector_add": ("default", _ex30, True),
    "ex31_row_softmax": ("default", _ex31, True),
    "ex32_tiled_matmul": ("default", _ex32, True),
    "ex33_attention": ("tiny", _ex33, True),
    "ex34_tree_reduce": ("default", _ex34, True),
    "tests_add_softmax_matmul": ("tiny", _tk_add_softmax_matmul, True),
    "tests_gather_scatter": ("tiny", _tk_gather_scatter, True),
    "tests_2d_tiles_and_helper_kernel": ("tiny", _tk_2d_and_helpers, True),
    "tests_python_loop_on_program_id": ("tiny", _tk_python_loops, False),
    "tests_language_mix": ("tiny", _tk_language_mix, True),
    "tests_inplace_accumulate": ("tiny", _tk_inplace, True),
}


async def _run(preset: str, scenario: Scenario, mode: str) -> dict[str, Any]:
    async with kbus.open_device(preset) as torch:
        arrays, results = await scenario(torch, mode)
        dev = torch.device
        pes = [pe for sip in dev.pes for cube in sip for pe in cube]
        return {
            "bytes": [a.tobytes() for a in arrays],
            "times": [(r.start_ps, r.end_ps, r.instances, r.active_pes) for r in results],
            "now": torch.now_ps,
            "dma": [(pe.engine.transfers, pe.engine.translations, pe.cpu.busy_ps) for pe in pes],
            "info": kl.kernel_cache_info(torch),
        }


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_batched_and_per_instance_runs_are_identical(name: str) -> None:
    preset, scenario, batches = SCENARIOS[name]
    auto = await _run(preset, scenario, "auto")
    off = await _run(preset, scenario, "off")
    assert auto["bytes"] == off["bytes"]
    assert auto["times"] == off["times"]
    assert auto["now"] == off["now"]
    assert auto["dma"] == off["dma"], "every instance's DMA transfers, translations and busy time are unchanged"
    assert off["info"].batched == 0 and off["info"].per_instance > 0
    if batches:
        assert auto["info"].batched > 0, auto["info"]
        assert not auto["info"].fallbacks, auto["info"].fallbacks
    else:
        assert auto["info"].batched == 0 and auto["info"].fallbacks


# ----------------------------------------------------------------- fallbacks
@kbus.kernel
def first_doubles(x_ptr, out_ptr, BLOCK: kl.constexpr):
    pid = kl.program_id(0)
    offs = pid * BLOCK + kl.arange(0, BLOCK)
    x = kl.load(x_ptr + offs)
    if pid == 0:  # Python control flow on the program id: cannot run as one batch
        x = x * 2
    kl.store(out_ptr + offs, x)


@kbus.kernel
def overlapping(x_ptr, out_ptr, BLOCK: kl.constexpr):
    """Instance i writes [i*BLOCK/2, i*BLOCK/2 + BLOCK): neighbours overlap, the later one wins."""
    pid = kl.program_id(0)
    offs = pid * (BLOCK // 2) + kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs) * 0 + pid)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def emit(self, cat: str, name: str, path: str, ts: int, dur: int | None, args: dict[str, Any] | None) -> None:
        self.events.append((cat, name, path, ts, dur, args))


@pytest.mark.asyncio
async def test_control_flow_on_program_id_falls_back_with_its_reason() -> None:
    async with kbus.open_device("tiny") as torch:
        x = np.arange(4096, dtype=np.float32)
        xt = torch.tensor(x, policy=kbus.Shard(dim=0, targets=[(0, 0, 0)]))
        out = torch.zeros(4096, dtype=np.float32, policy=kbus.Shard(dim=0, targets=[(0, 0, 0)]))
        rec = _Recorder()
        torch.sim.tracer = rec
        await first_doubles[(4,)](xt, out, BLOCK=1024, placement="owner")
        torch.sim.tracer = None
        expect = x.copy()
        expect[:1024] *= 2
        np.testing.assert_array_equal(await out.numpy(), expect)
        info = kl.kernel_cache_info(torch)
        assert info.batched == 0 and info.per_instance == 1
        assert "bool()" in info.fallbacks["first_doubles"] and "test_lang_batch.py" in info.fallbacks["first_doubles"]
        marks = [e[5] for e in rec.events if e[0] == "kernel" and e[5] and "batch_fallback" in e[5]]
        assert len(marks) == 1 and marks[0]["batch_fallback"] == info.fallbacks["first_doubles"]
        assert marks[0]["instances"] == 4
        await first_doubles[(4,)](xt, out, BLOCK=1024, placement="owner")  # known: not tried again
        assert kl.kernel_cache_info(torch).per_instance == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_instances_that_share_memory_run_one_by_one(mode: str) -> None:
    async with kbus.open_device("tiny") as torch:
        x = np.zeros(4096, np.float32)
        pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
        xt, out = torch.tensor(x, policy=pe0), torch.zeros(4096, dtype=np.float32, policy=pe0)
        await overlapping[(4,)](xt, out, BLOCK=1024, placement="owner", batch=mode)
        expect = np.zeros(4096, np.float32)
        for pid in range(4):  # instances one after another: the later one wins where they overlap
            expect[pid * 512 : pid * 512 + 1024] = pid
        np.testing.assert_array_equal(await out.numpy(), expect)
        info = kl.kernel_cache_info(torch)
        if mode == "auto":
            assert info.batched == 0
            assert info.fallbacks["overlapping"].startswith(
                "sip0.cube0.pe0.cpu: programs (0, 0, 0) and (1, 0, 0) both access VA"
            )


@kbus.kernel
def one_strays(x_ptr, out_ptr, bad, BLOCK: kl.constexpr):
    pid = kl.program_id(0)
    offs = pid * BLOCK + kl.arange(0, BLOCK) + (pid == bad) * (1 << 40)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs) + 1)


@pytest.mark.asyncio
async def test_a_fault_in_one_instance_of_a_batch_reports_that_instance_exactly() -> None:
    errors: dict[str, str] = {}
    for mode in ("auto", "off"):
        async with kbus.open_device("tiny") as torch:
            pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
            xt = torch.tensor(np.arange(4096, dtype=np.float32), policy=pe0)
            out = torch.zeros(4096, dtype=np.float32, policy=pe0)
            with pytest.raises(kbus.KernelError) as info:
                await one_strays[(4,)](xt, out, 2, BLOCK=1024, placement="owner", batch=mode)
            errors[mode] = str(info.value)
            va = xt.addr + (2 * 1024 + (1 << 40)) * 4
            # Programs 0 and 1 stored to out before program 2 faulted: out carries the failure, x does not.
            np.testing.assert_array_equal(await xt.numpy(), np.arange(4096, dtype=np.float32))
            with pytest.raises(kbus.KernelError, match="unavailable because an earlier command failed"):
                await out.numpy()
    assert errors["auto"] == errors["off"]
    msg = errors["auto"]
    assert "kernel 'one_strays'" in msg and "program (2, 0, 0)" in msg and "sip0.cube0.pe0" in msg
    assert f"VA {va:#x}" in msg and "kl.load from x_ptr" in msg


# ----------------------------------------------------------------- timing
@kbus.kernel
def scale_block(x_ptr, out_ptr, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs) * 2.0)


def _leg(hops: list[tuple[int, int]], nbytes: int) -> int:
    """A pipelined flow alone on its route of (latency ps, bandwidth B/s) hops."""
    return -(-nbytes * 10**12 // min(bw for _, bw in hops)) + sum(lat for lat, _ in hops)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_batched_instances_each_cost_what_one_instance_costs(mode: str) -> None:
    async with kbus.open_device("tiny") as torch:
        cfg = torch.config
        block = 1024
        pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
        xt = torch.tensor(np.ones(4 * block, np.float32), policy=pe0)
        out = torch.zeros(4 * block, dtype=np.float32, policy=pe0)
        await scale_block[(4,)](xt, out, BLOCK=block, placement="owner", batch=mode)  # deploy, cache the code
        rec = _Recorder()
        torch.sim.tracer = rec
        await scale_block[(4,)](xt, out, BLOCK=block, placement="owner", batch=mode)
        torch.sim.tracer = None
        spans = [e for e in rec.events if e[0] == "kernel" and e[4] is not None]
        assert [tuple(e[5]["program_id"]) for e in spans] == [(i, 0, 0) for i in range(4)]
        # Local data: a load is its descriptor over the DMA->HBM port, then data + completion back over
        # HBM and the port; a store the reverse. Each access first costs the engine's issue time and one
        # translation. `pid * BLOCK + arange` adds a Python int to a tile (`block` operations, before the
        # load), and the multiply is `block` more (before the store).
        port = [(cfg.links.dma_hbm.latency, cfg.links.dma_hbm.bandwidth)]
        mem = cfg.memory
        hbm = [(mem.hbm_latency, mem.hbm_channels * mem.hbm_channel_bandwidth)]
        msg, nbytes = cfg.fabric.msg_bytes, block * 4
        issue = cfg.processing.pe_dma + cfg.dma.translate
        load = issue + _leg(port, msg) + _leg(hbm + port, msg + nbytes)
        store = issue + _leg(port + hbm, msg + nbytes) + _leg(port, msg)
        one = cfg.compute.flops_to_ps(block) + load + cfg.compute.flops_to_ps(block) + store
        assert [e[4] for e in spans] == [one] * 4
        starts = [e[3] for e in spans]
        assert [b - a for a, b in itertools.pairwise(starts)] == [one] * 3
        info = kl.kernel_cache_info(torch)
        assert (info.batched, info.per_instance) == ((2, 0) if mode == "auto" else (0, 2))


# ----------------------------------------------------------------- options
@kbus.kernel(batch="off")
def never_batched(x_ptr, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    kl.store(x_ptr + offs, kl.load(x_ptr + offs) + 1)


@pytest.mark.asyncio
async def test_batch_option_of_kernel_and_launch() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.zeros(2048, dtype=np.float32, policy=kbus.Shard(dim=0, targets=[(0, 0, 0)]))
        await never_batched[(2,)](x, BLOCK=1024, placement="owner")
        assert kl.kernel_cache_info(torch).per_instance == 1
        await never_batched[(2,)](x, BLOCK=1024, placement="owner", batch="auto")
        assert kl.kernel_cache_info(torch).batched == 1
        np.testing.assert_array_equal(await x.numpy(), np.full(2048, 2, np.float32))
        with pytest.raises(ValueError, match="batch must be one of auto, off, got 'sometimes'"):
            never_batched[(2,)](x, BLOCK=1024, batch="sometimes")
    with pytest.raises(ValueError, match="batch must be 'auto' or 'off'"):
        kbus.kernel(batch="maybe")(lambda x: None)


@pytest.mark.asyncio
async def test_a_pe_runs_many_instances_in_batches_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import kbus.lang.runner as runner

    monkeypatch.setattr(runner, "BATCH_LANES", 4 * 1024)  # 4 instances of 1024 lanes per batch after the first
    results: dict[str, Any] = {}
    for mode in ("auto", "off"):
        async with kbus.open_device("tiny") as torch:
            pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
            n = 30 * 1024
            xt = torch.tensor(np.arange(n, dtype=np.float32), policy=pe0)
            out = torch.zeros(n, dtype=np.float32, policy=pe0)
            rec = _Recorder()
            torch.sim.tracer = rec
            r = await scale_block[(30,)](xt, out, BLOCK=1024, placement="owner", batch=mode)
            torch.sim.tracer = None
            sizes = [e[5].get("batched") for e in rec.events if e[0] == "kernel" and e[4] is None]
            results[mode] = ((await out.numpy()).tobytes(), r.start_ps, r.end_ps, torch.now_ps, sizes)
    assert results["auto"][:4] == results["off"][:4]
    assert results["auto"][4] == [16] * 16 + [4] * 12 + [2] * 2  # 16 first, then BATCH_LANES // 1024
    assert results["off"][4] == [None] * 30


@pytest.mark.parametrize("name", ["ex33_attention", "tests_language_mix"])
def test_batched_runs_are_the_same_on_uvloop_and_the_default_loop(name: str) -> None:
    preset, scenario, _ = SCENARIOS[name]
    runs = [
        kbus.run(_run, preset, scenario, mode, use_uvloop=loop) for mode in ("auto", "off") for loop in (False, True)
    ]
    first = runs[0]
    for other in runs[1:]:
        assert (other["bytes"], other["times"], other["now"], other["dma"]) == (
            first["bytes"],
            first["times"],
            first["now"],
            first["dma"],
        )


@kbus.kernel
def carry(buf_ptr, BLOCK: kl.constexpr):
    """Instance i reads block i and writes block i+1: one after another, each sees its predecessor's store."""
    pid = kl.program_id(0)
    offs = kl.arange(0, BLOCK)
    y = kl.load(buf_ptr + pid * BLOCK + offs)
    kl.store(buf_ptr + (pid + 1) * BLOCK + offs, y + 1)


@pytest.mark.asyncio
async def test_an_instance_reading_what_another_wrote_runs_one_by_one() -> None:
    got: dict[str, Any] = {}
    for mode in ("auto", "off"):
        async with kbus.open_device("tiny") as torch:
            pe0 = kbus.Shard(dim=0, targets=[(0, 0, 0)])
            buf = torch.zeros(5 * 256, dtype=np.float32, policy=pe0)
            r = await carry[(4,)](buf, BLOCK=256, placement="owner", batch=mode)
            got[mode] = (await buf.numpy(), r.end_ps - r.start_ps, kl.kernel_cache_info(torch))
    np.testing.assert_array_equal(got["auto"][0], np.repeat(np.arange(5, dtype=np.float32), 256))
    np.testing.assert_array_equal(got["auto"][0], got["off"][0])
    assert got["auto"][1] == got["off"][1]
    info = got["auto"][2]
    assert info.batched == 0 and "programs (0, 0, 0) and (1, 0, 0) both access VA" in info.fallbacks["carry"]
