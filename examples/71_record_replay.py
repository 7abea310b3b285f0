"""71 — Record a run once, replay it anywhere.

What this shows, in order:

1. ``kbus.open_device("tiny", record="demo.kbrec")`` records every host
   message, response, virtual time, host-buffer byte and causal frontier of
   the demo workload (``kbus demo --record demo.kbrec`` does the same);
2. ``kbus.replay(path)`` re-issues the requests on a fresh device of the
   recorded config: responses, their virtual times and the bytes read back are
   identical, and the result says so;
3. ``kbus.replay(path, "default")`` replays the same requests, in the same
   causal order, on another config and compares latency per request kind
   (``kbus replay demo.kbrec --config default --csv out.csv`` prints the same
   table and writes it as CSV).

Run: ``python examples/71_record_replay.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console

import kbus
from kbus.demo import workload
from kbus.remote.replay import print_replay


async def record(path: Path) -> None:
    async with kbus.open_device("tiny", record=path) as torch:
        rows = await workload(torch)
    if not all(ok for _, ok, _ in rows):
        sys.exit("the demo workload did not match numpy")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.kbrec"
        kbus.run(lambda: record(path))
        print(f"recorded the demo on 'tiny': {path.stat().st_size:,} bytes")
        console = Console(highlight=False, width=120)

        same = kbus.replay(path)
        print_replay(same, console)
        if not same.identical:
            sys.exit("replay on the recorded config differs from the recording")

        other = kbus.replay(path, "default")
        print_replay(other, console)
        slowest = max(other.rows, key=lambda r: r.new_total_ps / max(r.old_total_ps, 1))
        print(
            f"on 'default' the run takes {other.new_end_ps / other.old_end_ps:.2f}x its recorded device time; "
            f"{slowest.kind} changes most ({slowest.new_total_ps / max(slowest.old_total_ps, 1):.2f}x)"
        )


if __name__ == "__main__":
    main()
