"""The node daemon (`ninefs serve`): listens, admits authorized keys, serves the node's tree.

Every connection runs in its own task: its handshake has a deadline, its session its own
fid table, and anything it does wrong ends that connection only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ninefs.protocol.errors import ProtocolError
from ninefs.protocol.fs import Principal
from ninefs.protocol.handshake import HandshakeError
from ninefs.protocol.keys import AuthorizedUsers, Grant, fingerprint, load_or_create
from ninefs.protocol.server import Session
from ninefs.protocol.transport import ConnectionClosed, accept, parse_addr

from . import cpu, jobs, metrics, proc, storage
from .root import NodeTree, base_entries

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    name: str
    listen: str = "127.0.0.1:5640"
    export: Path | None = None
    state: Path = Path("ninefs-state")
    labels: list[str] = field(default_factory=list)
    keep: float = 3600.0  # seconds a finished job's directory is kept
    max_connections: int = 256
    max_fids: int = 4096


class NodeDaemon:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        cfg.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = load_or_create(cfg.state / "key")
        self.users = AuthorizedUsers(cfg.state / "authorized_users")
        self.jobs = jobs.JobTable(cfg.state / "jobs", node=cfg.name, keep=cfg.keep, workdir=cfg.export)
        self.stats = {"connections": 0, "connections_total": 0, "refused_total": 0}
        entries = base_entries(cfg.name, cfg.labels)
        entries.append(proc.tree(self.jobs))
        entries.append(self.jobs.tree())
        if cfg.export is not None:
            cfg.export.mkdir(parents=True, exist_ok=True)
            entries.append(storage.tree(cfg.export))
        entries.append(metrics.entry(cfg.name, lambda: dict(self.stats), self.jobs.counts))
        self.tree = NodeTree(entries)
        self._conn_slots = trio.CapacityLimiter(cfg.max_connections)

    def _authorize(self, key: bytes, user: str, peer: str | None) -> tuple[Grant | None, str]:
        grant = self.users.lookup(key)
        if grant is None:
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
                log.warning("refusing a connection: %d connections open", self.cfg.max_connections)
                await stream.aclose()
                return
            async with self._conn_slots:
                try:
                    ch, user, grant = await accept(stream, self.identity, self._authorize)
                except (HandshakeError, ProtocolError, trio.TooSlowError, ConnectionClosed, OSError,
                        trio.BrokenResourceError, trio.ClosedResourceError) as e:  # fmt: skip
                    self.stats["refused_total"] += 1
                    log.info("handshake failed: %s", str(e) or type(e).__name__)
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    return
                self.stats["connections"] += 1
                self.stats["connections_total"] += 1
                log.info("%s connected as %s", ch.peer, user)
                try:
                    session = Session(
                        self.tree, Principal(user, grant, ch.peer), max_fids=self.cfg.max_fids
                    )
                    await session.serve(ch)
                finally:
                    self.stats["connections"] -= 1
                    log.info("%s (%s) disconnected", ch.peer, user)
        except Exception:
            log.exception("connection handler failed")

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


def main(cfg: NodeConfig) -> None:
    try:
        trio.run(run_daemon, cfg)
    except OSError as e:
        sys.exit(f"ninefs serve: {e.strerror or e}")
