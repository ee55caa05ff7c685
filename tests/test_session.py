"""Sessions over real sockets: a real node daemon (the fixtures), or an in-process server where
a test needs a file that blocks. Misbehaving peers are driven by hand on a raw socket with
protocol.handshake and protocol.sealing; whatever one connection does, the daemon keeps
serving the others.
"""

from __future__ import annotations

import functools
import os

import nacl.signing
import nacl.utils
import pytest
import trio
import trio.testing

from ninefs.protocol import messages as m
from ninefs.protocol.client import connect
from ninefs.protocol.errors import NineError, ProtocolError
from ninefs.protocol.framing import FrameReader, frame
from ninefs.protocol.fs import File, Handle, Principal, Tree
from ninefs.protocol.handshake import (
    MAX_HANDSHAKE_MSG,
    ClientHandshake,
    Refused,
    TrafficKeys,
)
from ninefs.protocol.keys import (
    AuthorizedUsers,
    Grant,
    HostKeyChanged,
    KnownNodes,
    encode_public,
    fingerprint,
)
from ninefs.protocol.sealing import AegisOpener, AegisSealer, Opener, Sealer, opener_for, sealer_for
from ninefs.protocol.server import Session
from ninefs.protocol.transport import Channel, ConnectionClosed, accept, dial, open_stream

T = 20  # seconds: the deadline of every test step (generous for a loaded 2-core machine)


# -- a hand-driven connection ------------------------------------------------------------


class Raw:
    """A client connection driven by hand: raw bytes, or sealed bodies of our choosing."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = FrameReader(MAX_HANDSHAKE_MSG)
        self.sealer: Sealer | AegisSealer | None = None
        self.opener: Opener | AegisOpener | None = None
        self.keys: TrafficKeys | None = None

    @classmethod
    async def open(cls, addr: str) -> Raw:
        return cls(await open_stream(addr))

    async def _frame(self) -> bytes:
        while (body := self.reader.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionClosed("closed")
            self.reader.feed(data)
        return body

    async def handshake(self, key: nacl.signing.SigningKey, user: str) -> None:
        hs = ClientHandshake(key, user)
        await self.stream.send_all(frame(hs.hello()))
        msg3 = hs.on_reply(await self._frame())
        await self.stream.send_all(frame(msg3))
        self.keys = hs.on_verdict(await self._frame())
        self.reader.limit = m.MAX_MSIZE + 64
        self.sealer = sealer_for(self.keys.suite, self.keys.send)
        await self.stream.send_all(frame(self.sealer.header))

    def seal(self, msg: m.Msg | bytes) -> bytes:
        """One sealed frame, ready for the wire."""
        body = msg if isinstance(msg, bytes) else m.encode(msg)
        return frame(self.sealer.seal(body))

    async def send(self, *msgs: m.Msg | bytes) -> None:
        await self.stream.send_all(b"".join(self.seal(x) for x in msgs))

    async def recv(self) -> m.Msg:
        if self.opener is None:
            self.opener = opener_for(self.keys.suite, self.keys.recv, await self._frame())
        return m.decode(self.opener.open(await self._frame()))

    async def version(self, msize: int = 1 << 20) -> m.Rversion:
        await self.send(m.Tversion(m.NOTAG, msize, m.VERSION))
        r = await self.recv()
        assert isinstance(r, m.Rversion) and r.version == m.VERSION
        return r

    async def expect_closed(self) -> None:
        """Read (and drop) whatever comes until the node closes the connection."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, ConnectionError):
                return  # a reset: the node closed with our bytes unread
            if not data:
                return

    async def aclose(self) -> None:
        await self.stream.aclose()


async def wait_for_log(node, text: str) -> str:
    """The node's log once it holds ``text`` (polled: a log line has no event to wait on)."""
    while True:
        log = node.log.read_text(errors="replace")
        if text in log:
            return log
        await trio.sleep(0.02)


async def still_serving(client) -> None:
    assert await client.read_file("/node/name") == b"n1\n"


# -- fids, tags, flush -------------------------------------------------------------------


async def test_fid_misuse(client):
    with trio.fail_after(T):
        root = client.root
        fid = await client.walk_path("/node/name")
        # a newfid that is in use
        with pytest.raises(NineError) as e:
            await client.rpc(m.Twalk(0, root, fid, []))
        assert e.value.ename == "EBADF"
        with pytest.raises(NineError):
            await client.rpc(m.Tattach(0, fid, client.user, ""))
        with pytest.raises(NineError, match="NOFID"):
            await client.rpc(m.Twalk(0, root, m.NOFID, []))
        # reading a fid that is not open; writing one open for reading
        with pytest.raises(NineError, match="not open"):
            await client.read(fid, 0, 10)
        await client.open(fid, m.OREAD)
        with pytest.raises(NineError, match="writing"):
            await client.rpc(m.Twrite(0, fid, 0, b"x"))
        # an open fid cannot be walked, cloned or opened again
        for req in (m.Twalk(0, fid, client.new_fid(), []), m.Twalk(0, fid, fid, []),
                    m.Topen(0, fid, m.OREAD)):  # fmt: skip
            with pytest.raises(NineError) as e:
                await client.rpc(req)
            assert e.value.ename == "EBADF"
        assert await client.read(fid, 0, 100) == b"n1\n"
        # use after clunk
        await client.clunk(fid)
        for req in (m.Tstat(0, fid), m.Tread(0, fid, 0, 1), m.Tclunk(0, fid),
                    m.Twalk(0, fid, client.new_fid(), [])):  # fmt: skip
            with pytest.raises(NineError) as e:
                await client.rpc(req)
            assert e.value.ename == "EBADF"
        # the root is untouched by all this
        assert (await client.stat(root)).qid.type & m.QTDIR


async def test_walk_semantics(client):
    with trio.fail_after(T):
        root, nf = client.root, client.new_fid()
        # a partial walk: the qids of the names that worked, and newfid is not made
        r = await client.rpc(m.Twalk(0, root, nf, ["node", "nope", "deeper"]))
        assert len(r.qids) == 1 and r.qids[0].type & m.QTDIR
        with pytest.raises(NineError, match="unknown fid"):
            await client.stat(nf)
        # the first name failing is an error
        with pytest.raises(NineError) as e:
            await client.rpc(m.Twalk(0, root, nf, ["nope"]))
        assert e.value.ename == "ENOENT"
        # a clone, then a walk of a fid onto itself
        await client.rpc(m.Twalk(0, root, nf, []))
        r = await client.rpc(m.Twalk(0, nf, nf, ["node", "name"]))
        assert [q.type for q in r.qids] == [m.QTDIR, m.QTFILE]
        assert (await client.stat(nf)).name == "name"
        # a partial walk onto itself leaves the fid where it was
        await client.rpc(m.Twalk(0, nf, nf, [".."]))
        assert (await client.stat(nf)).name == "node"
        r = await client.rpc(m.Twalk(0, nf, nf, ["name", "nope"]))
        assert len(r.qids) == 1
        assert (await client.stat(nf)).name == "node"
        await client.clunk(nf)


async def test_version_negotiation(node, identity):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.send(m.Tversion(m.NOTAG, 2**32 - 1, "9P2000"))
        assert (await raw.recv()).version == "unknown"
        await raw.send(m.Tversion(m.NOTAG, m.MIN_MSIZE - 1, m.VERSION))
        assert (await raw.recv()).version == "unknown"
        r = await raw.version(2**32 - 1)
        assert m.MIN_MSIZE <= r.msize <= m.MAX_MSIZE
        assert (await raw.version(m.MIN_MSIZE)).msize == m.MIN_MSIZE
        # a frame longer than the msize just agreed closes the connection
        await raw.send(m.Twrite(1, 1, 0, bytes(m.MIN_MSIZE)))
        await raw.expect_closed()


async def test_first_message_must_be_tversion(node, identity, client):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.send(m.Tping(1))
        await raw.expect_closed()
        await still_serving(client)


async def test_notag_is_not_a_request_tag(node, identity, client):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.version()
        await raw.send(m.Tping(m.NOTAG))
        await raw.expect_closed()
        await still_serving(client)


async def test_flush_of_unknown_tag_and_of_itself(node, identity):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.version()
        await raw.send(m.Tflush(9, 9), m.Tflush(10, 500))
        got = [await raw.recv(), await raw.recv()]
        assert sorted(got, key=lambda r: r.tag) == [m.Rflush(9), m.Rflush(10)]
        await raw.send(m.Tping(9))  # and both tags are usable again
        assert await raw.recv() == m.Rping(9)


async def test_a_thousand_concurrent_reads(client):
    with trio.fail_after(60):
        fid = await client.walk_path("/node/name")
        await client.open(fid, m.OREAD)
        results: list[bytes] = []

        async def one() -> None:
            results.append(await client.read(fid, 0, 64))

        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(one)
        assert results == [b"n1\n"] * 1000
        assert not client._pending and not client.closed.is_set()
        await client.clunk(fid)


# -- cancellation and flush, against a server with a file that blocks --------------------


class _BlockingTree(Tree):
    """A root with ``block`` (a read never returns) and ``fast``; records what reads saw."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.cancelled = trio.Event()

    async def attach(self, principal: Principal, aname: str) -> File:
        return _File(self, "", m.QTDIR)


class _File(File):
    def __init__(self, tree: _BlockingTree, name: str, qtype: int) -> None:
        self.tree, self.name, self.qtype = tree, name, qtype

    @property
    def qid(self) -> m.Qid:
        return m.Qid(self.qtype, 0, hash(self.name) & 0xFFFF)

    async def walk(self, name: str) -> File:
        if self.name or name not in ("block", "fast", "loud", "bad"):
            raise NineError("ENOENT", name)
        return _File(self.tree, name, m.QTFILE)

    async def open(self, mode: int) -> Handle:
        if self.name == "loud":  # an error message too long for MAXSTR, with a NUL in it
            raise NineError("EINVAL", "\0bad command: " + "é" * m.MAXSTR)
        return _Handle(self.tree, self.name)

    async def stat(self) -> m.Stat:  # "bad": a name msgpack cannot encode (a lone surrogate)
        name = "x\udcff" if self.name == "bad" else self.name
        return m.Stat(self.qid, 0o444, 0, 0, 0, 0, 1, "u", "g", name)


class _Handle(Handle):
    flags = m.OF_SYNTHETIC | m.OF_STREAM

    def __init__(self, tree: _BlockingTree, name: str) -> None:
        self.tree, self.name = tree, name

    async def read(self, offset: int, count: int) -> bytes:
        if self.name == "fast":
            return b"fast\n"[offset:]
        self.tree.entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.tree.cancelled.set()
            raise


async def _serve_in_process(nursery: trio.Nursery, tree: Tree) -> str:
    node_key = nacl.signing.SigningKey.generate()

    async def handler(stream: trio.SocketStream) -> None:
        try:
            ch, user, _ = await accept(stream, node_key, lambda k, u, ip: (True, ""))
        except Exception:
            await stream.aclose()
            return
        await Session(tree, Principal(user)).serve(ch)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_cancelled_call_is_flushed_and_the_connection_stays_usable():
    tree = _BlockingTree()
    me = nacl.signing.SigningKey.generate()
    with trio.fail_after(T):
        async with trio.open_nursery() as servers:
            addr = await _serve_in_process(servers, tree)
            async with connect(addr, me, "tester", None) as c:
                sent: list[m.Msg] = []
                send = c.channel.send

                async def spy(body: bytes) -> None:
                    sent.append(m.decode(body))
                    await send(body)

                c.channel.send = spy
                fid = await c.walk_path("/block")
                await c.open(fid, m.OREAD)

                # cancelled by the caller
                async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with trio.CancelScope() as scope:
                        task_status.started(scope)
                        await c.read(fid, 0, 10)

                async with trio.open_nursery() as n:
                    scope = await n.start(reader)
                    await tree.entered.wait()
                    scope.cancel()
                await tree.cancelled.wait()  # the flush reached the node and cancelled the read
                reads = [x for x in sent if isinstance(x, m.Tread)]
                flushes = [x for x in sent if isinstance(x, m.Tflush)]
                assert len(reads) == 1 and [f.oldtag for f in flushes] == [reads[0].tag]
                assert not c._pending

                # a deadline that passes is flushed the same way
                tree.entered, tree.cancelled = trio.Event(), trio.Event()
                with pytest.raises(NineError) as e:
                    await c.read(fid, 0, 10, timeout=0.5)
                assert e.value.ename == "ETIMEDOUT"
                await tree.cancelled.wait()
                assert sum(isinstance(x, m.Tflush) for x in sent) == 2

                # the connection is still good
                await c.ping()
                assert await c.read_file("/fast") == b"fast\n"
                assert not c.closed.is_set() and not c._pending
            servers.cancel_scope.cancel()


async def _blocked_read(addr: str, tree: _BlockingTree) -> Raw:
    """A raw connection with Tread tag 7 of /block in flight on the node."""
    raw = await Raw.open(addr)
    await raw.handshake(nacl.signing.SigningKey.generate(), "tester")
    await raw.version()
    await raw.send(m.Tattach(1, 0, "tester", ""), m.Twalkopen(2, 0, 1, ["block"], m.OREAD, 0))
    assert isinstance(await raw.recv(), m.Rattach)
    assert isinstance(await raw.recv(), m.Rwalkopen)
    await raw.send(m.Tread(7, 1, 0, 10))
    await tree.entered.wait()
    return raw


async def test_a_blocked_request_holds_up_nothing_else_on_its_connection():
    """Handlers run in the task that read them until one blocks; then reading moves to a
    new task: what comes after a blocked read is answered, in line or not."""
    tree = _BlockingTree()
    with trio.fail_after(T):
        async with trio.open_nursery() as servers:
            addr = await _serve_in_process(servers, tree)
            raw = await _blocked_read(addr, tree)
            await raw.send(m.Tping(8), m.Twalkopen(9, 0, 2, ["fast"], m.OREAD, 0))
            assert await raw.recv() == m.Rping(8)
            assert isinstance(await raw.recv(), m.Rwalkopen)
            await raw.send(m.Tread(10, 2, 0, 10))
            assert await raw.recv() == m.Rread(10, b"fast\n")
            # a second blocked read moves reading on again; flushes still get through
            tree.entered = trio.Event()
            await raw.send(m.Twalkopen(11, 0, 3, ["block"], m.OREAD, 0), m.Tread(12, 3, 0, 1))
            assert isinstance(await raw.recv(), m.Rwalkopen)
            await tree.entered.wait()
            await raw.send(m.Tflush(13, 7), m.Tflush(14, 12))
            got = {(await raw.recv()).tag, (await raw.recv()).tag}
            assert got == {13, 14}
            await raw.send(m.Tping(7))  # tag 7 is free again once its flush is answered
            assert await raw.recv() == m.Rping(7)
            servers.cancel_scope.cancel()


async def test_duplicate_tag_closes_the_connection_only(caplog):
    tree = _BlockingTree()
    with trio.fail_after(T):
        async with trio.open_nursery() as servers:
            addr = await _serve_in_process(servers, tree)
            raw = await _blocked_read(addr, tree)
            await raw.send(m.Tping(7))  # tag 7 is a read still in flight
            await raw.expect_closed()
            assert "tag 7 is already in use" in caplog.text
            other = await Raw.open(addr)
            await other.handshake(nacl.signing.SigningKey.generate(), "tester")
            await other.version()
            await other.send(m.Tping(7))
            assert await other.recv() == m.Rping(7)
            servers.cancel_scope.cancel()


class _Stalling:
    """A stream that, once ``stall`` is set, writes half of what it is given and blocks, as a
    socket with a full send buffer does."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner, self.stall = inner, False

    async def send_all(self, data: bytes) -> None:
        if self.stall:
            await self.inner.send_all(data[: len(data) // 2])
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_unsendable_replies_fail_the_request_not_the_connection():
    me = nacl.signing.SigningKey.generate()
    with trio.fail_after(T):
        async with trio.open_nursery() as servers:
            addr = await _serve_in_process(servers, _BlockingTree())
            async with connect(addr, me, "tester", None) as c:
                with pytest.raises(NineError) as e:
                    await c.read_file("/loud")
                assert e.value.ename == "EINVAL" and "bad command" in e.value.message
                assert len(e.value.message.encode()) <= m.MAXSTR
                with pytest.raises(NineError) as e:
                    await c.stat_path("/bad")
                assert e.value.ename == "EIO"
                assert await c.read_file("/fast") == b"fast\n"
            servers.cancel_scope.cancel()


async def test_send_interrupted_mid_frame_closes_the_channel():
    """A sealed frame cut short leaves the two ends out of step; the channel closes instead,
    so both ends see a closed connection rather than a garbled or a silent one."""
    a_end, b_end = trio.testing.memory_stream_pair()
    a_stream = _Stalling(a_end)
    k1, k2 = nacl.utils.random(32), nacl.utils.random(32)
    a = Channel(a_stream, FrameReader(0), TrafficKeys(k1, k2), "a")
    b = Channel(b_end, FrameReader(0), TrafficKeys(k2, k1), "b")
    with trio.fail_after(T):
        await a.send(b"one")
        assert await b.receive() == b"one"
        a_stream.stall = True
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(a.send, b"two")
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        with pytest.raises(ConnectionClosed):
            await a.send(b"three")
        with pytest.raises(ConnectionClosed):
            await b.receive()


async def test_cancel_before_sending_leaves_the_channel_whole():
    a_end, b_end = trio.testing.memory_stream_pair()
    k1, k2 = nacl.utils.random(32), nacl.utils.random(32)
    a = Channel(a_end, FrameReader(0), TrafficKeys(k1, k2), "a")
    b = Channel(b_end, FrameReader(0), TrafficKeys(k2, k1), "b")
    with trio.fail_after(T):
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.send(b"never sealed")
        await a.send(b"one")
        assert await b.receive() == b"one"


# -- hostile frames on a raw socket --------------------------------------------------------


@pytest.mark.parametrize("how", ["tampered", "replayed", "truncated", "reordered", "cut-off"])
async def test_bad_sealed_frame_closes_that_connection_only(node, identity, client, how):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.version()
        ping = raw.seal(m.Tping(1))
        if how == "tampered":
            await raw.stream.send_all(ping[:-1] + bytes([ping[-1] ^ 1]))
        elif how == "replayed":
            await raw.stream.send_all(ping)
            assert await raw.recv() == m.Rping(1)
            await raw.stream.send_all(ping)
        elif how == "truncated":
            await raw.stream.send_all(frame(ping[4:-3]))
        elif how == "reordered":
            second = raw.seal(m.Tping(2))
            await raw.stream.send_all(second + ping)
        else:  # half a frame, then the end of the stream
            await raw.stream.send_all(ping[:-5])
            await raw.stream.send_eof()
        await raw.expect_closed()
        if how != "cut-off":
            await wait_for_log(node, "failed to open")
        await still_serving(client)


@pytest.mark.parametrize(
    "when, data",
    [
        ("before the handshake", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("before the handshake", b"\xff\xff\xff\xff"),
        ("before the handshake", frame(b"\xc1" * 40)),
        ("before the handshake", os.urandom(300)),
        ("after the handshake", b"\xff\xff\xff\xff"),
        ("after the handshake", b"\x7f\x00\x00\x00" + os.urandom(200)),
        ("after the handshake", os.urandom(300)),
        ("sealed", b"\xc1 not msgpack"),
        ("sealed", b"\x92\x75\x01"),  # a reply (Rread), which a client may not send
    ],
)
async def test_garbage_closes_that_connection_only(node, identity, client, when, data):
    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        if when != "before the handshake":
            await raw.handshake(identity.key, identity.user)
            await raw.version()
        if when == "sealed":
            data = raw.seal(data)
        await raw.stream.send_all(data)
        await raw.expect_closed()
        await still_serving(client)


# -- admission ---------------------------------------------------------------------------


async def test_unknown_key_is_refused_in_the_handshake(node, identity, tmp_path):
    stranger = nacl.signing.SigningKey.generate()
    known = KnownNodes(tmp_path / "known")
    with trio.fail_after(T):
        with pytest.raises(Refused):
            await dial(node.addr, stranger, identity.user, known)
        log = await wait_for_log(node, fingerprint(bytes(stranger.verify_key)))
        assert "is not in" in log
        # a known key claiming another user's name
        with pytest.raises(Refused):
            await dial(node.addr, identity.key, "mallory", known)
        await wait_for_log(node, "may not act as 'mallory'")


async def test_authorized_users_is_reread_and_fails_closed(node, identity, tmp_path):
    users = node.state / "authorized_users"
    known = KnownNodes(tmp_path / "known")
    with trio.fail_after(T):
        ch = await dial(node.addr, identity.key, identity.user, known)
        await ch.aclose()
        # no file: nobody gets in
        saved = users.read_text()
        users.unlink()
        with pytest.raises(Refused):
            await dial(node.addr, identity.key, identity.user, known)
        # an expired grant, then a read-only one: each seen without a restart
        AuthorizedUsers(users).add(
            Grant(identity.public, identity.user, expires=__import__("datetime").date(2000, 1, 1))
        )
        with pytest.raises(Refused):
            await dial(node.addr, identity.key, identity.user, known)
        await wait_for_log(node, "key expired on 2000-01-01")
        users.write_text(saved.strip() + " ro\n")
        async with connect(node.addr, identity.key, identity.user, known) as c:
            assert await c.read_file("/node/name") == b"n1\n"
            with pytest.raises(NineError) as e:
                await c.write_file("/node/name", b"x")
            assert e.value.ename == "EROFS"


async def test_changed_node_key_is_refused_by_the_client(node, identity, tmp_path):
    path = tmp_path / "known_nodes"
    with trio.fail_after(T):
        # first use pins the node's key
        ch = await dial(node.addr, identity.key, identity.user, KnownNodes(path))
        real = ch.node_key
        await ch.aclose()
        assert path.read_text() == f"{node.addr} {encode_public(real)}\n"
        # a different pin for the same address: refused before we say who we are
        other = bytes(nacl.signing.SigningKey.generate().verify_key)
        path.write_text(f"{node.addr} {encode_public(other)}\n")
        connected = node.log.read_text().count("connected as")
        with pytest.raises(HostKeyChanged) as e:
            await dial(node.addr, identity.key, identity.user, KnownNodes(path))
        text = str(e.value)
        assert "has changed" in text and fingerprint(real) in text and fingerprint(other) in text
        assert str(path) in text
        assert node.log.read_text().count("connected as") == connected


async def test_handshake_garbage_is_refused_without_a_reply(node, identity, client):
    """A wrong magic gets no msg2: the node says nothing about itself to a non-client."""
    import msgpack

    with trio.fail_after(T):
        raw = await Raw.open(node.addr)
        hello = msgpack.packb(["ninefz", 1, nacl.utils.random(32), nacl.utils.random(32)])
        await raw.stream.send_all(frame(hello))
        assert await raw.stream.receive_some(4096) in (b"",)
        await still_serving(client)


def test_protocol_error_is_the_base_of_handshake_errors():
    assert issubclass(Refused, ProtocolError)


async def test_walkstat_is_walk_and_stat_in_one(client):
    with trio.fail_after(T):
        fid, qids, st = await client.walk_stat(client.root, ["cpu", "load"])
        try:
            assert qids[-1] == st.qid and st.name == "load"
            assert await client.stat(fid) == st
        finally:
            await client.clunk(fid)
        # a partial walk is ENOENT, and the new fid is not made
        newfid = client.new_fid()
        with pytest.raises(NineError) as e:
            await client.rpc(m.Twalkstat(0, client.root, newfid, ["cpu", "nothing"]))
        assert e.value.ename == "ENOENT"
        with pytest.raises(NineError) as e:
            await client.stat(newfid)
        assert e.value.ename == "EBADF"


async def test_walkopen_is_walk_and_open_in_one(client):
    with trio.fail_after(T):
        fid, r = await client.walk_open(client.root, ["node", "name"], m.OREAD)
        try:
            assert r.flags & m.OF_SYNTHETIC
            assert await client.read(fid, 0, 100) == b"n1\n"
        finally:
            await client.clunk(fid)
        # a failed open leaves no fid behind; so does a partial walk
        for names, mode, ename in (
            (["cpu", "load"], m.OWRITE, "EACCES"),
            (["cpu", "none"], m.OREAD, "ENOENT"),
        ):
            newfid = client.new_fid()
            with pytest.raises(NineError) as e:
                await client.rpc(m.Twalkopen(0, client.root, newfid, names, mode, 100))
            assert e.value.ename == ename
            with pytest.raises(NineError) as e:
                await client.stat(newfid)
            assert e.value.ename == "EBADF"


async def test_walkopen_brings_the_first_bytes_when_asked(client, node):
    """With a count, Rwalkopen carries what a Tread at 0 would give: all of a snapshot, a
    storage file's first count bytes; nothing for a stream (reading would wait for what
    is not there yet) or an open for writing."""
    (node.export / "ten").write_bytes(b"0123456789")
    with trio.fail_after(T):
        for names, mode, count, want in (
            (["node", "name"], m.OREAD, 100, (m.OF_HEAD, b"n1\n")),
            (["storage", "ten"], m.OREAD, 4, (m.OF_HEAD, b"0123")),
            (["storage", "ten"], m.ORDWR, 100, (m.OF_HEAD, b"0123456789")),
            (["storage", "ten"], m.OWRITE, 100, (0, b"")),
            (["storage", "ten"], m.OREAD, 0, (0, b"")),
        ):
            fid, r = await client.walk_open(client.root, names, mode, count)
            await client.clunk(fid)
            assert (r.flags & m.OF_HEAD, bytes(r.data)) == want, names
        jid = (await client.read_file("/jobs/clone")).decode().strip()
        await client.write_file(f"/jobs/{jid}/ctl", b"exec sleep 30")
        fid, r = await client.walk_open(client.root, ["jobs", jid, "stdout"], m.OREAD, 100)
        assert r.flags & m.OF_STREAM and not r.flags & m.OF_HEAD and r.data == b""
        await client.clunk(fid)
        await client.write_file(f"/jobs/{jid}/ctl", b"kill")


async def test_clunkmany_clunks_every_known_fid(client):
    with trio.fail_after(T):
        fids = [(await client.walk(client.root, ["node", "name"]))[0] for _ in range(5)]
        await client.rpc(m.Tclunkmany(0, fids[:3]))
        for fid in fids[:3]:
            with pytest.raises(NineError) as e:
                await client.stat(fid)
            assert e.value.ename == "EBADF"
        # an unknown fid is EBADF, and the known ones in the same list are clunked still
        with pytest.raises(NineError) as e:
            await client.rpc(m.Tclunkmany(0, [fids[3], 9999, fids[4]]))
        assert e.value.ename == "EBADF" and "9999" in e.value.message
        for fid in fids[3:]:
            with pytest.raises(NineError):
                await client.stat(fid)
        with pytest.raises(NineError):  # more than MAXCLUNK: malformed, the connection goes
            await client.rpc(m.Tclunkmany(0, list(range(m.MAXCLUNK + 1))))
