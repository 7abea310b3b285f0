"""What a device server refuses, and how it stays usable: tokens, limits, bad frames, dead clients."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import kbus
from kbus.protocol import MemoryReadMsg, MemoryWriteMsg, PeDmaMsg, ResponseMsg, to_wire
from kbus.remote import connect_device, serve_device
from kbus.remote.wire import PROTOCOL_VERSION, decode_frame

ROOT = Path(__file__).resolve().parents[2]


_PENDING: dict[int, list[dict[str, Any]]] = {}


async def _frame(ws: Any) -> dict[str, Any]:
    """The next frame from ``ws`` (a websocket message holds one frame, or an array of them)."""
    pending = _PENDING.setdefault(id(ws), [])
    if not pending:
        obj = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        pending.extend(obj if isinstance(obj, list) else [obj])
    return pending.pop(0)


async def _until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        f = await _frame(ws)
        if f["t"] == kind:
            return f


def test_a_token_is_required_before_anything_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KBUS_TOKEN", raising=False)

    async def main() -> None:
        async with serve_device("tiny", token="s3cret") as server:
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_connect(server.url, additional_headers=headers):
                        pass
                assert info.value.response.status_code == 401
            with pytest.raises(kbus.RemoteError, match="HTTP 401"):
                await connect_device(server.url, token="wrong")
            assert server.stats.connections == 0  # refused at the handshake: no handler ran
            dev = await connect_device(server.url, token="s3cret")
            await dev.aclose()
            monkeypatch.setenv("KBUS_TOKEN", "s3cret")
            async with kbus.open_device(server.url) as torch:
                assert torch.config.name == "tiny"
            assert server.stats.connections == 2

    kbus.run(main)


def test_only_loopback_without_a_token() -> None:
    with pytest.raises(ValueError, match=r"refusing to serve on '0\.0\.0\.0' without a token"):
        serve_device("tiny", host="0.0.0.0")

    async def main() -> str:
        async with serve_device("tiny") as server:
            return server.host

    assert kbus.run(main) == "127.0.0.1"


def test_bad_frames_get_an_error_naming_the_field_and_the_connection_stays_usable() -> None:
    async def main() -> None:
        async with serve_device("tiny") as server, ws_connect(server.url) as ws:
            hello = await _frame(ws)
            assert hello["t"] == "hello" and hello["protocol"] == PROTOCOL_VERSION and hello["format"] == "msgpack"
            assert kbus.DeviceConfig.from_toml_text(hello["config"]) == kbus.DeviceConfig.load("tiny")
            assert set(hello["formats"]) == {"msgpack", "json"}
            await ws.send(b"\xc1 not msgpack")
            err = await _until(ws, "error")
            assert "malformed msgpack" in err["error"]
            good = to_wire(PeDmaMsg("c", "p", 0, 0, 1, 0, 64))
            bad = {**good, "dst_pa": "0x10"}
            await ws.send(msgpack.packb({"t": "req", "id": 7, "msg": bad}))
            err = await _until(ws, "error")
            assert err["id"] == 7 and err["path"] == "msg.dst_pa" and "expected int" in err["error"]
            await ws.send(msgpack.packb({"t": "req", "id": 8, "msg": {**good, "msg_type": "warp_drive"}}))
            err = await _until(ws, "error")
            assert err["path"] == "msg.msg_type" and "unknown msg_type" in err["error"]
            not_a_request = to_wire(ResponseMsg("c", "r", 0, 0, True))
            await ws.send(msgpack.packb({"t": "req", "id": 9, "msg": not_a_request}))
            err = await _until(ws, "error")
            assert err["path"] == "msg.msg_type" and "not a host request" in err["error"]
            await ws.send(msgpack.packb({"t": "teleport"}))
            err = await _until(ws, "error")
            assert err["path"] == "t"
            await ws.send(msgpack.packb({"t": "put", "name": "nope", "offset": 0, "data": b"x"}))
            err = await _until(ws, "error")
            assert err["path"] == "name" and "'nope' is not registered" in err["error"]
            await ws.send(msgpack.packb({"t": "buf", "name": "b", "nbytes": True}))
            err = await _until(ws, "error")
            assert err["path"] == "nbytes"
            await ws.send(msgpack.packb(5))
            err = await _until(ws, "error")
            assert "array of frames" in err["error"]
            # Several frames in one message (an array) are handled in order; a bad one is refused alone.
            await ws.send(msgpack.packb([{"t": "ack", "n": 1}, 42, {"t": "req", "id": 10, "msg": good}]))
            err = await _until(ws, "error")
            assert "a frame must be a map, got int" in err["error"]
            resp = await _until(ws, "resp")
            assert resp["id"] == 10 and resp["ok"] and resp["responses"][0]["value"] > 0 and resp["now_ps"] > 0
            assert server.stats.rejected_frames == 9

    kbus.run(main)


def test_frame_size_and_in_flight_limits() -> None:
    async def main() -> None:
        async with serve_device("tiny", max_size=4096, max_inflight=2) as server:
            async with ws_connect(server.url) as ws:
                await _frame(ws)
                await ws.send(msgpack.packb({"t": "put", "name": "x", "offset": 0, "data": bytes(8192)}))
                with pytest.raises(ConnectionClosed) as info:
                    await _until(ws, "never")
                assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big
            dev = await connect_device(server.url)
            try:
                msgs = [PeDmaMsg("c", f"p{i}", 0, 0, i % 4, 0, 4096) for i in range(5)]
                results = await asyncio.gather(*(dev.request(m) for m in msgs), return_exceptions=True)
                refused = [r for r in results if isinstance(r, kbus.RemoteError)]
                assert len(refused) == 3 and "limit 2" in str(refused[0])
                assert sum(isinstance(r, tuple) for r in results) == 2
                (ok,) = await dev.request(msgs[0])  # usable afterwards
                assert ok.success
            finally:
                await dev.aclose()

    kbus.run(main)


def test_no_pickle_on_the_wire() -> None:
    serializers = re.compile(r"^\s*(import|from)\s+(pickle|_pickle|cPickle|marshal|dill|cloudpickle|shelve)\b", re.M)
    sources = [*(ROOT / "kbus" / "remote").glob("*.py"), ROOT / "kbus" / "protocol" / "codec.py"]
    offenders = [p.name for p in sources if serializers.search(p.read_text())]
    assert len(sources) >= 6 and offenders == []
    # A frame decodes to plain data only: a msgpack extension type is not turned into an object.
    frame = decode_frame(msgpack.packb({"t": "req", "x": msgpack.ExtType(1, b"payload")}), "msgpack")
    assert isinstance(frame["x"], msgpack.ExtType)


_VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    import kbus
    from kbus.protocol import MemoryReadMsg, MemoryWriteMsg

    async def main():
        dev = await kbus.connect_device(sys.argv[1])
        hbm = dev.config.memory.hbm_base
        data = np.full(1 << 16, 7, np.uint8)
        for i in range(10_000):
            name = f"b{i}"
            dev.register_host_buffer(name, data.copy())
            reqs = [
                dev.request(MemoryWriteMsg("v", f"w{i}.{pe}", 0, 1, pe, hbm, data.nbytes, src_kind="host_buffer_ref",
                                           target_cubes=(1,), target_pe=pe, host_buffer=name))
                for pe in range(4)
            ]
            if i == 3:
                print("running", flush=True)
            await asyncio.gather(*reqs)

    asyncio.run(main())
    """
)


def test_a_killed_client_leaves_nothing_behind_and_others_carry_on(tmp_path: Path) -> None:
    script = tmp_path / "victim.py"
    script.write_text(_VICTIM)

    async def checker(url: str, rounds: int) -> int:
        dev = await connect_device(url)
        rng = np.random.default_rng(1)
        hbm = dev.config.memory.hbm_base
        checked = 0
        try:
            for i in range(rounds):
                data = rng.integers(0, 256, 1 << 14, dtype=np.uint8)
                back = np.zeros_like(data)
                dev.register_host_buffer(f"d{i}", data)
                dev.register_host_buffer(f"r{i}", back)
                pe = i % 4
                one = dict(target_cubes=(0,), target_pe=pe)
                await dev.request(MemoryWriteMsg("k", f"w{i}", 0, 0, pe, hbm, data.nbytes,
                                                 src_kind="host_buffer_ref", host_buffer=f"d{i}", **one))  # fmt: skip
                await dev.request(MemoryReadMsg("k", f"r{i}", 0, 0, pe, hbm, data.nbytes, host_buffer=f"r{i}", **one))
                np.testing.assert_array_equal(back, data)
                dev.unregister_host_buffer(f"d{i}")
                dev.unregister_host_buffer(f"r{i}")
                checked += 1
                await asyncio.sleep(0)
        finally:
            await dev.aclose()
        return checked

    async def main() -> None:
        async with serve_device("tiny") as server:
            baseline = len(server.sim.tasks())
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), server.url, stdout=subprocess.PIPE, env=env
            )
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line.strip() == b"running"
                assert server.clients == 1 and server.stats.requests >= 12
                task = asyncio.create_task(checker(server.url, 40))
                await asyncio.sleep(0.05)
                proc.kill()  # mid-run: requests in flight, buffers registered
                await proc.wait()
                assert await task == 40
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for _ in range(200):
                if server.clients == 0 and len(server.sim.tasks()) == baseline:
                    break
                await asyncio.sleep(0.01)
            assert server.clients == 0
            assert server.host_buffers() == []
            assert len(server.sim.tasks()) == baseline, server.sim.tasks()
            assert server.device.orphans == []
            assert server.sim.runnable == 0  # no hold left behind by the dead client

    kbus.run(main)


def test_clients_cut_bulk_bytes_to_the_servers_frame_limit() -> None:
    async def main() -> None:
        async with serve_device("tiny", max_size=64 * 1024) as server, kbus.open_device(server.url) as torch:
            a = np.random.default_rng(5).standard_normal(1 << 18).astype(np.float32)  # 1 MiB
            np.testing.assert_array_equal(await torch.tensor(a).numpy(), a)
            assert server.stats.rejected_frames == 0

    kbus.run(main)


def test_a_client_that_never_acks_cannot_freeze_the_device_for_others() -> None:
    async def main() -> None:
        async with serve_device("tiny", ack_timeout=0.3) as server, ws_connect(server.url) as silent:
            hello = await _frame(silent)  # a raw client that never acks its hello: time is held for it
            assert hello["t"] == "hello"
            dev = await connect_device(server.url)
            try:
                (resp,) = await asyncio.wait_for(dev.request(PeDmaMsg("c", "p", 0, 0, 1, 0, 4096)), 10)
                assert resp.value > 0
            finally:
                await dev.aclose()
            err = await _until(silent, "error")
            assert err["path"] == "ack" and "no ack within 0.3 s" in err["error"]
            assert server.sim.runnable == 0

    kbus.run(main)
