"""The demo and the runtime examples, unchanged, against devices served by ``kbus serve``.

Each example that opens its device with ``kbus.open_device("<preset>")`` runs
in a fresh interpreter with ``KBUS_CONNECT`` pointing at a server of that
preset, so every protocol message crosses a socket. Scripts that need the
device in their own process by design are left out: ``10_messages`` builds a
``Device`` itself (``test_remote_device.py`` drives the same messages
remotely), ``50_live_trace`` streams the device's internal events, a sweep
builds one device per config, and the 7x examples run their own servers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN_PROCESS = ("build_device", "kbus.trace.serve", "sweep", "serve_device", "record=")
SCRIPTS = sorted(
    p
    for p in (ROOT / "examples").glob("[0-9]*.py")
    if "kbus.open_device(" in (text := p.read_text()) and not any(marker in text for marker in OWN_PROCESS)
)
TIMEOUT_S = 120


def _presets(script: Path) -> tuple[list[str], bool]:
    """The presets a script opens, and whether it takes them as arguments (a ``PRESETS`` tuple it loops over)."""
    text = script.read_text()
    found = set(re.findall(r'open_device\("(\w+)"', text))
    if found:
        assert len(found) == 1, f"{script.name}: expected one preset, found {found}"
        return sorted(found), False
    listed = re.search(r"^PRESETS = \(([^)]*)\)", text, re.MULTILINE)
    assert listed, f"{script.name}: names no preset literal and has no PRESETS tuple"
    return re.findall(r'"(\w+)"', listed.group(1)), True


RUNS = [(script, preset, takes) for script in SCRIPTS for presets, takes in [_presets(script)] for preset in presets]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """One ``kbus serve`` process per preset the scripts use; yields preset -> URL."""
    procs: list[subprocess.Popen[str]] = []
    urls: dict[str, str] = {}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("KBUS_CONNECT", None)
    try:
        for preset in sorted({preset for _, preset, _ in RUNS} | {"tiny"}):
            proc = subprocess.Popen(
                [sys.executable, "-m", "kbus", "serve", "--preset", preset, "--port", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"ws://[\d.]+:\d+", line)
            assert match, f"kbus serve --preset {preset} printed {line!r}"
            urls[preset] = match.group(0)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def test_the_runtime_examples_are_found() -> None:
    assert {p.name[:2] for p in SCRIPTS} >= {"20", "30", "31", "32", "33", "34"}


@pytest.mark.parametrize(("script", "preset", "takes_preset"), RUNS, ids=[f"{s.name}-{p}" for s, p, _ in RUNS])
def test_example_runs_against_a_served_device(
    script: Path, preset: str, takes_preset: bool, servers: dict[str, str]
) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "KBUS_CONNECT": servers[preset]}
    env.pop("PYTEST_ADDOPTS", None)
    args = [sys.executable, "-W", "error::RuntimeWarning", str(script)] + ([preset] if takes_preset else [])
    proc = _run(args, env)
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def test_demo_runs_against_a_served_device(servers: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("KBUS_CONNECT", None)
    rec = tmp_path / "demo.kbrec"
    proc = _run([sys.executable, "-m", "kbus", "demo", "--connect", servers["tiny"], "--record", str(rec)], env)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "all results match numpy" in proc.stdout and servers["tiny"] in proc.stdout
    assert "block messages" in proc.stdout and "busiest links" in proc.stdout  # the served device's counters
    replayed = _run([sys.executable, "-m", "kbus", "replay", str(rec)], env)
    assert replayed.returncode == 0 and "identical" in replayed.stdout, replayed.stdout + replayed.stderr
