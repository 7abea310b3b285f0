"""Workload scripts the sweep tests write to disk (text, as users would write files)."""

from __future__ import annotations

from pathlib import Path

GATHER = """
import numpy as np
import kbus

async def workload(torch):
    host = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    x = torch.tensor(host, policy=kbus.Shard(dim=0, min_bytes=0))  # 64 KiB: a shard on every PE anyway
    y = (x * 2 + 1).sum(dim=1)
    gathered = x.to(kbus.Replicate(targets=[(0, 0, 0)]))
    await gathered
    got = await y.numpy()
    return {"checksum": float(got.sum()), "pes": len(x.shards), "np_scalar": np.int64(7)}
"""

# Sleeps in wall time (not virtual time) so that points are still running when a test kills a worker.
SLOW = """
import time
import numpy as np

async def workload(torch):
    time.sleep(0.4)
    x = torch.tensor(np.ones((32, 64), np.float32))
    total = await x.sum(dim=1).numpy()
    return {"total": float(total.sum())}
"""

FAILS_ON_FOUR_CUBES = """
import numpy as np

async def workload(torch):
    x = torch.tensor(np.ones((16, 16), np.float32))
    await x
    if torch.device.config.topology.cubes_per_sip == 4:
        raise RuntimeError("four cubes are not supported by this workload")
    return {"ok": True}
"""


def write(tmp_path: Path, source: str, name: str = "workload.py") -> Path:
    path = tmp_path / name
    path.write_text(source, encoding="utf-8")
    return path


EMPTY = """
async def workload(torch):
    return {"pes": torch.device.config.num_pes}
"""

# Takes its worker process down at one point: only Dask can report that point.
KILLS_ITS_WORKER = """
import os

async def workload(torch):
    if torch.device.config.topology.cubes_per_sip == 2:
        os._exit(3)
    return {"ok": True}
"""


def slow_with_marker(marker_dir: str) -> str:
    """SLOW, plus a file per started point in ``marker_dir`` (so a test knows points are running)."""
    return f"""
import os
import time
import numpy as np

async def workload(torch):
    open(os.path.join({marker_dir!r}, f"started-{{os.getpid()}}-{{time.monotonic_ns()}}"), "w").close()
    time.sleep(0.4)
    x = torch.tensor(np.ones((32, 64), np.float32))
    total = await x.sum(dim=1).numpy()
    return {{"total": float(total.sum())}}
"""
