"""The wire alone: round-trip latency and bulk throughput, sealed and plain, over loopback TCP.

Three servers, each in its own process (so client and server have a core each):

- the real node daemon (tests/cluster.py): small reads of /node/name, sealed; large reads of
  a file in its export under /storage once the storage passthrough serves one;
- a bench server (``python -m bench.protocol --serve``) running the same server Session over
  a tree of two in-memory files (``small``, and ``big`` of any size, served from one buffer
  so the disk is out of the picture), on two ports: one with the handshake and sealing
  (transport.accept / dial), one with framing and msgpack alone (``PlainChannel``, a
  Channel without sealing). The ratio of the two is the cost of the secure channel.

Reported: p50/p99 of a sequential small Tread on an open fid; small reads/s with 32 in
flight; MB/s of 1 MiB reads with 1 and 4 in flight. Full runs alternate sealed and plain
three times and report medians (figures on this 2-vCPU VM swing with vCPU placement).
"""

from __future__ import annotations

import argparse
import functools
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.client import Client, connect
from ninefs.protocol.errors import NineError
from ninefs.protocol.framing import FrameReader, frame_header
from ninefs.protocol.fs import File, Handle, Principal, Tree
from ninefs.protocol.server import Session
from ninefs.protocol.transport import ConnectionClosed, accept

NAME = "protocol"
DESCRIPTION = "the wire alone: Tread latency and bulk MB/s over loopback, sealed vs plain"

MiB = 1 << 20
READ = MiB  # one bulk Tread, as one FUSE read would be
START_TIMEOUT = 20.0


# -- a Channel without sealing -------------------------------------------------------------


class PlainChannel:
    """transport.Channel's interface over framing alone: the msgpack+framing path, unsealed.
    For measurement only; ninefs itself has no insecure path."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream, self.peer = stream, peer
        self._reader = FrameReader(m.MIN_MSIZE)
        self._lock = trio.Lock()
        self.limit = m.MIN_MSIZE

    def set_limit(self, limit: int) -> None:
        self.limit = self._reader.limit = limit

    async def send(self, body: bytes) -> None:
        async with self._lock:
            try:
                await self.stream.send_all(frame_header(len(body)) + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionClosed(str(e) or "closed") from None

    async def receive(self) -> bytes:
        while (body := self._reader.next_frame()) is None:
            try:
                data = await self.stream.receive_some(max(self._reader.needed(), 65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionClosed(str(e) or "closed") from None
            if not data:
                raise ConnectionClosed("closed by peer")
            self._reader.feed(data)
        return body

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# -- the bench server's tree ---------------------------------------------------------------


class _MemHandle(Handle):
    def __init__(self, data: memoryview, size: int) -> None:
        self.data, self.size = data, size

    async def read(self, offset: int, count: int) -> bytes:
        n = max(0, min(count, self.size - offset, len(self.data)))
        return self.data[:n]  # a view: the codec copies it once, into the frame


class _MemFile(File):
    def __init__(self, tree: _MemTree, name: str) -> None:
        self.tree, self.name = tree, name

    @property
    def qid(self) -> m.Qid:
        return m.Qid(m.QTDIR if not self.name else m.QTFILE, 0, len(self.name))

    async def walk(self, name: str) -> File:
        if self.name or name not in ("small", "big"):
            raise NineError("ENOENT", name)
        return _MemFile(self.tree, name)

    async def open(self, mode: int) -> Handle:
        if self.name == "small":
            return _MemHandle(memoryview(b"n1\n"), 3)
        return _MemHandle(self.tree.blob, self.tree.size)


class _MemTree(Tree):
    def __init__(self, size: int) -> None:
        self.size = size
        self.blob = memoryview(os.urandom(READ) * 2)

    async def attach(self, principal: Principal, aname: str) -> File:
        return _MemFile(self, "")


async def _serve(size: int) -> None:
    key = nacl.signing.SigningKey.generate()
    tree = _MemTree(size)

    async def sealed(stream: trio.SocketStream) -> None:
        try:
            ch, user, _ = await accept(stream, key, lambda k, u, ip: (True, ""))
        except Exception:
            await stream.aclose()
            return
        await Session(tree, Principal(user)).serve(ch)

    async def plain(stream: trio.SocketStream) -> None:
        await Session(tree, Principal("bench")).serve(PlainChannel(stream, "plain"))

    async with trio.open_nursery() as nursery:
        ports = []
        for handler in (sealed, plain):
            serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            ports.append(listeners[0].socket.getsockname()[1])
        print(f"listening {ports[0]} {ports[1]}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent goes away
        nursery.cancel_scope.cancel()


def _start_server(size: int) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.protocol", "--serve", str(size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    r, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().split() if r else []
    if len(line) != 3 or line[0] != b"listening":
        proc.kill()
        raise RuntimeError("the bench server did not start")
    return proc, int(line[1]), int(line[2])


# -- measurements --------------------------------------------------------------------------


@dataclass
class Figures:
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    small_per_s: float = float("nan")
    mb_s_1: float = float("nan")
    mb_s_4: float = float("nan")


async def _open(client: Client, path: str) -> int:
    return await client.open_path(path, m.OREAD)


async def _latency(client: Client, fid: int, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        await client.read(fid, 0, 64)
        samples.append(time.perf_counter_ns() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1e3, samples[
        min(len(samples) - 1, len(samples) * 99 // 100)
    ] / 1e3


async def _pipelined_small(client: Client, fid: int, n: int, depth: int = 32) -> float:
    per = n // depth

    async def worker() -> None:
        for _ in range(per):
            await client.read(fid, 0, 64)

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    return per * depth / (time.perf_counter() - t)


async def _bulk(client: Client, fid: int, size: int, depth: int) -> float:
    """MB/s reading ``size`` bytes in READ-sized Treads, ``depth`` in flight (as readahead)."""
    offsets = iter(range(0, size, READ))
    total = 0

    async def worker() -> None:
        nonlocal total
        for off in offsets:
            data = await client.read(fid, off, READ, timeout=60)
            total += len(data)

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - t
    if total != size:
        raise RuntimeError(f"read {total} bytes of {size}")
    return size / elapsed / 1e6


async def _measure(client: Client, small: str, big: str | None, size: int, n: int) -> Figures:
    f = Figures()
    fid = await _open(client, small)
    await _latency(client, fid, min(200, n))  # warm up
    f.p50_us, f.p99_us = await _latency(client, fid, n)
    f.small_per_s = await _pipelined_small(client, fid, n)
    await client.clunk(fid)
    if big:
        fid = await _open(client, big)
        f.mb_s_1 = await _bulk(client, fid, size, 1)
        f.mb_s_4 = await _bulk(client, fid, size, 4)
        await client.clunk(fid)
    return f


async def _plain_client(port: int):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return Client(PlainChannel(stream, f"127.0.0.1:{port}"), "bench")


async def _run_bench_server(sealed_port: int, plain_port: int, size: int, n: int, rounds: int):
    key = nacl.signing.SigningKey.generate()
    results: dict[str, list[Figures]] = {"sealed": [], "plain": []}
    for _ in range(rounds):
        for kind in ("sealed", "plain"):  # alternate A/B
            if kind == "sealed":
                async with connect(f"127.0.0.1:{sealed_port}", key, "bench", None) as c:
                    results[kind].append(await _measure(c, "/small", "/big", size, n))
            else:
                c = await _plain_client(plain_port)
                async with trio.open_nursery() as nursery:
                    await nursery.start(c.run)
                    await c.attach()
                    results[kind].append(await _measure(c, "/small", "/big", size, n))
                    await c.aclose()
                    nursery.cancel_scope.cancel()
    return {k: _median(v) for k, v in results.items()}


def _median(figs: list[Figures]) -> Figures:
    return Figures(
        *(statistics.median(getattr(f, k) for f in figs) for k in Figures.__annotations__)
    )


async def _run_daemon(node, identity, size: int, n: int) -> tuple[Figures, str]:
    async with connect(node.addr, identity.key, identity.user, None) as c:
        big, note = "/storage/bench.dat", ""
        try:
            st = await c.stat_path(big)
            if st.size != size:
                big, note = None, f"/storage/bench.dat has size {st.size}, not {size}"
        except NineError as e:
            big, note = None, f"skipped: /storage serves no passthrough yet ({e.ename})"
        f = await _measure(c, "/node/name", big, size, n)
    return f, note


# -- the report ----------------------------------------------------------------------------


def _fmt(v: float, unit: str) -> str:
    if v != v:  # nan
        return "-"
    if unit == "us":
        return f"{v:,.0f} us"
    if unit == "/s":
        return f"{v:,.0f}/s"
    return f"{v:,.0f} MB/s"


ROWS = [
    ("small Tread round trip, p50", "p50_us", "us"),
    ("small Tread round trip, p99", "p99_us", "us"),
    ("small Treads, 32 in flight", "small_per_s", "/s"),
    ("1 MiB Treads, 1 in flight", "mb_s_1", "MB/s"),
    ("1 MiB Treads, 4 in flight", "mb_s_4", "MB/s"),
]


def _table(daemon: Figures, sealed: Figures, plain: Figures) -> str:
    head = ("", "daemon, sealed", "bench, sealed", "bench, plain", "sealed/plain")
    lines = [head]
    for label, attr, unit in ROWS:
        s, p = getattr(sealed, attr), getattr(plain, attr)
        ratio = f"{s / p:.2f}x" if p == p and s == s and p else "-"
        lines.append(
            (label, _fmt(getattr(daemon, attr), unit), _fmt(s, unit), _fmt(p, unit), ratio)
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(quick: bool = False) -> int:
    # tests/cluster.py starts real daemons; it lives in the repo's tests package
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.cluster import make_identity, make_node

    size = (64 if quick else 256) * MiB
    n = 2000 if quick else 10000
    rounds = 1 if quick else 3
    print(f"loopback TCP, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"{n} small reads, {size // MiB} MiB bulk, {rounds} round(s)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="ninefs-bench-") as tmp:
        base = Path(tmp)
        who = make_identity(base / "home")
        node = make_node(base, "n1", who)
        with open(node.export / "bench.dat", "wb") as f:
            # real blocks, left in the page cache: the wire is what is measured (reading a
            # sparse file's holes costs ext4 about 3 ms per MiB here, more than the wire)
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
        node.start()
        server, sealed_port, plain_port = _start_server(size)
        try:
            daemon, note = trio.run(_run_daemon, node, who, size, n)
            figs = trio.run(_run_bench_server, sealed_port, plain_port, size, n, rounds)
        finally:
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
            node.stop()
    print(_table(daemon, figs["sealed"], figs["plain"]))
    print("daemon: the node daemon (small = /node/name; bulk = /storage/bench.dat, page-cached)")
    if note:
        print(f"  {note}")
    print("sealed/plain: the sealed figure over the plain one (times: >1 is slower; rates: <1)")
    print("bench: in-memory files behind the same server Session; plain = framing + msgpack,")
    print("  no handshake or sealing (not a ninefs mode: measured only for the ratio)")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=int, metavar="SIZE", help="run the bench server (internal)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.serve is not None:
        trio.run(_serve, a.serve)
    else:
        sys.exit(run(a.quick))
