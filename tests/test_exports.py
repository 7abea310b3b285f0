"""The public surface: one place (``kbus``) names everything users need."""

from __future__ import annotations

import inspect

import kbus
from kbus import errors


def test_every_exported_name_exists_and_is_listed_once() -> None:
    assert len(kbus.__all__) == len(set(kbus.__all__))
    for name in kbus.__all__:
        assert hasattr(kbus, name), f"kbus.__all__ names {name!r}, which kbus does not define"


def test_every_exception_type_is_exported_from_kbus() -> None:
    mine = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    }
    assert mine, "kbus.errors defines no exception types"
    assert mine <= set(kbus.__all__), f"not exported from kbus: {sorted(mine - set(kbus.__all__))}"
    for name in ("TraceError", "MemoryLeakError", "ConfigError"):
        assert issubclass(getattr(kbus, name), kbus.KbusError)


def test_device_config_and_build_device_are_top_level() -> None:
    cfg = kbus.DeviceConfig.load("tiny")
    assert cfg.topology.sips >= 1
    assert kbus.build_device is kbus.hw.build_device


def test_remote_devices_and_replay_are_top_level() -> None:
    from kbus import remote

    assert kbus.serve_device is remote.serve_device and kbus.connect_device is remote.connect_device
    assert kbus.replay is remote.replay and kbus.ReplayResult is remote.ReplayResult
    assert issubclass(kbus.RemoteDevice, kbus.hw.HostDevice) and not issubclass(kbus.RemoteDevice, kbus.hw.Device)
    assert issubclass(kbus.hw.Device, kbus.hw.HostDevice)
    assert issubclass(kbus.RemoteError, kbus.KbusError) and issubclass(kbus.RecordingError, kbus.KbusError)
