"""70 — A device in its own process: serve it, then drive it from another process.

What this shows, in order:

1. ``kbus.serve_device("tiny", token=...)`` builds a device and serves it over
   websockets on loopback (``kbus serve --preset tiny --token ...`` does the
   same from a shell); clients must present the bearer token;
2. a second Python process (this file again, with ``--client URL``) opens it
   with ``kbus.open_device(URL)``: the whole tensor runtime, unchanged, with
   every protocol message crossing the socket in msgpack frames;
3. the same process also drives it by raw messages with
   ``kbus.connect_device(URL)`` (the host surface of an in-process device);
4. virtual time belongs to the served device: both clients read it from the
   responses, and the server shows it advancing.

Run: ``python examples/70_remote_device.py``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

import numpy as np

import kbus
from kbus.protocol import PeDmaMsg


async def client(url: str) -> None:
    """The second process: a runtime and a raw-message client on the served device."""
    async with kbus.open_device(url) as torch:  # the token comes from KBUS_TOKEN
        a = np.arange(4096, dtype=np.float32).reshape(64, 64)
        x = torch.tensor(a)
        y = (x * 2.0 + 1.0) @ torch.tensor(np.eye(64, dtype=np.float32))
        got = await y.numpy()
        assert np.allclose(got, a * 2 + 1), "remote result differs from numpy"
        print(f"client: (x * 2 + 1) @ I on {torch.device!r}: matches numpy")
        print(f"client: device time after the runtime's work: {kbus.format_time(torch.now_ps)}")
    dev = await kbus.connect_device(url)
    try:
        (resp,) = await dev.request(PeDmaMsg("probe", "p1", 0, 1, 3, dev.config.memory.hbm_base, 65536))
        print(f"client: a 64 KiB PE->HBM read took {kbus.format_time(resp.value)} of device time")
    finally:
        await dev.aclose()


async def serve() -> None:
    token = secrets.token_hex(16)
    async with kbus.serve_device("tiny", token=token) as server:
        print(f"server: serving {server.device.config.name!r} at {server.url} (token required)")
        env = {**os.environ, "KBUS_TOKEN": token}
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", server.url, env=env)
        code = await proc.wait()
        if code != 0:
            sys.exit(f"the client process failed with exit code {code}")
        print(f"server: {server.stats.requests} requests served; device time now {kbus.format_time(server.sim.now)}")
    # Without the token the handshake is refused before any frame is read.
    async with kbus.serve_device("tiny", token=token) as server:
        try:
            await kbus.connect_device(server.url, token="wrong")
        except kbus.RemoteError as exc:
            print(f"server: a client with the wrong token was refused: {exc}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        kbus.run(lambda: client(sys.argv[2]))
    else:
        kbus.run(serve)
