"""50 — Stream a device's trace live over websockets.

What this shows, in order:

1. ``kbus.trace.serve(device, port=0)`` starts a websocket server on
   loopback (``port=0`` picks a free port; read it from ``server.url``);
2. a client (here the ``websockets`` library; in practice the page in
   the viewer page served on the same port, or your own tool) subscribes with a filter:
   ``{"op": "subscribe", "filter": {"cat": ["request"]}}`` (host requests only);
3. the device runs some tensor work while the server streams it;
4. the client reads ``events`` frames, each a batch of
   ``[ts_ps, dur_ps, cat, name, path, args]`` arrays, and prints the first
   completed request spans: what the runtime asked of the device, when, and
   how long each took in device time.

The simulation never waits for a client: events go to a bounded ring and each
client is sent what it can take. See ``kbus/trace/README.md`` for the protocol.
Run: ``python examples/50_live_trace.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect

import kbus
import kbus.trace

WANTED = 8  # request spans to print


async def read_spans(ws: Any, wanted: int) -> list[list[Any]]:
    """Read frames until ``wanted`` completed spans have arrived.

    Status frames are skipped, and so are begin markers (a span's first
    event, with no duration yet; the complete span follows when it ends).
    """
    spans: list[list[Any]] = []
    while len(spans) < wanted:
        frame = json.loads(await ws.recv())
        if frame["type"] == "events":
            spans.extend(ev for ev in frame["events"] if ev[1] is not None)
        elif frame["type"] == "error":
            raise RuntimeError(f"the trace server refused a message: {frame['reason']}")
    return spans


async def main() -> None:
    async with kbus.open_device("tiny") as torch, kbus.trace.serve(torch.device, port=0) as server:
        print(f"trace stream at {server.url}")
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"op": "subscribe", "filter": {"cat": ["request"]}}))
            ack = json.loads(await ws.recv())
            while ack["type"] == "status":  # the server also sends status frames from the start
                ack = json.loads(await ws.recv())
            assert ack["type"] == "subscribed", ack
            print(f"subscribed; events are {ack['fields']}")

            t = torch.ones(64 * 1024)  # the device works while the server streams
            total = await (t * 3).sum().item()
            print(f"sum = {total} after {kbus.format_time(torch.now_ps)} of device time")

            async with asyncio.timeout(10):  # wall clock: only guards against a hang
                spans = await read_spans(ws, WANTED)
        for ts_ps, dur_ps, _cat, name, path, _args in spans[:WANTED]:
            print(f"  {path} {name:<14} at {kbus.format_time(ts_ps):>9} took {kbus.format_time(dur_ps)}")
        print(f"the server published {server.events} events")


if __name__ == "__main__":
    kbus.run(main)
