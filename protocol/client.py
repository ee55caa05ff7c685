"""The client end of a session: tags, fids and calls, over one Channel.

Many tasks may call at once: each request gets a tag, replies come back in any order and
wake the task that waits for them. A call that is cancelled (or whose deadline passes)
sends Tflush for its tag and frees the tag only when Rflush arrives, as 9P requires.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import nacl.signing
import trio

from . import messages as m
from .errors import NineError, ProtocolError, collapse_groups
from .framing import LEN_SIZE, SPARES
from .keys import KnownNodes
from .sealing import MAX_ABYTES
from .transport import Channel, ConnectionClosed, dial, take

log = logging.getLogger(__name__)

DEFAULT_MSIZE = 4 << 20
META_TIMEOUT = 5.0  # seconds for a metadata call
DATA_TIMEOUT = 30.0  # seconds for a read or write of data
BIG_WRITE = 64 << 10  # Twrites at least this long are laid out in their frame directly
CLUNK_DELAY = 0.01  # seconds clunks gather for one Tclunkmany
FLUSH_TIMEOUT = 3.0  # seconds for Rflush; past that the node is hung and the connection goes
MAX_TAGS = 4096
READDIR_CHUNK = 512  # entries a streamed listing asks for at a time (Client.read_dir)
READDIR_AHEAD = 2  # and how many such Treaddirs it keeps in flight


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: m.Msg | None = None


class Client:
    """One connection to one node. Start ``run`` in a nursery (``connect`` does it)."""

    def __init__(self, channel: Channel, user: str, *, msize: int = DEFAULT_MSIZE) -> None:
        self.channel = channel
        self.user = user
        self.want_msize = msize
        self.msize = 0
        self.iounit = 0
        self.root: int | None = None
        self.closed = trio.Event()
        self.reason = ""
        self._pending: dict[int, _Slot] = {}
        self._free_tags = list(range(MAX_TAGS - 1, -1, -1))
        self._tags = trio.Semaphore(MAX_TAGS)
        self._next_fid = 1
        self._free_fids: list[int] = []
        self._bg: trio.Nursery | None = None  # flushes and clunks nobody waits for
        self._to_clunk: list[int] = []  # fids for the next Tclunkmany
        self._clunk_full = trio.Event()
        self._clunking = False

    # -- the connection ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Negotiate the version, report started, then read replies until the connection ends."""
        try:
            await self.channel.send(m.encode(m.Tversion(m.NOTAG, self.want_msize, m.VERSION)))
            with trio.fail_after(META_TIMEOUT):
                reply = m.decode(await self.channel.receive())
            if not isinstance(reply, m.Rversion) or reply.version != m.VERSION:
                raise ProtocolError(f"the node does not speak {m.VERSION}")
            if not m.MIN_MSIZE <= reply.msize <= self.want_msize:
                raise ProtocolError(f"bad msize {reply.msize}")
            self.msize = reply.msize
            self.iounit = self.msize - m.HEADER_ROOM
            self.channel.set_limit(self.msize)
        except BaseException as e:
            self._close(f"version: {e}")
            raise
        task_status.started()
        async with trio.open_nursery() as self._bg:
            try:
                while True:
                    msg = m.decode(await self.channel.receive())
                    slot = self._pending.get(msg.tag)
                    if slot is None or slot.event.is_set() or m.is_request(msg):
                        raise ProtocolError(f"unexpected {type(msg).__name__} for tag {msg.tag}")
                    slot.reply = msg
                    slot.event.set()
            except ConnectionClosed as e:
                self._close(str(e))
            except ProtocolError as e:
                log.warning("%s: %s", self.channel.peer, e)
                self._close(f"protocol error: {e}")
            finally:
                self._close("client closed")
                with trio.CancelScope(shield=True):
                    await self.channel.aclose()

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.reason = reason
        self.closed.set()
        for slot in self._pending.values():
            slot.event.set()  # reply None: the waiter raises EIO

    def _lost(self) -> NineError:
        return NineError("EIO", f"connection to {self.channel.peer} lost: {self.reason}")

    async def aclose(self) -> None:
        self._close("client closed")
        await self.channel.aclose()

    # -- calls -------------------------------------------------------------------------

    async def rpc(self, msg: m.Msg, timeout: float | None = META_TIMEOUT) -> m.Msg:
        """Send a request and wait for its reply; Rerror raises NineError, a passed deadline
        ETIMEDOUT, a lost connection EIO.

        ETIMEDOUT is raised when the deadline passes, not later: the Tflush for the tag then
        goes out in the background, which frees the tag on Rflush or closes the connection
        if the node does not answer within FLUSH_TIMEOUT."""
        if self.closed.is_set():
            raise self._lost()
        await take(self._tags)
        tag = self._free_tags.pop()
        slot = self._pending[tag] = _Slot()
        msg.tag = tag
        keep = False  # the tag stays taken until a background flush frees it
        try:
            try:
                if type(msg) is m.Twrite and len(msg.data) >= BIG_WRITE:
                    # into its frame once, sealed where it lies (no encode + seal copies)
                    buf, n = m.encode_into(msg, LEN_SIZE, MAX_ABYTES, SPARES.take)
                    await self.channel.send_prepared(buf, n, spare=True)
                else:
                    await self.channel.send(m.encode(msg))
            except ConnectionClosed as e:
                self._close(str(e))
                raise self._lost() from None
            try:
                with trio.fail_after(math.inf if timeout is None else timeout):
                    await slot.event.wait()
            except trio.TooSlowError:
                if not self.closed.is_set() and self._bg is not None:
                    keep = True
                    self._bg.start_soon(self._flush_then_free, tag)
                raise NineError(
                    "ETIMEDOUT", f"{type(msg).__name__} to {self.channel.peer} timed out"
                ) from None
            except BaseException:  # cancelled: flush now, shielded, before the tag is reused
                if not slot.event.is_set() and not self.closed.is_set():
                    await self._flush(tag)
                raise
        finally:
            if not keep:
                self._free_tag(tag)
        reply = slot.reply
        if reply is None:
            raise self._lost()
        if isinstance(reply, m.Rerror):
            raise NineError(reply.ename, reply.message)
        if reply.TYPE != msg.TYPE + 1:
            self._close(f"bad reply {type(reply).__name__} to {type(msg).__name__}")
            raise self._lost()
        return reply

    def _free_tag(self, tag: int) -> None:
        del self._pending[tag]
        self._free_tags.append(tag)
        self._tags.release()

    async def _flush_then_free(self, oldtag: int) -> None:
        try:
            if not self.closed.is_set():
                await self._flush(oldtag)
        finally:
            self._free_tag(oldtag)

    async def _flush(self, oldtag: int) -> None:
        # Shielded: the caller is being cancelled, but the tag must not be reused until
        # the node has answered Rflush (or the connection is given up).
        with trio.CancelScope(shield=True):
            if not self._free_tags:
                self._close("no tag free to flush with")
                return
            tag = self._free_tags.pop()
            slot = self._pending[tag] = _Slot()
            try:
                with trio.move_on_after(FLUSH_TIMEOUT) as scope:
                    await self.channel.send(m.encode(m.Tflush(tag, oldtag)))
                    await slot.event.wait()
                if scope.cancelled_caught:
                    self._close("flush not answered")
            except ConnectionClosed as e:
                self._close(str(e))
            finally:
                del self._pending[tag]
                self._free_tags.append(tag)

    def new_fid(self) -> int:
        if self._free_fids:
            return self._free_fids.pop()
        self._next_fid += 1
        return self._next_fid - 1

    def _free_fid(self, fid: int) -> None:
        self._free_fids.append(fid)

    async def attach(self, aname: str = "") -> int:
        fid = self.new_fid()
        try:
            await self.rpc(m.Tattach(0, fid, self.user, aname))
        except BaseException:
            self._free_fid(fid)
            raise
        self.root = fid
        return fid

    async def walk(
        self, fid: int, names: list[str] | tuple[str, ...] = ()
    ) -> tuple[int, list[m.Qid]]:
        """A new fid for ``names`` under ``fid`` (a clone if empty); ENOENT on a partial walk."""
        newfid, qids, _ = await self._walk(fid, names, False)
        return newfid, qids

    async def walk_stat(
        self, fid: int, names: list[str] | tuple[str, ...]
    ) -> tuple[int, list[m.Qid], m.Stat]:
        """As ``walk``, and the stat of the file reached, in one round trip (Twalkstat)."""
        newfid, qids, st = await self._walk(fid, names, True)
        assert st is not None
        return newfid, qids, st

    async def walk_open(
        self, fid: int, names: list[str] | tuple[str, ...], mode: int, count: int = 0
    ) -> tuple[int, m.Rwalkopen]:
        """A new fid for ``names`` under ``fid``, opened with ``mode``, in one round trip
        (Twalkopen) when the path fits one walk; with ``count``, the reply may carry the
        file's first ``count`` bytes (flag OF_HEAD)."""
        if len(names) > m.MAXWELEM:
            newfid, _ = await self.walk(fid, names)
            try:
                r = await self.open(newfid, mode)
            except BaseException:
                await self._clunk_quietly(newfid)
                raise
            return newfid, m.Rwalkopen(r.tag, r.qid, r.iounit, r.flags, b"")
        newfid = self.new_fid()
        try:
            return newfid, await self.rpc(m.Twalkopen(0, fid, newfid, list(names), mode, count))
        except BaseException as e:
            await self._abandon(newfid, e)
            raise

    async def _walk(
        self, fid: int, names: list[str] | tuple[str, ...], with_stat: bool
    ) -> tuple[int, list[m.Qid], m.Stat | None]:
        newfid = self.new_fid()
        qids: list[m.Qid] = []
        names, src, made = list(names), fid, False
        try:
            while True:
                part, names = names[: m.MAXWELEM], names[m.MAXWELEM :]
                if with_stat and not names:  # the last piece brings the stat along
                    r = await self.rpc(m.Twalkstat(0, src, newfid, part))
                    return newfid, [*qids, *r.qids], r.stat
                r = await self.rpc(m.Twalk(0, src, newfid, part))
                if len(r.qids) < len(part):
                    raise NineError("ENOENT", f"no {part[len(r.qids)]!r}")
                made, src = True, newfid
                qids.extend(r.qids)
                if not names:
                    return newfid, qids, None
        except BaseException as e:
            await self._abandon(newfid, e, made)
            raise

    async def _abandon(self, newfid: int, exc: BaseException, made: bool = False) -> None:
        """Forget ``newfid`` after a call that was to make it failed with ``exc``. If the
        node answered with an error, it exists only if an earlier step made it; if the
        answer never came (a deadline, a cancel), we cannot know, so it is clunked."""
        answered = isinstance(exc, NineError) and exc.ename != "ETIMEDOUT"
        if answered and not made:
            self._free_fid(newfid)
        elif isinstance(exc, NineError) and not answered and self._bg is not None:
            self._bg.start_soon(self._clunk_quietly, newfid)  # not past the caller's deadline
        else:
            await self._clunk_quietly(newfid)

    async def _clunk_quietly(self, fid: int) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT):
            try:
                await self.clunk(fid)
            except NineError:
                pass

    async def open(self, fid: int, mode: int) -> m.Ropen:
        return await self.rpc(m.Topen(0, fid, mode))

    async def create(self, fid: int, name: str, perm: int, mode: int) -> m.Rcreate:
        return await self.rpc(m.Tcreate(0, fid, name, perm, mode))

    async def read(
        self, fid: int, offset: int, count: int, timeout: float | None = DATA_TIMEOUT
    ) -> bytes:
        r = await self.rpc(m.Tread(0, fid, offset, min(count, self.iounit)), timeout)
        return r.data

    async def write(
        self, fid: int, offset: int, data: bytes, timeout: float | None = DATA_TIMEOUT
    ) -> int:
        """Write all of ``data`` in iounit pieces; returns the count the node took."""
        done = 0
        view = memoryview(data)
        while True:
            part = view[done : done + self.iounit]
            r = await self.rpc(m.Twrite(0, fid, offset + done, part), timeout)
            done += r.count
            if done >= len(data) or r.count == 0:
                return done

    async def clunk(self, fid: int) -> None:
        try:
            await self.rpc(m.Tclunk(0, fid))
        finally:
            self._free_fid(fid)  # a clunked fid is gone even when the clunk failed

    def clunk_later(self, fid: int) -> None:
        """Clunk ``fid`` soon, without waiting: the fids given within CLUNK_DELAY (or until
        MAXCLUNK of them) go in one Tclunkmany, so a mount that looks up or opens file after
        file sends one clunk message per batch, not one per file. The fid is free for reuse
        once its batch is answered."""
        self._to_clunk.append(fid)
        if len(self._to_clunk) >= m.MAXCLUNK:
            self._clunk_full.set()
        if not self._clunking and self._bg is not None and not self.closed.is_set():
            self._clunking = True
            self._bg.start_soon(self._clunk_batches)

    async def _clunk_batches(self) -> None:
        try:
            while self._to_clunk:
                with trio.move_on_after(CLUNK_DELAY):
                    await self._clunk_full.wait()
                self._clunk_full = trio.Event()
                batch = self._to_clunk[: m.MAXCLUNK]
                del self._to_clunk[: m.MAXCLUNK]
                try:
                    with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT):
                        await self.rpc(m.Tclunkmany(0, batch))
                except NineError:
                    pass  # as for Tclunk: the fids are gone either way
                finally:
                    for fid in batch:
                        self._free_fid(fid)
        finally:
            self._clunking = False

    async def remove(self, fid: int) -> None:
        try:
            await self.rpc(m.Tremove(0, fid))
        finally:
            self._free_fid(fid)

    async def stat(self, fid: int) -> m.Stat:
        return (await self.rpc(m.Tstat(0, fid))).stat

    async def wstat(self, fid: int, **changes: int) -> None:
        await self.rpc(m.Twstat(0, fid, changes))

    async def readdir(self, fid: int, offset: int, count: int = 1024) -> list[m.Stat]:
        return (await self.rpc(m.Treaddir(0, fid, offset, count))).entries

    async def read_dir(
        self,
        fid: int,
        take: Callable[[list[m.Stat]], Awaitable[None]],
        ahead: int = READDIR_AHEAD,
    ) -> None:
        """All of an open directory's entries, handed to ``take`` batch by batch in order
        as they arrive, with ``ahead`` Treaddirs in flight (the node takes the next batch's
        stats while this one travels and is used); ``take`` may wait, to slow the
        listing down to its reader."""
        # a batch small enough that no reply is ever cut to fit msize (an entry is at most
        # ~900 bytes), so that a reply shorter than asked is the end
        chunk = max(1, min(READDIR_CHUNK, (self.msize - m.HEADER_ROOM) // 1024))
        got: dict[int, list[m.Stat] | NineError] = {}
        arrived = {i: trio.Event() for i in range(ahead)}

        async def fetch(i: int) -> None:
            try:
                got[i] = await self.readdir(fid, i * chunk, chunk)
            except NineError as e:  # raised in order, by the loop below
                got[i] = e
            arrived[i].set()

        with collapse_groups():
            async with trio.open_nursery() as n:
                for i in range(ahead):
                    n.start_soon(fetch, i)
                i = 0
                while True:
                    await arrived[i].wait()
                    batch = got.pop(i)
                    del arrived[i]
                    if isinstance(batch, NineError):
                        raise batch
                    if batch:
                        await take(batch)
                    if len(batch) < chunk:
                        break  # the end: what is still in flight comes back empty
                    arrived[i + ahead] = trio.Event()
                    n.start_soon(fetch, i + ahead)
                    i += 1

    async def rename(self, fid: int, newdirfid: int, newname: str) -> None:
        await self.rpc(m.Trename(0, fid, newdirfid, newname))

    async def fsync(self, fid: int) -> None:
        await self.rpc(m.Tfsync(0, fid), DATA_TIMEOUT)

    async def statfs(self, fid: int) -> m.StatFs:
        return (await self.rpc(m.Tstatfs(0, fid))).statfs

    async def symlink(self, fid: int, name: str, target: str) -> m.Qid:
        return (await self.rpc(m.Tsymlink(0, fid, name, target))).qid

    async def readlink(self, fid: int) -> str:
        return (await self.rpc(m.Treadlink(0, fid))).target

    async def ping(self, timeout: float = META_TIMEOUT) -> None:
        await self.rpc(m.Tping(0), timeout)

    # -- whole-path helpers, for the CLI, tests and scripts ------------------------------

    async def _root(self) -> int:
        return self.root if self.root is not None else await self.attach()

    async def walk_path(self, path: str) -> int:
        # Twalkstat, not Twalk: a walk that stops short says why (EACCES, ENOTDIR, ...)
        return (await self.walk_stat(await self._root(), split_path(path)))[0]

    async def open_path(self, path: str, mode: int) -> int:
        """A new fid for ``path``, open with ``mode``."""
        return (await self.walk_open(await self._root(), split_path(path), mode))[0]

    async def read_file(self, path: str, timeout: float | None = DATA_TIMEOUT) -> bytes:
        root = await self._root()
        fid, r = await self.walk_open(root, split_path(path), m.OREAD, self.iounit)
        try:
            chunks, offset = [], 0
            if r.flags & m.OF_HEAD:
                if r.flags & m.OF_SYNTHETIC and len(r.data) < self.iounit:
                    return bytes(r.data)  # a snapshot that came up short: all of it
                chunks.append(r.data)
                offset = len(r.data)
            while data := await self.read(fid, offset, self.iounit, timeout):
                chunks.append(data)
                offset += len(data)
            return b"".join(chunks)
        finally:
            self.clunk_later(fid)  # closing has no effect to wait for: no round trip

    async def write_file(self, path: str, data: bytes, *, truncate: bool = True) -> int:
        fid = await self.open_path(path, m.OWRITE | (m.OTRUNC if truncate else 0))
        try:
            return await self.write(fid, 0, data)
        finally:
            self.clunk_later(fid)  # the write has taken effect (a ctl's) or failed

    async def list_dir(self, path: str) -> list[m.Stat]:
        fid = await self.open_path(path, m.OREAD)
        try:
            out: list[m.Stat] = []

            async def take(batch: list[m.Stat]) -> None:
                out.extend(batch)

            await self.read_dir(fid, take)
            return out
        finally:
            self.clunk_later(fid)  # no round trip of its own

    async def stat_path(self, path: str) -> m.Stat:
        fid = await self.walk_path(path)
        try:
            return await self.stat(fid)
        finally:
            await self._clunk_quietly(fid)


def split_path(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


@asynccontextmanager
async def connect(
    addr: str,
    identity: nacl.signing.SigningKey,
    user: str,
    known: KnownNodes | None,
    *,
    msize: int = DEFAULT_MSIZE,
) -> AsyncIterator[Client]:
    """A connected, version-negotiated, attached Client, closed on exit."""
    channel = await dial(addr, identity, user, known)
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            client = Client(channel, user, msize=msize)
            try:
                await nursery.start(client.run)
                await client.attach()
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
