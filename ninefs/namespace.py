"""The user's namespace: a mount table with Plan 9's mount and bind, and the cluster files.

A namespace path (a tuple of names) resolves to an ordered list of places, each either a
path in one node's tree (``NodeSrc``) or a file the namespace makes itself (``LocalSrc``:
the root, /n, /nodes, /ctl, /jobs, /jobs/clone, and each cluster job's ctl). A union
directory is a mount-table entry with several places: a lookup takes the first place that
has the name, a listing merges them (first wins), and creation goes to the first.

    mount ADDR NAME        the node at ADDR appears at /n/NAME
    bind [-a|-b] OLD NEW   what is at OLD appears at NEW too: replacing it, or after (-a)
                           or before (-b) what NEW shows already (a union)
    unmount NAME           /n/NAME goes away (and the connection with it)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import trio

from ninefs.protocol.errors import NineError
from ninefs.protocol.keys import KnownNodes
from ninefs.protocol.transport import parse_addr
from ninefs.servers.toolkit import Cmd, parse_ctl

from .nodes import NodeConn

log = logging.getLogger(__name__)

Path_ = tuple[str, ...]
MAX_BIND_DEPTH = 8
RESTART_TRACK = 2.0  # seconds between looks at the state of `restart on-failure` jobs


@dataclass(frozen=True)
class NodeSrc:
    node: str
    path: Path_


@dataclass(frozen=True)
class LocalSrc:
    path: Path_


@dataclass(frozen=True)
class BindSrc:
    """A namespace path, resolved each time (so mounts made later under it show)."""

    path: Path_


Src = NodeSrc | LocalSrc | BindSrc


def _show(path: Path_) -> str:
    return "/" + "/".join(path)


def _show_src(src: Src) -> str:
    if isinstance(src, NodeSrc):
        return _show(("n", src.node, *src.path))
    return _show(src.path)


def split(path: str) -> Path_:
    return tuple(p for p in path.split("/") if p and p != ".")


@dataclass
class ClusterJob:
    """A job made through /jobs/clone: where it runs, and what its ctl was told before exec."""

    id: str
    node: str
    rid: str
    constraints: dict[str, str] = field(default_factory=dict)
    restart: bool = False
    log: list[str] = field(default_factory=list)
    started: bool = False
    restarts: int = 0
    ended: bool = False  # seen ended (by the tracker): a node loss no longer restarts it
    history: list[str] = field(default_factory=list)  # restart lines, shown by a ctl read


class Namespace:
    def __init__(
        self, identity: nacl.signing.SigningKey, user: str, known: KnownNodes | None
    ) -> None:
        self.identity, self.user, self.known = identity, user, known
        self.nodes: dict[str, NodeConn] = {}
        self.table: dict[Path_, list[Src]] = {(): [LocalSrc(())]}
        self.jobs: dict[str, ClusterJob] = {}
        # node -> ids of jobs there that were started again elsewhere while it was away:
        # removed (killed) once it is back, so a job never runs twice for long
        self._superseded: dict[str, set[str]] = {}
        self._placed: dict[str, int] = {}  # jobs placed per node since its facts were read
        self._nursery: trio.Nursery | None = None
        self.ctl_table = {
            "mount": Cmd(self._ctl_mount, 2, 2, "ADDR NAME"),
            "unmount": Cmd(self._ctl_unmount, 1, 1, "NAME"),
            "bind": Cmd(self._ctl_bind, 2, 3, "[-a|-b] OLD NEW"),
        }

    # -- life --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._track_restartable)
            task_status.started()
            await trio.sleep_forever()

    async def mount(self, addr: str, name: str) -> NodeConn:
        parse_addr(addr)
        if not name or "/" in name or name in (".", ".."):
            raise NineError("EINVAL", f"bad node name {name!r}")
        if name in self.nodes:
            raise NineError("EEXIST", f"node {name} is already mounted")
        assert self._nursery is not None, "Namespace.run must be started first"
        conn = NodeConn(name, addr, self.identity, self.user, self.known)
        self.nodes[name] = conn
        self.table[("n", name)] = [NodeSrc(name, ())]
        await self._nursery.start(conn.run)
        return conn

    def unmount(self, name: str) -> None:
        conn = self.nodes.pop(name, None)
        if conn is None:
            raise NineError("ENOENT", f"no node {name} is mounted")
        conn.stop()
        self.table.pop(("n", name), None)

    def bind(self, old: str, new: str, flag: str = "") -> None:
        o, n = split(old), split(new)
        if not n:
            raise NineError("EINVAL", "cannot bind over the root")
        if o == n:
            raise NineError("EINVAL", "OLD and NEW are the same")
        if not any(self._may_exist(s, o) for s in self.resolve(o)):
            raise NineError("ENOENT", f"{old}: nothing there")
        src: Src = BindSrc(o)
        if flag == "":
            self.table[n] = [src]
        else:
            current = self.table.get(n) or self.resolve(n)
            # places where nothing exists (the root's own tree below a new name) add nothing
            # to a union, and must not come first and refuse every create
            current = [
                c
                for c in current
                if not (isinstance(c, LocalSrc) and self.local_kind(c.path) is None)
            ]
            self.table[n] = [*current, src] if flag == "-a" else [src, *current]

    def text(self) -> str:
        """The namespace as a namespace file would make it (what reading /ctl gives, as
        Plan 9's ns(1) prints a mount table): each node's `mount`, then each bound place
        as `bind` for its first source and `bind -a`/`-b` for the others, in the order
        they were made. Loading the text gives this namespace again."""
        lines = [f"mount {c.addr} {c.name}" for c in self.nodes.values()]
        table = self.table
        for dst, srcs in list(table.items()):
            if not dst or (len(dst) == 2 and dst[0] == "n" and dst[1] in self.nodes):
                continue  # the root, and the nodes' own mount points: the lines above
            # what would show there without this entry: a union's own part
            self.table = {k: v for k, v in table.items() if k != dst}
            try:
                under = [c for c in self.resolve(dst)
                         if not (isinstance(c, LocalSrc) and self.local_kind(c.path) is None)]  # fmt: skip
            finally:
                self.table = table
            where, k = _show(dst), len(under)
            if under and srcs[:k] == under:
                lines += [f"bind -a {_show_src(x)} {where}" for x in srcs[k:]]
            elif under and srcs[-k:] == under:
                lines += [f"bind -b {_show_src(x)} {where}" for x in reversed(srcs[:-k])]
            elif srcs:
                lines.append(f"bind {_show_src(srcs[0])} {where}")
                lines += [f"bind -a {_show_src(x)} {where}" for x in srcs[1:]]
        return "".join(line + "\n" for line in lines)

    async def load(self, lines: Iterable[str], origin: str = "namespace") -> None:
        """Apply a namespace file: ``mount ADDR NAME`` and ``bind [-a|-b] OLD NEW`` lines."""
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                await self.ctl(line)
            except NineError as e:
                raise NineError("EINVAL", f"{origin}:{n}: {e.message}") from None

    async def load_file(self, path: Path) -> None:
        await self.load(path.read_text().splitlines(), str(path))

    # -- /ctl --------------------------------------------------------------------------

    async def ctl(self, text: str) -> None:
        for cmd, args in parse_ctl(text, self.ctl_table):
            await cmd.fn(None, args)

    async def _ctl_mount(self, _ctx: object, args: list[str]) -> None:
        try:
            await self.mount(args[0], args[1])
        except ValueError as e:
            raise NineError("EINVAL", str(e)) from None

    async def _ctl_unmount(self, _ctx: object, args: list[str]) -> None:
        self.unmount(args[0])

    async def _ctl_bind(self, _ctx: object, args: list[str]) -> None:
        flag = ""
        if len(args) == 3:
            flag = args.pop(0)
            if flag not in ("-a", "-b"):
                raise NineError("EINVAL", f"bind: unknown flag {flag!r}; use -a or -b")
        await self._check_on_nodes(args[0])
        self.bind(args[0], args[1], flag)

    def _may_exist(self, src: NodeSrc | LocalSrc, path: Path_) -> bool:
        """False for a place that surely is not there (a namespace name nothing made)."""
        if isinstance(src, NodeSrc):
            return True
        return (self.local_kind(src.path) is not None or src.path in self.table
                or bool(self.mount_points(path)))  # fmt: skip

    async def _check_on_nodes(self, old: str) -> None:
        """ENOENT if every node that OLD resolves to says it has no such file (a node that
        is down or slow gets the benefit of the doubt: a namespace file must still load)."""
        srcs = self.resolve(split(old))
        if not srcs or not all(isinstance(s, NodeSrc) for s in srcs):
            return
        for s in srcs:
            conn = self.nodes.get(s.node)
            try:
                if conn is None:
                    return
                client, _ = conn.get()
                await client.stat_path("/" + "/".join(s.path))
                return
            except NineError as e:
                if e.ename != "ENOENT":
                    return
        raise NineError("ENOENT", f"{old}: nothing there")

    # -- resolution --------------------------------------------------------------------

    def resolve(self, path: Path_, depth: int = 0) -> list[NodeSrc | LocalSrc]:
        """The places that show at ``path``, in union order."""
        if depth > MAX_BIND_DEPTH:
            return []
        if len(path) >= 2 and path[0] == "jobs" and path[1] != "clone":
            job = self.job(path[1])
            if job is None:
                return []
            if path[2:] == ("ctl",):
                return [LocalSrc(path)]
            return [NodeSrc(job.node, ("jobs", job.rid, *path[2:]))]
        for i in range(len(path), -1, -1):
            srcs = self.table.get(path[:i])
            if srcs is None:
                continue
            rest, out = path[i:], []
            for s in srcs:
                if isinstance(s, BindSrc):
                    out.extend(self.resolve(s.path + rest, depth + 1))
                elif isinstance(s, NodeSrc):
                    out.append(NodeSrc(s.node, s.path + rest))
                else:
                    out.append(LocalSrc(s.path + rest))
            return out
        return []

    def mount_points(self, path: Path_) -> list[str]:
        """Names that mount-table entries add directly under ``path``."""
        n = len(path)
        return sorted({k[n] for k in self.table if len(k) == n + 1 and k[:n] == path})

    # -- the namespace's own files -------------------------------------------------------

    LOCAL_DIRS = {(), ("n",), ("jobs",)}
    LOCAL_FILES = {("nodes",), ("ctl",), ("jobs", "clone")}

    def local_kind(self, path: Path_) -> str | None:
        """'dir', 'file' or None for a LocalSrc path."""
        if path in self.LOCAL_DIRS:
            return "dir"
        if path in self.LOCAL_FILES:
            return "file"
        if len(path) == 3 and path[0] == "jobs" and path[2] == "ctl" and self.job(path[1]):
            return "file"
        return None

    def local_names(self, path: Path_) -> list[str]:
        if path == ():
            return ["n", "nodes", "jobs", "ctl"]
        if path == ("jobs",):
            return ["clone"]
        return []

    def nodes_text(self) -> str:
        now = time.time()
        lines = []
        for n in sorted(self.nodes.values(), key=lambda c: c.name):
            f = n.facts
            line = (f"{n.name:<8} {n.addr:<21} {n.state:<7} load {f.load:.2f}  cpu {f.ncpu}  "
                    f"mem {f.mem_free / 2**30:.1f}G free  jobs {f.jobs}")  # fmt: skip
            if n.state != "up":
                line += f"  since {time.strftime('%H:%M:%S', time.localtime(n.since))} ({int(now - n.since)}s)"
            lines.append(line + "\n")
        return "".join(lines)

    # -- cluster jobs ------------------------------------------------------------------

    def job(self, jid: str) -> ClusterJob | None:
        """A cluster job by id; ids of jobs made elsewhere (``node.N``) are understood too."""
        j = self.jobs.get(jid)
        if j is None:
            node, dot, rid = jid.partition(".")
            if dot and node in self.nodes and rid.isdigit():
                j = ClusterJob(jid, node, rid, started=True)
        return j

    def _fits(self, conn: NodeConn, c: dict[str, str]) -> bool:
        if conn.state != "up":
            return False
        if "node" in c and conn.name != c["node"]:
            return False
        if "label" in c and c["label"] not in conn.facts.labels:
            return False
        return True

    def place(self, constraints: dict[str, str] | None = None, avoid: str = "") -> NodeConn:
        """The node that fits best: up, meets the constraints, least load per cpu."""
        c = constraints or {}
        fits = [n for n in self.nodes.values() if self._fits(n, c) and n.name != avoid]
        if not fits:
            why = " ".join(f"{k} {v}" for k, v in c.items()) or "any node"
            raise NineError("EHOSTDOWN", f"no node that is up fits: {why}")

        def score(n: NodeConn) -> tuple[float, str]:
            cpus = max(n.facts.ncpu, 1)
            return ((n.facts.load + n.facts.jobs + self._placed.get(n.name, 0)) / cpus, n.name)

        best = min(fits, key=score)
        self._placed[best.name] = self._placed.get(best.name, 0) + 1
        return best

    def facts_refreshed(self, node: str) -> None:
        self._placed.pop(node, None)

    async def clone(self, constraints: dict[str, str] | None = None, avoid: str = "") -> ClusterJob:
        conn = self.place(constraints, avoid)
        try:
            client, _ = conn.get()
            rid = (await client.read_file("/jobs/clone")).decode().strip()
        except NineError as e:
            if e.ename not in ("EHOSTDOWN", "EIO") or avoid:
                raise
            # the node was lost between its last heartbeat and now: once more, elsewhere
            return await self.clone(constraints, avoid=conn.name)
        job = ClusterJob(f"{conn.name}.{rid}", conn.name, rid)
        self.jobs[job.id] = job
        return job

    async def job_ctl_read(self, jid: str) -> bytes:
        job = self.job(jid)
        if job is None:
            raise NineError("ENOENT", f"no job {jid}")
        client, _ = self.nodes[job.node].get()
        line = await client.read_file(f"/jobs/{job.rid}/ctl")
        # the node's `ID STATE PID...`, with the id saying where the job is: `n3.4 running 42`
        rest = line.split(b" ", 1)[1] if b" " in line else b"\n"
        line = f"{job.node}.{job.rid} ".encode() + rest
        return line + "".join(h + "\n" for h in job.history).encode()

    async def job_ctl_write(self, jid: str, text: str) -> None:
        """A cluster job's ctl: placement words are ours, the rest goes to the node."""
        job = self.job(jid)
        if job is None:
            raise NineError("ENOENT", f"no job {jid}")
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] in ("node", "label"):
                if len(words) != 2:
                    raise NineError(
                        "EINVAL", f"usage: {words[0]} {'NAME' if words[0] == 'node' else 'LABEL'}"
                    )
                if job.started:
                    raise NineError("EINVAL", f"{words[0]}: the job has started already")
                job.constraints[words[0]] = words[1]
                continue
            if words[0] == "restart":
                if words[1:] != ["on-failure"]:
                    raise NineError("EINVAL", "usage: restart on-failure")
                if job.started:
                    raise NineError("EINVAL", "restart: the job has started already")
                job.restart = True
                continue
            starting = words[0] in ("exec", "run")
            if starting and not job.started:
                await self._ensure_placement(job)
            try:
                await self._forward(job, line)
            except NineError as e:
                if starting and e.ename not in ("EHOSTDOWN", "EIO", "ETIMEDOUT"):
                    self._forget_if_plain(job)  # the node failed it for good (no such program)
                raise
            if starting:
                job.started = True
                job.log.append(line)
                self._forget_if_plain(job)
            elif not job.started:
                job.log.append(line)  # replayed if the job must be made again elsewhere

    def _forget_if_plain(self, job: ClusterJob) -> None:
        """Once a job has been told to run, the mount keeps it only if it must: to restart
        it, or because its id no longer says where it is (it was moved). Any other is found
        from its id (``job``), so a mount that launches millions of jobs holds none of them."""
        if not job.restart and job.id == f"{job.node}.{job.rid}":
            self.jobs.pop(job.id, None)

    async def _forward(self, job: ClusterJob, line: str) -> None:
        client, _ = self.nodes[job.node].get()
        await client.write_file(f"/jobs/{job.rid}/ctl", (line + "\n").encode())

    async def _ensure_placement(self, job: ClusterJob) -> None:
        conn = self.nodes.get(job.node)
        if conn is not None and self._fits(conn, job.constraints):
            return
        await self._replace(job)

    async def _replace(self, job: ClusterJob, avoid: str = "") -> None:
        """Move a job that has not run (or must run again) to a node that fits: a new job
        there, told what this one was told, and the old one removed."""
        old_node, old_rid = job.node, job.rid
        conn = self.place(job.constraints, avoid)
        client, _ = conn.get()
        rid = (await client.read_file("/jobs/clone")).decode().strip()
        job.node, job.rid = conn.name, rid
        for line in job.log:
            await self._forward(job, line)
        old = self.nodes.get(old_node)
        if old is not None and old.state == "up":
            try:
                oc, _ = old.get()
                await oc.write_file(f"/jobs/{old_rid}/ctl", b"rm\n")
            except NineError:
                pass
        elif old is not None:  # cut off, perhaps still running it: remove it on return
            self._superseded.setdefault(old_node, set()).add(old_rid)
        self.jobs[f"{conn.name}.{rid}"] = job
        log.info("job %s moved from %s.%s to %s.%s", job.id, old_node, old_rid, conn.name, rid)

    async def restart_lost_jobs(self, node: str) -> None:
        """Jobs with ``restart on-failure`` whose node went down start again elsewhere."""
        for job in {id(j): j for j in self.jobs.values()}.values():
            if job.node == node and job.restart and job.started and not job.ended:
                await self._restart(job, avoid=node, why=f"{node} down")

    async def _restart(self, job: ClusterJob, avoid: str, why: str) -> None:
        was = f"{job.node}.{job.rid}"
        try:
            await self._replace(job, avoid=avoid)
            job.restarts += 1
            job.history.append(f"restarted {job.restarts} {was} -> {job.node}.{job.rid} "
                               f"at {time.strftime('%H:%M:%S')} ({why})")  # fmt: skip
        except NineError as e:
            log.warning("job %s could not be restarted: %s", job.id, e.message)
            job.history.append(f"restart failed {was} at {time.strftime('%H:%M:%S')} "
                               f"({why}): {e.message}")  # fmt: skip

    async def _remove_superseded(self) -> None:
        """On a node that is back, remove the jobs that ran again elsewhere meanwhile (a
        node that was only cut off kept running them)."""
        for node, rids in list(self._superseded.items()):
            conn = self.nodes.get(node)
            if conn is None:
                del self._superseded[node]  # unmounted: nothing more to do there
                continue
            if conn.state != "up":
                continue
            for rid in sorted(rids):
                try:
                    client, _ = conn.get()
                    await client.write_file(f"/jobs/{rid}/ctl", b"rm\n")
                except NineError as e:
                    if e.ename != "ENOENT":
                        continue  # try again next time
                rids.discard(rid)
                log.info("removed %s.%s, which ran again elsewhere while %s was away",
                         node, rid, node)  # fmt: skip
            if not rids:
                del self._superseded[node]

    async def _track_restartable(self) -> None:
        """Every RESTART_TRACK seconds, read the state of each started `restart on-failure`
        job whose node is up: one seen ended is not started again when its node goes down."""
        while True:
            await trio.sleep(RESTART_TRACK)
            await self._remove_superseded()
            for job in {id(j): j for j in self.jobs.values()}.values():
                conn = self.nodes.get(job.node)
                if not (job.restart and job.started and not job.ended) or conn is None:
                    continue
                if conn.state != "up":
                    continue
                try:
                    client, _ = conn.get()
                    words = (await client.read_file(f"/jobs/{job.rid}/ctl", 2.0)).split()
                except NineError:
                    continue
                state = words[1].decode() if len(words) > 1 else ""
                if state in ("exited", "signalled", "failed"):
                    job.ended = True
                elif state == "lost":  # its node's daemon restarted before we saw it down
                    await self._restart(job, avoid="", why=f"{job.node} restarted")
