"""Fuzzing: a hypothesis state machine over fids and tags against a model of the session's fid
table, and atheris (coverage-guided, libFuzzer) on the decoder, the framing and sealing, and
the handshake. Any crash either finds becomes a regression test elsewhere.

The state machine drives a real server Session in this process, over sealed in-memory
streams, from a trio loop in a thread of its own (hypothesis's stateful tests are sync).
The atheris run is bounded (FUZZ_SECONDS per target, targets in parallel) and skipped when
atheris is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ninefs.protocol import messages as m
from ninefs.protocol.framing import FrameReader
from ninefs.protocol.fs import Principal
from ninefs.protocol.handshake import TrafficKeys
from ninefs.protocol.server import Session
from ninefs.protocol.transport import Channel
from ninefs.servers.root import NodeTree, base_entries

MAX_FIDS = 8
MSIZE = 1 << 16
NAMES = st.lists(st.sampled_from(["node", "cpu", "name", "ncpu", "load", "..", "nope"]), max_size=4)
FIDS = st.integers(0, MAX_FIDS + 3)


class Harness:
    """A server Session on a trio loop in a thread, and the client end of its channel."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _main(self) -> None:
        a, b = trio.testing.memory_stream_pair()
        k1, k2 = os.urandom(32), os.urandom(32)
        server = Channel(a, FrameReader(MSIZE), TrafficKeys(k1, k2), "client")
        self.ch = Channel(b, FrameReader(MSIZE), TrafficKeys(k2, k1), "server")
        self.session = Session(NodeTree(base_entries("n1", [])), Principal("alice"),
                               max_fids=MAX_FIDS)  # fmt: skip
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.session.serve, server)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, *msgs: m.Msg, until=None) -> list[m.Msg]:  # noqa: ANN001
        """Send ``msgs``; the replies, one per message or until ``until(replies)`` holds."""

        async def go() -> list[m.Msg]:
            with trio.fail_after(10):
                for msg in msgs:
                    await self.ch.send(m.encode(msg))
                got: list[m.Msg] = []
                while not (until(got) if until else len(got) == len(msgs)):
                    got.append(m.decode(await self.ch.receive()))
                return got

        return trio.from_thread.run(go, trio_token=self.token)

    def fids(self) -> set[int]:
        return trio.from_thread.run_sync(lambda: set(self.session.fids), trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)


class FidMachine(RuleBasedStateMachine):
    """The model: which fids exist and which are open. Every error the model predicts must be
    the server's, and after every step the server's fid table is exactly the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.version()

    def teardown(self) -> None:
        self.h.close()

    def one(self, msg: m.Msg) -> m.Msg:
        (r,) = self.h.call(msg)
        assert r.tag == msg.tag
        return r

    def expect_error(self, msg: m.Msg, ename: str) -> None:
        r = self.one(msg)
        assert isinstance(r, m.Rerror) and r.ename == ename, (msg, r)

    def version(self) -> None:
        self.h.ch.set_limit(MSIZE)
        r = self.one(m.Tversion(m.NOTAG, MSIZE, m.VERSION))
        assert r == m.Rversion(m.NOTAG, MSIZE, m.VERSION)
        self.model: dict[int, bool] = {}  # fid -> open

    @rule()
    def renegotiate(self) -> None:
        self.version()  # nothing is in flight between steps: every fid goes

    @rule(fid=FIDS)
    def attach(self, fid: int) -> None:
        msg = m.Tattach(1, fid, "alice", "")
        if fid in self.model:
            return self.expect_error(msg, "EBADF")
        if len(self.model) >= MAX_FIDS:
            return self.expect_error(msg, "EMFILE")
        assert isinstance(self.one(msg), m.Rattach)
        self.model[fid] = False

    @rule(fid=FIDS, newfid=FIDS, names=NAMES)
    def walk(self, fid: int, newfid: int, names: list[str]) -> None:
        msg = m.Twalk(2, fid, newfid, names)
        if fid not in self.model or self.model[fid]:
            return self.expect_error(msg, "EBADF")
        if newfid != fid and newfid in self.model:
            return self.expect_error(msg, "EBADF")
        r = self.one(msg)
        if isinstance(r, m.Rerror):
            assert r.ename in ("ENOENT", "ENOTDIR", "EMFILE"), r
            assert r.ename != "EMFILE" or len(self.model) >= MAX_FIDS
            return
        assert isinstance(r, m.Rwalk) and len(r.qids) <= len(names)
        if len(r.qids) == len(names) and newfid != fid:
            assert len(self.model) < MAX_FIDS
            self.model[newfid] = False

    @rule(fid=FIDS)
    def open(self, fid: int) -> None:
        msg = m.Topen(3, fid, m.OREAD)
        if fid not in self.model or self.model[fid]:
            return self.expect_error(msg, "EBADF")
        r = self.one(msg)
        if isinstance(r, m.Ropen):
            self.model[fid] = True
        else:
            assert r.ename in ("EACCES", "EPERM"), r

    @rule(fid=FIDS)
    def read(self, fid: int) -> None:
        msg = m.Tread(4, fid, 0, 100)
        if not self.model.get(fid):
            return self.expect_error(msg, "EBADF")
        r = self.one(msg)
        assert isinstance(r, m.Rread) or r.ename in ("EBADF", "EISDIR"), r

    @rule(fid=FIDS)
    def stat(self, fid: int) -> None:
        msg = m.Tstat(5, fid)
        if fid not in self.model:
            return self.expect_error(msg, "EBADF")
        assert isinstance(self.one(msg), m.Rstat)

    @rule(fid=FIDS)
    def clunk(self, fid: int) -> None:
        msg = m.Tclunk(6, fid)
        if fid not in self.model:
            return self.expect_error(msg, "EBADF")
        assert self.one(msg) == m.Rclunk(6)
        del self.model[fid]

    @rule(tags=st.lists(st.integers(0, 50), min_size=1, max_size=8, unique=True),
          fid=FIDS, old=st.integers(0, 60))  # fmt: skip
    def pipeline(self, tags: list[int], fid: int, old: int) -> None:
        """Several requests in one go and a flush of any tag (in use, finished or unknown):
        each request is answered at most once, the flush exactly once and after what it
        flushed, and nothing else arrives."""
        target = old
        flush = m.Tflush(100, target)
        msgs = [m.Tstat(t, fid) if t % 2 else m.Tping(t) for t in tags]
        others = set(tags) - {target}

        def complete(got: list[m.Msg]) -> bool:
            seen = {r.tag for r in got}
            return 100 in seen and others <= seen

        got = self.h.call(*msgs, flush, until=complete)
        seen = [r.tag for r in got]
        assert len(seen) == len(set(seen)) and set(seen) <= set(tags) | {100}
        if target in seen:  # answered before it could be flushed: then before the Rflush
            assert seen.index(target) < seen.index(100)
        assert self.one(m.Tping(target)) == m.Rping(target)  # nothing more came, tag is free

    @invariant()
    def fid_table_is_the_model(self) -> None:
        assert self.h.fids() == set(self.model)


FidMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_fid_and_tag_state_machine = FidMachine.TestCase


# -- atheris ----------------------------------------------------------------------------------

FUZZ_SECONDS = 6

FUZZ_SCRIPT = r"""
import sys
import atheris

with atheris.instrument_imports():
    import nacl.signing
    from ninefs.protocol import messages as m
    from ninefs.protocol.errors import ProtocolError
    from ninefs.protocol.framing import FrameReader
    from ninefs.protocol.handshake import ClientHandshake, ServerHandshake
    from ninefs.protocol.sealing import AEGIS, XCHACHA, opener_for

NODE = nacl.signing.SigningKey(bytes(range(32)))
USER = nacl.signing.SigningKey(bytes(range(1, 33)))
KEY = bytes(32)


def decode(data):
    try:
        msg = m.decode(data)
    except ProtocolError:
        return
    assert m.decode(m.encode(msg)) == msg  # whatever decodes re-encodes to the same message


def frames(data):
    reader = FrameReader(4096)
    try:
        reader.feed(data)
        bodies = []
        while (body := reader.next_frame()) is not None:
            bodies.append(body)
        if bodies:
            # the first frame's length picks the suite (24: secretstream, 32: AEGIS)
            suite = AEGIS if len(bodies[0]) == 32 else XCHACHA
            opener = opener_for(suite, KEY, bodies[0])
            for body in bodies[1:]:
                m.decode(opener.open(body))
    except ProtocolError:
        pass


def handshake(data):
    fdp = atheris.FuzzedDataProvider(data)
    step = fdp.ConsumeIntInRange(0, 3)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    server, client = ServerHandshake(NODE), ClientHandshake(USER, "alice")
    try:
        if step == 0:
            server.on_hello(rest)
        elif step == 1:
            server.on_hello(client.hello())
            server.on_auth(rest)
        elif step == 2:
            client.hello()
            client.on_reply(rest)
        else:
            msg2 = server.on_hello(client.hello())
            client.on_reply(msg2)
            client.on_verdict(rest)
    except ProtocolError:
        pass


target = {"decode": decode, "frames": frames, "handshake": handshake}[sys.argv[1]]
atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
atheris.Fuzz()
"""


@pytest.mark.parametrize("target", ["all"])
def test_atheris(tmp_path: Path, target: str) -> None:
    pytest.importorskip("atheris")
    procs = {}
    for name in ("decode", "frames", "handshake"):
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", FUZZ_SCRIPT, name, f"-max_total_time={FUZZ_SECONDS}",
             "-rss_limit_mb=1024", "-max_len=4096", "-print_final_stats=0"],
            cwd=tmp_path / name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    failed = []
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=FUZZ_SECONDS + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            crashes = [p.read_bytes() for p in (tmp_path / name).glob("crash-*")]
            failed.append(f"{name}: {crashes!r:.500}\n{out.decode(errors='replace')[-3000:]}")
    assert not failed, "\n\n".join(failed)
