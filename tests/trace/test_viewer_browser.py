"""The live viewer page, in headless Chromium, drawing events from a running simulation.

Chromium is driven over the DevTools protocol with the ``websockets`` library
(no Playwright, no browser download). The test is skipped when Chromium is not
installed, unless ``KBUS_REQUIRE_BROWSER=1`` (CI sets it after running
``tools/ci-browser.sh``), in which case a missing browser fails it.
The screenshot is saved next to the test's tmp files (and copied to
``$KBUS_SCREENSHOT_DIR`` if set) for people to look at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.server
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from kbus import Sim
from kbus.trace import serve
from kbus.trace.fake import FakeDevice, run_workload

VIEWER_DIR = Path(__file__).resolve().parents[2] / "tools" / "trace-viewer"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
    "--remote-debugging-port=0",
]


def find_chromium() -> str:
    """Path of the Chromium binary, or skip (fail under KBUS_REQUIRE_BROWSER=1)."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("KBUS_REQUIRE_BROWSER") == "1":
        pytest.fail("KBUS_REQUIRE_BROWSER=1 but no chromium binary found; run tools/ci-browser.sh")
    pytest.skip("chromium is not installed (tools/ci-browser.sh installs it)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[int]:
    """Serve ``directory`` on 127.0.0.1 from a thread; yield the port."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="viewer-http", daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@contextlib.asynccontextmanager
async def chromium(binary: str, url: str, profile: Path) -> AsyncIterator[int]:
    """Run headless Chromium on ``url``; yield its DevTools port. Stops only the processes it started."""
    log_path = profile.parent / "chromium.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        url,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so its helpers stop with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.returncode is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium wrote no DevToolsActivePort in 30 s; see {log_path}")
            await asyncio.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
        log.close()


class DevTools:
    """A minimal DevTools protocol client: numbered commands, replies matched by id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send(orjson.dumps({"id": msg_id, "method": method, "params": params}).decode())
        while True:
            reply = orjson.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"DevTools {method} failed: {reply['error']}")
                result = reply.get("result", {})
                assert isinstance(result, dict)
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


async def page_ws_url(port: int) -> str:
    def fetch() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            data = orjson.loads(resp.read())
            assert isinstance(data, list)
            return data

    deadline = time.monotonic() + 30
    while True:
        pages = [t for t in await asyncio.to_thread(fetch) if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        if time.monotonic() > deadline:
            raise AssertionError("chromium shows no page target")
        await asyncio.sleep(0.2)


async def drive_page(port: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Wait until the page has drawn events; return its hook state, a screenshot and the final state."""
    async with connect(await page_ws_url(port), proxy=None, max_size=64 << 20) as cdp_ws:
        cdp = DevTools(cdp_ws)
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            state = orjson.loads(await cdp.evaluate("JSON.stringify(window.kbusViewer || null)") or "null") or {}
            if state.get("eventsDrawn", 0) > 0 and state.get("rows", 0) > 10:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # a few more frames, for a fuller screenshot
        shot = await cdp.call("Page.captureScreenshot", format="png")
        final = orjson.loads(await cdp.evaluate("JSON.stringify(window.kbusViewer)"))
        return state, shot, final


def live_device() -> tuple[Any, Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """The real device (preset ``tiny``) if ``kbus.hw.build_device`` exists, else the fake one.

    Returns the device, a coroutine function running 16 more requests numbered
    from ``n``, and its closer.
    """
    try:
        from kbus.hw import build_device
        from kbus.protocol import MemoryWriteMsg, PeDmaMsg
    except ImportError:
        fake = FakeDevice(Sim(), sips=2, cubes=2, pes=2)
        return fake, lambda n: run_workload(fake, requests=16, window=8, first=n), fake.close
    dev = build_device(Sim(), "tiny")
    base = dev.config.memory.hbm_base
    coords = [node.coord for node in dev.iter_pes()]

    async def chunk(n: int) -> None:
        async def one(i: int) -> None:
            s, c, p = coords[i % len(coords)]
            if i % 8 == 7:
                await dev.request(MemoryWriteMsg("viewer", f"w{i}", s, c, p, base, 8192, pattern="zeros"))
            else:
                await dev.request(PeDmaMsg("viewer", f"d{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

        await asyncio.gather(*(one(i) for i in range(n, n + 16)))

    return dev, chunk, dev.aclose


def save_screenshot(png: bytes, tmp_path: Path) -> Path:
    """Keep the screenshot in the test's tmp dir, and in ``$KBUS_SCREENSHOT_DIR`` if set."""
    out = tmp_path / "viewer.png"
    out.write_bytes(png)
    if os.environ.get("KBUS_SCREENSHOT_DIR"):
        keep = Path(os.environ["KBUS_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / "viewer.png")
    return out


@pytest.mark.asyncio
async def test_viewer_draws_live_events_in_headless_chromium(tmp_path: Path) -> None:
    binary = find_chromium()
    assert (VIEWER_DIR / "index.html").is_file()
    dev, chunk, close = live_device()
    stop = asyncio.Event()

    async def simulate() -> None:
        """Keep the simulation producing events (in chunks, so the page sees them arrive live)."""
        n = 0
        while not stop.is_set():
            await chunk(n)
            n += 16
            await asyncio.sleep(0.05)

    async with serve(dev, flush_interval=0.02, status_interval=0.2) as server:
        sim_task = asyncio.create_task(simulate())
        try:
            with http_server(VIEWER_DIR) as http_port:
                url = f"http://127.0.0.1:{http_port}/index.html?ws={server.url}"
                async with chromium(binary, url, tmp_path / "profile") as port:
                    state, shot, final = await drive_page(port)
        finally:
            stop.set()
            await asyncio.wait_for(sim_task, 60)
    await close()

    png = base64.b64decode(shot["data"])
    print(f"viewer screenshot: {save_screenshot(png, tmp_path)}")
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert state.get("connected") is True, state
    assert state.get("eventsDrawn", 0) > 0, state
    assert final["eventsReceived"] > 100 and final["rows"] >= len(dev.blocks), final
    assert final["url"] == server.url
