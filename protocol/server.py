"""The server end of a session: version, the fid table, and dispatch to a Tree.

As in lib9p's srv.c, each request type has one handler; the handlers check the fids and
modes and call the tree. Requests run concurrently (up to ``max_inflight``), replies go out
in whatever order they finish, and Tflush cancels the request it names and is answered only
after that request has finished.

Concurrency: the task that reads a request runs its handler at once, and most handlers
(a walk, a stat, a read of a snapshot) finish without blocking: that request costs no task
and no trip through the scheduler. A handler that blocks (a thread, a wait) keeps the task
that read it, and a new task takes over reading: leader/follower, as pyfuse3's workers and
lib9p's srv loop (which calls walk and stat in line) do. So a Tree's methods may block when
they need to, but what is cheap should not.
"""

from __future__ import annotations

import errno
import logging
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import messages as m
from .errors import NineError, ProtocolError, collapse_groups
from .framing import LEN_SIZE, SPARES
from .fs import File, Handle, Principal, Tree
from .sealing import MAX_ABYTES
from .transport import Channel, ConnectionClosed, take

log = logging.getLogger(__name__)

DEFAULT_MSIZE = 4 << 20
BIG_READ = 64 << 10  # reads at least this long go straight into their reply's frame
FAIR_EVERY = 16  # requests handled in line between yields to the other connections


@dataclass(slots=True)
class Prepared:
    """A reply already laid out in its frame buffer (Channel.send_prepared): ``n`` bytes of
    plaintext after LEN_SIZE bytes of room; the buffer is one of SPARES."""

    buf: bytearray
    n: int


@dataclass
class Fid:
    file: File
    handle: Handle | None = None
    mode: int = 0
    listing: list[m.Stat] | None = None
    inflight: int = 0
    clunked: bool = False
    closed: trio.Event = field(default_factory=trio.Event)


class _Request:
    __slots__ = ("scope", "done", "replying")

    def __init__(self, scope: trio.CancelScope, done: trio.Event) -> None:
        self.scope = scope
        self.done = done
        self.replying = False  # the reply is being sent: the client may already reuse the tag


def _clip(text: str) -> str:
    """An error message that the peer's strict decoder accepts: at most MAXSTR bytes of
    valid UTF-8 (cut on a character boundary), no NUL, no lone surrogates."""
    raw = text.replace("\0", " ").encode("utf-8", "replace")
    return raw[: m.MAXSTR].decode("utf-8", "ignore")


@types.coroutine
def _carry_on(coro, trap):  # type: ignore[no-untyped-def]
    """Drive ``coro`` on from where it first blocked (having yielded ``trap``) as part of
    the current task, which is the one that started it: trio's traps name that task."""
    while True:
        try:
            sent = yield trap
        except BaseException as e:  # trio sends outcomes, but be exact about the rest
            try:
                trap = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _check_name(name: str) -> None:
    if name in (".", ".."):
        raise NineError("EINVAL", f"bad name {name!r}")


class Session:
    """One connection's session: what one client sees of one tree."""

    def __init__(
        self,
        tree: Tree,
        principal: Principal,
        *,
        msize: int = DEFAULT_MSIZE,
        max_fids: int = 4096,
        max_inflight: int = 256,
        max_queued: int = 64,
        max_flushes: int = 64,
        stats: dict[str, int] | None = None,
    ) -> None:
        self.tree = tree
        self.stats = {"requests_total": 0} if stats is None else stats  # shared: the node's
        self.principal = principal
        self.max_msize = msize
        self.msize = 0
        self.max_fids = max_fids
        self.fids: dict[int, Fid] = {}
        self.requests: dict[int, _Request] = {}
        # Handlers running at once; requests read but waiting for a handler slot (the read
        # loop goes on reading past them, so a Tflush still gets through when every slot is
        # busy); each holds its place until its reply is sent, so a client that stops reading
        # makes the node stop reading it, never buffer replies without bound.
        self._slots = trio.Semaphore(max_inflight)
        self._admitted = trio.Semaphore(max_inflight + max_queued)
        self._flushes = trio.Semaphore(max_flushes)  # Tflushes waiting for their request
        self._handlers: dict[type, Callable[[m.Msg], Awaitable[m.Msg | bytes | Prepared]]] = {
            m.Tattach: self.attach, m.Twalk: self.walk, m.Topen: self.open,
            m.Tcreate: self.create, m.Tread: self.read, m.Twrite: self.write,
            m.Tclunk: self.clunk, m.Tclunkmany: self.clunkmany,
            m.Tremove: self.remove, m.Tstat: self.stat,
            m.Twstat: self.wstat, m.Treaddir: self.readdir, m.Trename: self.rename,
            m.Tfsync: self.fsync, m.Tstatfs: self.statfs, m.Tsymlink: self.symlink,
            m.Treadlink: self.readlink, m.Tping: self.ping, m.Twalkstat: self.walkstat,
            m.Twalkopen: self.walkopen,
        }  # fmt: skip

    # -- the loop ----------------------------------------------------------------------

    async def serve(self, ch: Channel) -> None:
        """Serve until the peer goes away or breaks the protocol; always cleans up fids."""
        self.channel = ch
        try:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    # the reader's error (the peer went, or broke the protocol) cancels the
                    # requests in flight and ends the session
                    nursery.start_soon(self._read_loop, ch, nursery)
        except ProtocolError as e:
            log.warning("%s: closing: %s", ch.peer, e)
        except ConnectionClosed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self._clunk_all()
                await ch.aclose()

    async def _read_loop(self, ch: Channel, nursery: trio.Nursery) -> None:
        """Read and handle requests until one blocks; then carry that one to its end and
        leave the reading to a new task (see the module's docstring)."""
        handled = 0
        while True:
            msg = m.decode(await ch.receive())
            if not m.is_request(msg):
                raise ProtocolError(f"{type(msg).__name__} is not a request")
            self.stats["requests_total"] += 1
            if isinstance(msg, m.Tversion):
                await self._version(msg)
                continue
            if not self.msize:
                raise ProtocolError("the first message must be Tversion")
            old = self.requests.get(msg.tag)
            if (old is not None and not old.replying) or msg.tag == m.NOTAG:
                raise ProtocolError(f"tag {msg.tag} is already in use")
            if isinstance(msg, m.Tflush):
                await take(self._flushes)  # bounded: stop reading when too many wait
                nursery.start_soon(self._flush, msg)
                continue
            await take(self._admitted)  # backpressure: stop reading when too much is queued
            req = _Request(trio.CancelScope(), trio.Event())
            self.requests[msg.tag] = req
            run = self._run(msg, req)
            try:
                trap = run.send(None)
            except StopIteration:  # done without blocking: reply sent
                handled += 1
                if handled % FAIR_EVERY == 0:  # a busy client must not starve the others
                    await trio.lowlevel.checkpoint()
                continue
            nursery.start_soon(self._read_loop, ch, nursery)
            await _carry_on(run, trap)
            return

    async def _run(self, msg: m.Msg, req: _Request) -> None:
        try:
            reply: m.Msg | bytes | Prepared | None = None
            try:
                with req.scope:
                    await take(self._slots)  # a Tflush may cancel the wait for a slot too
                    try:
                        reply = await self._handlers[type(msg)](msg)
                    finally:
                        self._slots.release()
            except NineError as e:
                reply = m.Rerror(msg.tag, e.ename, _clip(e.message))
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, "EIO")
                reply = m.Rerror(msg.tag, name, _clip(e.strerror or name))
            except Exception:
                log.exception("%s: %s failed", self.channel.peer, type(msg).__name__)
                reply = m.Rerror(msg.tag, "EIO", "internal server error")
            if reply is not None:  # None: a Tflush cancelled it, and 9P sends no reply then
                req.replying = True
                await self._send(reply)
        finally:
            if self.requests.get(msg.tag) is req:
                del self.requests[msg.tag]
            req.done.set()
            self._admitted.release()

    async def _send(self, reply: m.Msg | bytes | Prepared) -> None:
        if isinstance(reply, Prepared):
            try:
                await self.channel.send_prepared(reply.buf, reply.n, spare=True)
            except ConnectionClosed:
                pass
            return
        try:
            body = reply if isinstance(reply, bytes) else m.encode(reply)  # bytes: encoded
        except Exception:  # e.g. a name with lone surrogates: fail this request, not the session
            log.exception("%s: cannot encode %s", self.channel.peer, type(reply).__name__)
            body = m.encode(m.Rerror(reply.tag, "EIO", "the reply could not be encoded"))
        try:
            await self.channel.send(body)
        except ConnectionClosed:
            pass  # the read loop sees it too and ends the session

    async def _version(self, msg: m.Tversion) -> None:
        # A request whose reply is being sent is done as far as the client knows.
        if any(not r.replying for r in self.requests.values()):
            raise ProtocolError("Tversion with requests in flight")
        await self._clunk_all()
        if msg.version != m.VERSION or msg.msize < m.MIN_MSIZE:
            self.msize = 0
            await self._send(m.Rversion(msg.tag, min(msg.msize, self.max_msize), "unknown"))
            return
        self.msize = min(msg.msize, self.max_msize)
        self.channel.set_limit(self.msize)
        await self._send(m.Rversion(msg.tag, self.msize, m.VERSION))

    async def _flush(self, msg: m.Tflush) -> None:
        # 9P: Rflush is never an error; if the old request is still running, cancel it and
        # answer only once it has finished, so its tag is free when the client sees Rflush.
        try:
            req = self.requests.get(msg.oldtag)
            if req is not None and msg.oldtag != msg.tag:
                req.scope.cancel()
                await req.done.wait()
            await self._send(m.Rflush(msg.tag))
        finally:
            self._flushes.release()

    # -- fids --------------------------------------------------------------------------

    def _fid(self, n: int) -> Fid:
        f = self.fids.get(n)
        if f is None:
            raise NineError("EBADF", f"unknown fid {n}")
        return f

    def _new_fid(self, n: int, file: File) -> Fid:
        if n in self.fids:
            raise NineError("EBADF", f"fid {n} is in use")
        if n == m.NOFID:
            raise NineError("EBADF", "NOFID is not a fid")
        if len(self.fids) >= self.max_fids:
            raise NineError("EMFILE", f"too many fids (limit {self.max_fids})")
        f = self.fids[n] = Fid(file)
        return f

    def _opened(self, n: int) -> Fid:
        f = self._fid(n)
        if f.handle is None:
            raise NineError("EBADF", f"fid {n} is not open")
        return f

    async def _release(self, f: Fid) -> None:
        if f.clunked and f.inflight == 0 and not f.closed.is_set():
            f.closed.set()
            if f.handle is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await f.handle.close()
                    except Exception:
                        log.exception("closing a handle failed")

    async def _clunk_all(self) -> None:
        fids, self.fids = self.fids, {}
        for f in fids.values():
            f.clunked = True
            await self._release(f)

    async def _with_handle(self, n: int, op: Callable[[Fid], Awaitable[m.Msg]]) -> m.Msg:
        """Run ``op`` on an open fid, keeping a clunk from closing the handle under it."""
        f = self._opened(n)
        f.inflight += 1
        try:
            return await op(f)
        finally:
            f.inflight -= 1
            await self._release(f)

    def _check_write(self) -> None:
        if self.principal.read_only:
            raise NineError("EROFS", "this key may only read")

    # -- handlers ----------------------------------------------------------------------

    async def ping(self, msg: m.Tping) -> m.Msg:
        return m.Rping(msg.tag)

    async def attach(self, msg: m.Tattach) -> m.Msg:
        # One identity per connection: the name must be the one the handshake proved.
        if msg.uname != self.principal.user:
            raise NineError("EACCES", f"this connection is {self.principal.user!r}")
        if msg.fid in self.fids:
            raise NineError("EBADF", f"fid {msg.fid} is in use")
        root = await self.tree.attach(self.principal, msg.aname)
        self._new_fid(msg.fid, root)
        return m.Rattach(msg.tag, root.qid)

    async def _walk(
        self, fid: int, newfid: int, names: list[str], whole: bool = False
    ) -> tuple[Fid, File | None, list[m.Qid]]:
        """Walk ``names`` from ``fid``: the file reached (None for a partial walk) and the
        qids on the way. Nothing is bound yet: ``_bind`` does that. ``whole``: a partial
        walk is the error of the name that failed (Twalkstat, Twalkopen)."""
        f = self._fid(fid)
        if f.handle is not None:
            raise NineError("EBADF", "cannot walk an open fid")
        if newfid != fid and newfid in self.fids:
            raise NineError("EBADF", f"fid {newfid} is in use")
        file, qids = f.file, []
        for i, name in enumerate(names):
            try:
                file = await file.walk(name)
            except NineError:
                if i == 0 or whole:
                    raise
                return f, None, qids  # a partial walk: newfid is not made
            qids.append(file.qid)
        return f, file, qids

    def _bind(self, f: Fid, fid: int, newfid: int, file: File) -> None:
        if newfid == fid:
            if self.fids.get(fid) is not f:
                raise NineError("EBADF", f"fid {fid} was clunked during the walk")
            f.file = file
        else:
            self._new_fid(newfid, file)

    async def walk(self, msg: m.Twalk) -> m.Msg:
        f, file, qids = await self._walk(msg.fid, msg.newfid, msg.names)
        if file is not None:
            self._bind(f, msg.fid, msg.newfid, file)
        return m.Rwalk(msg.tag, qids)

    async def walkstat(self, msg: m.Twalkstat) -> bytes:
        # Twalk and Tstat in one round trip: what a lookup needs (the stat comes first, so
        # a failed stat leaves no newfid behind)
        f, file, qids = await self._walk(msg.fid, msg.newfid, msg.names, whole=True)
        assert file is not None
        st = await file.stat()
        try:  # encoded before the bind: a reply that cannot be sent must not leave newfid
            body = m.encode(m.Rwalkstat(msg.tag, qids, st))
        except Exception:
            log.exception("%s: cannot encode the stat of %s", self.channel.peer, msg.names)
            raise NineError("EIO", "the reply could not be encoded") from None
        self._bind(f, msg.fid, msg.newfid, file)
        return body

    def _open_mode_check(self, mode: int) -> None:
        if (mode & 3) in (m.OWRITE, m.ORDWR) or mode & (m.OTRUNC | m.ORCLOSE):
            self._check_write()

    async def open(self, msg: m.Topen) -> m.Msg:
        f = self._fid(msg.fid)
        if f.handle is not None:
            raise NineError("EBADF", "fid is already open")
        self._open_mode_check(msg.mode)
        h = await f.file.open(msg.mode)
        if self.fids.get(msg.fid) is not f or f.handle is not None:
            await h.close()
            raise NineError("EBADF", "fid changed while opening")
        f.handle, f.mode = h, msg.mode
        return m.Ropen(msg.tag, f.file.qid, self._iounit(h), h.flags)

    async def walkopen(self, msg: m.Twalkopen) -> m.Msg:
        # Twalk and Topen in one round trip: what an open(2) needs. newfid is made only
        # once the open has succeeded.
        f, file, qids = await self._walk(msg.fid, msg.newfid, msg.names, whole=True)
        assert file is not None
        self._open_mode_check(msg.mode)
        h = await file.open(msg.mode)
        try:
            self._bind(f, msg.fid, msg.newfid, file)
        except BaseException:
            await h.close()
            raise
        nf = self.fids[msg.newfid]
        nf.handle, nf.mode = h, msg.mode
        iounit, flags, data = self._iounit(h), h.flags, b""
        if msg.count and h.head and (msg.mode & 3) != m.OWRITE:
            # the first bytes along with the open (a small file in one round trip); if the
            # read fails the open still stands, and a Tread will meet the error
            try:
                data = await h.read(0, min(msg.count, iounit))
                flags |= m.OF_HEAD
            except NineError:
                data = b""
        return m.Rwalkopen(msg.tag, file.qid, iounit, flags, data)

    def _iounit(self, h: Handle) -> int:
        limit = self.msize - m.HEADER_ROOM
        return min(h.iounit, limit) if h.iounit else limit

    async def create(self, msg: m.Tcreate) -> m.Msg:
        f = self._fid(msg.fid)
        if f.handle is not None:
            raise NineError("EBADF", "fid is already open")
        self._check_write()
        _check_name(msg.name)
        file, h = await f.file.create(msg.name, msg.perm, msg.mode)
        if self.fids.get(msg.fid) is not f or f.handle is not None:
            await h.close()
            raise NineError("EBADF", "fid changed while creating")
        f.file, f.handle, f.mode = file, h, msg.mode
        return m.Rcreate(msg.tag, file.qid, self._iounit(h), h.flags)

    async def read(self, msg: m.Tread) -> m.Msg | Prepared:
        count = min(msg.count, self.msize - m.HEADER_ROOM)

        async def op(f: Fid) -> m.Msg | Prepared:
            if (f.mode & 3) == m.OWRITE:
                raise NineError("EBADF", "not open for reading")
            read_into = getattr(f.handle, "read_into", None)
            if read_into is not None and count >= BIG_READ:
                # read straight into the reply's frame, sealed where it lies: no copies
                head = m.encode(m.Rread(msg.tag, b""))
                start = LEN_SIZE + len(head)
                buf = SPARES.take(start + count + MAX_ABYTES)
                buf[LEN_SIZE:start] = head
                with memoryview(buf) as view:
                    got = await read_into(msg.offset, view[start : start + count])
                return Prepared(buf, len(head) + min(got, count))
            data = await f.handle.read(msg.offset, count)
            return m.Rread(msg.tag, data[:count])

        return await self._with_handle(msg.fid, op)

    async def write(self, msg: m.Twrite) -> m.Msg:
        async def op(f: Fid) -> m.Msg:
            if (f.mode & 3) not in (m.OWRITE, m.ORDWR):
                raise NineError("EBADF", "not open for writing")
            data = msg.data  # a view of its frame if big: as bytes unless the handle takes views
            if type(data) is not bytes and not f.handle.takes_views:
                data = bytes(data)
            return m.Rwrite(msg.tag, await f.handle.write(msg.offset, data))

        return await self._with_handle(msg.fid, op)

    async def readdir(self, msg: m.Treaddir) -> m.Msg:
        async def op(f: Fid) -> m.Msg:
            entries = await f.handle.readdir(msg.offset, max(1, min(msg.count, m.MAXENTRIES)))
            # keep the reply inside msize: about 100 bytes an entry, plus the names
            out, size = [], 32
            for e in entries:
                size += 96 + len(e.name.encode()) + len(e.uid) + len(e.gid)
                if size > self.msize and out:
                    break
                out.append(e)
            return m.Rreaddir(msg.tag, out)

        return await self._with_handle(msg.fid, op)

    async def fsync(self, msg: m.Tfsync) -> m.Msg:
        async def op(f: Fid) -> m.Msg:
            await f.handle.fsync()
            return m.Rfsync(msg.tag)

        return await self._with_handle(msg.fid, op)

    async def clunk(self, msg: m.Tclunk) -> m.Msg:
        await self._clunk(msg.fid)
        return m.Rclunk(msg.tag)

    async def clunkmany(self, msg: m.Tclunkmany) -> m.Msg:
        # Tclunk for each, in order; every known fid is clunked even if another is not
        unknown = []
        for fid in msg.fids:
            try:
                await self._clunk(fid)
            except NineError:
                unknown.append(fid)
        if unknown:
            raise NineError("EBADF", f"unknown fids {unknown[:8]}")
        return m.Rclunkmany(msg.tag)

    async def _clunk(self, fid: int) -> None:
        f = self.fids.pop(fid, None)
        if f is None:
            raise NineError("EBADF", f"unknown fid {fid}")
        f.clunked = True
        await self._release(f)
        if f.handle is not None and f.mode & m.ORCLOSE:
            try:
                await f.file.remove()
            except NineError:
                pass

    async def remove(self, msg: m.Tremove) -> m.Msg:
        # 9P: remove clunks the fid even when the remove fails.
        f = self.fids.pop(msg.fid, None)
        if f is None:
            raise NineError("EBADF", f"unknown fid {msg.fid}")
        f.clunked = True
        try:
            self._check_write()
            await f.file.remove()
        finally:
            await self._release(f)
        return m.Rremove(msg.tag)

    async def stat(self, msg: m.Tstat) -> m.Msg:
        return m.Rstat(msg.tag, await self._fid(msg.fid).file.stat())

    async def wstat(self, msg: m.Twstat) -> m.Msg:
        f = self._fid(msg.fid)
        self._check_write()
        await f.file.wstat(msg.changes)
        return m.Rwstat(msg.tag)

    async def rename(self, msg: m.Trename) -> m.Msg:
        f, d = self._fid(msg.fid), self._fid(msg.newdirfid)
        self._check_write()
        _check_name(msg.newname)
        await f.file.rename(d.file, msg.newname)
        return m.Rrename(msg.tag)

    async def statfs(self, msg: m.Tstatfs) -> m.Msg:
        return m.Rstatfs(msg.tag, await self._fid(msg.fid).file.statfs())

    async def symlink(self, msg: m.Tsymlink) -> m.Msg:
        f = self._fid(msg.fid)
        self._check_write()
        _check_name(msg.name)
        file = await f.file.symlink(msg.name, msg.target)
        return m.Rsymlink(msg.tag, file.qid)

    async def readlink(self, msg: m.Treadlink) -> m.Msg:
        return m.Rreadlink(msg.tag, await self._fid(msg.fid).file.readlink())
