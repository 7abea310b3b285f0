"""Every ```python block of README.md and docs/ runs as written, so the docs cannot go stale.

A block that defines pytest tests runs under pytest (with the kbus plugin, as
a user's suite would); a block with top-level ``await`` / ``async with`` runs
inside ``async def main()`` under ``kbus.run``, as one would paste it into a
script; any other block runs as a plain script. Blocks that are not meant to
run use another fence language (```text, ```toml, ```sh).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_LEVEL_AWAIT = re.compile(r"^(await |async with |async for )", re.M)


def blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in FILES:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            out.append((str(path.relative_to(ROOT)), i, code))
    return out


BLOCKS = blocks()


def as_script(code: str) -> str:
    """The block as a runnable script: top-level awaits go inside ``async def main()``."""
    if not TOP_LEVEL_AWAIT.search(code):
        return code
    lines = code.splitlines()
    head = [ln for ln in lines if ln.startswith(("import ", "from "))]
    body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
    return "\n".join(
        ["import kbus", *head, "", "async def main():", textwrap.indent("\n".join(body), "    "), "", "kbus.run(main)"]
    )


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) >= 8
    assert {name for name, _i, _c in BLOCKS} >= {"README.md", "docs/kernels.md", "docs/tracing.md"}


@pytest.mark.parametrize(("name", "index", "code"), BLOCKS, ids=[f"{n}#{i}" for n, i, _c in BLOCKS])
def test_block_runs(name: str, index: int, code: str, tmp_path: Path) -> None:
    if re.search(r"^(async )?def test_", code, re.M):
        script = tmp_path / f"test_doc_{index}.py"
        script.write_text(code)
        (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(script)]
    else:
        script = tmp_path / f"doc_{index}.py"
        script.write_text(as_script(code))
        cmd = [sys.executable, str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, f"{name} block {index} failed:\n{script.read_text()}\n{out.stdout}\n{out.stderr}"
    if (name, index) == ("README.md", 0):  # the engine in ten lines prints what its comments say
        assert out.stdout.split() == ["164ns", "hello", "228ns", "device"]
