"""``kbus demo``: a short tour of the device through the torch-like runtime.

Creates replicated and sharded tensors on the device, runs a few ops (including
a matmul whose right operand is sharded, so PEs read remote shards through
their MMUs), reads the results back, checks them against numpy and prints a
summary of virtual time, messages, bytes moved and per-level utilisation.

The same program runs on every preset, ``large`` (4096 PEs) included: the
main tensors have 64 rows per PE up to 64 PEs and 4096 rows beyond (one row
per PE on ``large``), and the redistribution gathers each cube's rows onto
the cube's first PE, which grows with the number of PEs, where a full
replica on every PE would grow with its square.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .hw.config import DeviceConfig
from .sim import format_time, run
from .sim.units import format_bandwidth


async def workload(torch: Any, console: Console | None = None, seed: int = 0) -> list[tuple[str, bool, int]]:
    """The demo's tensor program; returns (step, matches numpy, virtual ps taken) rows."""
    import kbus

    rng = np.random.default_rng(seed)
    pes = torch.device.config.num_pes
    rows: list[tuple[str, bool, int]] = []

    def working(label: str) -> contextlib.AbstractContextManager[object]:
        """A spinner naming the step while it runs (on a terminal; big presets take a while)."""
        if console is None or not console.is_terminal:
            return contextlib.nullcontext()
        return console.status(f"{label} ...")

    async def step(label: str, t: Any, expect: np.ndarray[Any, Any], t0: int) -> None:
        with working(label):
            got = await t.numpy()
        ok = bool(np.allclose(got, expect, rtol=1e-4, atol=1e-3))
        rows.append((label, ok, torch.now_ps - t0))
        if console is not None:
            console.print(
                f"  {'[green]ok[/]' if ok else '[red]MISMATCH[/]'}  {label:<46} "
                f"{format_time(torch.now_ps - t0):>10} device time"
            )

    n = 64 * min(pes, 64)
    x_np = rng.standard_normal((n, 64), dtype=np.float32)
    y_np = rng.standard_normal((n, 64), dtype=np.float32)
    w_np = rng.standard_normal((64, 32), dtype=np.float32)
    t0 = torch.now_ps
    x = torch.tensor(x_np, policy=kbus.Shard(dim=0))
    y = torch.tensor(y_np, policy=kbus.Shard(dim=0))
    w = torch.tensor(w_np, policy=kbus.Replicate())
    with working("upload x, y, w"):
        await x
        await y
        await w
    rows.append((f"upload x, y ({n}x64, sharded), w (replicated)", True, torch.now_ps - t0))
    if console is not None:
        console.print(f"  [green]ok[/]  {rows[-1][0]:<46} {format_time(rows[-1][2]):>10} device time")

    t0 = torch.now_ps
    await step("z = x * 2 + y (sharded elementwise)", x * 2.0 + y, x_np * 2 + y_np, t0)
    t0 = torch.now_ps
    await step("h = x @ w (row-sharded @ replicated)", x @ w, x_np @ w_np, t0)
    a_np = rng.standard_normal((32, 48), dtype=np.float32)
    b_np = rng.standard_normal((48, 16), dtype=np.float32)
    a = torch.tensor(a_np, policy=kbus.Shard(dim=0))
    b = torch.tensor(b_np, policy=kbus.Shard(dim=0))
    t0 = torch.now_ps
    await step("a @ b (b sharded: PEs read remote shards)", a @ b, a_np @ b_np, t0)
    t0 = torch.now_ps
    await step("x.sum()", x.sum(), np.asarray(x_np.sum(dtype=np.float64), dtype=np.float32), t0)
    t0 = torch.now_ps
    await step("x.to(Shard(over='cube')) (redistribute)", x.to(kbus.Shard(dim=0, over="cube")), x_np, t0)
    return rows


_MEMORY_KINDS = frozenset({"HBM", "SRAM"})


def plural(n: int, word: str) -> str:
    """``"1 SIP"``, ``"2 SIPs"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(torch: Any, console: Console, rows: list[tuple[str, bool, int]], served: Any = None) -> None:
    """The fabric, link and block tables and the closing line; ``served``: a remote device's DeviceStats."""
    dev = torch.device
    now = dev.sim.now if served is None else served.now_ps
    stats = dev.stats() if served is None else served.blocks
    msgs = sum(s.msgs_in for s in stats.values())
    levels = dev.level_stats() if served is None else served.levels
    moved = sum(d["bytes"] for d in levels.values())
    table = Table(title=f"fabric levels and memories over {format_time(now)} of device time")
    for col in ("level", "resources", "flows", "bytes", "utilisation"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for level, d in levels.items():
        table.add_row(
            level,
            f"{int(d['links'])}",
            f"{int(d['messages']):,}",
            f"{int(d['bytes']):,}",
            f"{100 * d['utilisation']:.3f}%",
        )
    console.print(table)
    link_stats = dev.link_stats() if served is None else served.links
    links = sorted(link_stats.values(), key=lambda r: (-r.busy, r.name))[:8]
    top = Table(title="busiest links and memory channels (busy = allocated rate / bandwidth over time)")
    for col in ("resource", "kind", "flows", "bytes", "busy", "queueing mean", "queueing p99"):
        top.add_column(col, justify="left" if col in ("resource", "kind") else "right", no_wrap=col == "resource")
    for r in links:
        top.add_row(
            r.name,
            r.level,
            f"{r.flows:,}",
            f"{r.bytes:,}",
            f"{100 * r.busy:.2f}%",
            format_time(round(r.queue_mean_ps)),
            format_time(r.queue_p99_ps),
        )
    console.print(top)
    kinds: dict[str, list[float]] = {}
    for s in stats.values():
        if s.kind not in _MEMORY_KINDS:  # a memory's work is its channel's busy time, in the tables above
            kinds.setdefault(s.kind, []).append(s.utilisation)
    busy = Table(title="block utilisation (mean / max over blocks of a kind; memories: see their channels)")
    for col in ("kind", "blocks", "mean", "max"):
        busy.add_column(col, justify="left" if col == "kind" else "right")
    for kind, us in kinds.items():
        busy.add_row(kind, str(len(us)), f"{100 * sum(us) / len(us):.2f}%", f"{100 * max(us):.2f}%")
    console.print(busy)
    ok = all(r[1] for r in rows)
    where = "" if served is None else f" on the device at {dev.url}"
    console.print(
        f"[bold]{'all results match numpy' if ok else 'SOME RESULTS DIFFER FROM NUMPY'}[/]; "
        f"virtual time {format_time(now)}{where}, {msgs:,} block messages, {moved:,} bytes over links "
        f"({format_bandwidth(moved * 1e12 / now) if now else '-'} aggregate)"
    )


def _heading(console: Console, cfg: DeviceConfig, where: str = "") -> None:
    t = cfg.topology
    console.print(
        f"[bold]kbus demo[/] on {cfg.name!r}{where}: {plural(t.sips, 'SIP')} x {plural(t.cubes_per_sip, 'cube')} x "
        f"{plural(t.pes_per_cube, 'PE')} = {plural(cfg.num_pes, 'PE')}"
    )


def run_demo(
    config: str = "default",
    *,
    trace: str | None = None,
    use_uvloop: bool = True,
    connect: str | None = None,
    record: str | None = None,
    token: str | None = None,
) -> int:
    """Run the demo on a fresh device (or the device served at ``connect``); returns the exit code.

    ``record`` writes a ``.kbrec`` recording of the run (see ``kbus replay``).
    """
    import kbus
    from kbus.remote import RemoteDevice

    console = Console(highlight=False)  # numbers and units are coloured by us, not guessed at
    cfg = None
    if connect is None:
        cfg = DeviceConfig.load(config)
        _heading(console, cfg)

    async def main() -> int:
        async with kbus.open_device(cfg or connect, trace=trace, record=record, token=token) as torch:  # type: ignore[arg-type]
            if connect is not None:
                _heading(console, torch.config, f" at {connect}")
            rows = await workload(torch, console)
            dev = torch.device
            served = await dev.fetch_stats() if isinstance(dev, RemoteDevice) else None
            _summary(torch, console, rows, served)
        if trace:
            console.print(f"trace written to {trace} (open it in https://ui.perfetto.dev)")
        if record:
            console.print(f"recording written to {record} (replay it: kbus replay {record})")
        return 0 if all(r[1] for r in rows) else 1

    return run(main, use_uvloop=use_uvloop)


def serve_demo(config: str = "default", *, host: str = "127.0.0.1", port: int = 8765, repeat: int = 0) -> int:
    """Run the demo workload repeatedly with a live websocket trace stream.

    Prints the one URL to open (the viewer page is served on the stream's own
    port), then a line per client connecting or leaving and per finished run.
    """
    import kbus
    from kbus import trace as ktrace
    from kbus.sim.units import format_time

    console = Console(highlight=False, soft_wrap=True)

    def on_client(what: str, client: ktrace.StreamClient) -> None:
        if what == "connect":
            console.print(f"viewer connected from {client.peer}")
        else:
            console.print(f"viewer {client.peer} left (sent {client.sent:,} events, dropped {client.dropped:,})")

    async def main() -> int:
        async with kbus.open_device(config) as torch, ktrace.serve(torch.device, host=host, port=port) as server:
            server.on_client = on_client
            console.print(f"live trace of {config!r}: open {server.viewer_url} (websocket {server.url})")
            console.print("Ctrl-C stops" + (f"; {repeat} run(s)" if repeat else ""))
            i = 0
            while repeat == 0 or i < repeat:
                await workload(torch, None, seed=i)
                i += 1
                console.print(
                    f"run {i}: virtual time {format_time(torch.device.sim.now)}, "
                    f"{server.events:,} events, {len(server.clients)} viewer(s)"
                )
                await asyncio.sleep(0.2)
        return 0

    try:
        return run(main)
    except KeyboardInterrupt:
        return 0
