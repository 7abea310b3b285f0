"""Every example runs: each ``examples/[0-9]*.py`` script and the example pytest suite.

Examples are documentation that executes, so each runs here exactly as a
reader would run it: a fresh interpreter, from the repository root, with a
generous timeout (they finish in seconds; the timeout only turns a hang into
a failure). Scripts are discovered, not listed, so a new example is covered
the moment it is added. Besides the exit code, stderr must be free of warnings
and of asyncio's "Task was destroyed but it is pending": examples are what
people copy, so they must be clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("[0-9]*.py"))
SUITES = sorted(p for p in EXAMPLES.glob("[0-9]*") if p.is_dir() and any(p.glob("test_*.py")))
TIMEOUT_S = 120
DIRTY_STDERR = ("Warning", "Task was destroyed", "never awaited", "Traceback")


def _run(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})}
    env.pop("PYTEST_ADDOPTS", None)
    try:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        command = " ".join(args)
        pytest.fail(f"{command} did not finish within {TIMEOUT_S} s\nstdout:\n{exc.stdout!r}\nstderr:\n{exc.stderr!r}")


def test_examples_are_found() -> None:
    assert SCRIPTS, f"no examples/[0-9]*.py under {EXAMPLES}"
    assert SUITES, f"no example pytest suite (a numbered folder with test_*.py) under {EXAMPLES}"
    for script in SCRIPTS:
        head = script.read_text(encoding="utf-8").lstrip()
        assert head.startswith('"""'), f"{script.name} must start with a docstring saying what it shows"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_script_runs(script: Path) -> None:
    proc = _run([sys.executable, "-W", "error::RuntimeWarning", str(script)], cwd=ROOT)
    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{output}"
    assert proc.stdout.strip(), f"{script.name} printed nothing; an example should show its results"
    dirty = [marker for marker in DIRTY_STDERR if marker in proc.stderr]
    assert not dirty, f"{script.name} wrote {dirty} to stderr:\n{proc.stderr}"


KERNEL_SCRIPTS = [s for s in SCRIPTS if s.name.startswith("3")]


@pytest.mark.parametrize("script", KERNEL_SCRIPTS, ids=[s.name for s in KERNEL_SCRIPTS])
def test_kernel_example_runs_one_instance_at_a_time(script: Path) -> None:
    # The kernel-language examples again with every launch per instance (the fallback of batched
    # execution): same checks, same clean output. tests/lang/test_lang_batch.py compares the two runs.
    env_mode = {"KBUS_LANG_BATCH": "off"}
    proc = _run([sys.executable, "-W", "error::RuntimeWarning", str(script)], cwd=ROOT, extra_env=env_mode)
    assert proc.returncode == 0, (
        f"{script.name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert not [m for m in DIRTY_STDERR if m in proc.stderr], proc.stderr


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_example_pytest_suite_passes(suite: Path) -> None:
    # The suite's own pytest.ini applies (rootdir = the suite), as in a user's project.
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(suite)], cwd=suite)
    assert proc.returncode == 0, f"{suite.name}: pytest exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout
