"""Write-behind for one open storage file: write(2) returns once the data is on its way.

Without it every FUSE write waits a whole round trip (seal, send, the node's pwrite, the
reply) before the writer may hand over the next piece, so one writer gets one request on
the wire at a time. Here a write is answered as soon as it is queued, and up to
``MAX_IN_FLIGHT`` bytes travel at once: the cipher on each side, the wire and the node's
disk overlap.

What it must never cost is a lost write going unnoticed. The first error a queued write
meets (a full disk, a node that went away, a revoked key) is kept: every later write on the
handle fails with it at once, and ``flush`` (every close(2)) and ``fsync`` wait for all
queued writes and return it, as NFS does and as the kernel's own writeback cache would.
Anything that must see the written bytes drains first: a read through the same handle, a
getattr or setattr of the file (the size must not step back), the release.

Writes whose ranges overlap one still in flight wait for it: the node may run two Twrites
in either order, and the later must land last.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ninefs.protocol.errors import NineError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8 << 20  # bytes queued and not yet acknowledged, per open file
MOUNT_SLOTS = 64  # writes queued in the whole mount (each at most FUSE's 1 MiB): 64 MiB


class WriteBehind:
    """The queued writes of one open file. ``send(offset, data)`` writes all of ``data``
    (the client's write, iounit pieces included) and raises NineError on failure.
    ``slots`` is shared by every open file of the mount: however many files are being
    written, the mount holds at most that many writes (MOUNT_SLOTS) in memory."""

    def __init__(
        self,
        send: Callable[[int, bytes], Awaitable[int]],
        nursery: trio.Nursery,
        slots: trio.Semaphore,
    ) -> None:
        self._send = send
        self._nursery = nursery
        self._slots = slots
        self._flying: dict[int, tuple[int, int]] = {}  # id -> (start, end)
        self._bytes = 0
        self._next = 0
        self._changed = trio.Event()
        self.error: NineError | None = None

    async def write(self, offset: int, data: bytes) -> int:
        """Queue ``data`` at ``offset``; returns its length, or raises the kept error."""
        self._raise()
        end = offset + len(data)
        while self._flying and (
            self._bytes + len(data) > MAX_IN_FLIGHT
            or any(s < end and offset < e for s, e in self._flying.values())
        ):
            await self._wait_change()
            self._raise()
        await self._slots.acquire()  # the mount's bound: wait for another file's write
        n, self._next = self._next, self._next + 1
        self._flying[n] = (offset, end)
        self._bytes += len(data)
        self._nursery.start_soon(self._one, n, offset, data)
        return len(data)

    async def drain(self) -> None:
        """Wait for every queued write; raise the kept error, if any."""
        await self.settle()
        self._raise()

    async def settle(self) -> None:
        """Wait for every queued write (what reads and stats do: the error is the
        writer's, for its next write, flush or fsync)."""
        while self._flying:
            await self._wait_change()

    async def _one(self, n: int, offset: int, data: bytes) -> None:
        try:
            done = await self._send(offset, data)
            if done < len(data) and self.error is None:
                self.error = NineError("ENOSPC", f"the node took {done} of {len(data)} bytes")
        except NineError as e:
            if self.error is None:
                self.error = e
        except Exception as e:  # kept for the writer, never lost in the nursery
            log.exception("queued write failed")
            if self.error is None:
                self.error = NineError("EIO", f"write failed: {e}")
        finally:
            self._slots.release()
            del self._flying[n]
            self._bytes -= len(data)
            self._changed.set()
            self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _raise(self) -> None:
        if self.error is not None:
            raise NineError(self.error.ename, self.error.message)
