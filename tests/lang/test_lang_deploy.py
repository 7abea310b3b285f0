"""Deployment: the code blob in device memory, the program caches, integrity, and what a launch carries."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import struct
from typing import Any

import numpy as np
import pytest

import kbus
import kbus.lang as kl
from kbus.protocol import KernelLaunchMsg, KernelRef, MemoryWriteMsg, ScalarArg, TensorArg, roundtrip


@kbus.kernel
def fill(out_ptr, n, value, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    kl.store(out_ptr + offs, kl.full((BLOCK,), value, kl.float32), mask=offs < n)


def _fresh_kernel() -> kl.Kernel:
    """A kernel no device has seen yet (a new variant each call)."""

    @kbus.kernel
    def inc(x_ptr, n, BLOCK: kl.constexpr):
        offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
        mask = offs < n
        kl.store(x_ptr + offs, kl.load(x_ptr + offs, mask=mask) + 1, mask=mask)

    return inc


async def _corrupt(torch: Any, dep: kl.Deployment, offset: int, pattern: str, nbytes: int = 4) -> None:
    s, c, p = dep.coord
    await torch.device.request(
        MemoryWriteMsg(
            "test",
            f"corrupt-{offset}",
            s,
            c,
            p,
            dep.pa + offset,
            nbytes,
            pattern=pattern,
            target_cubes=(c,),
            target_pe=p,
        )
    )


@pytest.mark.asyncio
async def test_first_launch_deploys_later_launches_reuse() -> None:
    async with kbus.open_device("tiny") as torch:
        kern = _fresh_kernel()
        x = torch.zeros(4096, dtype=np.float32)
        first = await kern[(4,)](x, 4096, BLOCK=1024)
        assert first.deployed
        info = kl.kernel_cache_info(torch)
        assert (info.misses, info.hits, info.deployments, info.kernels) == (1, 0, 1, 1)
        assert info.pe_fetches == 4 and info.pe_hits == 0  # 4 instances spread on 4 PEs, one fetch each
        for _ in range(3):
            again = await kern[(4,)](x, 4096, BLOCK=1024)
            assert not again.deployed
        info = kl.kernel_cache_info(torch.device)
        assert (info.misses, info.hits, info.deployments) == (1, 3, 1)
        assert info.pe_fetches == 4 and info.pe_hits == 12
        np.testing.assert_array_equal(await x.numpy(), np.full(4096, 4, np.float32))
        # The cached PEs no longer pay the fetch: a warm launch is faster than the first.
        assert again.duration_ps < first.duration_ps


@pytest.mark.asyncio
async def test_blob_is_where_the_ref_says_and_holds_no_code() -> None:
    async with kbus.open_device("tiny") as torch:
        dep = await kl.deploy(torch, fill)
        assert await kl.deploy(torch, fill) is dep  # deploying twice reuses
        coord, base, size = kl.code_region(torch.config)
        assert dep.coord == coord and base <= dep.pa < base + size and dep.pa % 64 == 0
        blob = fill.blob()
        assert dep.nbytes == len(blob) and dep.sha256 == hashlib.sha256(blob).hexdigest()
        # Read the deployed bytes back through the protocol and compare.
        host = np.zeros(dep.nbytes, np.uint8)
        torch.device.register_host_buffer("readback", host)
        s, c, p = dep.coord
        await torch.device.request(
            kbus.protocol.MemoryReadMsg(
                "test", "rb", s, c, p, dep.pa, dep.nbytes, target_cubes=(c,), target_pe=p, host_buffer="readback"
            )
        )
        torch.device.unregister_host_buffer("readback")
        assert host.tobytes() == blob
        payload = json.loads(blob[64:])
        assert payload["name"] == fill.id.name and payload["source_sha256"] == fill.id.source_sha256
        assert inspect.getsource(fill.fn).encode() not in blob


@pytest.mark.asyncio
async def test_launch_message_references_the_blob_and_round_trips_the_codec(batch_mode: str) -> None:
    async with kbus.open_device("tiny") as torch:
        seen: list[Any] = []
        torch.device.on_request = lambda phase, msg, responses, now: seen.append(msg) if phase == "begin" else None
        out = torch.zeros(100, dtype=np.float32)
        await out
        await fill[(1,)](out, 100, np.float32(2.5), BLOCK=128)
        torch.device.on_request = None
        (msg,) = [m for m in seen if isinstance(m, KernelLaunchMsg)]
        dep = await kl.deploy(torch, fill)
        assert msg.kernel_ref == dep.ref()
        assert msg.kernel_ref.kind == "deployed" and msg.kernel_ref.nbytes_code == dep.nbytes
        assert roundtrip(msg) == msg
        source = inspect.getsource(fill.fn)
        assert all(isinstance(a, TensorArg) or len(a.dtype) <= 5 for a in msg.args), "only dtype names as strings"
        assert "kl.store" not in repr(msg) and source not in repr(msg)
        ta = msg.args[0]
        assert isinstance(ta, TensorArg) and ta.va_base == out.addr
        # tensor group, then n (int), value (f32), BLOCK (int), then grid x3 and placement, then the batch
        # mode unless it is the default ("off" is code 1)
        assert msg.args[1] == ScalarArg("f32", 1)
        mode = (ScalarArg("i64", 1),) if batch_mode == "off" else ()
        assert msg.args[-7 - len(mode) :] == (
            ScalarArg("int", 100),
            ScalarArg("f32", 2.5),
            ScalarArg("int", 128),
            ScalarArg("i64", 1),
            ScalarArg("i64", 1),
            ScalarArg("i64", 1),
            ScalarArg("i64", 0),
            *mode,
        )
        np.testing.assert_array_equal(await out.numpy(), np.full(100, 2.5, np.float32))


@pytest.mark.asyncio
async def test_argument_encoding_matches_the_runtime_builtin_convention() -> None:
    from kbus.lang.launch import _scalar, _tensor_args
    from kbus.runtime.builtins import encode_scalar, encode_tensor

    for value in (3, True, 2.5, float("-inf"), np.float32("nan"), np.float16(1.5), np.int8(-4), np.uint64(7)):
        assert _scalar(value, "v") == encode_scalar(value), value

    async with kbus.open_device("default") as torch:
        for policy in (kbus.Shard(dim=0), kbus.Shard(dim=1), kbus.Replicate()):
            t = torch.zeros(33, 70, dtype=np.float32, policy=policy)
            group, _ = _tensor_args(t, "t")
            assert group == encode_tensor(t._storage.desc)


@pytest.mark.asyncio
async def test_wire_mode_carries_a_launch_through_the_codec() -> None:
    async with kbus.open_device("tiny", wire=True) as torch:
        out = torch.zeros(300, dtype=np.float32)
        await fill[(3,)](out, 300, 1.5, BLOCK=128)
        np.testing.assert_array_equal(await out.numpy(), np.full(300, 1.5, np.float32))


@pytest.mark.asyncio
async def test_concurrent_first_launches_deploy_once() -> None:
    async with kbus.open_device("tiny") as torch:
        kern = _fresh_kernel()
        a, b = torch.zeros(1024, dtype=np.float32), torch.zeros(1024, dtype=np.float32)
        ra, rb = await asyncio.gather(kern[(1,)](a, 1024, BLOCK=1024), kern[(1,)](b, 1024, BLOCK=1024))
        assert [ra.deployed, rb.deployed].count(True) == 1
        info = kl.kernel_cache_info(torch)
        assert (info.deployments, info.misses, info.hits) == (1, 1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("offset", "pattern", "reason"),
    [
        (64 + 5, "0xDEADBEEF", "payload checksum mismatch"),
        (0, "zeros", "bad magic"),
        (12, "word32:0x7FFF", "header says 32767 payload bytes"),
    ],
    ids=["payload", "magic", "length"],
)
async def test_corrupt_blob_fails_the_launch_clearly_then_redeploys(offset: int, pattern: str, reason: str) -> None:
    async with kbus.open_device("tiny") as torch:
        kern = _fresh_kernel()
        x = torch.zeros(1024, dtype=np.float32)
        dep = await kl.deploy(torch, kern)
        await _corrupt(torch, dep, offset, pattern)
        with pytest.raises(kbus.KernelError) as info:
            await kern[(1,)](x, 1024, BLOCK=1024)
        msg = str(info.value)
        s, c, p = dep.coord
        assert f"bad code blob at sip{s}.cube{c}.pe{p} PA {dep.pa:#x}" in msg and reason in msg
        np.testing.assert_array_equal(await x.numpy(), np.zeros(1024, np.float32))
        # The host forgot the corrupt deployment: the next launch writes a fresh copy elsewhere and runs.
        res = await kern[(1,)](x, 1024, BLOCK=1024)
        assert res.deployed
        assert (await kl.deploy(torch, kern)).pa != dep.pa
        assert kl.kernel_cache_info(torch).deployments == 2
        np.testing.assert_array_equal(await x.numpy(), np.ones(1024, np.float32))


@pytest.mark.asyncio
async def test_pe_code_cache_keeps_what_it_fetched() -> None:
    async with kbus.open_device("tiny") as torch:
        kern = _fresh_kernel()
        x = torch.zeros(2048, dtype=np.float32, policy=kbus.Shard(dim=0, targets=[(0, 0, 0), (0, 1, 0)], min_bytes=0))
        await kern[(1,)](x, 2048, BLOCK=1024)  # program 0 on sip0.cube0.pe0: that PE caches the blob
        dep = await kl.deploy(torch, kern)
        await _corrupt(torch, dep, 64 + 1, "0xFFFF")
        again = await kern[(1,)](x, 2048, BLOCK=1024)  # same PE: served from its code cache
        assert not again.deployed
        with pytest.raises(kbus.KernelError, match=r"sip0\.cube1\.pe0\.cpu: kernel .*bad code blob"):
            await kern[(2,)](x, 2048, BLOCK=1024, placement="owner")  # program 1 runs on sip0.cube1.pe0: fetches


@pytest.mark.asyncio
async def test_blob_naming_an_unknown_kernel_is_refused() -> None:
    async with kbus.open_device("tiny") as torch:
        dev = torch.device
        payload = json.dumps(
            {"abi": 1, "name": "nowhere.ghost", "source_sha256": "0" * 64, "variant": 0, "params": []}
        ).encode()
        blob = struct.pack("<8sHHI32s16x", b"KBUSKERN", 1, 64, len(payload), hashlib.sha256(payload).digest())
        data = np.frombuffer(blob + payload, np.uint8).copy()
        coord, base, size = kl.code_region(torch.config)
        pa = base + size - 4096  # an unused corner of the code region
        dev.register_host_buffer("ghost", data)
        await dev.request(
            MemoryWriteMsg(
                "t",
                "w",
                *coord,
                pa,
                data.size,
                src_kind="host_buffer_ref",
                target_cubes=(coord[1],),
                target_pe=coord[2],
                host_buffer="ghost",
            )
        )
        dev.unregister_host_buffer("ghost")
        kl.kernel_cache_info(torch)  # installs the resolver on this device
        ref = KernelRef(
            "nowhere.ghost",
            "deployed",
            deploy_pa=pa,
            deploy_sip=coord[0],
            deploy_cube=coord[1],
            deploy_pe=coord[2],
            nbytes_code=int(data.size),
        )
        launch = KernelLaunchMsg("t", "k", ref, (ScalarArg("i64", 1),) * 4, (0,), 0, (0,))
        with pytest.raises(kbus.DeviceError, match=r"names kernel nowhere\.ghost .* which is not registered"):
            await dev.request(launch)
        bad_ref = KernelRef("x", "deployed", deploy_pa=None)
        with pytest.raises(kbus.DeviceError, match="has no deploy_pa"):
            await dev.request(KernelLaunchMsg("t", "k2", bad_ref, (), (0,), 0, (0,)))
