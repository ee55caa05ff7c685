"""The FUSE bridge: kernel requests in, namespace and node calls out.

Each inode is a namespace path plus the place it resolved to (a node's file, or one of the
namespace's own files). A node's inode keeps a fid walked on the node's current connection;
a fid from an older connection is re-walked for new requests, while a handle opened on an
older connection fails with EIO for good (its file position and open state are gone).

Caching: files under a node's /storage are ordinary files: attributes and entries are
cached for STORAGE_TTL and the page cache is kept while qid.version is unchanged.
Everything else on a node is synthetic: size 0, no attribute cache, direct I/O.
Blocking reads (a job's stdout, wait) hold only their own worker task; they end with EINTR
within SIGNAL_POLL of the reader getting a signal, since FUSE_INTERRUPT never reaches us.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat as st
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.client import META_TIMEOUT, Client
from ninefs.protocol.errors import NineError

from .namespace import LocalSrc, Namespace, NodeSrc, Path_
from .writeback import MOUNT_SLOTS, WriteBehind

log = logging.getLogger(__name__)

MAX_HELD_FIDS = 1024  # fids the mount keeps per inode, over all nodes (a node allows 4096)
STORAGE_TTL = 1.0  # seconds the kernel may cache storage attributes and entries
LISTING_TTL = STORAGE_TTL  # seconds a storage directory's listing is reused (as its attrs)
MAX_LISTINGS = 64  # storage listings kept per node
STREAM_AHEAD = 4096  # entries a listing arriving behind opendir may get ahead of readdir
# Statahead (as Lustre's): a storage directory in which lookups keep missing is listed once,
# and its listing answers the lookups after (stat of every file, open-read-close of many).
STATAHEAD_AFTER = 8  # misses within LISTING_TTL that start it
STATAHEAD_PER_ENTRY = 64  # ... and at least one per this many entries the last listing had
STATAHEAD_MAX_DIR = 1 << 20  # a directory bigger than this (st_size) is never listed for it
MAX_STATAHEAD_DIRS = 256  # directories whose misses are counted
HEAD_BYTES = 64 << 10  # what an open for reading asks the node to send along (a small file)
READAHEAD = 2 << 20  # bytes a streaming read asks the node for at once (two FUSE reads)
READAHEAD_FROM = 256 << 10  # a read this big is the kernel streaming a file: read ahead
READAHEAD_TTL = STORAGE_TTL  # seconds fetched bytes may wait for the read that wants them
MAX_READAHEAD = 32  # windows held over the whole mount (64 MiB); past it, plain reads
ENTRY_TTL = 1.0  # synthetic names are stable; their contents are never cached
SIGNAL_POLL = 0.2
CONNECT_WAIT = 5.0  # seconds a `mount` written to /ctl waits for the node to connect
NODE_WATCH = 1.0  # seconds between looks for newly mounted nodes (changes wake us at once)
BLKSIZE = 1 << 20
RENAME_NOREPLACE = 1  # renameat2's flag (pyfuse3 passes the flags through)
_DMDIR, _DMSYMLINK = m.DMDIR, m.DMSYMLINK
_IFDIR, _IFLNK, _IFREG = st.S_IFDIR, st.S_IFLNK, st.S_IFREG


@dataclass(eq=False)
class Vnode:
    ino: int
    path: Path_
    src: NodeSrc | LocalSrc
    kind: str = "file"  # file | dir | link
    nlookup: int = 0
    fid: int | None = None
    gen: int = -1  # the connection generation the fid belongs to
    stat: m.Stat | None = None
    stat_until: float = 0.0  # trio time after which a storage stat may no longer be cached
    version: int | None = None  # qid.version when last opened (for keep_cache)
    behind: set[WriteBehind] = field(default_factory=set)  # of its handles open for writing
    changes: int = 0  # writes and truncates this mount made to it (read-ahead's check)

    @property
    def storage(self) -> bool:
        return isinstance(self.src, NodeSrc) and self.src.path[:1] == ("storage",)


@dataclass(eq=False)
class Listing:
    """A storage directory's entries as listed, reused until ``until`` (trio time)."""

    until: float
    entries: list[m.Stat]
    _by_name: dict[str, m.Stat] | None = None

    def get(self, name: str) -> m.Stat | None:
        if self._by_name is None:
            self._by_name = {s.name: s for s in self.entries}
        return self._by_name.get(name)


@dataclass(eq=False)
class Streaming:
    """A storage directory's listing still arriving (opendir returned at once): readdir
    hands out what is there and waits for more only when it has nothing to give."""

    scope: trio.CancelScope
    more: trio.Event = field(default_factory=trio.Event)  # set at each batch, then renewed
    room: trio.Event = field(default_factory=trio.Event)  # set as readdir hands entries out
    handed: int = 0  # entries readdir has handed to the kernel
    done: bool = False
    error: NineError | None = None

    def wake(self) -> None:
        self.more.set()
        self.more = trio.Event()

    def took(self, upto: int) -> None:
        self.handed = max(self.handed, upto)
        self.room.set()
        self.room = trio.Event()


@dataclass(eq=False)
class Window:
    """Bytes of a file fetched ahead of the kernel's reads: one Tread of READAHEAD answers
    the FUSE reads (1 MiB each) that fall in it. Good while the vnode's ``changes`` is
    ``changes`` and until ``until``."""

    changes: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | bytearray | None = None  # None: not yet, or it failed
    until: float = 0.0
    error: NineError | None = None


@dataclass(eq=False)
class OpenFile:
    vnode: Vnode
    pid: int
    node: str = ""
    gen: int = -1
    fid: int | None = None
    flags: int = 0  # OF_* from Ropen
    data: bytes = b""  # a local file's snapshot
    writer: object = None  # a local file's write callback
    eof_at: int | None = None  # where a synthetic snapshot was seen to end
    head: bytes | None = None  # the first bytes, sent with the open; dropped once read
    head_all: bool = False  # head is the whole file (it came up short)
    behind: WriteBehind | None = None  # a storage file open for writing: its queued writes
    streaming: Streaming | None = None  # a directory whose listing is still arriving
    ahead: dict[int, Window] | None = None  # a storage file open read-only: by offset
    read_end: int = 0  # where the last read ended: only a read from there starts a window
    # a directory's listing: name, place (None: resolve it when listed), kind, node's stat
    # and until when that stat may be cached
    entries: list[tuple[str, NodeSrc | LocalSrc | None, str, m.Stat | None, float]] = field(
        default_factory=list
    )


def _fuse_errors(fn):
    """NineError -> FUSEError with the same errno; anything unexpected -> EIO, logged."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except NineError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def signalled(pid: int) -> bool:
    """True if ``pid`` has a signal pending that it does not block, or is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    pending = int(fields.get("SigPnd", "0").strip(), 16) | int(
        fields.get("ShdPnd", "0").strip(), 16
    )
    return bool(pending & ~int(fields.get("SigBlk", "0").strip(), 16))


def _mode_9p(flags: int) -> int:
    acc = flags & os.O_ACCMODE
    mode = {os.O_RDONLY: m.OREAD, os.O_WRONLY: m.OWRITE, os.O_RDWR: m.ORDWR}.get(acc, m.OREAD)
    if flags & os.O_TRUNC:
        mode |= m.OTRUNC
    if flags & os.O_APPEND:
        mode |= m.OAPPEND
    if flags & os.O_EXCL:
        mode |= m.OEXCL
    return mode


class NinefsOps(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, ns: Namespace, nursery: trio.Nursery) -> None:
        super().__init__()
        self.ns = ns
        self.nursery = nursery
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()  # the times of the namespace's own files
        root = Vnode(pyfuse3.ROOT_INODE, (), LocalSrc(()), "dir", nlookup=1)
        self.vnodes: dict[int, Vnode] = {root.ino: root}
        self._held: OrderedDict[int, Vnode] = OrderedDict()  # vnodes holding a fid, LRU first
        self.by_path: dict[Path_, Vnode] = {(): root}
        self.files: dict[int, OpenFile] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._next_fh = 1
        self.on_init: Callable[[], None] | None = None  # runs once FUSE_INIT is answered
        self._write_slots = trio.Semaphore(MOUNT_SLOTS)  # queued writes, all files together
        self._windows = 0  # read-ahead windows held, over all open files
        # node -> storage directory -> (when it goes stale, its entries): `ls -l` again
        # within a second lists from here. Anything this mount changes on a node, and a
        # node's loss or return, drops that node's listings (_changed).
        self._listings: dict[str, dict[tuple[str, ...], Listing]] = {}
        self._list_gen: dict[str, int] = {}  # node -> changes made, to spot a racing listing
        self._listing_now: dict[tuple[str, tuple[str, ...]], trio.Event] = {}  # being fetched
        # (node, storage directory) -> (misses, time of the last, entries last listed)
        self._misses: OrderedDict[tuple[str, tuple[str, ...]], tuple[int, float, int]] = (
            OrderedDict()
        )

    def init(self) -> None:
        # libfuse sends the INIT reply (which caps the kernel's readahead) after this
        # returns, so what must come after it runs in a task of its own
        if self.on_init is not None:
            self.nursery.start_soon(trio.to_thread.run_sync, self.on_init)
        self.nursery.start_soon(self._watch_nodes)

    async def _watch_nodes(self) -> None:
        """When a node goes down or comes back on a new connection, the kernel forgets the
        names and attributes it cached for that node's files, so that the next lookup asks
        us (EHOSTDOWN at once while it is down, fresh facts once it is back)."""
        seen: dict[str, tuple[bool, int]] = {}

        async def changed(event: trio.Event, scope: trio.CancelScope) -> None:
            await event.wait()
            scope.cancel()

        while True:
            events = []
            for name, conn in list(self.ns.nodes.items()):
                events.append(conn.changed)
                now = (conn.state == "down", conn.gen)
                if seen.setdefault(name, now) != now:
                    seen[name] = now
                    self.nursery.start_soon(self._invalidate_node, name)
            with trio.move_on_after(NODE_WATCH):  # also picks up nodes mounted since
                async with trio.open_nursery() as n:
                    for event in events:
                        n.start_soon(changed, event, n.cancel_scope)

    def _changed(self, node: str) -> None:
        """This mount changed something on ``node`` (called once the change is made): its
        cached listings, and any being fetched now, may be wrong."""
        self._listings.pop(node, None)
        self._list_gen[node] = self._list_gen.get(node, 0) + 1

    def _listing(self, node: str, path: tuple[str, ...]) -> Listing | None:
        """The storage directory's listing, if one fresh enough is kept."""
        cached = self._listings.get(node, {}).get(path)
        return cached if cached is not None and cached.until > trio.current_time() else None

    async def _list_storage(self, client: Client, node: str, path: tuple[str, ...]) -> Listing:
        key = (node, path)
        while True:
            cached = self._listing(node, path)
            if cached is not None:
                return cached
            fetching = self._listing_now.get(key)
            if fetching is None:
                break
            await fetching.wait()  # one listing at a time per directory: share it
        self._listing_now[key] = done = trio.Event()
        try:
            gen = self._list_gen.get(node, 0)
            now = trio.current_time()
            listing = Listing(now + LISTING_TTL, await client.list_dir("/" + "/".join(path)))
        finally:
            del self._listing_now[key]
            done.set()
        if not self._keep_listing(node, path, listing, gen):
            listing.until = now  # something changed while it was listed: use it, keep it not
        return listing

    def _keep_listing(self, node: str, path: tuple[str, ...], listing: Listing, gen: int) -> bool:
        """Keep ``listing`` (taken from change count ``gen`` on) for reuse, unless this
        mount changed something on the node while it was taken."""
        if self._list_gen.get(node, 0) != gen:
            return False
        mine = self._listings.setdefault(node, {})
        mine.pop(path, None)
        mine[path] = listing
        while len(mine) > MAX_LISTINGS:
            del mine[next(iter(mine))]  # the oldest
        return True

    def _statahead_due(self, node: str, path: tuple[str, ...], parent: Vnode | None) -> bool:
        """Count a lookup that missed in a storage directory; True when listing it would
        cost less than the misses it is seeing (the listing's size bounds both)."""
        key, now = (node, path), trio.current_time()
        misses, last, size = self._misses.pop(key, (0, 0.0, 0))
        if now - last > LISTING_TTL:
            misses = 0
        misses += 1
        due = (
            misses >= max(STATAHEAD_AFTER, size // STATAHEAD_PER_ENTRY)
            and parent is not None
            and parent.src == NodeSrc(node, path)
            and parent.stat is not None
            and parent.stat.size <= STATAHEAD_MAX_DIR
        )
        self._misses[key] = (0 if due else misses, now, size)
        while len(self._misses) > MAX_STATAHEAD_DIRS:
            self._misses.popitem(last=False)
        return due

    async def _from_listing(
        self, client: Client, path: Path_, src: NodeSrc
    ) -> tuple[m.Stat, float] | None:
        """What a storage directory's listing says of ``src`` (and until when), when one is
        kept or statahead lists it now; None: ask the node (a name not listed is asked too:
        it may be new)."""
        if src.path[:1] != ("storage",) or len(src.path) < 2:
            return None
        where = src.path[:-1]
        listing = self._listing(src.node, where)
        if listing is None:
            if not self._statahead_due(src.node, where, self.by_path.get(path[:-1])):
                return None
            listing = await self._list_storage(client, src.node, where)
            n = self._misses.get((src.node, where))
            if n is not None:
                self._misses[(src.node, where)] = (n[0], n[1], len(listing.entries))
        s = listing.get(src.path[-1])
        return None if s is None else (s, listing.until)

    def _set_stat(self, v: Vnode, s: m.Stat, until: float | None = None) -> None:
        """``v``'s stat as the node gave it; ``until``: when it goes stale (fresh now if
        not given)."""
        v.stat = s
        v.stat_until = trio.current_time() + STORAGE_TTL if until is None else until

    async def _refresh(self, v: Vnode) -> None:
        """Ask the node for ``v``'s stat (one round trip with or without a held fid)."""
        assert isinstance(v.src, NodeSrc)
        client, gen = self._client(v.src.node)
        if v.fid is not None and v.gen == gen:
            self._held.move_to_end(v.ino)
            self._set_stat(v, await client.stat(v.fid))
            return
        fid, _, s = await client.walk_stat(self.ns.nodes[v.src.node].root, v.src.path)
        self._keep_fid(v, fid, gen)
        self._set_stat(v, s)

    async def _invalidate_node(self, node: str) -> None:
        self._changed(node)
        inos, entries = [], []
        for v in list(self.vnodes.values()):
            if isinstance(v.src, NodeSrc) and v.src.node == node:
                inos.append(v.ino)
                parent = self.by_path.get(v.path[:-1])
                # Only names in the node's own directories: invalidating a name locks its
                # directory, and must never wait on a lookup under /n, /jobs or a union
                # that goes to another node (a hung node's lookup holds it for a deadline).
                if (
                    parent is not None
                    and v.path
                    and isinstance(parent.src, NodeSrc)
                    and parent.src.node == node
                    and len(self.ns.resolve(parent.path)) == 1
                ):
                    entries.append((parent.ino, os.fsencode(v.path[-1])))
        for parent_ino, name in entries:  # queued to pyfuse3's own thread: never blocks us
            pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)

        def inval() -> None:
            # attributes and cached pages (an old handle must not read on from the cache);
            # dropping pages may wait on a page lock that a pending read holds, so this runs
            # in a thread, abandoned if the mount ends (closing /dev/fuse frees it)
            for ino in inos:
                try:
                    pyfuse3.invalidate_inode(ino)
                except OSError:
                    pass  # the kernel has forgotten it already

        await trio.to_thread.run_sync(inval, abandon_on_cancel=True)

    # -- vnodes ------------------------------------------------------------------------

    def _vnode(self, ino: int) -> Vnode:
        v = self.vnodes.get(ino)
        if v is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return v

    def _vnode_for(self, path: Path_, src: NodeSrc | LocalSrc, kind: str) -> Vnode:
        v = self.by_path.get(path)
        if v is not None and (v.src != src or v.kind != kind):
            # the name now means another file (a union changed, a file was replaced): that is
            # a new inode, so the kernel never sees one inode change its type or its place;
            # the old one lives on (for open handles) until the kernel forgets it
            del self.by_path[path]
            if v.nlookup <= 0:
                self.vnodes.pop(v.ino, None)
                self._drop_fid(v)
            v = None
        if v is None:
            v = Vnode(self._next_ino, path, src, kind)
            self._next_ino += 1
            self.vnodes[v.ino] = v
            self.by_path[path] = v
        return v

    def _keep_fid(self, v: Vnode, fid: int, gen: int) -> None:
        """Let ``v`` hold ``fid``. Held fids are bounded (least recently used go first), since
        a node allows each connection only so many and ``ls -l`` of a big directory looks
        up every entry."""
        self._drop_fid(v)
        v.fid, v.gen = fid, gen
        self._held[v.ino] = v
        while len(self._held) > MAX_HELD_FIDS:
            _, old = self._held.popitem(last=False)
            self._drop_fid(old)

    def _drop_fid(self, v: Vnode) -> None:
        self._held.pop(v.ino, None)
        if v.fid is not None and isinstance(v.src, NodeSrc):
            conn = self.ns.nodes.get(v.src.node)
            fid, gen = v.fid, v.gen
            if conn is not None and conn.client is not None and conn.gen == gen:
                conn.client.clunk_later(fid)
        v.fid, v.gen = None, -1

    def _client(self, node: str) -> tuple[Client, int]:
        conn = self.ns.nodes.get(node)
        if conn is None:
            raise NineError("ENOENT", f"node {node} is not mounted")
        return conn.get()

    async def _fid(self, v: Vnode) -> tuple[Client, int]:
        """The client and a fid naming ``v`` on the node's current connection."""
        assert isinstance(v.src, NodeSrc)
        conn = self.ns.nodes.get(v.src.node)
        client, gen = self._client(v.src.node)
        if v.fid is None or v.gen != gen:
            fid, _ = await client.walk(conn.root, v.src.path)
            self._keep_fid(v, fid, gen)
        else:
            self._held.move_to_end(v.ino)
        return client, v.fid

    async def _clone(self, v: Vnode) -> tuple[Client, int, int]:
        """A fresh fid for ``v`` (to open or create with); returns (client, gen, fid)."""
        assert isinstance(v.src, NodeSrc)
        conn = self.ns.nodes.get(v.src.node)
        client, gen = self._client(v.src.node)
        fid, _ = await client.walk(conn.root, v.src.path)
        return client, gen, fid

    # -- attributes --------------------------------------------------------------------

    def _attrs(self, v: Vnode, now: float | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = v.ino
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = BLKSIZE
        s = v.stat
        if s is None:  # the namespace's own files
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started_ns
            a.st_mode = (st.S_IFDIR | 0o555) if v.kind == "dir" else (st.S_IFREG | 0o644)
            if v.path == ("jobs", "clone"):
                a.st_mode = st.S_IFREG | 0o444
            a.st_nlink = 2 if v.kind == "dir" else 1
            # a directory's name and attributes are fixed: cache them as synthetic names are
            # (else every path lookup through /n/NODE costs a walk and a stat on the node)
            a.entry_timeout = a.attr_timeout = ENTRY_TTL if v.kind == "dir" else 0
            return a
        # (in line, with module constants: readdir makes thousands of these)
        mode = s.mode
        kind = _IFDIR if mode & _DMDIR else _IFLNK if mode & _DMSYMLINK else _IFREG
        a.st_mode = kind | (mode & 0o7777)
        a.st_nlink = s.nlink or 1
        a.st_size = size = s.size
        a.st_blocks = (size + 511) >> 9
        a.st_atime_ns = s.atime
        a.st_mtime_ns = s.mtime
        a.st_ctime_ns = s.ctime
        if v.storage:
            # never cached past STORAGE_TTL from when the node said it (a listing's age counts)
            ttl = v.stat_until - (trio.current_time() if now is None else now)
            a.entry_timeout = a.attr_timeout = min(STORAGE_TTL, ttl) if ttl > 0 else 0.0
        else:
            # A synthetic file's attributes are fixed too (size 0, read with direct I/O to
            # EOF), so the stat that cat's fstat asks for need not cross the network.
            a.entry_timeout = a.attr_timeout = ENTRY_TTL
        return a

    @staticmethod
    def _kind(s: m.Stat) -> str:
        return "dir" if s.mode & m.DMDIR else "link" if s.mode & m.DMSYMLINK else "file"

    async def _resolve(self, path: Path_, listed: bool = True) -> Vnode:
        """Find the first place in the union at ``path`` that has the file. ``listed``: a
        storage directory's listing may answer (see _from_listing)."""
        err: NineError | None = None
        for src in self.ns.resolve(path):
            if isinstance(src, LocalSrc):
                kind = self.ns.local_kind(src.path)
                if kind is None and path in self.ns.table:
                    kind = "dir"
                if kind is not None:
                    v = self._vnode_for(path, src, kind)
                    v.stat = None
                    return v
                continue
            try:
                conn = self.ns.nodes.get(src.node)
                client, gen = self._client(src.node)
                hit = await self._from_listing(client, path, src) if listed else None
                if hit is not None:
                    # no fid yet: what needs one walks then (an open walks anyway)
                    v = self._vnode_for(path, src, self._kind(hit[0]))
                    self._set_stat(v, *hit)
                    return v
                fid, _, s = await client.walk_stat(conn.root, src.path)
            except NineError as e:
                if err is None or err.ename == "ENOENT":
                    err = e
                continue
            v = self._vnode_for(path, src, self._kind(s))
            self._keep_fid(v, fid, gen)
            self._set_stat(v, s)
            return v
        raise err or NineError("ENOENT", "/".join(path))

    # -- lookup and attributes -----------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._vnode(parent_inode)
        name = os.fsdecode(name)
        if name == ".":
            v = parent
        elif name == "..":
            v = self.by_path.get(parent.path[:-1]) or parent
        else:
            known = self.by_path.get((*parent.path, name))
            busy = known is not None and bool(known.behind)
            if busy:
                await self._settle(known)  # as getattr: the size must not step back
            # and a listing may be from before those writes landed: ask the node
            v = await self._resolve((*parent.path, name), listed=not busy)
        v.nlookup += 1
        return self._attrs(v)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            v = self.vnodes.get(ino)
            if v is None or ino == pyfuse3.ROOT_INODE:
                continue
            v.nlookup -= n
            if v.nlookup <= 0:
                del self.vnodes[ino]
                if self.by_path.get(v.path) is v:
                    del self.by_path[v.path]
                self._drop_fid(v)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        v = self._vnode(inode)
        await self._settle(v)  # the size the kernel is told must not step back
        if isinstance(v.src, NodeSrc):
            try:
                await self._refresh(v)
            except NineError as e:
                # the kernel asks for attributes before reading through an open handle:
                # one opened on a connection that broke gets EIO, as its reads do
                if e.ename == "EHOSTDOWN" and any(
                    of.vnode is v and of.fid is not None for of in self.files.values()
                ):
                    raise NineError("EIO", f"the connection to {v.src.node} is gone") from None
                raise
        return self._attrs(v)

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        v = self._vnode(inode)
        if not isinstance(v.src, NodeSrc):
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise NineError("EPERM", "the namespace's own files cannot change owner or mode")
            return self._attrs(v)  # the shell's O_TRUNC on /ctl: nothing to truncate
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode & 0o7777
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_atime:
            changes["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime"] = attr.st_mtime_ns
        if fields.update_uid or fields.update_gid:
            raise NineError("EPERM", "ownership cannot change")
        await self._settle(v)  # a truncate lands after the writes before it
        if not v.storage and set(changes) <= {"size", "atime", "mtime"}:
            return self._attrs(v)  # truncating a ctl file: the shell's O_TRUNC is harmless
        client, fid = await self._fid(v)
        if changes:
            try:
                await client.wstat(fid, **changes)
            finally:
                v.changes += 1
                self._changed(v.src.node)
        self._set_stat(v, await client.stat(fid))
        return self._attrs(v)

    @_fuse_errors
    async def readlink(self, inode, ctx):
        v = self._vnode(inode)
        if not isinstance(v.src, NodeSrc):
            raise NineError("EINVAL", "not a link")
        client, fid = await self._fid(v)
        return os.fsencode(await client.readlink(fid))

    # -- directories -------------------------------------------------------------------

    def _new_fh(self, of: OpenFile) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = of
        return fh

    async def _list_local(self, v: Vnode, src: LocalSrc) -> list[tuple[str, str]]:
        names = [(n, "dir" if self.ns.local_kind((*src.path, n)) == "dir" else "file")
                 for n in self.ns.local_names(src.path)]  # fmt: skip
        if src.path == ("jobs",):
            names.extend((j, "dir") for j in await self._cluster_jobs())
        return names

    async def _cluster_jobs(self) -> list[str]:
        out: list[str] = []

        async def one(name: str) -> None:
            try:
                client, _ = self._client(name)
                if self.ns.nodes[name].state != "up":
                    return  # a suspect node must not hold up the listing
                with trio.fail_after(META_TIMEOUT):
                    entries = await client.list_dir("/jobs")
            except (NineError, trio.TooSlowError):
                return
            out.extend(f"{name}.{e.name}" for e in entries if e.name != "clone")

        async with trio.open_nursery() as n:
            for name in list(self.ns.nodes):
                n.start_soon(one, name)
        # a job moved before it started (`node`, `label`) is listed by the id its maker holds
        moved = {f"{j.node}.{j.rid}": j.id for j in self.ns.jobs.values()
                 if j.id != f"{j.node}.{j.rid}"}  # fmt: skip
        return sorted({moved.get(j, j) for j in out})

    @_fuse_errors
    async def opendir(self, inode, ctx):
        v = self._vnode(inode)
        srcs = self.ns.resolve(v.path)
        if (
            len(srcs) == 1
            and isinstance(srcs[0], NodeSrc)
            and srcs[0].path[:1] == ("storage",)
            and self._listing(srcs[0].node, srcs[0].path) is None
            and not self.ns.mount_points(v.path)
        ):
            return await self._opendir_streaming(v, srcs[0], ctx)
        # name -> (place or None, kind, stat, until); inodes are made only for the names
        # that readdir hands to the kernel (each of those counts as a lookup)
        seen: dict[str, tuple[NodeSrc | LocalSrc | None, str, m.Stat | None, float]] = {}
        for name in self.ns.mount_points(v.path):
            seen.setdefault(name, (None, "dir", None, 0.0))
        found = bool(seen)
        for src in self.ns.resolve(v.path):
            if isinstance(src, LocalSrc):
                if self.ns.local_kind(src.path) == "dir" or src.path in self.ns.table:
                    found = True
                for name, kind in await self._list_local(v, src):
                    seen.setdefault(name, (None, kind, None, 0.0))
                continue
            try:
                client, gen = self._client(src.node)
                until = trio.current_time() + STORAGE_TTL
                if src.path[:1] == ("storage",):
                    listing = await self._list_storage(client, src.node, src.path)
                    entries, until = listing.entries, listing.until
                else:  # synthetic directories change by themselves: always asked
                    entries = await client.list_dir("/" + "/".join(src.path))
            except NineError as e:
                if not seen and e.ename != "ENOENT":
                    raise
                continue
            found = True
            for s in entries:
                place = NodeSrc(src.node, (*src.path, s.name))
                seen.setdefault(s.name, (place, self._kind(s), s, until))
        if not found:  # e.g. /n/NAME after `unmount NAME`, through a name the kernel kept
            raise NineError("ENOENT", "/".join(v.path) + ": nothing is there now")
        of = OpenFile(v, ctx.pid)
        dots = [(".", None, "dot", None, 0.0), ("..", None, "dot", None, 0.0)]
        of.entries = [*dots, *((name, *e) for name, e in seen.items() if name not in (".", ".."))]
        return self._new_fh(of)

    async def _opendir_streaming(self, v: Vnode, src: NodeSrc, ctx) -> int:
        """Open a storage directory that has no fresh listing and let its entries arrive
        behind the open, batch by batch (Client.read_dir): the kernel takes the first
        entries while the node still takes the stats of the rest, and the whole listing is
        kept as _list_storage keeps one."""
        client, _ = self._client(src.node)
        gen = self._list_gen.get(src.node, 0)
        until = trio.current_time() + LISTING_TTL
        fid = await client.open_path("/" + "/".join(src.path), m.OREAD)  # errors here
        of = OpenFile(v, ctx.pid)
        of.entries = [(".", None, "dot", None, 0.0), ("..", None, "dot", None, 0.0)]
        of.streaming = stream = Streaming(trio.CancelScope())
        listed: list[m.Stat] = []

        async def take(batch: list[m.Stat]) -> None:
            listed.extend(batch)
            for s in batch:
                place = NodeSrc(src.node, (*src.path, s.name))
                of.entries.append((s.name, place, self._kind(s), s, until))
            stream.wake()
            # no further ahead of the reader than this: a slow reader of a huge directory
            # holds a bounded listing (and a reader that stops holds up no node)
            while len(of.entries) - stream.handed > STREAM_AHEAD:
                await stream.room.wait()

        async def arrive() -> None:
            try:
                with stream.scope:
                    await client.read_dir(fid, take)
                    self._keep_listing(src.node, src.path, Listing(until, listed), gen)
            except NineError as e:
                stream.error = e
            finally:
                stream.done = True
                client.clunk_later(fid)
                stream.wake()

        self.nursery.start_soon(arrive)
        return self._new_fh(of)

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        of = self.files[fh]
        stream = of.streaming
        if stream is not None:
            stream.took(start_id)  # the kernel has what comes before: let more arrive
            while start_id >= len(of.entries) and not stream.done:
                await stream.more.wait()  # nothing to hand out yet: wait for the next batch
            if start_id >= len(of.entries) and stream.error is not None:
                raise stream.error  # after what did arrive (ls shows those, then the error)
        now = trio.current_time()
        for i in range(start_id, len(of.entries)):
            name, src, kind, stat, until = of.entries[i]
            if kind == "dot":  # the kernel takes no lookup for . and ..: count none
                d = of.vnode if name == "." else self.by_path.get(of.vnode.path[:-1], of.vnode)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(d), i + 1):
                    return
                continue
            path = (*of.vnode.path, name)
            if src is None:  # a mount point, or one of the namespace's own names
                srcs = self.ns.resolve(path)
                src = srcs[0] if srcs else LocalSrc(path)
            # readdirplus counts a lookup for each entry it returns: give it an inode
            child = self._vnode_for(path, src, kind)
            if child.behind:
                # open for writing here, with writes queued: the listing's size is from
                # before them, and the kernel would take it; ask once they have landed
                with contextlib.suppress(NineError):
                    await self._settle(child)
                    await self._refresh(child)
                now = trio.current_time()
            elif stat is not None:
                self._set_stat(child, stat, until)
            attrs = self._attrs(child, now)
            if not pyfuse3.readdir_reply(
                token, name.encode("utf-8", "surrogateescape"), attrs, i + 1
            ):
                return
            child.nlookup += 1

    async def releasedir(self, fh):
        of = self.files.pop(fh, None)
        if of is not None and of.streaming is not None:
            of.streaming.scope.cancel()  # closed before the end (`ls | head`): stop asking

    # -- files -------------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        v = self._vnode(inode)
        if v.kind == "dir":
            raise NineError("EISDIR", "is a directory")
        of = OpenFile(v, ctx.pid)
        if isinstance(v.src, LocalSrc):
            await self._open_local(of, v.src.path, flags)
            return pyfuse3.FileInfo(fh=self._new_fh(of), direct_io=True, keep_cache=False)
        conn = self.ns.nodes.get(v.src.node)
        client, gen = self._client(v.src.node)
        mode = _mode_9p(flags)
        want = HEAD_BYTES if mode & 3 == m.OREAD else 0
        fid, r = await client.walk_open(conn.root, v.src.path, mode, want)
        of.node, of.gen, of.fid, of.flags = v.src.node, gen, fid, r.flags
        if r.flags & m.OF_HEAD:
            of.head, of.head_all = bytes(r.data), len(r.data) < want
        synthetic = bool(r.flags & m.OF_SYNTHETIC) or not v.storage
        if not synthetic:
            self._write_behind(of, client, flags)
            if mode & 3 == m.OREAD and not r.flags & m.OF_STREAM:
                of.ahead = {}
        keep = not synthetic and v.version == r.qid.version
        v.version = r.qid.version
        if not synthetic and v.stat is not None and v.stat.qid.version != r.qid.version:
            # changed since the kernel was given its attributes (on the node's disk, by
            # another mount): a read must not stop at the size the kernel cached
            try:
                pyfuse3.invalidate_inode(v.ino, attr_only=True)  # no page locks: safe here
            except OSError:
                pass
        return pyfuse3.FileInfo(
            fh=self._new_fh(of),
            direct_io=synthetic,
            keep_cache=keep,
            nonseekable=bool(r.flags & m.OF_STREAM),
        )

    def _write_behind(self, of: OpenFile, client: Client, flags: int) -> None:
        # Storage files only (a ctl write's error is its answer), and not O_APPEND: the
        # node appends wherever the write lands, so order is all there is.
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) and not flags & os.O_APPEND:
            fid = of.fid
            of.behind = WriteBehind(
                lambda off, data: client.write(fid, off, data), self.nursery, self._write_slots
            )
            of.vnode.behind.add(of.behind)

    @staticmethod
    async def _settle(v: Vnode) -> None:
        """Let ``v``'s queued writes land before its size or contents are looked at."""
        for wb in list(v.behind):
            await wb.settle()

    async def _open_local(self, of: OpenFile, path: Path_, flags: int) -> None:
        writing = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        reading = flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)
        if path == ("nodes",):
            if writing:
                raise NineError("EACCES", "/nodes is read-only")
            of.data = self.ns.nodes_text().encode()
        elif path == ("ctl",):
            of.writer = self._ctl_write
            if reading:
                of.data = self.ns.text().encode()
        elif path == ("jobs", "clone"):
            if writing:
                raise NineError("EACCES", "clone is read-only")
            job = await self.ns.clone()
            of.data = f"{job.id}\n".encode()
        elif len(path) == 3 and path[0] == "jobs" and path[2] == "ctl":
            jid = path[1]
            of.writer = functools.partial(self.ns.job_ctl_write, jid)
            if reading:
                of.data = await self.ns.job_ctl_read(jid)
        else:
            raise NineError("EISDIR", "is a directory")

    async def _ctl_write(self, text: str) -> None:
        """/ctl: change the namespace, then have the kernel forget the names it cached where
        the mount table changed, so that what runs after the write sees the new namespace."""
        before = {k: list(v) for k, v in self.ns.table.items()}
        had = set(self.ns.nodes)
        try:
            await self.ns.ctl(text)
            # a node mounted now: give it the time a mount at start gets to connect
            with trio.move_on_after(CONNECT_WAIT):
                async with trio.open_nursery() as n:
                    for name in set(self.ns.nodes) - had:
                        n.start_soon(self.ns.nodes[name].wait_state, CONNECT_WAIT)
        finally:
            changed = [k for k in before.keys() | self.ns.table.keys()
                       if k and before.get(k) != self.ns.table.get(k)]  # fmt: skip
            names = [(parent.ino, os.fsencode(k[-1]))
                     for k in changed if (parent := self.by_path.get(k[:-1])) is not None]  # fmt: skip

            def inval() -> None:
                for parent_ino, name in names:
                    try:
                        pyfuse3.invalidate_entry(parent_ino, name)
                    except OSError:
                        pass  # the kernel did not have it

            if names:
                # synchronous, so the writer's next command sees it; bounded, as a lookup
                # in that directory that waits on a slow node would hold it up
                with trio.move_on_after(2):
                    await trio.to_thread.run_sync(inval, abandon_on_cancel=True)

    def _open_file(self, fh: int) -> tuple[OpenFile, Client | None]:
        of = self.files.get(fh)
        if of is None:
            raise NineError("EBADF", "bad handle")
        if of.fid is None:
            return of, None
        conn = self.ns.nodes.get(of.node)
        if conn is None or conn.client is None or conn.gen != of.gen or conn.client.closed.is_set():
            raise NineError("EIO", f"the connection to {of.node} that opened this file is gone")
        return of, conn.client

    async def _read_ahead(
        self, of: OpenFile, client: Client, off: int, size: int, sequential: bool
    ) -> memoryview | None:
        """``size`` bytes at ``off`` from the window that holds them, fetching it (one
        Tread of READAHEAD for the reads the kernel has in flight at once, and the next).
        None: read it the plain way (no room for another window, or its fetch was
        cancelled). A window is dropped once the vnode changed here, or after
        READAHEAD_TTL: no older than what the kernel's page cache would keep."""
        span = min(READAHEAD, client.iounit)
        if span < 2 * size:
            return None
        assert of.ahead is not None
        start = off - off % span
        now = trio.current_time()
        win = of.ahead.get(start)
        if win is not None and (
            win.changes != of.vnode.changes or (win.done.is_set() and win.until <= now)
        ):
            self._drop_window(of, start)
            win = None
        if win is None:
            if self._windows >= MAX_READAHEAD or not sequential:
                return None  # a read out of sequence (random access) fetches only itself
            for old in [k for k in of.ahead if k != start - span]:
                self._drop_window(of, old)  # a handle keeps this window and the one before
            win = of.ahead[start] = Window(of.vnode.changes)
            self._windows += 1
            fresh = True  # fetched for this read: as new as a plain read would be
            try:
                win.data = await client.read(of.fid, start, span)
                win.until = trio.current_time() + READAHEAD_TTL
            except BaseException as e:
                win.error = e if isinstance(e, NineError) else None  # else: waiters ask again
                self._drop_window(of, start)
                raise
            finally:
                win.done.set()
        else:
            fresh = not win.done.is_set()
            await win.done.wait()
            if win.error is not None:
                raise win.error
            if win.data is None:
                return None  # its fetch was cancelled (an interrupted read): ask again
        data = win.data
        if not fresh and off - start + size > len(data) and len(data) < span:
            return None  # past where the file ended a while ago: the node says where now
        return memoryview(data)[off - start : off - start + size]

    def _drop_window(self, of: OpenFile, start: int) -> None:
        if of.ahead is not None and of.ahead.pop(start, None) is not None:
            self._windows -= 1

    @_fuse_errors
    async def read(self, fh, off, size):
        of, client = self._open_file(fh)
        if client is None:
            return of.data[off : off + size]
        if of.behind is not None:
            await of.behind.settle()  # read back what this handle wrote
        if of.head is not None:
            head = of.head
            if off + size <= len(head) or of.head_all:
                if off + size >= len(head):
                    of.head = None  # read to its end: most programs are done with it
                if of.head_all and of.flags & m.OF_SYNTHETIC:
                    of.eof_at = len(head)
                return head[off : off + size]
            of.head = None  # a read beyond it: the file is read in the usual way from here
        if not of.flags & m.OF_STREAM:
            if of.eof_at is not None and off >= of.eof_at:
                return b""  # a snapshot that already came up short: the end, no round trip
            if of.ahead is not None:
                sequential, of.read_end = off == of.read_end, off + size
                if size >= READAHEAD_FROM and not of.vnode.behind:
                    ahead = await self._read_ahead(of, client, off, size, sequential)
                    if ahead is not None:
                        return ahead
            want = min(size, client.iounit)
            data = await client.read(of.fid, off, want)
            if of.flags & m.OF_SYNTHETIC and len(data) < want:
                of.eof_at = off + len(data)
            return data
        data = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    await trio.sleep(SIGNAL_POLL)
                    if signalled(of.pid):
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            data = await client.read(of.fid, off, size, timeout=None)
            nursery.cancel_scope.cancel()
        if data is None:
            # the cancelled read has sent Tflush and had its Rflush (or the connection is gone)
            log.info("read of /%s interrupted by a signal to pid %d; flushed on the wire",
                     "/".join(of.vnode.path), of.pid)  # fmt: skip
            raise NineError("EINTR", "interrupted")
        return data

    @_fuse_errors
    async def write(self, fh, off, buf):
        of, client = self._open_file(fh)
        if client is None:
            if of.writer is None:
                raise NineError("EBADF", "not open for writing")
            try:
                text = bytes(buf).decode()
            except UnicodeDecodeError:
                raise NineError("EINVAL", "ctl text must be UTF-8") from None
            await of.writer(text)
            return len(buf)
        try:
            if of.behind is not None:
                return await of.behind.write(off, bytes(buf))
            return await client.write(of.fid, off, buf)
        finally:
            of.vnode.changes += 1
            self._changed(of.node)  # and again once queued writes have landed (flush)

    @_fuse_errors
    async def flush(self, fh):
        # every close(2): the queued writes have landed, or the close reports why not
        of = self.files.get(fh)
        if of is not None and of.behind is not None:
            try:
                await of.behind.drain()
            finally:
                self._changed(of.node)  # the sizes listed before they landed are old

    @_fuse_errors
    async def fsync(self, fh, datasync):
        of = self.files.get(fh)
        if of is not None and of.behind is not None:
            await of.behind.drain()
        of, client = self._open_file(fh)
        if client is not None:
            await client.fsync(of.fid)

    async def release(self, fh):
        of = self.files.pop(fh, None)
        if of is not None and of.ahead:
            for start in list(of.ahead):
                self._drop_window(of, start)
        if of is not None and of.behind is not None:
            await of.behind.settle()  # every close flushed; this is for the clunk's sake
            of.vnode.behind.discard(of.behind)
            self._changed(of.node)
            if of.behind.error is not None:
                log.warning("/%s: a queued write failed: %s", "/".join(of.vnode.path),
                            of.behind.error)  # fmt: skip
        if of is None or of.fid is None:
            return
        conn = self.ns.nodes.get(of.node)
        if conn is not None and conn.client is not None and conn.gen == of.gen:
            conn.client.clunk_later(of.fid)

    # -- changes -----------------------------------------------------------------------

    def _node_dir(self, parent_inode: int) -> Vnode:
        parent = self._vnode(parent_inode)
        if not isinstance(parent.src, NodeSrc):
            raise NineError("EACCES", "the namespace's own directories cannot change this way")
        return parent

    async def _entry(self, parent: Vnode, name: str) -> Vnode:
        v = await self._resolve((*parent.path, name))
        v.nlookup += 1
        return v

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._node_dir(parent_inode)
        name = os.fsdecode(name)
        client, gen, fid = await self._clone(parent)
        try:
            r = await client.create(fid, name, mode & 0o7777, _mode_9p(flags))
        except BaseException:
            client.clunk_later(fid)
            raise
        finally:
            self._changed(parent.src.node)
        path = (*parent.path, name)
        v = self._vnode_for(path, NodeSrc(parent.src.node, (*parent.src.path, name)), "file")
        self._set_stat(v, await client.stat(fid))
        v.version = r.qid.version
        v.nlookup += 1
        of = OpenFile(v, ctx.pid, parent.src.node, gen, fid, r.flags)
        synthetic = not v.storage
        if not synthetic:
            self._write_behind(of, client, flags)
        info = pyfuse3.FileInfo(fh=self._new_fh(of), direct_io=synthetic, keep_cache=False)
        return info, self._attrs(v)

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._node_dir(parent_inode)
        name = os.fsdecode(name)
        client, _, fid = await self._clone(parent)
        try:
            await client.create(fid, name, m.DMDIR | (mode & 0o7777), m.OREAD)
        finally:
            client.clunk_later(fid)
            self._changed(parent.src.node)
        return self._attrs(await self._entry(parent, name))

    async def _remove(self, parent_inode: int, name: bytes) -> None:
        parent = self._node_dir(parent_inode)
        path = (*parent.path, os.fsdecode(name))
        v = await self._resolve(path)
        client, fid = await self._fid(v)
        self._held.pop(v.ino, None)
        v.fid, v.gen = None, -1  # Tremove clunks it, whatever the outcome
        try:
            await client.remove(fid)
        finally:
            self._changed(parent.src.node)
        if self.by_path.get(path) is v:
            del self.by_path[path]

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name)

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~RENAME_NOREPLACE:
            raise NineError("EINVAL", "rename flags other than RENAME_NOREPLACE are not supported")
        old_parent = self._node_dir(parent_inode_old)
        new_parent = self._node_dir(parent_inode_new)
        old_path = (*old_parent.path, os.fsdecode(name_old))
        new_name = os.fsdecode(name_new)
        v = await self._resolve(old_path)
        if not isinstance(v.src, NodeSrc) or v.src.node != new_parent.src.node:
            raise NineError("EXDEV", "rename across nodes")
        if flags & RENAME_NOREPLACE:
            try:
                await self._resolve((*new_parent.path, new_name))
            except NineError as e:
                if e.ename != "ENOENT":
                    raise
            else:
                raise NineError("EEXIST", f"{new_name} exists")
        client, fid = await self._fid(v)
        _, dfid = await self._fid(new_parent)
        try:
            await client.rename(fid, dfid, new_name)
        finally:
            self._changed(v.src.node)
        # the kernel moves its dentry; move ours, and everything below it
        new_path = (*new_parent.path, new_name)
        new_src_path = (*new_parent.src.path, new_name)
        gone = self.by_path.pop(new_path, None)
        if gone is not None and gone is not v:
            self._drop_fid(gone)
        old_src, k = v.src.path, len(v.src.path)
        n = len(old_path)
        for p in [p for p in self.by_path if p[:n] == old_path]:
            w = self.by_path.pop(p)
            if w is not v and (
                not isinstance(w.src, NodeSrc)
                or w.src.node != v.src.node
                or w.src.path[:k] != old_src
            ):
                continue  # a name below that came from another place (a union): look again
            w.path = new_path + p[n:]
            w.src = NodeSrc(v.src.node, new_src_path + w.src.path[k:])
            self.by_path[w.path] = w

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._node_dir(parent_inode)
        name = os.fsdecode(name)
        client, fid = await self._fid(parent)
        try:
            await client.symlink(fid, name, os.fsdecode(target))
        finally:
            self._changed(parent.src.node)
        return self._attrs(await self._entry(parent, name))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @_fuse_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        for conn in self.ns.nodes.values():
            if conn.state != "up":
                continue
            try:
                client, _ = conn.get()
                fid, _ = await client.walk(conn.root, ["storage"])
                try:
                    fs = await client.statfs(fid)
                finally:
                    client.clunk_later(fid)
            except NineError:
                continue
            s.f_bsize, s.f_frsize = fs.bsize, fs.bsize
            s.f_blocks, s.f_bfree, s.f_bavail = fs.blocks, fs.bfree, fs.bavail
            s.f_files, s.f_ffree, s.f_favail = fs.files, fs.ffree, fs.ffree
            break
        return s
