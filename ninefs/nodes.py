"""One managed connection per node: connect, heartbeat, notice loss, reconnect with backoff.

A node is ``up`` (connected and answering), ``suspect`` (a heartbeat went unanswered),
``down`` (the connection is gone or too many heartbeats were missed) or ``connecting``
(the first attempt). Calls for a node that is not up fail at once with EHOSTDOWN; a fid
from an earlier connection (an older ``gen``) is worthless, and its users get EIO.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import nacl.signing
import trio

from ninefs.protocol.client import Client
from ninefs.protocol.errors import NineError, ProtocolError, collapse_groups
from ninefs.protocol.keys import HostKeyChanged, KnownNodes
from ninefs.protocol.transport import ConnectionClosed, dial

log = logging.getLogger(__name__)

HEARTBEAT = 2.0  # seconds between pings
HEARTBEAT_TIMEOUT = 2.0
MISSES_DOWN = 3  # missed heartbeats before a node is declared down
BACKOFF_MIN, BACKOFF_MAX = 0.2, 3.0  # a node that is back is found within BACKOFF_MAX
CONNECT_TIMEOUT = 5.0  # seconds for TCP connect and handshake (a hung node accepts, then stalls)


@dataclass
class Facts:
    """What /nodes shows and placement uses; refreshed with each heartbeat."""

    load: float = 0.0
    ncpu: int = 0
    mem_free: int = 0
    jobs: int = 0
    labels: tuple[str, ...] = ()


@dataclass
class NodeConn:
    name: str
    addr: str
    identity: nacl.signing.SigningKey
    user: str
    known: KnownNodes | None
    state: str = "connecting"
    since: float = field(default_factory=time.time)
    gen: int = 0
    client: Client | None = None
    root: int = 0
    facts: Facts = field(default_factory=Facts)
    error: str = ""
    _cancel: trio.CancelScope | None = None
    changed: trio.Event = field(default_factory=trio.Event)  # set (and replaced) on state changes

    def _set(self, state: str, error: str = "") -> None:
        if state != self.state:
            log.info(
                "node %s (%s): %s%s", self.name, self.addr, state, f" ({error})" if error else ""
            )
            self.state, self.since = state, time.time()
            self.changed.set()
            self.changed = trio.Event()
        self.error = error or self.error

    def get(self) -> tuple[Client, int]:
        """The client of a node that is up, or EHOSTDOWN at once."""
        if (
            self.client is None
            or self.state not in ("up", "suspect")
            or self.client.closed.is_set()
        ):
            raise NineError("EHOSTDOWN", f"node {self.name} is {self.state}")
        return self.client, self.gen

    async def wait_state(self, timeout: float) -> str:
        """Wait until the node leaves ``connecting`` (or ``timeout``); the state then."""
        with trio.move_on_after(timeout):
            while self.state == "connecting":
                await self.changed.wait()
        return self.state

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to the node for as long as this runs."""
        backoff = BACKOFF_MIN
        with trio.CancelScope() as self._cancel:
            task_status.started()
            while True:
                try:
                    with collapse_groups():
                        await self._connect_and_serve()
                    backoff = BACKOFF_MIN
                except HostKeyChanged as e:
                    self._set("down", str(e))
                    log.error("%s", e)
                    backoff = BACKOFF_MAX
                except (
                    OSError,
                    ProtocolError,
                    ConnectionClosed,
                    NineError,
                    trio.TooSlowError,
                ) as e:
                    self._set("down", str(e) or type(e).__name__)
                finally:
                    self.client = None
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self._set("down", "unmounted")

    async def _connect_and_serve(self) -> None:
        with trio.fail_after(CONNECT_TIMEOUT):
            channel = await dial(self.addr, self.identity, self.user, self.known)
        async with trio.open_nursery() as nursery:
            client = Client(channel, self.user)
            await nursery.start(client.run)
            self.root = await client.attach()
            self.gen += 1
            self.client = client
            await self._refresh(client)
            self._set("up")
            nursery.start_soon(self._heartbeat, client)
            await client.closed.wait()
            nursery.cancel_scope.cancel()
        raise ConnectionClosed(client.reason or "connection closed")

    async def _heartbeat(self, client: Client) -> None:
        misses = 0
        while True:
            await trio.sleep(HEARTBEAT)
            try:
                await client.ping(HEARTBEAT_TIMEOUT)
                misses = 0
                self._set("up")
                await self._refresh(client)
            except NineError as e:
                misses += 1
                if client.closed.is_set():
                    return
                self._set("suspect", f"{misses} heartbeat(s) missed")
                if misses >= MISSES_DOWN:
                    self._set("down", f"no answer to {misses} heartbeats: {e.message}")
                    await client.aclose()
                    return

    async def _refresh(self, client: Client) -> None:
        """Load, cpus, free memory and jobs from /metrics (one file, one round of reads)."""
        try:
            text = (await client.read_file("/metrics", timeout=HEARTBEAT_TIMEOUT)).decode()
            labels = (await client.read_file("/node/labels", timeout=HEARTBEAT_TIMEOUT)).decode()
        except NineError:
            return
        f = Facts(labels=tuple(labels.split()))
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, _, val = line.rpartition(" ")
            try:
                v = float(val)
            except ValueError:
                continue
            if key == "ninefs_load1":
                f.load = v
            elif key == "ninefs_cpus":
                f.ncpu = int(v)
            elif key == "ninefs_memory_available_bytes":
                f.mem_free = int(v)
            elif key.startswith("ninefs_jobs{") and ('"running"' in key or '"new"' in key):
                f.jobs += int(v)
        self.facts = f
