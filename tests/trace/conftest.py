"""Shared helpers for the kbus.trace tests: a real device factory and a recording sink."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from workloads import make_device as _make_device

from kbus.hw import Device
from kbus.trace import Event


class ListSink:
    """Keeps every event it is given, and whether it was closed."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False

    def write(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True

    def cats(self) -> set[str]:
        return {ev[2] for ev in self.events}


@pytest.fixture
def list_sink() -> ListSink:
    return ListSink()


@pytest.fixture
def make_sink() -> Callable[[], ListSink]:
    """A factory of fresh :class:`ListSink` s (tests import the class only for type hints)."""
    return ListSink


@pytest.fixture
def make_device() -> Callable[..., Device]:
    """``make_device(sips=1, cubes=2, pes=2)``: a fresh real device on a fresh Sim (call inside a loop)."""
    return _make_device
