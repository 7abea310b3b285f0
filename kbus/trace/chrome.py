"""FileSink: record events into a Chrome trace-event JSON or Perfetto protobuf file.

The file opens in Perfetto UI (ui.perfetto.dev) and chrome://tracing; its
layout (a process per SIP, a track per block and per link, lanes for
overlapping spans, request -> response flows) is described in
:mod:`kbus.trace._chrome_encode`, which does the encoding;
:mod:`kbus.trace._perfetto_encode` writes the same layout as Perfetto's
native protobuf packets.

Why a writer process
--------------------
The simulation calls :meth:`FileSink.write` from its hooks, once per event.
Turning an event into a trace record (lane placement, a record dict, JSON
encoding) costs a few microseconds of Python, as much as simulating the event.
So the hook only appends the event tuple to a list. Every ``batch`` events the
list is encoded as one JSON array by a single orjson call (about 0.1 us per
event) and written to a pipe to a separate writer process, which decodes the
batches, builds the records and writes the file on another core while the
simulation goes on. Batches are small (256 events) on purpose: events kept
longer survive into older garbage-collector generations and cost more to
keep than to send (measured: 16,384-event batches cost about twice the
overhead of 256-event ones). The pipe gives backpressure: if the writer falls behind
by more than the pipe holds, the simulation waits for it, and nothing is lost.

The writer process loads only ``_chrome_encode.py`` and ``events.py`` (not the
kbus package), so it starts in a few tens of milliseconds. ``writer="inline"``
runs the same encoder in this process instead (one core, no subprocess); both
give byte-identical files, since both consume the same JSON batches.

Deterministic: the file derives from the events alone (no wall clock, no OS
pids, dicts in insertion order), so the same run gives the same bytes on
every event loop and with either writer.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Final, Literal

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

from ._chrome_encode import FRAME_EVENTS, FRAME_FLUSH, ChromeEncoder, encode_batch, frame, make_encoder
from .events import Event
from .tracer import TraceError

__all__ = ["PERFETTO_SUFFIXES", "FileSink"]

_HERE: Final = Path(__file__).resolve().parent

# Runs in the writer process: make this directory a nameless package and run the
# encoder module from it, so its relative import of events.py works without
# importing kbus itself.
_BOOT: Final = """\
import importlib, sys, types
pkg = types.ModuleType("_kbus_trace_writer")
pkg.__path__ = [sys.argv[1]]
sys.modules[pkg.__name__] = pkg
sys.exit(importlib.import_module(pkg.__name__ + "._chrome_encode").main(sys.argv[2:]))
"""


PERFETTO_SUFFIXES: Final = (".pftrace", ".perfetto", ".perfetto-trace")
"""File names ending in one of these get Perfetto's protobuf format; anything else Chrome JSON."""

_PIPE_BYTES: Final = 1 << 20


def _widen_pipe(proc: subprocess.Popen[bytes]) -> None:
    """Let the pipe to the writer hold about 8,000 events instead of 500 (Linux's default is 64 KiB).

    A wider pipe absorbs the writer's hiccups (a page-cache flush, a busy
    core) without stalling the simulation; where the call is not available
    the default pipe still works, just with less slack.
    """
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsz is None or proc.stdin is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(proc.stdin.fileno(), setsz, _PIPE_BYTES)


class FileSink:
    """Write events to ``path`` as Chrome trace-event JSON or Perfetto protobuf.

    ``format="auto"`` picks Perfetto's protobuf format for names ending in
    ``.pftrace``, ``.perfetto`` or ``.perfetto-trace`` (several times smaller,
    faster to load in Perfetto UI), and Chrome JSON (which chrome://tracing
    also opens) for anything else; ``"json"`` or ``"perfetto"`` force one.
    Both carry the same tracks, spans, flows and counters.

    ``counters=False`` leaves out inbox depth counters (a fifth of the events
    on a typical run). ``batch`` is how many events are handed to the encoder
    at once; ``flush_bytes`` how much encoded JSON the encoder keeps before a
    write to the file. ``writer`` is ``"process"`` (the default: encode in a
    writer process, off the simulation's core) or ``"inline"``.

    Close it (or use ``with``) to finish the file: until then the JSON is not
    terminated. :meth:`flush` makes everything recorded so far reach the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        counters: bool = True,
        flush_bytes: int = 1 << 20,
        batch: int = 256,
        writer: Literal["process", "inline"] = "process",
        format: Literal["auto", "json", "perfetto"] = "auto",
    ) -> None:
        self.path = os.fspath(path)
        where = f"FileSink({self.path!r})"
        for name, value in (("flush_bytes", flush_bytes), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"{where}: {name} must be an int >= 1, got {value!r}")
        if writer not in ("process", "inline"):
            raise TraceError(f"{where}: writer must be 'process' or 'inline', got {writer!r}")
        if format == "auto":
            format = "perfetto" if self.path.endswith(PERFETTO_SUFFIXES) else "json"
        elif format not in ("json", "perfetto"):
            raise TraceError(f"{where}: format must be 'auto', 'json' or 'perfetto', got {format!r}")
        self.format = format
        self.counters = counters
        self.writer = writer
        self._batch_size = batch
        self._pending: list[Event] = []
        self._append = self._pending.append
        self._closed = False
        self.events_written = 0
        """Records in the file; known once the sink is closed."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._inline: ChromeEncoder | None = None
        self._file: IO[bytes] | None = None
        if writer == "inline":
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            self._inline = make_encoder(format, self._file, counters=counters, flush_bytes=flush_bytes)
        else:
            Path(self.path).open("wb").close()  # fail here, in the caller, if the path cannot be written
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    str(_HERE),
                    self.path,
                    format,
                    "1" if counters else "0",
                    str(flush_bytes),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _widen_pipe(self._proc)

    # ------------------------------------------------------------- hot path
    def write(self, event: Event) -> None:
        """Record one event (see :mod:`kbus.trace.events`); never blocks unless the writer is far behind."""
        if self._closed:
            raise TraceError(f"FileSink({self.path!r}) is closed; events can no longer be written")
        self._append(event)
        if len(self._pending) >= self._batch_size:
            self._send()

    def _send(self) -> None:
        """Hand the pending events to the encoder as one JSON batch."""
        pending = self._pending
        if not pending:
            return
        blob = encode_batch(pending)
        pending.clear()
        if self._inline is not None:
            self._inline.feed(blob)
            return
        self._to_writer(frame(FRAME_EVENTS, blob))

    def _to_writer(self, data: bytes) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, OSError) as exc:
            raise self._writer_failed("while sending events") from exc

    def _writer_failed(self, when: str) -> TraceError:
        proc = self._proc
        err = b""
        if proc is not None:
            try:
                _, err = proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                proc.kill()
        self._closed = True
        detail = err.decode(errors="replace").strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        return TraceError(f"FileSink({self.path!r}): the trace writer process failed {when}{tail}")

    # ------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Make every event recorded so far reach the file (the JSON stays unterminated until close)."""
        if self._closed:
            return
        self._send()
        if self._inline is not None:
            self._inline.flush()
            assert self._file is not None
            self._file.flush()
            return
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self._to_writer(frame(FRAME_FLUSH))
        try:
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._writer_failed("while flushing") from exc
        if proc.stdout.readline() != b"flushed\n":
            raise self._writer_failed("while flushing")

    def close(self) -> None:
        """Finish the file: spans still open end at the last time seen, marked ``unfinished``."""
        if self._closed:
            return
        self._send()
        self._closed = True
        if self._inline is not None:
            assert self._file is not None
            try:
                self.events_written = self._inline.finish()
            finally:
                self._file.close()
            return
        proc = self._proc
        assert proc is not None
        try:
            out, err = proc.communicate()
        except (BrokenPipeError, OSError) as exc:
            raise self._writer_failed("while finishing the file") from exc
        lines = out.split()
        if proc.returncode != 0 or not lines:
            detail = err.decode(errors="replace").strip().splitlines()
            tail = f": {detail[-1]}" if detail else ""
            raise TraceError(f"FileSink({self.path!r}): the trace writer process exited with {proc.returncode}{tail}")
        self.events_written = int(lines[-1])

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None and not self._closed:
            proc.kill()  # never closed: do not leave a writer process behind
            proc.wait()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FileSink {self.path!r} {state} writer={self.writer} events={self.events_written}>"
