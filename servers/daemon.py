"""The node daemon (`ninefs serve`): listens, admits authorized keys, serves the node's tree.

Every connection runs in its own task: its handshake has a deadline, its session its own
fid table, and anything it does wrong ends that connection only.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio

from ninefs.protocol.errors import ProtocolError
from ninefs.protocol.fs import Principal
from ninefs.protocol.handshake import HandshakeError
from ninefs.protocol.keys import AuthorizedUsers, Grant, fingerprint, load_or_create
from ninefs.protocol.server import Session
from ninefs.protocol.transport import (
    Authorizer,
    ConnectionClosed,
    PublicReason,
    accept,
    parse_addr,
)

from . import cpu, jobs, metrics, proc, storage
from .accounts import Policy
from .root import NodeTree, base_entries

log = logging.getLogger(__name__)

REVALIDATE_EVERY = 2.0  # seconds between checks of open connections against their grants


@dataclass
class NodeConfig:
    name: str
    listen: str = "127.0.0.1:5640"
    export: Path | None = None
    state: Path = Path("ninefs-state")
    labels: list[str] = field(default_factory=list)
    keep: float = 3600.0  # seconds a finished job's directory is kept
    max_connections: int = 256  # in all, handshakes included
    max_handshakes: int = 64  # of those, still in their handshake
    max_user_connections: int = 64  # established, per user
    max_fids: int = 4096  # per connection
    max_user_jobs: int = 64  # jobs not yet ended, per user
    allow_root: bool = False  # a root daemon may act as root for users without an account


@dataclass(eq=False)
class _Conn:
    """An established connection, as the revalidation sees it."""

    grant: Grant
    user: str
    peer_ip: str | None
    scope: trio.CancelScope


class NodeDaemon:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        cfg.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = load_or_create(cfg.state / "key")
        self.users = AuthorizedUsers(cfg.state / "authorized_users")
        policy = Policy(cfg.name, cfg.allow_root)  # whose rights jobs and /storage use
        self.jobs = jobs.JobTable(cfg.state / "jobs", node=cfg.name, keep=cfg.keep, workdir=cfg.export,
                                  policy=policy, max_per_user=cfg.max_user_jobs)  # fmt: skip
        self.stats = {
            "connections": 0, "connections_total": 0, "refused_total": 0, "requests_total": 0
        }  # fmt: skip
        entries = base_entries(cfg.name, cfg.labels)
        entries.append(proc.tree(self.jobs))
        entries.append(self.jobs.tree())
        if cfg.export is not None:
            cfg.export.mkdir(parents=True, exist_ok=True)
            entries.append(storage.tree(cfg.export, policy))
        entries.append(metrics.entry(cfg.name, lambda: dict(self.stats), self.jobs.counts))
        self.tree = NodeTree(entries)
        self._conn_slots = trio.CapacityLimiter(cfg.max_connections)
        self._handshakes = trio.CapacityLimiter(cfg.max_handshakes)
        self._conns: set[_Conn] = set()
        self._pending: dict[trio.CancelScope, None] = {}  # handshakes in progress, oldest first
        self._per_user: dict[str, int] = {}

    def _authorize(self, key: bytes, user: str, peer: str | None) -> tuple[Grant | None, str]:
        grant, why = self._check(key, user, peer)
        if grant is not None and self._per_user.get(user, 0) >= self.cfg.max_user_connections:
            n = self.cfg.max_user_connections
            return None, PublicReason(f"too many connections for {user!r} (limit {n})")
        return grant, why

    def _check(self, key: bytes, user: str, peer: str | None) -> tuple[Grant | None, str]:
        grant = self.users.lookup(key)
        if grant is None:
            if self.users.problem:
                return None, f"{self.users.path} is {self.users.problem}"
            return None, f"key {fingerprint(key)} is not in {self.users.path}"
        if grant.user != user:
            return None, f"key {fingerprint(key)} may not act as {user!r} (only {grant.user!r})"
        why = grant.admits(peer)
        if why:
            return None, why
        return grant, ""

    async def _handle(self, stream: trio.abc.Stream) -> None:
        # Nothing a client does may escape this function: serve_listeners would crash.
        try:
            if self._conn_slots.available_tokens == 0:
                self.stats["refused_total"] += 1
                log.warning("refusing a connection: %d connections open", self.cfg.max_connections)
                await stream.aclose()
                return
            if self._handshakes.available_tokens == 0 and self._pending:
                # Every handshake slot is taken: drop the oldest, which has had the longest to
                # finish. A real client needs milliseconds; a flood of connections that never
                # finish cannot keep one out, and holds at most max_handshakes sockets.
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                oldest.cancel()
                log.warning("dropping the oldest handshake in progress (%d in progress)",
                            self.cfg.max_handshakes)  # fmt: skip
            admitted: list[str] = []  # counted per user from the moment it is admitted

            def authorize(key: bytes, user: str, peer: str | None) -> tuple[Grant | None, str]:
                grant, why = self._authorize(key, user, peer)
                if grant is not None:
                    self._per_user[user] = self._per_user.get(user, 0) + 1
                    admitted.append(user)
                return grant, why

            async with self._conn_slots:
                try:
                    await self._serve_one(stream, authorize)
                finally:
                    for user in admitted:
                        self._per_user[user] -= 1
                        if not self._per_user[user]:
                            del self._per_user[user]
        except Exception:
            log.exception("connection handler failed")

    async def _serve_one(self, stream: trio.abc.Stream, authorize: Authorizer) -> None:
        scope = trio.CancelScope()
        self._pending[scope] = None
        try:
            with scope:
                async with self._handshakes:
                    ch, user, grant = await accept(stream, self.identity, authorize)
        except (HandshakeError, ProtocolError, trio.TooSlowError, ConnectionClosed, OSError,
                trio.BrokenResourceError, trio.ClosedResourceError) as e:  # fmt: skip
            self.stats["refused_total"] += 1
            log.info("handshake failed: %s", str(e) or type(e).__name__)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        finally:
            self._pending.pop(scope, None)
        if scope.cancelled_caught:
            self.stats["refused_total"] += 1
            log.info("handshake dropped: the handshake slots were full")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        self.stats["connections"] += 1
        self.stats["connections_total"] += 1
        log.info("%s connected as %s", ch.peer, user)
        conn = _Conn(grant, user, None if ch.peer == "unix" else ch.peer, trio.CancelScope())
        self._conns.add(conn)
        try:
            session = Session(
                self.tree, Principal(user, grant, ch.peer), max_fids=self.cfg.max_fids,
                stats=self.stats,
            )  # fmt: skip
            with conn.scope:
                await session.serve(ch)
        finally:
            self._conns.discard(conn)
            self.stats["connections"] -= 1
            log.info("%s (%s) disconnected", ch.peer, user)

    async def _revalidate(self) -> None:
        """Close each open connection whose key was revoked, expired, or had its grant changed
        (within REVALIDATE_EVERY seconds): a connection lives under the grant it was admitted
        with only while that grant stands unchanged."""
        while True:
            await trio.sleep(REVALIDATE_EVERY)
            for c in list(self._conns):
                try:
                    grant, why = self._check(c.grant.key, c.user, c.peer_ip)
                except OSError as e:
                    log.warning("cannot re-read %s: %s", self.users.path, e)
                    break
                if grant != c.grant:
                    log.info("closing %s (%s): %s", c.peer_ip or "unix", c.user,
                             why or "its grant has changed")  # fmt: skip
                    c.scope.cancel()

    async def _listeners(self) -> list[trio.abc.Listener]:
        host, port = parse_addr(self.cfg.listen)
        if host == "unix":
            path = str(port)
            if os.path.exists(path):
                os.unlink(path)
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
            return [trio.SocketListener(sock)]
        return await trio.open_tcp_listeners(int(port), host=host)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        cpu._usage()  # prime the sampler so the first read of /cpu/usage does not wait
        listeners = await self._listeners()
        addr = self.cfg.listen
        sockname = listeners[0].socket.getsockname()
        if isinstance(sockname, tuple):
            addr = f"{sockname[0]}:{sockname[1]}"
        async with trio.open_nursery() as nursery:
            await nursery.start(self.jobs.run)
            nursery.start_soon(self._revalidate)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            log.info("node %s listening on %s, key %s", self.cfg.name, addr,
                     fingerprint(bytes(self.identity.verify_key)))  # fmt: skip
            task_status.started(addr)


async def run_daemon(cfg: NodeConfig, ready_fd: int | None = None) -> None:
    """Run until SIGTERM or SIGINT; print ``listening ADDR`` once ready (for scripts)."""
    daemon = NodeDaemon(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(daemon.serve)
            print(f"listening {addr} {fingerprint(bytes(daemon.identity.verify_key))}", flush=True)
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def read_ready_line(stdout: IO[bytes], timeout: float) -> str | None:
    """The address a `ninefs serve` child reports once it listens (its first stdout line,
    ``listening ADDR KEY``); None if it exits or says nothing for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stdout.fileno(), 1) if ready else b""
        if not chunk:
            return None
        line += chunk
    return line.split()[1].decode()


def main(cfg: NodeConfig) -> None:
    try:
        trio.run(run_daemon, cfg)
    except OSError as e:
        sys.exit(f"ninefs serve: {e.strerror or e}")
