"""Hostile input against a running node: every case ends that one connection (or gets an
error reply), and the node then still serves another client.

What test_session.py and test_codec.py already cover is not repeated here (garbage before
and after the handshake, a 4 GiB length, bad sealed frames, a duplicate tag, NOTAG, a first
message that is not Tversion, a flush of an unknown tag or of itself). The limits that need
short deadlines run against a daemon in this process, with the deadlines shortened.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import msgpack
import psutil
import pytest
import trio

from ninefs.protocol import messages as m
from ninefs.protocol import transport
from ninefs.protocol.client import connect
from ninefs.protocol.errors import NineError, ProtocolError
from ninefs.protocol.framing import frame
from ninefs.protocol.keys import AuthorizedUsers, Grant, KnownNodes
from ninefs.protocol.transport import ConnectionClosed
from ninefs.servers.daemon import NodeConfig, NodeDaemon

from .test_session import Raw, still_serving, wait_for_log

T = 20


async def attached(node, identity) -> Raw:
    raw = await Raw.open(node.addr)
    await raw.handshake(identity.key, identity.user)
    await raw.version()
    await raw.send(m.Tattach(1, 0, identity.user, ""))
    assert isinstance(await raw.recv(), m.Rattach)
    return raw


async def rpc(raw: Raw, msg: m.Msg) -> m.Msg:
    await raw.send(msg)
    return await raw.recv()


async def closes(node, identity, body: bytes, client) -> None:
    """``body``, sealed, ends that connection; the node serves ``client`` after it."""
    raw = await Raw.open(node.addr)
    await raw.handshake(identity.key, identity.user)
    await raw.version()
    await raw.stream.send_all(raw.seal(body))
    await raw.expect_closed()
    await still_serving(client)


async def sleeping_job(raw: Raw, seconds: int = 60) -> str:
    """A job running ``sleep``: its stdout is a file whose reads block."""
    await raw.send(m.Twalk(1, 0, 2, ["jobs", "clone"]))
    await raw.recv()
    await raw.send(m.Topen(1, 2, m.OREAD))
    await raw.recv()
    jid = (await rpc(raw, m.Tread(1, 2, 0, 100))).data.decode().strip()
    await rpc(raw, m.Tclunk(1, 2))
    await rpc(raw, m.Twalk(1, 0, 2, ["jobs", jid, "ctl"]))
    await rpc(raw, m.Topen(1, 2, m.OWRITE))
    assert isinstance(await rpc(raw, m.Twrite(1, 2, 0, f"exec sleep {seconds}".encode())), m.Rwrite)
    await rpc(raw, m.Tclunk(1, 2))
    return jid


# -- msgpack bombs, wrong types, replies, unknown types ---------------------------------

BOMBS = [
    b"\x91" * 100_000,  # nesting a hundred thousand arrays deep
    b"\xdd\xff\xff\xff\xff",  # an array that claims 4 G elements
    b"\xdf\xff\xff\xff\xff",  # a map that claims 4 G pairs
    b"\xdb\xff\xff\xff\xff" + b"x" * 100,  # a string that claims 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin, which the protocol never uses
    b"\xc9\xff\xff\xff\xff\x01",  # ext
    msgpack.packb([112, 1, 0, 1, ["a"] * 70000]),  # Twalk with 70000 names
    msgpack.packb([112, 1, 0, 1, ["a" * 300]]),  # a name past MAXNAME
    msgpack.packb([100, 1, 8192, "x" * 20000]),  # a string past MAXSTR
    msgpack.packb([100, 1, {"a": 1}, "x"]),  # a map where an int goes
]


async def test_msgpack_bombs_close_the_connection_only(node, identity, client):
    with trio.fail_after(T * 2):
        for body in BOMBS:
            await closes(node, identity, body, client)
        assert psutil.Process(node.proc.pid).memory_info().rss < 500 << 20


WRONG = ["x", -1, 2**64 - 1, -(2**63), None, [], 1.5, True, b"\x00".decode()]


def _wrong_type_bodies() -> list[bytes]:
    """Each request with each field (tag included) replaced by a value of the wrong kind."""
    out = []
    examples = {
        m.Tattach: [0, "u", ""], m.Twalk: [0, 1, ["a"]], m.Topen: [0, 0], m.Tcreate: [0, "a", 0, 0],
        m.Tread: [0, 0, 1], m.Twrite: [0, 0], m.Tclunk: [0], m.Tremove: [0], m.Tstat: [0],
        m.Twstat: [0, {}], m.Treaddir: [0, 0, 1], m.Trename: [0, 0, "a"], m.Tfsync: [0],
        m.Tstatfs: [0], m.Tsymlink: [0, "a", "b"], m.Treadlink: [0], m.Tflush: [1],
        m.Tversion: [8192, m.VERSION],
    }  # fmt: skip
    for cls, fields in examples.items():
        full = [cls.TYPE, 5, *fields]
        for i in range(1, len(full)):
            bad = WRONG[(i + cls.TYPE) % len(WRONG)]
            if type(bad) is type(full[i]) or (full[i] == 0 and bad is None):
                bad = "x" if not isinstance(full[i], str) else 7
            out.append(msgpack.packb([*full[:i], bad, *full[i + 1 :]]))
        out.append(msgpack.packb(full[:-1]))  # a field short
        out.append(msgpack.packb([*full, 0]))  # a field too many
    return out


async def test_wrong_types_in_every_field(node, identity, client):
    with trio.fail_after(T * 4):
        for body in _wrong_type_bodies():
            await closes(node, identity, body, client)


async def test_replies_and_unknown_types_sent_by_a_client(node, identity, client):
    replies = [msgpack.packb([t, 1]) for t in sorted(m._BY_TYPE) if t % 2 == 1]
    unknown = [msgpack.packb([t, 1]) for t in (0, 99, 250, 255, 256, -1, 2**40)]
    with trio.fail_after(T * 2):
        for body in [*replies, *unknown, msgpack.packb(["Tping", 1])]:
            await closes(node, identity, body, client)


# -- version, flush, fids, walk names ------------------------------------------------------


async def test_tversion_mid_session(node, identity, client):
    with trio.fail_after(T):
        raw = await attached(node, identity)
        # with nothing in flight: a fresh session, every fid gone
        await raw.version()
        assert (await rpc(raw, m.Tstat(1, 0))).ename == "EBADF"
        r = await rpc(raw, m.Tattach(1, 0, identity.user, ""))
        assert isinstance(r, m.Rattach)  # fid 0 was clunked by the Tversion
        # with a request in flight (a read that blocks): the connection ends
        jid = await sleeping_job(raw)
        await rpc(raw, m.Twalk(1, 0, 3, ["jobs", jid, "stdout"]))
        await rpc(raw, m.Topen(1, 3, m.OREAD))
        await raw.send(m.Tread(9, 3, 0, 100), m.Tversion(m.NOTAG, 8192, m.VERSION))
        await raw.expect_closed()
        await wait_for_log(node, "Tversion with requests in flight")
        await still_serving(client)


async def test_flush_of_finished_and_of_blocked_requests(node, identity, client):
    with trio.fail_after(T):
        raw = await attached(node, identity)
        assert await rpc(raw, m.Tping(5)) == m.Rping(5)
        assert await rpc(raw, m.Tflush(6, 5)) == m.Rflush(6)  # finished: answered at once
        jid = await sleeping_job(raw)
        await rpc(raw, m.Twalk(1, 0, 3, ["jobs", jid, "stdout"]))
        await rpc(raw, m.Topen(1, 3, m.OREAD))
        await raw.send(m.Tread(7, 3, 0, 100), m.Tflush(8, 7))
        assert await raw.recv() == m.Rflush(8)  # and no Rread for tag 7, ever:
        assert await rpc(raw, m.Tping(7)) == m.Rping(7)
        # a Tflush whose own tag is in use by a running request breaks the protocol
        await raw.send(m.Tread(11, 3, 0, 100), m.Tflush(11, 11))
        await raw.expect_closed()
        await still_serving(client)


async def test_flush_gets_through_with_every_slot_busy(node, identity, client):
    """256 reads that block fill every handler slot; more wait for one; a Tflush still
    gets through, and flushing them all answers each flush and none of the reads."""
    with trio.fail_after(T * 2):
        raw = await attached(node, identity)
        jid = await sleeping_job(raw)
        await rpc(raw, m.Twalk(1, 0, 3, ["jobs", jid, "stdout"]))
        await rpc(raw, m.Topen(1, 3, m.OREAD))
        n = 256 + 40
        await raw.send(*(m.Tread(t, 3, 0, 100) for t in range(n)))
        await raw.send(m.Tflush(1000, 0))
        assert await raw.recv() == m.Rflush(1000)
        await raw.send(*(m.Tflush(1000 + t, t) for t in range(1, n)))
        got = {(await raw.recv()).tag for _ in range(1, n)}
        assert got == {1000 + t for t in range(1, n)}
        assert await rpc(raw, m.Tping(1)) == m.Rping(1)  # nothing else was queued for us
        await still_serving(client)


async def test_fid_exhaustion_is_per_connection(node, identity, client):
    with trio.fail_after(T * 2):
        raw = await attached(node, identity)
        for start in range(0, 4095, 500):  # in batches: neither side's buffers fill
            batch = range(start, min(start + 500, 4095))
            await raw.send(*(m.Twalk(t, 0, 1 + t, []) for t in batch))
            for _ in batch:
                assert isinstance(await raw.recv(), m.Rwalk)
        r = await rpc(raw, m.Twalk(1, 0, 9999, []))
        assert isinstance(r, m.Rerror) and r.ename == "EMFILE" and "4096" in r.message
        assert isinstance(await rpc(raw, m.Tclunk(1, 17)), m.Rclunk)
        assert isinstance(await rpc(raw, m.Twalk(1, 0, 9999, [])), m.Rwalk)
        await still_serving(client)  # another connection has its own table


@pytest.mark.parametrize(
    "names", [["/"], [""], ["a\0b"], ["x" * 256], ["node"] * 17, ["node/name"]]
)
async def test_bad_walk_names_close_the_connection(node, identity, client, names):
    body = msgpack.packb([m.Twalk.TYPE, 1, 0, 1, names])
    with trio.fail_after(T):
        raw = await attached(node, identity)
        await raw.stream.send_all(raw.seal(body))
        await raw.expect_closed()
        await still_serving(client)


async def test_dotdot_never_leaves_the_root(node, identity, client):
    with trio.fail_after(T):
        raw = await attached(node, identity)
        root = (await rpc(raw, m.Tstat(1, 0))).stat.qid
        r = await rpc(raw, m.Twalk(1, 0, 1, ["..", "..", "node", "..", ".."]))
        assert isinstance(r, m.Rwalk) and r.qids[-1] == root and r.qids[0] == root
        r = await rpc(raw, m.Twalk(1, 0, 2, ["storage", "..", ".."]))
        assert r.qids[1] == r.qids[2] == root  # above the export: the node's root, no further
        await still_serving(client)


# -- ctl injection ---------------------------------------------------------------------------


async def run_job(client, text: str) -> tuple[str, str, str]:
    jid = (await client.read_file("/jobs/clone")).decode().strip()
    await client.write_file(f"/jobs/{jid}/ctl", text.encode())
    wait = (await client.read_file(f"/jobs/{jid}/wait")).decode()
    out = (await client.read_file(f"/jobs/{jid}/stdout")).decode()
    return wait, out, jid


async def test_exec_words_are_literal_argv(client, node):
    with trio.fail_after(T):
        marker = node.export / "pwned"
        words = ["; touch " + str(marker), "$(touch x)", "`id`", "|", "&&", "*", "$HOME", ">y"]
        line = "exec /bin/echo " + " ".join("'" + w + "'" for w in words)
        wait, out, _ = await run_job(client, line)
        assert wait == "exit 0\n" and out == " ".join(words) + "\n"
        assert not marker.exists() and not (node.export / "y").exists()
        # a second line in one write is a second command, not part of the argv
        wait, out, jid = await run_job(client, "env A=1;B=2\nexec /bin/sh -c 'echo \"$A\"'")
        assert out == "1;B=2\n"


async def test_env_cannot_reach_the_daemon(client, node):
    """LD_PRELOAD and the like are the job's own business (it runs its own code anyway): they
    reach only the job, never the daemon; NUL is refused; the daemon's environment is not
    passed on."""
    with trio.fail_after(T):
        wait, out, _ = await run_job(
            client, "env LD_PRELOAD=/nonexistent/evil.so LD_LIBRARY_PATH=/tmp\nexec /usr/bin/env"
        )
        env = dict(line.split("=", 1) for line in out.splitlines())
        assert env["LD_PRELOAD"] == "/nonexistent/evil.so"
        assert "PYTHONUNBUFFERED" not in env  # set for the daemon by the test harness
        assert set(env) <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LD_PRELOAD",
                            "LD_LIBRARY_PATH"}  # fmt: skip
        jid = (await client.read_file("/jobs/clone")).decode().strip()
        with pytest.raises(NineError) as e:
            await client.write_file(f"/jobs/{jid}/ctl", b"env A=x\0y")
        assert e.value.ename == "EINVAL"
        with pytest.raises(NineError) as e:
            await client.write_file(f"/jobs/{jid}/ctl", b"exec /bin/echo a\0b")
        assert e.value.ename == "EINVAL"
        await still_serving(client)


async def test_huge_argv(client, node):
    with trio.fail_after(T * 2):
        wait, out, _ = await run_job(client, "exec /bin/echo " + "x " * 100_000)
        assert wait == "exit 0\n" and len(out) == 200_000
        jid = (await client.read_file("/jobs/clone")).decode().strip()
        with pytest.raises(NineError) as e:  # one argument past the kernel's MAX_ARG_STRLEN
            await client.write_file(f"/jobs/{jid}/ctl", b"exec /bin/echo " + b"y" * 300_000)
        assert e.value.ename == "E2BIG"
        await still_serving(client)


# -- a daemon in this process, with short deadlines --------------------------------------


@pytest.fixture
async def fast_node(tmp_path, identity, monkeypatch) -> AsyncIterator[str]:
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(transport, "FRAME_TIMEOUT", 1.0)
    state = tmp_path / "fast"
    state.mkdir()
    AuthorizedUsers(state / "authorized_users").add(Grant(identity.public, identity.user))
    daemon = NodeDaemon(NodeConfig("n1", "127.0.0.1:0", tmp_path / "fx", state, max_handshakes=8))
    async with trio.open_nursery() as nursery:
        yield await nursery.start(daemon.serve)
        nursery.cancel_scope.cancel()


async def test_frame_left_hanging_is_closed_after_its_deadline(fast_node, identity):
    known = KnownNodes(identity.home / "known_nodes")
    async with connect(fast_node, identity.key, identity.user, known) as c:
        with trio.fail_after(T):
            raw = Raw(await transport.open_stream(fast_node))
            await raw.handshake(identity.key, identity.user)
            await raw.version()
            ping = raw.seal(m.Tping(1))
            await raw.stream.send_all(ping[:-5])  # and nothing more, ever
            start = trio.current_time()
            await raw.expect_closed()
            assert 0.9 <= trio.current_time() - start < 5
            # idle between frames is fine: the other connection was idle all along
            assert await c.read_file("/node/name") == b"n1\n"


async def test_handshake_left_hanging_is_closed_after_its_deadline(fast_node, identity):
    with trio.fail_after(T):
        for data in (b"", b"\x00\x00", frame(b"x" * 100)[:50]):
            stream = await transport.open_stream(fast_node)
            await stream.send_all(data)
            start = trio.current_time()
            with pytest.raises((ConnectionClosed, trio.BrokenResourceError)):
                while await stream.receive_some(4096):
                    pass
                raise ConnectionClosed("closed")
            assert 0.9 <= trio.current_time() - start < 5
            await stream.aclose()


async def test_handshake_flood_evicts_the_oldest(fast_node, identity):
    """More connections that never finish the handshake than there are handshake slots:
    the oldest are dropped, so a real client still gets in at once."""
    known = KnownNodes(identity.home / "known_nodes")
    with trio.fail_after(T):
        flood = [await transport.open_stream(fast_node) for _ in range(40)]
        async with connect(fast_node, identity.key, identity.user, known) as c:
            assert await c.read_file("/node/name") == b"n1\n"
        for s in flood:
            await s.aclose()


# -- floods against the real daemon ----------------------------------------------------------


async def test_500_unfinished_handshakes(node, identity, client):
    """500 connections that never finish the handshake: the node keeps serving the client it
    has and admits a new one meanwhile, and holds at most its handshake slots (64) open."""
    known = KnownNodes(identity.home / "known_nodes")
    proc = psutil.Process(node.proc.pid)
    fds = proc.num_fds()
    with trio.fail_after(T * 2):
        flood = []
        try:
            for i in range(500):
                s = await transport.open_stream(node.addr)
                if i % 2:
                    await s.send_all(b"\x00\x00\x00\x40" + b"\x00" * 10)  # half a hello
                flood.append(s)
                if i % 100 == 99:
                    await still_serving(client)
            for attempt in range(3):  # as a real client does: a busy node may drop one try
                try:
                    async with connect(node.addr, identity.key, identity.user, known) as c:
                        assert await c.read_file("/node/name") == b"n1\n"
                    break
                except (trio.TooSlowError, ProtocolError, ConnectionClosed, OSError):
                    if attempt == 2:
                        raise
            await still_serving(client)
            assert proc.num_fds() < fds + 64 + 16
        finally:
            for s in flood:
                await s.aclose()
        await wait_for_log(node, "dropping the oldest handshake")


async def test_a_client_that_stops_reading(node, identity, client):
    """Thousands of reads of a 64 KiB file, and never a reply read: the node stops reading
    that connection once its queue is full instead of buffering hundreds of MB of replies."""
    (node.export / "big").write_bytes(os.urandom(64 << 10))
    proc = psutil.Process(node.proc.pid)
    base = proc.memory_info().rss
    with trio.fail_after(T * 2):
        raw = await attached(node, identity)
        await rpc(raw, m.Twalk(1, 0, 1, ["storage", "big"]))
        await rpc(raw, m.Topen(1, 1, m.OREAD))
        sent = 0
        with trio.move_on_after(3):  # 320 MB of replies if the node buffered them all
            for batch in range(50):
                await raw.send(*(m.Tread(batch * 100 + t, 1, 0, 64 << 10) for t in range(100)))
                sent += 100
        assert sent > 320  # more than the node takes in before it stops reading
        peak = 0
        for _ in range(10):  # a window in which a node that buffered would grow by 300 MB
            await still_serving(client)
            peak = max(peak, proc.memory_info().rss - base)
            await trio.sleep(0.2)
        assert peak < 120 << 20
        await raw.aclose()
        await still_serving(client)
