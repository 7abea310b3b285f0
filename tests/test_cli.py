"""The ``kbus`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kbus.cli import main


def test_info_prints_tree_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "sip0" in out and "links.noc_pe.latency" in out


def test_probe_table_matches_analytic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--preset", "tiny", "--sizes", "64,4096", "--max-pes", "2"]) == 0
    out = capsys.readouterr().out
    assert "PE -> HBM DMA probe" in out and out.count("equal") == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--preset", "nope"], "neither a preset nor a TOML file"),
        (["probe", "--preset", "tiny", "--sizes", "0"], "probe sizes must be > 0"),
        (["probe", "--preset", "tiny", "--sizes", "big"], "--sizes 'big'"),
        (["info", "--config", "/nonexistent/dev.toml"], "dev.toml"),
        (["demo", "--connect", "ws://127.0.0.1:1"], "cannot connect to a device server at ws://127.0.0.1:1"),
        (["demo", "--connect", "ws://127.0.0.1:1", "--preset", "tiny"], "--connect uses the served device's config"),
        (["replay", "/nonexistent/run.kbrec"], "cannot read recording /nonexistent/run.kbrec"),
        (["replay", "/nonexistent/run.kbrec", "--config", "nope"], "cannot read recording"),
        (["serve", "--preset", "tiny", "--host", "0.0.0.0"], "refusing to serve on '0.0.0.0' without a token"),
    ],
)
def test_bad_input_exits_2_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KBUS_TOKEN", raising=False)
    monkeypatch.delenv("KBUS_CONNECT", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trace", "serve", "--port", "99999"], "99999 is outside 0..65535"),
        (["trace", "serve", "--port", "65536"], "65536 is outside 0..65535"),
        (["trace", "serve", "--port", "http"], "'http' is not a port number"),
        (["trace", "serve", "--repeat", "-3"], "-3 must be >= 0"),
        (["probe", "--preset", "tiny", "--max-pes", "0"], "0 must be >= 1"),
        (["probe", "--preset", "tiny", "--max-pes", "-5"], "-5 must be >= 1"),
        (["serve", "--port", "70000"], "70000 is outside 0..65535"),
        (["serve", "--max-inflight", "0"], "0 must be >= 1"),
        (["serve", "--max-size", "10"], "10 must be >= 1024"),
    ],
)
def test_bad_option_values_exit_2_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_with_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "run.json"
    assert main(["demo", "--preset", "tiny", "--trace", str(trace)]) == 0
    assert "all results match numpy" in capsys.readouterr().out
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert {"X", "M", "C"} <= {e["ph"] for e in events}


def test_trace_serve_prints_the_viewer_url_and_each_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "serve", "--preset", "tiny", "--port", "0", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "open http://127.0.0.1:" in out and "(websocket ws://127.0.0.1:" in out
    assert "run 1: virtual time" in out and "run 2: virtual time" in out
