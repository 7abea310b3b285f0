"""The ``--report`` page, opened in headless Chromium: every plot drawn, the table complete.

Chromium is driven over the DevTools protocol with the helpers of
``tests/trace/test_viewer_browser.py`` (same skip rule: skipped without
Chromium unless ``KBUS_REQUIRE_BROWSER=1``). The page is served over HTTP from
the test's tmp dir, with no network: the report must be self-contained.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sweep_workloads import GATHER, write
from websockets.asyncio.client import connect

from kbus.sweep import sweep, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))
browser: Any = importlib.import_module("test_viewer_browser")

STATE_JS = """JSON.stringify({
  ready: document.readyState,
  plotly: typeof window.Plotly,
  plots: document.querySelectorAll('.js-plotly-plot').length,
  drawn: document.querySelectorAll('.js-plotly-plot .main-svg').length,
  lines: Array.from(document.querySelectorAll('.plot')).map(
    p => [p.id, p.querySelectorAll('.scatterlayer .trace').length]),
  heatmap: document.querySelectorAll('#utilisation .hm image').length,
  rows: document.querySelectorAll('#results tbody tr').length,
  failedRows: document.querySelectorAll('#results tbody tr.failed').length,
  summary: (document.getElementById('summary') || {}).textContent || '',
  scripts: Array.from(document.scripts).filter(s => s.src).length,
})"""


async def _read_page(port: int) -> tuple[dict[str, Any], bytes]:
    async with connect(await browser.page_ws_url(port), proxy=None, max_size=64 << 20) as ws:
        cdp = browser.DevTools(ws)
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            state = orjson.loads(await cdp.evaluate(STATE_JS) or "{}")
            if state.get("ready") == "complete" and state.get("heatmap") and state.get("drawn", 0) >= state["plots"]:
                break
            await asyncio.sleep(0.2)
        shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return state, base64.b64decode(shot["data"])


@pytest.mark.asyncio
async def test_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    binary = browser.find_chromium()
    path = write(tmp_path, GATHER)
    grid = {"links.noc_hop.bandwidth": ["16GB/s", "64GB/s", "256GB/s", "nope"], "topology.cubes_per_sip": [1, 2]}
    results = await asyncio.to_thread(sweep, path, grid, "tiny", None, workers=0)
    site = tmp_path / "site"
    site.mkdir()
    write_report(results, site / "report.html", title="report test")

    url = (site / "report.html").as_uri()  # opened from disk: a self-contained page needs no server
    async with browser.chromium(binary, url, tmp_path / "profile") as port:
        state, png = await _read_page(port)

    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    print(f"report screenshot: {shot}")
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert state["plotly"] == "object", state  # plotly.js is embedded, not fetched
    assert state["scripts"] == 0, state  # no external script at all
    # Two swept keys -> two line plots, plus the utilisation heatmap; every one drawn.
    assert state["plots"] == 3 and state["drawn"] >= 3, state
    lines = dict(state["lines"])
    # time vs bandwidth: one line per cube count; time vs cubes: one line per valid bandwidth.
    assert lines["time-vs-links.noc_hop.bandwidth"] == 2, state
    assert lines["time-vs-topology.cubes_per_sip"] == 3, state
    assert state["heatmap"] == 1, state
    assert state["rows"] == 8 and state["failedRows"] == 2, state
    assert "8 points, 2 failed" in state["summary"], state
