"""Recordings (``.kbrec``): every host message and response of a run, as a msgpack stream.

A recording is a sequence of msgpack maps written one after the other (no
index, no footer), so a run killed mid-write leaves a file whose complete
records are all readable; :func:`read_recording` stops at the last complete
one and says where. Records, by ``"k"``:

* ``header`` (first): ``format`` (:data:`FORMAT_VERSION`), ``kbus``,
  ``config`` (the device config as TOML), ``source`` (``"in-process"``,
  ``"client"`` or ``"server"``);
* ``kernel``: client ``c`` deployed the ``@kbus.kernel`` kernels of ``specs``
  (their source, see :mod:`kbus.remote.kernels`), so a replay registers them;
* ``buf`` / ``free``: client ``c`` registered host buffer ``name``
  (``nbytes`` long) / forgot it, at virtual time ``t``;
* ``req``: request number ``i`` of client ``c`` sent at ``t``: ``msg`` (its
  wire dict), ``seen`` (the requests whose responses this client had seen
  since its previous request: the causal frontier, kept as increments) and
  ``data`` (the host-buffer bytes a write carries into the device, else nil);
* ``resp``: the outcome of request ``i`` at ``t``: ``ok``, ``error``,
  ``raised`` (exception type, or nil), ``responses`` (wire dicts) and
  ``data`` (the bytes a read brought back into the host buffer, else nil).

The frontier of request ``i`` is the union of ``seen`` over client ``c``'s
requests up to ``i``. A replay issues request ``i`` once that frontier has
completed and the client's previous request went out, plus the think time
the host took in the recording (see :mod:`kbus.remote.replay`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, Final

import attrs
import msgpack

from ..errors import DeviceError, RecordingError, RemoteError
from ..lang.kernel import MAX_BLOB
from ..protocol import HostMessage, MemoryReadMsg, MemoryWriteMsg, ResponseMsg, to_wire

__all__ = ["FORMAT_VERSION", "Recorder", "Recording", "read_recording"]

FORMAT_VERSION: Final = 1
"""The recording format this kbus writes; it reads this version and older."""


def write_bytes(msg: HostMessage, buffer: Any) -> bytes | None:
    """The host-buffer bytes ``msg`` carries into the device (a host-buffer write), else None."""
    if type(msg) is MemoryWriteMsg and msg.src_kind == "host_buffer_ref" and buffer is not None:
        return bytes(buffer[msg.host_offset : msg.host_offset + msg.nbytes])
    return None


def read_range(msg: HostMessage) -> tuple[str, int, int] | None:
    """``(buffer, offset, nbytes)`` a read fills on the host, else None."""
    if type(msg) is MemoryReadMsg and msg.host_buffer is not None:
        return msg.host_buffer, msg.host_offset, msg.nbytes
    return None


class Recorder:
    """Writes one recording; its ``on_*`` methods are called by whoever sees the host boundary.

    Three places do: :meth:`attach` wraps an in-process or remote device's
    host surface; the device server calls the methods for every client.
    Writes go straight to the file, one record per call, so a killed run
    leaves every record before the kill readable.
    """

    def __init__(self, path: str | os.PathLike[str], config_toml: str, source: str) -> None:
        from .. import __version__

        self.path = os.fspath(path)
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._next = 0
        self._seen: dict[int, list[int]] = {}
        self._kernels: set[Any] = set()
        self.requests = 0
        self._write(
            {"k": "header", "format": FORMAT_VERSION, "kbus": __version__, "config": config_toml, "source": source}
        )

    # ------------------------------------------------------------------ records
    def _write(self, record: dict[str, Any]) -> None:
        f = self._file
        if f is None:
            return
        f.write(self._packer.pack(record))
        f.flush()

    def on_register(self, client: int, name: str, nbytes: int, t: int) -> None:
        self._write({"k": "buf", "c": client, "name": name, "nbytes": nbytes, "t": t})

    def on_kernel(self, client: int, specs: Any, t: int) -> None:
        """Client ``client`` deploys kernels: keep their specs so a replay can register them."""
        self._write({"k": "kernel", "c": client, "specs": specs, "t": t})

    def on_free(self, client: int, name: str, t: int) -> None:
        self._write({"k": "free", "c": client, "name": name, "t": t})

    def on_request(self, client: int, msg: HostMessage, data: bytes | None, t: int) -> int:
        """Record a request; returns its number (for :meth:`on_response` and :meth:`on_seen`)."""
        i = self._next
        self._next += 1
        self.requests += 1
        seen = self._seen.pop(client, [])
        self._write({"k": "req", "i": i, "c": client, "t": t, "seen": seen, "msg": to_wire(msg), "data": data})
        return i

    def on_response(
        self,
        i: int,
        t: int,
        responses: tuple[ResponseMsg, ...],
        *,
        ok: bool = True,
        error: str | None = None,
        raised: str | None = None,
        data: bytes | None = None,
    ) -> None:
        self._write(
            {
                "k": "resp",
                "i": i,
                "t": t,
                "ok": ok,
                "error": error,
                "raised": raised,
                "responses": [to_wire(r) for r in responses],
                "data": data,
            }
        )

    def on_seen(self, client: int, i: int) -> None:
        """Client ``client`` has seen the response to request ``i``: it joins its next request's frontier."""
        self._seen.setdefault(client, []).append(i)

    def _note_kernel(self, client: int, data: bytes, t: int) -> None:
        from .kernels import blob_kernel, kernel_specs

        kern = blob_kernel(data)
        if kern is None or kern.id in self._kernels:
            return
        try:
            specs = kernel_specs(kern, set(self._kernels))
        except RemoteError:
            return  # not shippable: a replay in another process will say the kernel is not registered
        self._kernels.add(kern.id)
        self.on_kernel(client, specs, t)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    # ------------------------------------------------------------ attaching
    def attach(self, device: Any, client: int = 0) -> Callable[[], None]:
        """Record every request ``device`` (a Device or a remote device) serves to its host.

        Wraps the device's ``request``, ``register_host_buffer`` and
        ``unregister_host_buffer`` on the instance (so the kernel language and
        the runtime, which call them, are recorded too); returns a function
        that restores them. A response counts as *seen* when ``request``
        returns to its caller.
        """
        inner_request: Callable[[HostMessage], Awaitable[tuple[ResponseMsg, ...]]] = device.request
        inner_register: Callable[[str, Any], str] = device.register_host_buffer
        inner_unregister: Callable[[str], None] = device.unregister_host_buffer
        sim = device.sim

        def register_host_buffer(name: str, buffer: Any) -> str:
            out = inner_register(name, buffer)
            self.on_register(client, name, int(device.host_buffer(name).nbytes), sim.now)
            return out

        def unregister_host_buffer(name: str) -> None:
            inner_unregister(name)
            self.on_free(client, name, sim.now)

        async def request(msg: HostMessage) -> tuple[ResponseMsg, ...]:
            buf = None
            if type(msg) is MemoryWriteMsg and msg.host_buffer is not None:
                try:
                    buf = device.host_buffer(msg.host_buffer)
                except KeyError:
                    buf = None
            data = write_bytes(msg, buf)
            if data is not None and len(data) <= MAX_BLOB:
                self._note_kernel(client, data, sim.now)
            i = self.on_request(client, msg, data, sim.now)
            try:
                responses = await inner_request(msg)
            except DeviceError as exc:
                self.on_response(i, sim.now, exc.responses, ok=False, error=str(exc), raised=type(exc).__name__)
                self.on_seen(client, i)
                raise
            except (ValueError, TypeError) as exc:
                self.on_response(i, sim.now, (), ok=False, error=str(exc), raised=type(exc).__name__)
                self.on_seen(client, i)
                raise
            data = None
            rng = read_range(msg)
            if rng is not None:
                name, off, n = rng
                data = bytes(device.host_buffer(name)[off : off + n])
            self.on_response(i, sim.now, responses, data=data)
            self.on_seen(client, i)
            return responses

        vars(device).update(
            request=request,
            register_host_buffer=register_host_buffer,
            unregister_host_buffer=unregister_host_buffer,
        )

        def detach() -> None:
            for name in ("request", "register_host_buffer", "unregister_host_buffer"):
                vars(device).pop(name, None)
            self.close()

        return detach


# --------------------------------------------------------------------------- reading


@attrs.frozen
class Recording:
    """A recording read back: its header fields and records, and where reading stopped."""

    path: str
    format: int
    config_toml: str
    source: str
    records: tuple[dict[str, Any], ...]
    """Every complete record after the header, in file order."""
    stopped: str | None
    """Why reading stopped before the end of the file (a cut-off record), or None."""

    def requests(self) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r["k"] == "req")


_KINDS: Final = {
    "buf": ("c", "name", "nbytes", "t"),
    "free": ("c", "name", "t"),
    "kernel": ("c", "specs", "t"),
    "req": ("i", "c", "t", "seen", "msg", "data"),
    "resp": ("i", "t", "ok", "error", "raised", "responses", "data"),
}


def read_recording(path: str | os.PathLike[str]) -> Recording:
    """Read a ``.kbrec`` file; RecordingError names what is wrong and at which byte.

    A file cut off mid-record (a killed run) reads up to its last complete
    record; :attr:`Recording.stopped` says where it stopped.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise RecordingError(f"cannot read recording {path}: {exc}") from None
    with f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True, max_buffer_size=2**31 - 1)
        records: list[dict[str, Any]] = []
        header: dict[str, Any] | None = None
        offset = 0
        try:
            for obj in unpacker:
                where = offset
                offset = unpacker.tell()
                if header is None:
                    header = _check_header(obj, path)
                    continue
                records.append(_check_record(obj, path, len(records) + 1, where))
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
            if isinstance(exc, RecordingError):
                raise
            raise RecordingError(
                f"{path}: unreadable record after byte {offset} ({type(exc).__name__}: {exc})", offset
            ) from None
    if header is None:
        raise RecordingError(f"{path}: empty or not a kbus recording (no complete header record)", 0)
    stopped = None
    if offset < size:
        stopped = (
            f"{path} is cut off: {size - offset} trailing byte(s) after record {len(records)} "
            f"(byte {offset} of {size}) do not form a complete record; read the {len(records)} record(s) before them"
        )
    return Recording(path, header["format"], header["config"], header.get("source", "?"), tuple(records), stopped)


def _check_header(obj: Any, path: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("k") != "header":
        raise RecordingError(f"{path}: not a kbus recording (the first record is not a header)", 0)
    version = obj.get("format")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordingError(f"{path}: header field 'format' must be an int, got {version!r}", 0)
    if version > FORMAT_VERSION:
        raise RecordingError(
            f"{path}: recording format version {version} is newer than this kbus reads "
            f"(version {FORMAT_VERSION} and older); upgrade kbus to replay it",
            0,
        )
    if not isinstance(obj.get("config"), str):
        raise RecordingError(f"{path}: header field 'config' must be the device config as TOML text", 0)
    return obj


def _check_record(obj: Any, path: str, n: int, offset: int) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RecordingError(f"{path}: record {n} at byte {offset} is not a map", offset)
    kind = obj.get("k")
    fields = _KINDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise RecordingError(f"{path}: record {n} at byte {offset} has unknown kind {kind!r}", offset)
    missing = [f for f in fields if f not in obj]
    if missing:
        raise RecordingError(f"{path}: {kind} record {n} at byte {offset} lacks {', '.join(missing)}", offset)
    return obj
