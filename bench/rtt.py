"""Per-request overhead: µs per round trip to a real node daemon over loopback TCP.

Three loops, each on one connection, one request in flight at a time:

- ``ping``: Tping alone (the session, codec, sealing and two wake-ups);
- ``synth``: walk+open+read+read+clunk of /node/name (a synthetic file);
- ``storage``: walk+open+read+read+clunk of /storage/a (a 100-byte file in the export).

Reported: median and p90 of µs per round trip (a loop of five requests counts five), over
several rounds. ``python -m bench --only rtt`` or ``python -m bench.rtt [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ninefs.protocol import messages as m  # noqa: E402
from ninefs.protocol.client import Client, connect  # noqa: E402
from ninefs.protocol.keys import KnownNodes  # noqa: E402
from tests.cluster import make_identity, make_node  # noqa: E402

NAME = "rtt"
DESCRIPTION = "per-request overhead: µs per round trip (Tping, synthetic and storage loops)"


async def _ping(c: Client, n: int) -> int:
    for _ in range(n):
        await c.ping()
    return n


async def _loop(c: Client, n: int, names: list[str]) -> int:
    root = c.root
    for _ in range(n):
        fid, _ = await c.walk(root, names)
        await c.open(fid, m.OREAD)
        data = await c.read(fid, 0, 4096)
        await c.read(fid, len(data), 4096)
        await c.clunk(fid)
    return 5 * n


async def _measure(addr: str, who, rounds: int, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ping": [], "synth": [], "storage": []}
    known = KnownNodes(who.home / "known_nodes")
    async with connect(addr, who.key, who.user, known) as c:
        loops = {
            "ping": lambda k: _ping(c, k),
            "synth": lambda k: _loop(c, k, ["node", "name"]),
            "storage": lambda k: _loop(c, k, ["storage", "a"]),
        }
        for fn in loops.values():  # warm up
            await fn(50)
        for _ in range(rounds):
            for name, fn in loops.items():
                t0 = time.perf_counter()
                count = await fn(n)
                out[name].append((time.perf_counter() - t0) / count * 1e6)
    return out


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def run(quick: bool = False, rounds: int | None = None) -> int:
    rounds = rounds or (3 if quick else 7)
    n = 200 if quick else 400
    with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp:
        base = Path(tmp)
        who = make_identity(base / "home")
        node = make_node(base, "n1", who)
        (node.export / "a").write_bytes(b"x" * 100)
        node.start()
        try:
            res = trio.run(_measure, node.addr, who, rounds, n)
        finally:
            node.stop()
    print(f"{'loop':10} {'µs/rtt p50':>11} {'p90':>8}   ({rounds} rounds of {n})")
    for name, xs in res.items():
        print(f"{name:10} {statistics.median(xs):11.0f} {_p90(xs):8.0f}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args()
    sys.exit(run(a.quick, a.rounds))
