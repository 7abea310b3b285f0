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
import itertools
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from kbus import Sim
from kbus.trace import serve

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


def live_device(preset: str) -> tuple[Any, Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """The real device, a coroutine function running 16 more requests numbered from ``n``, and its closer."""
    from kbus.hw import build_device
    from kbus.protocol import MemoryWriteMsg, PeDmaMsg

    dev = build_device(Sim(), preset)
    base = dev.config.memory.hbm_base
    coords = [node.coord for node in dev.iter_pes()]

    async def chunk(n: int) -> None:
        async def one(i: int) -> None:
            s, c, p = coords[(i * 7) % len(coords)]
            if i % 8 == 7:
                await dev.request(MemoryWriteMsg("viewer", f"w{i}", s, c, p, base, 8192, pattern="zeros"))
            else:
                await dev.request(PeDmaMsg("viewer", f"d{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

        await asyncio.gather(*(one(i) for i in range(n, n + 16)))

    return dev, chunk, dev.aclose


def save_screenshot(png: bytes, tmp_path: Path, name: str) -> Path:
    """Keep the screenshot in the test's tmp dir, and in ``$KBUS_SCREENSHOT_DIR`` if set."""
    out = tmp_path / name
    out.write_bytes(png)
    if os.environ.get("KBUS_SCREENSHOT_DIR"):
        keep = Path(os.environ["KBUS_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / name)
    return out


class Page:
    """The viewer page under DevTools: read its hook, click like a person, type, take screenshots."""

    def __init__(self, cdp: DevTools) -> None:
        self.cdp = cdp

    async def state(self) -> dict[str, Any]:
        raw = await self.cdp.evaluate("JSON.stringify(window.kbusViewer || null)")
        return orjson.loads(raw or "null") or {}

    async def wait(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout: float = 45) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = await self.state()
            if cond(state):
                return state
            await asyncio.sleep(0.2)
        raise AssertionError(f"the viewer never showed {what}; its state: {state}")

    async def point(self, expression: str) -> tuple[float, float]:
        p = orjson.loads(await self.cdp.evaluate(f"JSON.stringify({expression})") or "null")
        assert p, f"nothing on the page for {expression}"
        return float(p["x"]), float(p["y"])

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.sleep(0.15)  # a frame or two

    async def click_element(self, element_id: str) -> None:
        box = f"document.getElementById({element_id!r}).getBoundingClientRect()"
        x, y = await self.point(f"(b => ({{x: b.left + b.width / 2, y: b.top + b.height / 2}}))({box})")
        await self.click(x, y)

    async def type_into(self, element_id: str, text: str) -> None:
        """Click into a text field, select what it holds and type over it."""
        await self.click_element(element_id)
        await self.cdp.evaluate(f"document.getElementById({element_id!r}).select()")
        await self.cdp.call("Input.insertText", text=text)

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.cdp.call("Page.captureScreenshot", format="png"))["data"])

    async def drawn_pixels(self) -> int:
        """Pixels of the timeline that are not background (a blank page has none)."""
        js = """(() => { const c = document.getElementById('cv'), x = c.getContext('2d');
            const d = x.getImageData(0, 0, c.width, Math.min(c.height, 900)).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 200) n++; return n; })()"""
        return int(await self.cdp.evaluate(js))


@pytest.mark.asyncio
async def test_viewer_served_by_the_stream_groups_clicks_and_searches_on_default(tmp_path: Path) -> None:
    """On ``default`` (285 rows): the first screen shows the whole device, groups open and close,
    a clicked span shows its fields, and a search highlights one request's whole path."""
    binary = find_chromium()
    dev, chunk, close = live_device("default")
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
            async with (
                chromium(binary, server.viewer_url, tmp_path / "profile") as port,
                connect(await page_ws_url(port), proxy=None, max_size=64 << 20) as cdp_ws,
            ):
                page = Page(DevTools(cdp_ws))
                first = await page.wait(
                    "live events on every row",
                    lambda s: s.get("connected") and s.get("rows", 0) >= len(dev.blocks) and s.get("eventsDrawn"),
                )
                # The first screen: cubes closed, so everything fits; closed groups draw their utilisation.
                assert first["collapsed"] >= dev.config.topology.cubes_per_sip and first["visibleRows"] < 40, first
                assert first["url"] == server.url  # the page connected back to the port it came from
                await asyncio.sleep(0.5)
                overview = await page.screenshot()
                assert await page.drawn_pixels() > 2000

                await page.click_element("follow")  # hold the view still while clicking on it
                await page.click(*(await page.point("kbusViewer.groupPoint('sip0.cube0')")))
                opened = await page.state()
                assert opened["collapsed"] == first["collapsed"] - 1 and opened["visibleRows"] > first["visibleRows"]

                await page.click(*(await page.point("kbusViewer.spanPoint('link')")))
                picked = (await page.state())["selected"]
                assert picked and picked["cat"] == "link" and "request_id" in picked["args"], picked
                assert await cdp_ws_visible_details(page)

                rid = picked["args"]["request_id"]
                await page.type_into("search", f"{rid}")
                await page.click_element("find")
                found = await page.wait("the request's path", lambda s: s.get("searchHits", 0) >= 2)
                assert len(found["searchRows"]) >= 2, found  # its messages crossed several blocks
                searched = await page.screenshot()

                await page.cdp.call("Page.navigate", url=server.viewer_url + "?prefix=sip0.cube1.pe2")
                selected = await page.wait(
                    "the rows of the prefix", lambda s: s.get("connected") and s.get("firstRow", "").startswith("sip0")
                )
                assert selected["firstRow"].startswith("sip0.cube1.pe2.") and selected["visibleRows"] == 4, selected
        finally:
            stop.set()
            await asyncio.wait_for(sim_task, 60)
    await close()

    for name, png in (("viewer.png", overview), ("viewer-search.png", searched)):
        print(f"viewer screenshot: {save_screenshot(png, tmp_path, name)}")
        assert png.startswith(b"\x89PNG") and len(png) > 5000


async def cdp_ws_visible_details(page: Page) -> bool:
    """The details panel is shown and names a request id."""
    text = await page.cdp.evaluate(
        "(e => e.style.display === 'block' ? e.textContent : '')(document.getElementById('details'))"
    )
    return "request_id" in str(text)
