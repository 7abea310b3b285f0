"""Exceptions of the sweep package (all derive from :class:`kbus.KbusError`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KbusError

if TYPE_CHECKING:
    from .results import SweepResults

__all__ = ["SweepError", "SweepInterrupted", "WorkloadError"]


class SweepError(KbusError, ValueError):
    """A sweep could not start: a malformed grid, ``--set`` argument or option.

    Errors of single points never raise; they are recorded in that point's
    ``error`` field and the sweep goes on.
    """


class WorkloadError(SweepError):
    """A workload file cannot be used: missing, of an unknown kind, or without ``async def workload(torch)``.

    ``path`` names the file.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the remaining points were cancelled.

    A ``KeyboardInterrupt`` so that code not expecting it still stops;
    ``results`` holds the points that had finished, so nothing computed is lost.
    """

    def __init__(self, results: SweepResults, cancelled: int) -> None:
        super().__init__(f"sweep interrupted: {len(results)} points finished, {cancelled} cancelled")
        self.results = results
        self.cancelled = cancelled
