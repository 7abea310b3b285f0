"""A device served in one place and driven from another: results, virtual time, formats, buffers."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import kbus
import kbus.hw
from kbus.demo import workload
from kbus.hw import build_device
from kbus.protocol import MemoryReadMsg, MemoryWriteMsg, PeDmaMsg
from kbus.remote import RemoteDevice, connect_device, serve_device


async def _messages(dev: Any) -> list[tuple[int, Any]]:
    """The README's message walk-through; returns (virtual time, value) after each step."""
    hbm = dev.config.memory.hbm_base
    data, back = np.arange(4096, dtype=np.uint8), np.zeros(4096, np.uint8)
    dev.register_host_buffer("data", data)
    dev.register_host_buffer("back", back)
    one_pe = dict(target_cubes=(1,), target_pe=3)
    out: list[tuple[int, Any]] = []
    await dev.request(
        MemoryWriteMsg("demo", "w1", 0, 1, 3, hbm, 4096, src_kind="host_buffer_ref", host_buffer="data", **one_pe)
    )
    out.append((dev.now_ps, None))
    await dev.request(MemoryReadMsg("demo", "r1", 0, 1, 3, hbm, 4096, host_buffer="back", **one_pe))
    out.append((dev.now_ps, bytes(back)))
    (resp,) = await dev.request(PeDmaMsg("demo", "p1", 0, 1, 3, hbm, 65536))
    out.append((dev.now_ps, resp.value))
    dev.unregister_host_buffer("data")
    dev.unregister_host_buffer("back")
    return out


def test_messages_take_the_same_virtual_time_remote_as_in_process() -> None:
    async def main() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
        local = build_device(kbus.Sim(), "tiny")
        here = await _messages(local)
        await local.aclose()
        async with serve_device("tiny") as server:
            dev = await connect_device(server.url)
            assert isinstance(dev, RemoteDevice) and dev.config == local.config
            there = await _messages(dev)
            served = await dev.fetch_stats()
            assert served.now_ps == dev.now_ps == server.sim.now
            assert served.blocks["sip0.cube1.pe3.dma"].msgs_in > 0
            assert served.levels.keys() == local.level_stats().keys()
            assert served.links.keys() == local.link_stats().keys()
            await dev.aclose()
        return here, there

    here, there = kbus.run(main)
    assert there == here
    assert there[1][1] == bytes(np.arange(4096, dtype=np.uint8))
    assert there[-1][0] > 0


def test_demo_runs_on_a_remote_device_with_the_same_times_every_run() -> None:
    async def main() -> list[list[tuple[str, bool, int]]]:
        runs = []
        async with serve_device("tiny") as server:
            for _ in range(2):
                async with kbus.open_device(server.url) as torch:
                    assert isinstance(torch.device, RemoteDevice)
                    runs.append(await workload(torch))
            assert server.clients == 0
            assert server.host_buffers() == []
        return runs

    first, second = kbus.run(main, use_uvloop=True)
    (third,) = kbus.run(lambda: _one_run(), use_uvloop=False)
    assert all(ok for _, ok, _ in first), first
    assert [t for *_, t in first] == [t for *_, t in second] == [t for *_, t in third]
    assert all(t > 0 for *_, t in first)


async def _one_run() -> list[list[tuple[str, bool, int]]]:
    async with serve_device("tiny") as server, kbus.open_device(server.url) as torch:
        return [await workload(torch)]


def test_json_frames_carry_the_same_messages_and_bytes() -> None:
    async def main() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
        async with serve_device("tiny") as server:
            out = []
            for fmt in ("msgpack", "json"):
                dev = await connect_device(server.url, format=fmt)  # type: ignore[arg-type]
                assert dev.format == fmt
                out.append(await _messages(dev))
                await dev.aclose()
        return out[0], out[1]

    packed, text = kbus.run(main)
    assert [v for _, v in text] == [v for _, v in packed]
    assert [t - text[0][0] for t, _ in text] == [t - packed[0][0] for t, _ in packed]


def test_json_frames_split_bulk_bytes_under_the_frame_limit() -> None:
    async def main() -> None:
        async with serve_device("tiny") as server:
            dev = await connect_device(server.url, format="json")
            try:
                hbm = dev.config.memory.hbm_base
                n = 6 << 20
                assert n > server.max_size
                data = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
                back = np.zeros_like(data)
                dev.register_host_buffer("big", data)
                dev.register_host_buffer("back", back)
                one = dict(target_cubes=(0,), target_pe=1)
                await dev.request(
                    MemoryWriteMsg("j", "w", 0, 0, 1, hbm, n, src_kind="host_buffer_ref", host_buffer="big", **one)
                )
                await dev.request(MemoryReadMsg("j", "r", 0, 0, 1, hbm, n, host_buffer="back", **one))
                np.testing.assert_array_equal(back, data)
            finally:
                await dev.aclose()

    kbus.run(main)


def test_kbus_connect_runs_open_device_remotely_and_checks_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with serve_device("tiny") as server:
            monkeypatch.setenv("KBUS_CONNECT", server.url)
            async with kbus.open_device("tiny") as torch:
                assert isinstance(torch.device, RemoteDevice)
                t = torch.tensor(np.arange(64, dtype=np.float32))
                np.testing.assert_array_equal(await (t * 2.0).numpy(), np.arange(64, dtype=np.float32) * 2)
            with pytest.raises(kbus.ConfigError, match=r"serves device config 'tiny'.*asked for 'default'"):
                async with kbus.open_device("default"):
                    pass
            assert server.stats.connections == 2

    kbus.run(main)


def test_the_server_reports_clients_coming_and_going() -> None:
    events: list[tuple[str, int, int]] = []

    async def main() -> None:
        async with serve_device("tiny") as server:
            server.on_client = lambda event, client, peer, requests: events.append((event, client, requests))
            for _ in range(2):
                dev = await connect_device(server.url)
                await dev.request(PeDmaMsg("c", "p", 0, 0, 1, 0, 64))
                await dev.aclose()
                for _ in range(100):
                    if len(events) % 2 == 0:
                        break
                    await asyncio.sleep(0.01)

    kbus.run(main)
    assert events == [("connect", 1, 0), ("leave", 1, 1), ("connect", 2, 0), ("leave", 2, 1)]


def test_remote_device_keeps_hardware_attributes_in_the_server() -> None:
    async def main() -> None:
        async with serve_device("tiny") as server:
            dev = await connect_device(server.url)
            try:
                with pytest.raises(AttributeError, match=r"'stats' is not available on a remote device"):
                    dev.stats()  # type: ignore[attr-defined]
                with pytest.raises(AttributeError, match=r"'blocks' is not available on a remote device"):
                    dev.blocks  # type: ignore[attr-defined]  # noqa: B018
                assert not isinstance(dev, kbus.hw.Device) and isinstance(dev, kbus.hw.HostDevice)
                with pytest.raises(TypeError, match="takes a host request message"):
                    await dev.request("not a message")  # type: ignore[arg-type]
                with pytest.raises(kbus.DeviceError, match="out of range"):
                    await dev.request(PeDmaMsg("c", "bad", 0, 9, 0, 0, 64))
                with pytest.raises(KeyError, match="'nope' is not registered"):
                    dev.host_buffer("nope")
                assert "tiny" in repr(dev)
            finally:
                await dev.aclose()
            with pytest.raises(kbus.RemoteError, match="is closed"):
                await dev.request(PeDmaMsg("c", "late", 0, 0, 0, 0, 64))

    kbus.run(main)


def test_kernel_language_kernels_travel_as_code_blobs() -> None:
    import kbus.lang as kl

    @kbus.kernel
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):  # type: ignore[no-untyped-def]
        offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
        mask = offs < n
        kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) + kl.load(y_ptr + offs, mask=mask), mask=mask)

    async def main() -> None:
        async with serve_device("tiny") as server, kbus.open_device(server.url) as torch:
            a = np.arange(1000, dtype=np.float32)
            x, y = torch.tensor(a), torch.tensor(a * 3)
            out = torch.empty(1000, dtype=np.float32)
            res = await add[(4,)](x, y, out, 1000, BLOCK=256)
            np.testing.assert_array_equal(await out.numpy(), a * 4)
            assert res.deployed and res.duration_ps > 0

    kbus.run(main)


def test_a_large_transfer_crosses_in_raw_bytes() -> None:
    async def main() -> tuple[int, int, int]:
        async with serve_device("tiny") as server, kbus.open_device(server.url) as torch:
            data = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32)  # 8 MiB
            assert isinstance(torch.device, RemoteDevice)
            before = torch.device.bytes_sent + torch.device.bytes_received
            back = await torch.tensor(data).numpy()
            moved = torch.device.bytes_sent + torch.device.bytes_received - before
            np.testing.assert_array_equal(back, data)
            return moved, data.nbytes, server.max_size

    moved, nbytes, max_size = kbus.run(main)
    assert moved <= 2.2 * nbytes, f"{moved} socket bytes for {nbytes} uploaded and read back"
    assert max_size < nbytes  # it travelled in chunks under the frame limit


def test_deadlines_in_device_time_say_they_need_the_device_in_process() -> None:
    async def main() -> None:
        async with serve_device("tiny") as server, kbus.open_device(server.url) as torch:
            with (
                pytest.raises(NotImplementedError, match=r"kbus\.fail_after.*need the device in this process"),
                kbus.fail_after(torch, "1us"),
            ):
                pass
            with pytest.raises(NotImplementedError, match=r"sleep\(5\)"):
                await torch.sim.sleep(5)

    kbus.run(main)
