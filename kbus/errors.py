"""Every exception kbus raises on purpose.

All of them derive from :class:`KbusError`, so ``except kbus.KbusError`` catches
anything the emulator reports deliberately. Each message names what was wrong
and where: a block path, coordinates, an address or a field.
"""

from __future__ import annotations

from typing import Any


class KbusError(Exception):
    """Base class of every error kbus raises on purpose."""


class CodecError(KbusError, ValueError):
    """Bytes or a value could not be encoded or decoded as a protocol message.

    ``path`` is the dotted field path of the offending value (``""`` when the
    whole input was unreadable, for example malformed JSON).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ConfigError(KbusError, ValueError):
    """A device configuration key, type or value is wrong.

    ``key`` is the dotted key and ``source`` the file (or ``"<preset name>"``).
    """

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class DeadlockError(KbusError, RuntimeError):
    """Nothing in the simulation can ever wake again while work is pending.

    ``blocked`` lists one line per blocked task or waiter saying what it waits
    on (an empty inbox, a full inbox, a future).
    """

    def __init__(self, message: str, blocked: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.blocked = blocked


class DeviceError(KbusError):
    """A device request failed; ``responses`` holds every response received."""

    def __init__(self, message: str, responses: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.responses = responses


class OutOfDeviceMemory(KbusError, MemoryError):
    """An allocation did not fit: names the memory, the size asked for, the
    free total and the largest free block."""

    def __init__(self, message: str, *, where: str = "", requested: int = 0, free: int = 0, largest: int = 0) -> None:
        super().__init__(message)
        self.where = where
        self.requested = requested
        self.free = free
        self.largest = largest


class AllocatorError(KbusError, ValueError):
    """Double free, or free of an address the allocator never handed out."""


class TensorFreedError(KbusError, RuntimeError):
    """A tensor was used after its device memory was freed."""


class KernelError(DeviceError):
    """A kernel failed on the device (page fault, bad argument, exception)."""


class MemoryLeakError(KbusError, RuntimeError):
    """Device memory or mappings were still held when the device closed (a runtime bug)."""


class RemoteError(KbusError, ConnectionError):
    """Talking to a device served by ``kbus serve`` failed.

    Raised for a refused or lost connection, a frame the peer rejected (the
    message names the frame field, ``path`` holds it), a server limit that was
    hit (frame size, requests in flight) or a protocol version mismatch.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class RecordingError(KbusError, ValueError):
    """A ``.kbrec`` recording cannot be read or replayed.

    ``offset`` is the byte offset in the file where the problem was found
    (``-1`` when it concerns the whole file), for example a recording written
    by a newer format version, or one that is not a kbus recording at all.
    """

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message)
        self.offset = offset


__all__ = [
    "AllocatorError",
    "CodecError",
    "ConfigError",
    "DeadlockError",
    "DeviceError",
    "KbusError",
    "KernelError",
    "MemoryLeakError",
    "OutOfDeviceMemory",
    "RecordingError",
    "RemoteError",
    "TensorFreedError",
]
