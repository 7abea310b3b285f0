"""Virtual time of kernels: every figure is a sum the configuration explains."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import kbus
import kbus.lang as kl
from kbus.hw.config import LinkSpec


@kbus.kernel
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) + kl.load(y_ptr + offs, mask=mask), mask=mask)


@kbus.kernel
def copy(x_ptr, out_ptr, BLOCK: kl.constexpr):
    offs = kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs))


@kbus.kernel
def copy_scaled(x_ptr, out_ptr, BLOCK: kl.constexpr):
    offs = kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.load(x_ptr + offs) * 2.0)


@kbus.kernel
def small_matmul(a_ptr, b_ptr, c_ptr, M: kl.constexpr, N: kl.constexpr, K: kl.constexpr):
    rm, rn, rk = kl.arange(0, M), kl.arange(0, N), kl.arange(0, K)
    a = kl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = kl.load(b_ptr + rk[:, None] * N + rn[None, :])
    kl.store(c_ptr + rm[:, None] * N + rn[None, :], kl.dot(a, b))


def _hop(spec: LinkSpec, nbytes: int) -> int:
    return spec.serialization(nbytes) + spec.latency


def _leg(hops: list[tuple[int, int]], nbytes: int) -> int:
    """A pipelined flow alone on its route of (latency ps, bandwidth B/s) hops: bytes over the narrowest + latencies."""
    return -(-nbytes * 10**12 // min(bw for _, bw in hops)) + sum(lat for lat, _ in hops)


# The fabric levels a transfer from sip0.cube0.pe0 to the remote owner crosses (symmetric both ways).
ROUTES = {
    "tiny": ((0, 1, 0), ("noc_pe", "noc_hop", "noc_pe")),
    "default": ((1, 0, 0), ("noc_pe", "sip_data", "noc_pe")),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("preset", ["tiny", "default"])
async def test_remote_data_costs_exactly_the_route(preset: str) -> None:
    remote, levels = ROUTES[preset]
    async with kbus.open_device(preset) as torch:
        cfg = torch.config
        block = 1024
        nbytes = block * 4
        x = np.arange(block, dtype=np.float32)

        def on(coord: tuple[int, int, int]) -> list[Any]:
            policy = kbus.Shard(dim=0, targets=[coord])
            return [
                torch.tensor(x, policy=policy),
                torch.tensor(x, policy=policy),
                torch.zeros(block, dtype=np.float32, policy=policy),
            ]

        local, far = on((0, 0, 0)), on(remote)
        for t in (*local, *far):
            await t
        await add[(1,)](*local, block, BLOCK=block)  # warm up: deploy, and sip0.cube0.pe0 caches the code
        near_run = await add[(1,)](*local, block, BLOCK=block)
        far_run = await add[(1,)](*far, block, BLOCK=block)
        assert near_run.pes == far_run.pes == 1  # one instance, on sip0.cube0.pe0 both times
        np.testing.assert_array_equal(await far[2].numpy(), 2 * x)

        # Each access is two flows through the PE's DMA engine: a load sends the descriptor over the
        # route and the owner's DMA->HBM port, and gets data + completion back over HBM, the port and
        # the route; a store sends data + descriptor over route, port and HBM, and gets the completion
        # back. Loads run one after the other; the store's completion ends the instance.
        route = [(s.latency, s.bandwidth) for s in (getattr(cfg.links, level) for level in levels)]
        port = [(cfg.links.dma_hbm.latency, cfg.links.dma_hbm.bandwidth)]
        mem = cfg.memory
        hbm = [(mem.hbm_latency, mem.hbm_channels * mem.hbm_channel_bandwidth)]
        msg = cfg.fabric.msg_bytes

        def access(far: bool) -> tuple[int, int]:
            r = route if far else []
            load = _leg(r + port, msg) + _leg(hbm + port + r, msg + nbytes)
            store = _leg(r + port + hbm, msg + nbytes) + _leg(port + r, msg)
            return load, store

        (near_load, near_store), (far_load, far_store) = access(False), access(True)
        assert far_run.duration_ps - near_run.duration_ps == 2 * (far_load - near_load) + far_store - near_store


@pytest.mark.asyncio
async def test_compute_costs_flops_to_ps_of_the_counted_operations() -> None:
    async with kbus.open_device("tiny") as torch:
        block = 1024
        x = torch.tensor(np.ones(block, np.float32))
        out = torch.zeros(block, dtype=np.float32)
        for kern in (copy, copy_scaled):
            await kern[(1,)](x, out, BLOCK=block)  # warm up
        plain = await copy[(1,)](x, out, BLOCK=block)
        scaled = await copy_scaled[(1,)](x, out, BLOCK=block)
        # One multiply per element between the load and the store.
        assert scaled.duration_ps - plain.duration_ps == torch.config.compute.flops_to_ps(block)
        np.testing.assert_array_equal(await out.numpy(), np.full(block, 2, np.float32))


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def emit(self, cat: str, name: str, path: str, ts: int, dur: int | None, args: dict[str, Any] | None) -> None:
        self.events.append((cat, name, path, ts, dur, args))


@pytest.mark.asyncio
async def test_trace_events_report_each_instance() -> None:
    async with kbus.open_device("tiny") as torch:
        M, N, K = 8, 16, 32
        a = torch.tensor(np.ones((M, K), np.float32))
        b = torch.tensor(np.ones((K, N), np.float32))
        c = torch.zeros(M, N, dtype=np.float32)
        for t in (a, b, c):
            await t
        rec = _Recorder()
        torch.sim.tracer = rec
        res = await small_matmul[(3,)](a, b, c, M=M, N=N, K=K)
        torch.sim.tracer = None
        kernel_events = [e for e in rec.events if e[0] == "kernel"]
        begins = [e for e in kernel_events if e[4] is None]
        spans = [e for e in kernel_events if e[4] is not None]
        assert len(begins) == len(spans) == 3
        for _cat, name, path, ts, dur, args in spans:
            assert name == "small_matmul" and path.endswith(".cpu") and res.start_ps <= ts <= ts + dur <= res.end_ps
            # rm*K, rk*N, rm*N on the column vectors; adding them to a pointer is address generation (free).
            index_ops = M + K + M
            assert args["flops"] == 2 * M * N * K + index_ops
            assert args["bytes_loaded"] == (M * K + K * N) * 4 and args["bytes_stored"] == M * N * 4
            assert args["error"] is None
        assert {tuple(e[5]["program_id"]) for e in spans} == {(0, 0, 0), (1, 0, 0), (2, 0, 0)}
        np.testing.assert_array_equal(await c.numpy(), np.full((M, N), K, np.float32))


async def _timeline(preset: str) -> list[int]:
    async with kbus.open_device(preset) as torch:
        n = 40_000
        x = torch.tensor(np.arange(n, dtype=np.float32))
        out = torch.empty(n, dtype=np.float32)
        times = []
        for placement in ("spread", "owner", "spread"):
            r = await add[(kl.cdiv(n, 512),)](x, x, out, n, BLOCK=512, placement=placement)
            times += [r.start_ps, r.end_ps]
        return times


@pytest.mark.asyncio
async def test_the_same_program_takes_the_same_virtual_time() -> None:
    assert await _timeline("default") == await _timeline("default")


@pytest.mark.asyncio
async def test_pe_cpu_is_busy_for_the_whole_instance() -> None:
    async with kbus.open_device("tiny") as torch:
        x = torch.tensor(np.ones(1024, np.float32), policy=kbus.Shard(dim=0, targets=[(0, 0, 0)]))
        await x
        cpu = torch.device.pes[0][0][0].cpu
        before = cpu.busy_ps
        await copy[(1,)](x, x, BLOCK=1024)
        first = cpu.busy_ps - before
        res = await copy[(1,)](x, x, BLOCK=1024)
        busy = cpu.busy_ps - before - first
        # kernel_launch is charged by PE_CPU; the rest of the launch's time on the PE is the instance.
        assert busy > torch.config.compute.kernel_launch
        assert busy < res.duration_ps
