"""The file-tree interface a server session dispatches to (what servers/ implements).

A tree is reached by ``attach``; every other call goes to a ``File`` (what a fid names) or to
the ``Handle`` that opening it made. Unimplemented calls answer with the 9P error a reader
would expect (EPERM for changes, ENOTDIR/EISDIR for the wrong kind of file).

Concurrency contract: all calls run as tasks of one trio loop, and any call may run while
others on the same File or Handle are in progress (the session serialises nothing). A call
may await; one that waits for an event (a stream read, ``wait``) must be cancellable at
every await, since a Tflush or a closed connection cancels it. Blocking system calls must go
to ``trio.to_thread`` so they hold up no other client. ``Handle.close`` is called once, after
every other call on the handle has returned.

Cost: the session runs each call in the task that read its request until the call first
blocks (then reading moves to a new task), so a call that returns without blocking costs
no task switch at all. Keep what is cheap (walk, stat, a snapshot's read) free of awaits
that yield; a ``trio.lowlevel.checkpoint_if_cancelled`` does not yield.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NineError
from .messages import Qid, Stat, StatFs

if TYPE_CHECKING:
    from .keys import Grant


@dataclass
class Principal:
    """Who is on the other end of a connection: fixed by the handshake, one per connection."""

    user: str
    grant: Grant | None = None
    peer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return bool(self.grant and self.grant.read_only)


class Handle:
    """An open file. ``flags`` is OF_SYNTHETIC and/or OF_STREAM for synthetic files."""

    flags: int = 0
    iounit: int = 0
    head: bool = False  # reading at 0 right after open has no effect: Twalkopen may do it
    takes_views: bool = False  # write may be given a memoryview (of the frame), not bytes

    async def read(self, offset: int, count: int) -> bytes:
        raise NineError("EBADF", "not open for reading")

    async def write(self, offset: int, data: bytes) -> int:
        raise NineError("EBADF", "not open for writing")

    async def readdir(self, offset: int, count: int) -> list[Stat]:
        raise NineError("ENOTDIR", "not a directory")

    async def fsync(self) -> None:
        return None

    async def close(self) -> None:
        return None


class File:
    """A file in a tree. Files are values: ``walk`` makes a new one and never changes this."""

    # Where ".." leads from the root of a tree mounted inside another (set by the tree that
    # mounts it); a root without one stays where it is, so ".." never climbs out of a tree.
    up: File | None = None

    @property
    def qid(self) -> Qid:
        raise NotImplementedError

    async def walk(self, name: str) -> File:
        raise NineError("ENOTDIR", "not a directory")

    async def stat(self) -> Stat:
        raise NotImplementedError

    async def open(self, mode: int) -> Handle:
        raise NineError("EPERM", "cannot be opened")

    async def create(self, name: str, perm: int, mode: int) -> tuple[File, Handle]:
        raise NineError("EPERM", "cannot create here")

    async def remove(self) -> None:
        raise NineError("EPERM", "cannot be removed")

    async def wstat(self, changes: dict[str, int]) -> None:
        raise NineError("EPERM", "cannot be changed")

    async def rename(self, newdir: File, newname: str) -> None:
        raise NineError("EPERM", "cannot be renamed")

    async def symlink(self, name: str, target: str) -> File:
        raise NineError("EPERM", "cannot make links here")

    async def readlink(self) -> str:
        raise NineError("EINVAL", "not a symbolic link")

    async def statfs(self) -> StatFs:
        return StatFs(4096, 0, 0, 0, 0, 0, 255)


class Tree:
    """What a node serves: ``attach`` gives the root File for a principal."""

    async def attach(self, principal: Principal, aname: str) -> File:
        raise NotImplementedError
