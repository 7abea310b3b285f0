"""The ``kbus`` command: ``demo``, ``info``, ``probe``, ``trace``, ``sweep``, ``serve`` and ``replay``.

Each sub-command is a thin shell over the library; the work lives in the
modules it calls, so scripts can do the same things without the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from rich.console import Console

from . import __version__

DEFAULT_MAX_SIZE = 4 * 1024 * 1024 + 64 * 1024
"""``kbus serve --max-size`` default (kbus.remote.server.DEFAULT_MAX_SIZE, without importing it at start-up)."""


def _port(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535 (0 picks a free port)")
    return port


def _count(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n} must be >= {minimum}")
        return n

    return parse


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="built-in device preset: tiny, default or large")
    g.add_argument("--config", default=None, metavar="FILE", help="device configuration TOML file")


def _config_spec(args: argparse.Namespace) -> str:
    return str(args.config or args.preset or "default")


def _cmd_info(args: argparse.Namespace) -> int:
    from .hw.config import DeviceConfig, describe, tree
    from .hw.network import topology_text

    cfg = DeviceConfig.load(_config_spec(args))
    console = Console(highlight=False)  # our numbers and units, not half-coloured by guesswork
    console.print(tree(cfg))
    console.print(topology_text(cfg), highlight=False, soft_wrap=True)
    from rich.table import Table

    table = Table(title=f"parameters of {cfg.name!r}")
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    for key, value, meaning in describe(cfg):
        table.add_row(key, value, meaning)
    console.print(table)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .hw.probe import print_probe, run_probe

    try:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        raise ValueError(f"--sizes {args.sizes!r}: expected comma-separated byte counts such as 64,4096") from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(highlight=False)  # our numbers and units, not half-coloured by guesswork
    columns = (TextColumn("probing PEs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("probe", total=None)

        def on_pe(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run_probe(
            _config_spec(args), sizes=sizes, max_pes=args.max_pes, use_uvloop=not args.no_uvloop, on_pe=on_pe
        )
    print_probe(result, console)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.connect and (args.preset or args.config):
        raise ValueError("--connect uses the served device's config; drop --preset/--config")
    return run_demo(
        _config_spec(args),
        trace=args.trace,
        use_uvloop=not args.no_uvloop,
        connect=args.connect,
        record=args.record,
        token=_token(args),
    )


def _token(args: argparse.Namespace) -> str | None:
    return getattr(args, "token", None) or os.environ.get("KBUS_TOKEN") or None


def _cmd_serve(args: argparse.Namespace) -> int:
    from .remote.server import serve_device
    from .sim import run

    console = Console(highlight=False, soft_wrap=True)

    async def main() -> int:
        server = await serve_device(
            _config_spec(args),
            host=args.host,
            port=args.port,
            token=_token(args),
            record=args.record,
            max_size=args.max_size,
            max_inflight=args.max_inflight,
            accept_kernels=not args.no_kernels,
            ack_timeout=args.ack_timeout or None,
        )

        def on_client(event: str, client: int, peer: str, requests: int) -> None:
            if event == "connect":
                console.print(f"client {client} connected from {peer}")
            else:
                console.print(f"client {client} ({peer}) left after {requests:,} request(s)")

        server.on_client = on_client
        try:
            cfg = server.device.config
            auth = "bearer token required" if server.token else "no token (loopback only)"
            console.print(f"serving device {cfg.name!r} at {server.url} ({auth})")
            if args.record:
                console.print(f"recording every client to {args.record}")
            console.print("Ctrl-C stops", style="dim")
            await asyncio.Event().wait()  # until interrupted
        finally:
            await server.aclose()
        return 0

    try:
        return run(main)
    except KeyboardInterrupt:
        return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from .remote.replay import print_replay, replay

    result = replay(args.recording, args.config, trace=args.trace, use_uvloop=not args.no_uvloop)
    console = Console(highlight=False)
    console = Console(highlight=False, width=max(console.width, 128))  # nine columns of times fit
    print_replay(result, console)
    if args.csv:
        result.write_csv(args.csv)
        console.print(f"comparison written to {args.csv}")
    if args.trace:
        console.print(f"trace written to {args.trace}")
    return 0 if result.identical or not result.same_config else 1


def _cmd_trace_serve(args: argparse.Namespace) -> int:
    from .demo import serve_demo

    return serve_demo(_config_spec(args), host=args.host, port=args.port, repeat=args.repeat)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep.cli import run_sweep_command

    return run_sweep_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbus", description="A multi-chip AI accelerator emulated as an asyncio message bus."
    )
    parser.add_argument("--version", action="version", version=f"kbus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the demo workload on a device and print a summary")
    _add_config_args(p)
    p.add_argument("--trace", metavar="FILE", default=None, help="write a trace (Chrome JSON; .pftrace: Perfetto)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("--connect", metavar="URL", default=None, help="run on the device served at URL (ws://host:port)")
    p.add_argument("--token", default=None, help="bearer token for --connect (default: $KBUS_TOKEN)")
    p.add_argument("--record", metavar="FILE", default=None, help="record every host message to FILE (.kbrec)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", help="serve one device to websocket clients (kbus.connect_device, open_device(URL))")
    _add_config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --token)")
    p.add_argument("--port", type=_port, default=8766, help="port to bind (default 8766; 0 picks a free one)")
    p.add_argument("--token", default=None, help="require this bearer token of every client (default: $KBUS_TOKEN)")
    p.add_argument("--record", metavar="FILE", default=None, help="record every client's messages to FILE (.kbrec)")
    p.add_argument(
        "--max-size", type=_count(1024), default=DEFAULT_MAX_SIZE, help="largest frame a client may send, in bytes"
    )
    p.add_argument("--max-inflight", type=_count(1), default=65536, help="most requests in flight per connection")
    p.add_argument(
        "--ack-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wall seconds a client may take to ack a response before it loses lockstep (0: no limit)",
    )
    p.add_argument(
        "--no-kernels", action="store_true", help="refuse @kbus.kernel code from clients (builtin kernels still run)"
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("replay", help="replay a .kbrec recording; compare with it on another config")
    p.add_argument("recording", metavar="FILE", help="a recording (kbus demo --record, open_device(record=...))")
    p.add_argument("--config", default=None, help="preset name or TOML file to replay on (default: the recorded one)")
    p.add_argument("--trace", metavar="FILE", default=None, help="write a trace of the replay")
    p.add_argument("--csv", metavar="FILE", default=None, help="write the comparison table as CSV")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("info", help="print the resolved topology and every parameter with its unit")
    _add_config_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("probe", help="measure PE->HBM DMA latency and bandwidth on an idle device")
    _add_config_args(p)
    p.add_argument(
        "--sizes", default=None, help="comma-separated transfer sizes in bytes (default 64,4096,65536,1048576)"
    )
    p.add_argument("--max-pes", type=_count(1), default=None, help="probe only the first N PEs (default: all)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("trace", help="live trace tools")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    ts = tsub.add_parser("serve", help="run the demo with a live websocket trace stream")
    _add_config_args(ts)
    ts.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    ts.add_argument("--port", type=_port, default=8765, help="port to bind (default 8765; 0 picks a free one)")
    ts.add_argument("--repeat", type=_count(0), default=0, help="run the demo workload N times (0 = until interrupted)")
    ts.set_defaults(func=_cmd_trace_serve)

    p = sub.add_parser("sweep", help="run a workload over a grid of device configs (locally or on a Dask cluster)")
    p.add_argument(
        "workload",
        metavar="WORKLOAD",
        help="Python file defining `async def workload(torch) -> dict`, or a recording (.kbrec) to replay",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a dotted config key and its values, in the config's units (repeat for more keys)",
    )
    p.add_argument("--zip", action="store_true", help="pair the value lists instead of taking their product")
    p.add_argument(
        "--config",
        default=None,
        metavar="BASE",
        help="preset or TOML file every point starts from (default: `default`, or a recording's own config)",
    )
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="submit to this Dask scheduler (tcp://...)")
    p.add_argument(
        "--workers", type=int, default=None, help="local worker processes (default one per core; 0 = serial)"
    )
    p.add_argument("--out", default=None, metavar="CSV", help="write the results table as CSV")
    p.add_argument("--report", default=None, metavar="HTML", help="write a self-contained HTML report with plots")
    p.set_defaults(func=_cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kbus`` console script and ``python -m kbus``."""
    from .errors import KbusError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KbusError as exc:
        print(f"kbus {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad option values, unreadable files
        print(f"kbus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
