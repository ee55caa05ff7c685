"""The synthetic-file toolkit: a tree is a table of entries, a file is a few callbacks.

    root = Dir("", [
        Dir("cpu", [Text("ncpu", lambda ctx: f"{os.cpu_count()}\\n")]),
        Ctl("ctl", {"kill": Cmd(kill, 0, 0)}, read=state_line),
    ])

Entries:
- ``Dir``: a table of entries, or a function that lists them (for /proc, /jobs).
- ``Text``: contents made at open, one snapshot per open, so a read in pieces is never torn;
  optionally a ``write`` callback that gets each write.
- ``Ctl``: text written to it is parsed against a table of commands (as 9front's devices
  do); a bad command is EINVAL with the reason. The shell's O_TRUNC is ignored.
- ``Stream``: each open makes a handle whose reads may block until data or end.
- ``Mount``: where another File implementation (the storage passthrough) takes over.

Concurrency contract (see protocol/fs.py): callbacks run on the trio loop and may await;
blocking reads must wait on trio primitives so a Tflush can cancel them.
"""

from __future__ import annotations

import inspect
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError
from ninefs.protocol.fs import File, Handle, Principal

Ctx = Principal
_BOOT_NS = time.time_ns()


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a callback that may be sync or async."""
    r = fn(*args)
    return await r if inspect.isawaitable(r) else r


def _bytes(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else v


class Entry:
    """One entry of a synthetic tree."""

    qtype = m.QTFILE

    def __init__(self, name: str, perm: int = 0o444) -> None:
        self.name = name
        self.perm = perm
        self.mtime = _BOOT_NS

    def salt(self) -> str:
        """Mixed into the qid path: a new object under an old name gets a new qid."""
        return ""

    async def open(self, ctx: Ctx, mode: int) -> Handle:
        raise NineError("EPERM", "cannot be opened")

    async def remove(self, ctx: Ctx) -> None:
        raise NineError("EPERM", f"{self.name} cannot be removed")


class Dir(Entry):
    """A directory: a fixed table of entries, or ``entries(ctx)`` returning them."""

    qtype = m.QTDIR

    def __init__(
        self,
        name: str,
        entries: Iterable[Entry]
        | Callable[[Ctx], Iterable[Entry] | Awaitable[Iterable[Entry]]] = (),
        perm: int = 0o555,
        lookup: Callable[[Ctx, str], Entry | None | Awaitable[Entry | None]] | None = None,
    ) -> None:
        super().__init__(name, perm)
        if callable(entries):
            self._list, self._table = entries, None
        else:
            self._list, self._table = None, {e.name: e for e in entries}
        self._lookup = lookup

    async def list(self, ctx: Ctx) -> list[Entry]:
        if self._table is not None:
            return list(self._table.values())
        return list(await _call(self._list, ctx))

    async def child(self, ctx: Ctx, name: str) -> Entry:
        if self._table is not None:
            e = self._table.get(name)
        elif self._lookup is not None:
            e = await _call(self._lookup, ctx, name)
        else:
            e = next((x for x in await self.list(ctx) if x.name == name), None)
        if e is None:
            raise NineError("ENOENT", f"{name}: no such file")
        return e

    def add(self, entry: Entry) -> Entry:
        assert self._table is not None, "add() is for table directories"
        self._table[entry.name] = entry
        return entry


class Text(Entry):
    """A file whose contents are made at open by ``read(ctx)`` (str or bytes); ``write(ctx,
    data)``, if given, takes each write and returns nothing or raises NineError."""

    def __init__(
        self,
        name: str,
        read: Callable[[Ctx], Any] | None = None,
        write: Callable[[Ctx, bytes], Any] | None = None,
        perm: int | None = None,
    ) -> None:
        super().__init__(
            name, perm if perm is not None else (0o444 if read else 0) | (0o222 if write else 0)
        )
        self._read, self._write = read, write

    async def open(self, ctx: Ctx, mode: int) -> Handle:
        acc = mode & 3
        reads, writes = acc != m.OWRITE, acc in (m.OWRITE, m.ORDWR)
        if reads and self._read is None:
            raise NineError("EACCES", f"{self.name} is write-only")
        if writes and self._write is None:
            raise NineError("EACCES", f"{self.name} is read-only")
        data = _bytes(await _call(self._read, ctx)) if reads else b""
        return SnapshotHandle(data, lambda d: _call(self._write, ctx, d) if self._write else None)


class SnapshotHandle(Handle):
    flags = m.OF_SYNTHETIC
    head = True  # the snapshot was taken at open: reading it changes nothing

    def __init__(self, data: bytes, on_write: Callable[[bytes], Any]) -> None:
        self.data = data
        self._on_write = on_write

    async def read(self, offset: int, count: int) -> bytes:
        return self.data[offset : offset + count]

    async def write(self, offset: int, data: bytes) -> int:
        await _call(self._on_write, data)
        return len(data)


@dataclass
class Cmd:
    """One word of a ctl file: ``fn(ctx, args)`` with between ``min`` and ``max`` arguments
    (max None: any number). ``raw``: the rest of the line is one argument, unsplit."""

    fn: Callable[[Ctx, list[str]], Any]
    min: int = 0
    max: int | None = 0
    usage: str = ""
    raw: bool = False


def parse_ctl(text: str, table: dict[str, Cmd]) -> list[tuple[Cmd, list[str]]]:
    """Parse what was written to a ctl file: one command a line. EINVAL says what is wrong."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        cmd = table.get(word)
        if cmd is None:
            raise NineError("EINVAL", f"unknown command {word!r}; one of: {' '.join(table)}")
        if cmd.raw:
            args = [rest.strip()] if rest.strip() else []
        else:
            try:
                args = shlex.split(rest)
            except ValueError as e:
                raise NineError("EINVAL", f"{word}: {e}") from None
        if len(args) < cmd.min or (cmd.max is not None and len(args) > cmd.max):
            raise NineError("EINVAL", f"usage: {word} {cmd.usage}".rstrip())
        out.append((cmd, args))
    return out


class Ctl(Text):
    """A control file: writes are commands from ``table``; reads give ``read(ctx)``."""

    def __init__(
        self,
        name: str,
        table: dict[str, Cmd],
        read: Callable[[Ctx], Any] | None = None,
        perm: int = 0o664,
        on_error: Callable[[Ctx, str], Any] | None = None,
    ) -> None:
        self.table = table
        self._on_error = on_error
        super().__init__(name, read or (lambda ctx: ""), self._run, perm)

    async def _run(self, ctx: Ctx, data: bytes) -> None:
        try:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise NineError("EINVAL", "ctl text must be UTF-8") from None
            for cmd, args in parse_ctl(text, self.table):
                await _call(cmd.fn, ctx, args)
        except NineError as e:
            if self._on_error is not None:
                await _call(self._on_error, ctx, e.message)
            raise


class Stream(Entry):
    """A file whose handles come from ``opener(ctx, mode)``: for stdout, stdin, wait."""

    def __init__(self, name: str, opener: Callable[[Ctx, int], Any], perm: int = 0o444) -> None:
        super().__init__(name, perm)
        self._opener = opener

    async def open(self, ctx: Ctx, mode: int) -> Handle:
        return await _call(self._opener, ctx, mode)


class Mount(Entry):
    """Where another File implementation takes over: ``attach(ctx)`` gives its root."""

    qtype = m.QTDIR

    def __init__(self, name: str, attach: Callable[[Ctx], Any], perm: int = 0o755) -> None:
        super().__init__(name, perm)
        self.attach = attach


def qid_path(path: str) -> int:
    return xxhash.xxh3_64_intdigest(path.encode())


class SynthFile(File):
    """The File a fid names in a synthetic tree: an entry, who is asking, and where it is."""

    def __init__(self, entry: Entry, ctx: Ctx, path: str, parent: SynthFile | None = None) -> None:
        self.entry, self.ctx, self.path, self.parent = entry, ctx, path, parent
        self._qid = m.Qid(entry.qtype, 0, qid_path(path + entry.salt()))

    @property
    def qid(self) -> m.Qid:
        return self._qid

    async def walk(self, name: str) -> File:
        if name == "..":
            return self.parent or self
        if not isinstance(self.entry, Dir):
            raise NineError("ENOTDIR", f"{self.entry.name or '/'} is not a directory")
        child = await self.entry.child(self.ctx, name)
        return await self._file(child)

    async def _file(self, child: Entry) -> File:
        if isinstance(child, Mount):
            root = await _call(child.attach, self.ctx)
            root.up = self
            return root
        return SynthFile(child, self.ctx, f"{self.path.rstrip('/')}/{child.name}", self)

    def _stat(self) -> m.Stat:
        e = self.entry
        mode = e.perm | (m.DMDIR if e.qtype & m.QTDIR else 0)
        return m.Stat(
            self._qid,
            mode,
            0,
            e.mtime,
            e.mtime,
            e.mtime,
            1,
            self.ctx.user,
            self.ctx.user,
            e.name or "/",
        )

    async def stat(self) -> m.Stat:
        return self._stat()

    async def open(self, mode: int) -> Handle:
        if isinstance(self.entry, Dir):
            if mode & 3 != m.OREAD:
                raise NineError("EISDIR", "a directory opens only for reading")
            files = [await self._file(e) for e in await self.entry.list(self.ctx)]
            return DirHandle([await f.stat() for f in files])
        return await self.entry.open(self.ctx, mode)

    async def remove(self) -> None:
        await self.entry.remove(self.ctx)


class DirHandle(Handle):
    """A listing taken at open, so offsets stay stable while the directory changes."""

    flags = m.OF_SYNTHETIC

    def __init__(self, entries: list[m.Stat]) -> None:
        self.entries = entries

    async def readdir(self, offset: int, count: int) -> list[m.Stat]:
        return self.entries[offset : offset + count]
