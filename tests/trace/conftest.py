"""Shared helpers for the kbus.trace tests: a fake device and a recording sink."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kbus import Sim
from kbus.trace import Event
from kbus.trace.fake import FakeDevice


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
def make_device() -> Callable[..., FakeDevice]:
    """``make_device(sips=1, cubes=2, pes=2)``: a fresh fake device on a fresh Sim (call inside a loop)."""

    def make(**kw: int) -> FakeDevice:
        return FakeDevice(Sim(), **kw)  # type: ignore[arg-type]

    return make
