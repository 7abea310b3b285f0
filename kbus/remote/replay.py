"""Replaying a recording on a device of any configuration: :func:`replay`.

Each recorded client becomes one simulated *host* task that walks its records
in order: it registers and frees host buffers where the recording did, and
before each request it waits until

1. every request in the request's causal frontier (the responses the host
   had seen when it sent it) has completed on the new device, and
2. the host's recorded *think time* has passed: the virtual time between the
   later of its previous request and the last of those responses, and the
   request, in the recording;

then it issues the request as a simulated task of its own, with the
host-buffer bytes the recording captured. On the recording's own config
every request therefore goes out at its recorded time and the device, being
deterministic, answers identically: :attr:`ReplayResult.identical` checks
every response, its virtual time and the bytes a read returned. On another
config the requests keep their dependencies, not their times, and the result
compares latencies per request kind.

The result is data (:class:`ReplayResult`); :func:`print_replay` and
:meth:`ReplayResult.write_csv` present it. Other code (a sweep over configs)
can call :func:`replay_async` per point.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
from rich.console import Console
from rich.table import Table

from ..errors import DeviceError, RecordingError
from ..hw import DeviceConfig, build_device
from ..hw.blocks import REQUESTS
from ..protocol import HostMessage, MemoryReadMsg, MemoryWriteMsg, from_wire, to_wire
from ..sim import Sim, SimFuture
from ..sim.units import format_time
from .kernels import install_kernels
from .record import Recording, read_recording
from .server import prepare_device

__all__ = ["ReplayResult", "ReplayRow", "print_replay", "replay", "replay_async"]

_MAX_DIFFERENCES = 10


@attrs.frozen
class ReplayRow:
    """Latencies of one request kind (``msg_type``), in the recording (old) and the replay (new), in ps.

    Totals and percentiles cover the requests that succeeded; failures are counted apart.
    """

    kind: str
    count: int
    old_failed: int
    """Requests of this kind that failed in the recording (not in the latencies)."""
    new_failed: int
    """Requests of this kind that failed in the replay (not in the latencies)."""
    old_total_ps: int
    new_total_ps: int
    old_p50_ps: int
    new_p50_ps: int
    old_p99_ps: int
    new_p99_ps: int


@attrs.frozen
class ReplayResult:
    """What a replay did and how it compares with the recording."""

    path: str
    old_config: str
    """Name of the config the recording was made on."""
    new_config: str
    same_config: bool
    """The replay ran on exactly the recorded config."""
    requests: int
    """Requests replayed (the recording may hold more requests than responses when cut off)."""
    rows: tuple[ReplayRow, ...]
    old_end_ps: int
    """Virtual time of the last response in the recording."""
    new_end_ps: int
    """Virtual time of the last response in the replay."""
    identical: bool
    """Every response, its virtual time and the bytes read back equal the recording's."""
    differences: tuple[str, ...]
    """The first differences found (empty when identical)."""
    stopped: str | None
    """Where a cut-off recording stopped, else None."""
    wall_s: float
    """Wall-clock seconds the replay took."""

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per request kind plus an ``end-to-end`` row; times in picoseconds."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([f.name for f in attrs.fields(ReplayRow)])
            for r in self.rows:
                w.writerow(attrs.astuple(r))
            failed = (sum(r.old_failed for r in self.rows), sum(r.new_failed for r in self.rows))
            w.writerow(["end-to-end", self.requests, *failed, self.old_end_ps, self.new_end_ps, "", "", "", ""])


def _pct(values: list[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..100) of integer picoseconds; 0 for none."""
    if not values:
        return 0
    s = sorted(values)
    k = max(1, -(-len(s) * q // 100))
    return s[int(k) - 1]


def replay(
    path: str | os.PathLike[str],
    config: DeviceConfig | str | os.PathLike[str] | None = None,
    *,
    trace: str | os.PathLike[str] | None = None,
    use_uvloop: bool = True,
) -> ReplayResult:
    """Replay the recording at ``path`` on ``config`` (default: the recorded one); see the module doc.

    Runs its own event loop; from async code use :func:`replay_async`.
    """
    from ..sim import run

    async def main() -> ReplayResult:
        return await replay_async(path, config, trace=trace)

    return run(main, use_uvloop=use_uvloop)


async def replay_async(
    path: str | os.PathLike[str] | Recording,
    config: DeviceConfig | str | os.PathLike[str] | None = None,
    *,
    trace: str | os.PathLike[str] | None = None,
    on_device: Callable[[Any], object] | None = None,
) -> ReplayResult:
    """:func:`replay` on the running loop; ``path`` may also be a :class:`Recording` already read.

    ``on_device(device)``, if given, is called after the replay and before the
    device closes, to read what the result does not carry (statistics).
    """
    rec = path if isinstance(path, Recording) else read_recording(path)
    wall0 = time.perf_counter()
    old_cfg = DeviceConfig.from_toml_text(rec.config_toml, source=rec.path)
    cfg = old_cfg if config is None else DeviceConfig.load(config)
    sim = Sim(name=f"replay of {os.path.basename(rec.path)}")
    device = build_device(sim, cfg)
    prepare_device(device)
    run = _Run(rec, device, sim)
    if trace is not None:
        from ..trace import attach_from_open_device

        async with attach_from_open_device(device, trace=trace):
            await run.run()
    else:
        await run.run()
    result = run.result(old_cfg, cfg, time.perf_counter() - wall0)
    if on_device is not None:
        on_device(device)
    await device.aclose()
    return result


class _Run:
    """The state of one replay: the recorded records by request, and what the replay observed."""

    def __init__(self, rec: Recording, device: Any, sim: Sim) -> None:
        self.rec = rec
        self.device = device
        self.sim = sim
        self.reqs: dict[int, dict[str, Any]] = {}
        self.resps: dict[int, dict[str, Any]] = {}
        self.events: dict[int, list[dict[str, Any]]] = {}
        for r in rec.records:
            if r["k"] == "resp":
                self.resps[r["i"]] = r
                continue
            if r["k"] == "kernel":
                continue
            if r["k"] == "req":
                self.reqs[r["i"]] = r
            self.events.setdefault(r["c"], []).append(r)
        self.multi = len(self.events) > 1
        self.done: dict[int, SimFuture[None]] = {i: sim.create_future(f"replayed request {i}") for i in self.reqs}
        self.new_send: dict[int, int] = {}
        self.new_done: dict[int, int] = {}
        self.outcome: dict[int, tuple[bool, str | None, list[dict[str, Any]], bytes | None]] = {}
        self.users: dict[str, int] = {}
        self.free_later: set[str] = set()
        self.inflight: dict[str, set[int]] = {}
        """Requests issued and not yet answered, per host buffer they use."""
        self.kernels: list[Any] = []

    def _name(self, client: int, name: str) -> str:
        return f"kbus.replay.{client}/{name}" if self.multi else name

    def _message(self, client: int, wire: Any, i: int) -> HostMessage:
        msg = from_wire(wire)
        if not isinstance(msg, REQUESTS):
            raise RecordingError(f"{self.rec.path}: request {i} is a {type(msg).__name__}, not a host request")
        if not self.multi:
            return msg
        tag = f"kbus.replay.{client}/"
        if type(msg) is MemoryWriteMsg or type(msg) is MemoryReadMsg:
            buf = None if msg.host_buffer is None else tag + msg.host_buffer
            return attrs.evolve(msg, correlation_id=tag + msg.correlation_id, host_buffer=buf)
        return attrs.evolve(msg, correlation_id=tag + msg.correlation_id)

    async def run(self) -> None:
        for r in self.rec.records:
            if r["k"] == "kernel":
                install_kernels(r["specs"], self.kernels)
        for client, events in self.events.items():
            self.sim.spawn(self._host(client, events), name=f"replayed host {client}")
        try:
            await self.sim.run()
        finally:
            for name in list(self.users):
                self._unregister(name)

    def _unregister(self, name: str) -> None:
        self.users.pop(name, None)
        self.free_later.discard(name)
        try:
            self.device.unregister_host_buffer(name)
        except KeyError:
            pass

    async def _host(self, client: int, events: list[dict[str, Any]]) -> None:
        sim, device = self.sim, self.device
        prev_sent = 0  # recorded send time of this host's previous request
        for ev in events:
            kind = ev["k"]
            if kind == "buf":
                name = self._name(client, ev["name"])
                # A name used again: its previous buffer goes once the requests using it are done.
                for j in list(self.inflight.get(name, ())):
                    await self.done[j]
                device.register_host_buffer(name, np.zeros(int(ev["nbytes"]), dtype=np.uint8))
                self.users[name] = 0
            elif kind == "free":
                name = self._name(client, ev["name"])
                if self.users.get(name):
                    self.free_later.add(name)
                elif name in self.users:
                    self._unregister(name)
            elif kind == "req":
                i = ev["i"]
                ready = prev_sent
                for j in ev["seen"]:
                    if j in self.done:
                        await self.done[j]
                    resp = self.resps.get(j)
                    if resp is not None:
                        ready = max(ready, int(resp["t"]))
                think = int(ev["t"]) - ready
                if think > 0:
                    await sim.sleep(think)
                prev_sent = int(ev["t"])
                msg = self._message(client, ev["msg"], i)
                data = ev["data"]
                if data is not None and type(msg) is MemoryWriteMsg and msg.host_buffer is not None:
                    buf = device.host_buffer(msg.host_buffer)
                    buf[msg.host_offset : msg.host_offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
                buf = getattr(msg, "host_buffer", None)
                if buf in self.users:
                    self.users[buf] += 1  # counted now: a free later in this walk must wait for it
                    self.inflight.setdefault(buf, set()).add(i)
                sim.spawn(self._issue(i, msg), name=f"replayed request {i}")

    async def _issue(self, i: int, msg: HostMessage) -> None:
        sim, device = self.sim, self.device
        buf = getattr(msg, "host_buffer", None)
        self.new_send[i] = sim.now
        ok, error = True, None
        responses: tuple[Any, ...] = ()
        try:
            responses = await device.request(msg)
        except DeviceError as exc:
            ok, error, responses = False, str(exc), exc.responses
        except (ValueError, TypeError) as exc:
            ok, error = False, str(exc)
        self.new_done[i] = sim.now
        data = None
        if ok and type(msg) is MemoryReadMsg and msg.host_buffer is not None:
            data = device.host_buffer(msg.host_buffer)[msg.host_offset : msg.host_offset + msg.nbytes].tobytes()
        tag = f"kbus.replay.{self.reqs[i]['c']}/" if self.multi else ""
        wires = []
        for r in responses:
            w = to_wire(r)
            if tag:
                w["correlation_id"] = w["correlation_id"].replace(tag, "", 1)
                if w.get("error"):
                    w["error"] = w["error"].replace(tag, "")
            wires.append(w)
        if error is not None and tag:
            error = error.replace(tag, "")
        self.outcome[i] = (ok, error, wires, data)
        if buf is not None:
            self.inflight.get(buf, set()).discard(i)
        if buf in self.users:
            self.users[buf] -= 1
            if self.users[buf] == 0 and buf in self.free_later:
                self._unregister(buf)
        self.done[i].set_result(None)

    def result(self, old_cfg: DeviceConfig, cfg: DeviceConfig, wall_s: float) -> ReplayResult:
        diffs: list[str] = []
        # Latencies of the requests that succeeded; failures are counted apart (a failure's
        # latency says nothing about the config: a coordinate the new device lacks fails at once).
        old_lat: dict[str, list[int]] = {}
        new_lat: dict[str, list[int]] = {}
        count: dict[str, int] = {}
        old_failed: dict[str, int] = {}
        new_failed: dict[str, int] = {}
        for i, req in self.reqs.items():
            kind = req["msg"].get("msg_type", "?")
            count[kind] = count.get(kind, 0) + 1
            resp = self.resps.get(i)
            if i in self.outcome:
                if self.outcome[i][0]:
                    new_lat.setdefault(kind, []).append(self.new_done[i] - self.new_send[i])
                else:
                    new_failed[kind] = new_failed.get(kind, 0) + 1
            if resp is None:
                continue  # cut off before its response: nothing to compare
            if resp["ok"]:
                old_lat.setdefault(kind, []).append(int(resp["t"]) - int(req["t"]))
            else:
                old_failed[kind] = old_failed.get(kind, 0) + 1
            if len(diffs) >= _MAX_DIFFERENCES:
                continue
            what = f"request {i} ({kind} {req['msg'].get('request_id')!r})"
            if i not in self.outcome:
                diffs.append(f"{what} did not complete")
                continue
            ok, error, wires, data = self.outcome[i]
            if self.new_send[i] != req["t"]:
                diffs.append(f"{what} sent at {format_time(self.new_send[i])}, recorded {format_time(req['t'])}")
            elif self.new_done[i] != resp["t"]:
                diffs.append(f"{what} answered at {format_time(self.new_done[i])}, recorded {format_time(resp['t'])}")
            elif ok != resp["ok"] or error != resp["error"]:
                diffs.append(f"{what}: outcome {ok} {error!r}, recorded {resp['ok']} {resp['error']!r}")
            elif wires != resp["responses"]:
                diffs.append(f"{what}: responses differ from the recording")
            elif data != resp["data"]:
                diffs.append(f"{what}: the bytes read back differ from the recording")
        rows = tuple(
            ReplayRow(
                k,
                count[k],
                old_failed.get(k, 0),
                new_failed.get(k, 0),
                sum(old_lat.get(k, [])),
                sum(new_lat.get(k, [])),
                _pct(old_lat.get(k, []), 50),
                _pct(new_lat.get(k, []), 50),
                _pct(old_lat.get(k, []), 99),
                _pct(new_lat.get(k, []), 99),
            )
            for k in sorted(count)
        )
        old_end = max((int(r["t"]) for r in self.resps.values()), default=0)
        new_end = max(self.new_done.values(), default=0)
        return ReplayResult(
            path=self.rec.path,
            old_config=old_cfg.name,
            new_config=cfg.name,
            same_config=old_cfg == cfg,
            requests=len(self.new_send),
            rows=rows,
            old_end_ps=old_end,
            new_end_ps=new_end,
            identical=not diffs and len(self.outcome) == len(self.reqs),
            differences=tuple(diffs),
            stopped=self.rec.stopped,
            wall_s=wall_s,
        )


def _ratio(old: int, new: int) -> str:
    return f"{new / old:.2f}x" if old else "-"


def print_replay(result: ReplayResult, console: Console | None = None) -> None:
    """Say what a replay found: identical, or a comparison table per request kind."""
    console = console or Console(highlight=False)
    if result.stopped:
        console.print(f"[yellow]{result.stopped}[/]")
    head = (
        f"replayed {result.requests} request(s) from {result.path} (recorded on {result.old_config!r}) "
        f"on {result.new_config!r} in {result.wall_s:.2f} s"
    )
    console.print(head)
    if result.same_config:
        if result.identical:
            console.print(
                f"[green]identical[/]: every response, its virtual time and the bytes read back match the "
                f"recording (end-to-end {format_time(result.new_end_ps)})"
            )
            return
        console.print("[red]NOT identical[/] to the recording on its own config:")
        for d in result.differences:
            console.print(f"  {d}")
    table = Table(title=f"{result.old_config!r} (old) vs {result.new_config!r} (new), virtual time")
    cols = (
        "request",
        "count",
        "failed",
        "total old",
        "total new",
        "p50 old",
        "p50 new",
        "p99 old",
        "p99 new",
        "new/old",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "request" else "right")
    for r in result.rows:
        table.add_row(
            r.kind,
            str(r.count),
            f"{r.old_failed} -> {r.new_failed}" if r.old_failed or r.new_failed else "",
            format_time(r.old_total_ps),
            format_time(r.new_total_ps),
            format_time(r.old_p50_ps),
            format_time(r.new_p50_ps),
            format_time(r.old_p99_ps),
            format_time(r.new_p99_ps),
            _ratio(r.old_total_ps, r.new_total_ps),
        )
    table.add_row(
        "end-to-end", str(result.requests), "", format_time(result.old_end_ps), format_time(result.new_end_ps),
        "", "", "", "", _ratio(result.old_end_ps, result.new_end_ps), style="bold",
    )  # fmt: skip
    console.print(table)
