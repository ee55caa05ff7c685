"""Framing (sans-I/O): a frame is a 4-byte big-endian length, then that many bytes of body.

The length is checked against the limit before any of the body is buffered, so a peer that
announces 4 GiB costs us four bytes, not four gigabytes.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

_LEN = struct.Struct(">I")
LEN_SIZE = _LEN.size


def frame(body: bytes | bytearray | memoryview) -> bytes:
    """One frame for ``body``."""
    return _LEN.pack(len(body)) + body


def frame_header(length: int) -> bytes:
    return _LEN.pack(length)


class Spares:
    """Big frame buffers kept for the next big frame: a new bytearray is zeroed, and for a
    MiB that costs as much as sealing it. One per process (``SPARES``); a buffer is given
    back only when nothing refers to it any more (it has been sent)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (its contents are whatever they were)."""
        for i, buf in enumerate(self._free):
            if len(buf) >= size:
                return self._free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


SPARES = Spares()


class FrameReader:
    """Splits a byte stream into frame bodies, refusing any longer than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def needed(self) -> int:
        """How many more bytes the next frame needs (at least 1 if it is incomplete)."""
        if len(self._buf) < LEN_SIZE:
            return LEN_SIZE - len(self._buf)
        (length,) = _LEN.unpack_from(self._buf)
        return max(0, LEN_SIZE + length - len(self._buf))

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None if more bytes are needed."""
        if len(self._buf) < LEN_SIZE:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.limit}")
        end = LEN_SIZE + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            body = bytes(view[LEN_SIZE:end])  # one copy, not a slice and then a copy
        del self._buf[:end]
        return body

    def whole(self, data: bytes) -> memoryview | None:
        """The body of ``data`` if it is exactly one whole frame and nothing is buffered
        (the usual case for small requests and replies): no copy through the buffer.
        None otherwise, and ``data`` is then to be fed."""
        if self._buf or len(data) < LEN_SIZE:
            return None
        (length,) = _LEN.unpack_from(data)
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.limit}")
        if len(data) != LEN_SIZE + length:
            return None
        return memoryview(data)[LEN_SIZE:]

    def start_frame(self, min_size: int) -> tuple[bytearray, int] | None:
        """For a frame of at least ``min_size`` bytes that has begun but is not complete: a
        buffer for its whole body holding what has arrived, and how many bytes that is. The
        reader is left empty; the caller receives the rest straight into the buffer (one
        allocation, no copies through this reader). None for anything else."""
        if len(self._buf) < LEN_SIZE:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self.limit:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.limit}")
        got = len(self._buf) - LEN_SIZE
        if length < min_size or got >= length:
            return None
        body = bytearray(length)
        with memoryview(self._buf) as view:
            body[:got] = view[LEN_SIZE:]
        self._buf.clear()
        return body, got

    @property
    def buffered(self) -> int:
        return len(self._buf)
