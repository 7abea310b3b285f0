"""A device in its own process, and runs you can record and replay.

* :func:`serve_device` (``kbus serve``) serves one emulated device to any
  number of websocket clients (:mod:`kbus.remote.server`);
* :func:`connect_device` returns a :class:`RemoteDevice` with the host surface
  of an in-process device; ``kbus.open_device("ws://host:port")`` runs the
  tensor runtime on it (:mod:`kbus.remote.client`);
* :class:`Recorder` writes ``.kbrec`` recordings of every host message and
  response (:mod:`kbus.remote.record`); :func:`replay` re-issues them on any
  device config and compares (:mod:`kbus.remote.replay`).

The frames on the wire are described in :mod:`kbus.remote.wire`. See
``docs/remote.md``.
"""

from .client import ClientSim, RemoteDevice, connect_device, is_url
from .record import FORMAT_VERSION, Recorder, Recording, read_recording
from .replay import ReplayResult, ReplayRow, replay, replay_async
from .server import DeviceServer, serve_device
from .wire import PROTOCOL_VERSION

__all__ = [
    "FORMAT_VERSION",
    "PROTOCOL_VERSION",
    "ClientSim",
    "DeviceServer",
    "Recorder",
    "Recording",
    "RemoteDevice",
    "ReplayResult",
    "ReplayRow",
    "connect_device",
    "is_url",
    "read_recording",
    "replay",
    "replay_async",
    "serve_device",
]
