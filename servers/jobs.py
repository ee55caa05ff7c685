"""/jobs: run commands on the node through files (docs/files.md has the contract).

    /jobs/clone                 opening it makes a job; a read gives its id
    /jobs/<id>/ctl              dir, env, limit, exec, run, kill, signal, close-stdin, rm
    /jobs/<id>/status           key value lines
    /jobs/<id>/{stdin,stdout,stderr,wait}

A job belongs to the node, not to a connection: the JobTable's own nursery (started by the
daemon) owns every job's supervisor, so a client that goes away leaves its jobs running.
The processes themselves are started (and reaped) by the node's fork server
(servers/spawner.py), which is far cheaper to fork than the daemon. Output goes to spool
files under state/<id>/ so that a reader who comes late, or after a restart, reads
everything from the start; each job's metadata is kept there as json. A reader at the
end of a spool waits on a trio Event, never polls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError
from ninefs.protocol.fs import Handle

from . import workers
from .accounts import Policy
from .cgroups import DEFAULT_PROCS, JobGroups
from .spawner import Child, SetupError, Spawner
from .toolkit import Cmd, Ctl, Ctx, Dir, Entry, Stream, Text

log = logging.getLogger(__name__)

SPOOL_MAX = 64 << 20  # bytes kept per output stream; the rest is read and thrown away
CHUNK = 64 << 10  # bytes moved from a pipe to a spool at a time
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when the daemon stops
PIPE_GRACE = 2.0  # seconds to drain pipes after the child exits (a leftover may hold them)
STATES = ("new", "running", "exited", "signalled", "failed", "lost")
ENDED = ("exited", "signalled", "failed", "lost")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SIZE = re.compile(r"(\d+)([KMGkmg]?)\Z")


def parse_signal(name: str) -> signal.Signals:
    """A signal by name (TERM, SIGTERM, term) or number; EINVAL otherwise."""
    n = name.upper()
    try:
        if n.isdigit():
            return signal.Signals(int(n))
        return signal.Signals[n if n.startswith("SIG") else "SIG" + n]
    except (KeyError, ValueError):
        raise NineError("EINVAL", f"unknown signal {name!r}") from None


def signame(sig: int) -> str:
    """``KILL`` for 9: how status and wait name a signal."""
    try:
        return signal.Signals(sig).name.removeprefix("SIG")
    except ValueError:
        return str(sig)


def _parse_limit(kind: str, value: str) -> float:
    if kind == "mem":
        mt = _SIZE.match(value)
        if not mt:
            raise NineError("EINVAL", f"limit mem: bad size {value!r} (bytes, or N with K M G)")
        n: float = int(mt[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[mt[2].lower()]
    else:
        try:
            n = float(value) if kind == "time" else int(value)
        except ValueError:
            raise NineError("EINVAL", f"limit {kind}: not a number: {value!r}") from None
    if not n > 0 or math.isinf(n):
        raise NineError("EINVAL", f"limit {kind}: must be positive")
    return n


def _rlimits(limits: dict[str, float], pids_cgroup: bool) -> list[tuple[int, int, int]]:
    """The job's rlimits as (resource, soft, hard minus soft), set by its child after it
    has become the job's account (servers/spawn_server.py). Without a pids cgroup,
    `limit procs` is RLIMIT_NPROC."""
    table = [
        (resource.RLIMIT_CPU, "cpu", 1),  # hard one second later: SIGXCPU first, then KILL
        (resource.RLIMIT_AS, "mem", 0),
        *([] if pids_cgroup else [(resource.RLIMIT_NPROC, "procs", 0)]),
    ]
    return [(res, int(limits[k]), extra) for res, k, extra in table if k in limits]


def _clean_env(pw: pwd.struct_passwd | None = None) -> dict[str, str]:
    """What a job starts with (before its `env` words): nothing of the daemon's own settings
    but PATH and LANG. HOME, USER and LOGNAME are those of the account the job runs as."""
    if pw is None:
        try:
            pw = pwd.getpwuid(os.geteuid())
        except KeyError:
            pw = None
    home, user = (pw.pw_dir, pw.pw_name) if pw else ("/", str(os.geteuid()))
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Spool:
    """One output stream of a job: a file on disk that grows, and an event for readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # bytes on disk that readers may read
        self.truncated = False
        self.done = False  # no more output will come
        self._more = trio.Event()
        self._fd: int | None = None

    def _notify(self) -> None:
        self._more.set()
        self._more = trio.Event()

    async def wait_change(self) -> None:
        await self._more.wait()

    async def append(self, data: bytes) -> None:
        room = SPOOL_MAX - self.size
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        if not data:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        await workers.run(os.write, self._fd, data)
        self.size += len(data)
        self._notify()

    def finish(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.done = True
        self._notify()


class SpoolReader(Handle):
    """Reads a spool from its start; at the end, waits for more or for the job's end.
    The offset a client sends is ignored: a stream has its own position (FUSE sends 0)."""

    flags = m.OF_SYNTHETIC | m.OF_STREAM

    def __init__(self, spool: Spool, fd: int) -> None:
        self.spool, self.fd, self.pos = spool, fd, 0
        self._lock = trio.Lock()  # two reads on one handle must not return the same bytes

    async def read(self, offset: int, count: int) -> bytes:
        async with self._lock:
            while True:
                if self.pos < self.spool.size:
                    n = min(count, self.spool.size - self.pos)
                    data = await workers.run(os.pread, self.fd, n, self.pos)
                    self.pos += len(data)
                    return data
                if self.spool.done:
                    return b""
                await self.spool.wait_change()

    async def close(self) -> None:
        os.close(self.fd)


class WaitHandle(Handle):
    flags = m.OF_SYNTHETIC | m.OF_STREAM

    def __init__(self, job: Job) -> None:
        self.job, self.data = job, b""
        self._got = False

    async def read(self, offset: int, count: int) -> bytes:
        if not self._got:
            await self.job.ended.wait()
            if not self._got:  # another read on this handle may have woken first
                self.data, self._got = self.job.wait_line().encode(), True
        out, self.data = self.data[:count], self.data[count:]
        return out


class StdinHandle(Handle):
    flags = m.OF_SYNTHETIC | m.OF_STREAM

    def __init__(self, job: Job) -> None:
        self.job = job

    async def write(self, offset: int, data: bytes) -> int:
        job = self.job
        job.check_present()
        if job.proc is None:
            raise NineError("EINVAL", f"job {job.id} has not started")
        if job.stdin_closed or job.proc.stdin is None:
            raise NineError("EPIPE", f"job {job.id}: stdin is closed")
        try:
            async with job.stdin_lock:
                await job.proc.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise NineError("EPIPE", f"job {job.id}: stdin is closed") from None
        return len(data)


@dataclass
class Job:
    """One job: what it will run, what it ran, and how it ended."""

    id: int
    owner: str
    dir: Path  # state/<id>: meta.json, stdout, stderr
    created: float = field(default_factory=time.time)
    state: str = "new"
    mode: str = ""  # "exec" or "run"
    argv: list[str] = field(default_factory=list)
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    pid: int = 0
    ctime: float = 0.0  # the child's create time, so a reused pid is never mistaken for it
    start: float = 0.0
    end: float = 0.0
    exit: int | None = None
    signal: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        self.proc: Child | None = None
        self.stdout = Spool(self.dir / "stdout")
        self.stderr = Spool(self.dir / "stderr")
        self.ended = trio.Event()
        self.removed = False
        self.stdin_closed = False
        self.stdin_lock = trio.Lock()
        self.io_lock = trio.Lock()  # orders metadata writes and the final rmtree
        self.entry: Dir | None = None
        self.account: pwd.struct_passwd | None = None  # None: the daemon's own account
        self.cgroups: list[Path] = []  # its cgroups while it runs, where there are any

    # -- what it looks like ---------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The child is running and not yet reaped (so its pid cannot have been reused)."""
        return self.proc is not None and not self.proc.ended

    def cmd_text(self) -> str:
        if self.mode == "run":
            return f"run {self.argv[-1]}"
        return f"exec {shlex.join(self.argv)}" if self.mode else "-"

    def wait_line(self) -> str:
        if self.state == "new":  # removed before it ever ran: there is no result
            return ""
        if self.state == "lost":
            return "lost\n"
        if self.signal:
            return f"signal {self.signal}\n"
        return f"exit {self.exit if self.exit is not None else 0}\n"

    def ctl_line(self) -> str:
        line = f"{self.id} {self.state} {self.pid or '-'}"
        if self.state in ("exited", "signalled", "failed"):
            line += " " + self.wait_line().strip()
        return line + "\n"

    def status(self) -> str:
        def t(x: float) -> str:
            return f"{x:.3f}" if x else "-"

        def spool(s: Spool) -> str:
            return f"{s.size}{' truncated' if s.truncated else ''}"

        lim = " ".join(f"{k}={_num(v)}" for k, v in sorted(self.limits.items())) or "-"
        rows = [
            ("id", self.id), ("owner", self.owner), ("state", self.state),
            ("pid", self.pid or "-"), ("cmd", self.cmd_text()), ("dir", self.cwd or "-"),
            ("limits", lim), ("created", t(self.created)), ("start", t(self.start)),
            ("end", t(self.end)), ("exit", "-" if self.exit is None else self.exit),
            ("signal", self.signal or "-"), ("stdout", spool(self.stdout)),
            ("stderr", spool(self.stderr)), ("error", self.error.replace("\n", " ") or "-"),
        ]  # fmt: skip
        return "".join(f"{k} {v}\n" for k, v in rows)

    # -- checks -----------------------------------------------------------------------------

    def check_present(self) -> None:
        if self.removed:
            raise NineError("ENOENT", f"job {self.id} was removed")

    def check_owner(self, ctx: Ctx) -> None:
        self.check_present()
        if ctx.user != self.owner:
            raise NineError("EACCES", f"job {self.id} belongs to {self.owner}")

    def check_new(self, word: str) -> None:
        if self.state != "new":
            raise NineError("EINVAL", f"{word}: job {self.id} has already started")

    # -- persistence ------------------------------------------------------------------------

    _KEYS = ("id", "owner", "created", "state", "mode", "argv", "cwd", "env", "limits",
             "pid", "ctime", "start", "end", "exit", "signal", "error")  # fmt: skip

    def meta(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["truncated"] = [n for n in ("stdout", "stderr") if getattr(self, n).truncated]
        return d

    async def save(self) -> None:
        """Write meta.json (atomically, in a thread); after ``rm`` there is nothing to keep."""
        async with self.io_lock:
            if self.removed:
                return
            text = json.dumps(self.meta())
            try:
                await workers.run(_write_atomic, self.dir / "meta.json", text)
            except OSError as e:
                log.warning("job %d: cannot save its metadata: %s", self.id, e)

    @classmethod
    def load(cls, d: Path) -> Job:
        meta = json.loads((d / "meta.json").read_text())
        job = cls(**{k: meta[k] for k in cls._KEYS if k in meta}, dir=d)
        for name in ("stdout", "stderr"):
            s: Spool = getattr(job, name)
            with contextlib.suppress(OSError):
                s.size = (d / name).stat().st_size
            s.truncated = name in meta.get("truncated", ())
            s.done = job.state != "new"
        if job.state in ENDED:
            job.ended.set()
        return job


class JobTable:
    """Every job on the node. ``run`` (in the daemon's nursery) owns the fork server and
    every job's supervisor."""

    def __init__(
        self,
        state: Path,
        *,
        node: str,
        keep: float = 3600.0,
        workdir: Path | None = None,
        policy: Policy | None = None,
        max_per_user: int = 64,
    ) -> None:
        self.state, self.node, self.keep = state, node, keep
        self.policy = policy or Policy(node)  # which account a user's job runs as
        self.cgroups = JobGroups.open(node, state)
        self.spawner = Spawner()  # starts every job's process (servers/spawn_server.py)
        self.max_per_user = max_per_user  # jobs not yet ended, per user
        self._making: dict[str, int] = {}
        self.workdir = workdir or state  # where a job runs unless it says `dir`
        self.jobs: dict[int, Job] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()  # a job ended or was made: the reaper looks again
        self._id_lock = trio.Lock()
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._next = self._load()

    # -- start-up: what the last daemon left --------------------------------------------

    def _load(self) -> int:
        """Read every job's metadata (before serving, so blocking here holds up nobody).
        Jobs that were running when the last daemon stopped are ``lost``."""
        top = 0
        with contextlib.suppress(OSError, ValueError):
            top = int((self.state / "next").read_text()) - 1
        for d in self.state.iterdir():
            if not d.name.isdigit():
                continue
            top = max(top, int(d.name))
            try:
                job = Job.load(d)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("%s: unreadable job metadata, ignored: %s", d, e)
                continue
            if job.state == "running":  # the last daemon died without recording its end
                self._kill_orphan(job)
                job.error = job.error or "the node's daemon stopped while it ran"
                job.state = "lost"
                job.end = job.end or time.time()
                job.stdout.done = job.stderr.done = True
                job.ended.set()
                _write_atomic(d / "meta.json", json.dumps(job.meta()))
            self.jobs[job.id] = job
        # what the last daemon's jobs left in their cgroups (none of them runs now)
        self.cgroups.sweep()
        return top + 1

    @staticmethod
    def _kill_orphan(job: Job) -> None:
        # A daemon that was killed leaves its children running in their own sessions;
        # nobody reads their output now, so end them, if the pid is still the same process.
        try:
            p = psutil.Process(job.pid)
            if job.pid and abs(p.create_time() - job.ctime) < 0.01:
                os.killpg(job.pid, signal.SIGKILL)
                log.info("job %d: killed its orphaned process group %d", job.id, job.pid)
        except (psutil.Error, OSError):
            pass

    # -- the daemon's side ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the fork server, the supervisors and the reaper until cancelled. On
        cancellation every running job's supervisor stops its child (SIGTERM, a grace,
        SIGKILL) and records the end; the fork server goes last."""
        try:
            async with trio.open_nursery() as outer:
                # the fork server outlives every supervisor: they wait on it as they stop
                await outer.start(self.spawner.run)
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await self._sweep()  # what expired while the daemon was down goes first
                        nursery.start_soon(self._reaper)
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self.spawner.close()
        finally:
            self.cgroups.close()

    async def _reaper(self) -> None:
        """Remove jobs ``keep`` seconds after they ended (or were made and never started)."""
        while True:
            self._changed = trio.Event()
            due = await self._sweep()
            wake = trio.current_time() + (due - time.time() if due is not None else math.inf)
            with trio.move_on_at(wake):
                await self._changed.wait()

    async def _sweep(self) -> float | None:
        """Remove the jobs whose time is up; the wall-clock time the next one is due."""
        now, due = time.time(), []
        for j in list(self.jobs.values()):
            since = j.end if j.state in ENDED else j.created if j.state == "new" else None
            if since is None:
                continue
            if since + self.keep <= now:
                await self._remove(j, why="kept long enough")
            else:
                due.append(since + self.keep)
        return min(due, default=None)

    def _poke(self) -> None:
        self._changed.set()

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for j in self.jobs.values():
            out[j.state] += 1
        return out

    def owned_by(self, user: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.owner == user]

    def live_pids(self, user: str) -> set[int]:
        """The pids (each also its process group and session) of ``user``'s running jobs."""
        return {j.pid for j in self.jobs.values() if j.owner == user and j.alive}

    # -- making and ending jobs -------------------------------------------------------------

    async def create(self, ctx: Ctx) -> Job:
        if ctx.read_only:
            raise NineError("EROFS", "this key may only read")
        live = self._making.get(ctx.user, 0) + sum(
            1 for j in self.jobs.values() if j.owner == ctx.user and j.state in ("new", "running")
        )
        if live >= self.max_per_user:
            raise NineError(
                "EAGAIN", f"{ctx.user} has {live} unfinished jobs (limit {self.max_per_user})"
            )
        self._making[ctx.user] = self._making.get(ctx.user, 0) + 1
        try:
            return await self._create(ctx)
        finally:
            self._making[ctx.user] -= 1
            if not self._making[ctx.user]:
                del self._making[ctx.user]

    def account(self, user: str) -> pwd.struct_passwd | None:
        """The local account a job of ``user`` runs as; None: the daemon's own (the rule is
        servers/accounts.py's); EPERM when the user may not run jobs here."""
        acct = self.policy.account(user, "run jobs")
        return acct.pw if acct is not None else None

    async def _create(self, ctx: Ctx) -> Job:
        async with self._id_lock:
            jid, self._next = self._next, self._next + 1
            # the counter is on disk before the id is handed out: ids are never reused
            await workers.run(_write_atomic, self.state / "next", f"{self._next}\n")
        d = self.state / str(jid)
        job = Job(jid, ctx.user, d, cwd=str(self.workdir))

        def make() -> None:  # one trip to a thread for all of it
            d.mkdir(mode=0o700)
            for s in (job.stdout, job.stderr):
                s.path.touch(0o600)

        await workers.run(make)
        job.entry = self._entry(job)
        self.jobs[jid] = job
        await job.save()
        self._poke()
        log.info("job %d made by %s", jid, ctx.user)
        return job

    async def _start(self, job: Job, mode: str, argv: list[str]) -> None:
        job.check_new(mode)
        if self._nursery is None:
            raise NineError("EAGAIN", "the job table is not running")
        if any("\0" in a for a in argv):
            raise NineError("EINVAL", f"{mode}: an argument may not hold NUL")
        job.account = self.account(job.owner)
        job.mode, job.argv = mode, argv
        job.state = "running"  # claimed now: a second exec that races this one is refused
        try:
            await self._nursery.start(self._supervise, job)
        except OSError as e:
            job.state, job.end = "failed", time.time()
            job.exit = 127 if isinstance(e, FileNotFoundError) else 126
            job.error = f"{mode} {argv[0]}: {e.strerror or e}"
            self._ended(job)
            await job.save()
            raise NineError(e.errno or 5, job.error) from None
        except SetupError as e:
            job.state, job.end, job.exit = "failed", time.time(), 126
            job.error = f"{mode}: cannot set up the job: {e}"
            self._ended(job)
            await job.save()
            raise NineError(e.errno, job.error) from None
        except BaseException:
            if job.proc is None:  # cancelled (a Tflush) while spawning: nothing runs
                job.state, job.end, job.exit = "failed", time.time(), 126
                job.error = f"{mode}: cancelled while starting"
                self._ended(job)
                with trio.CancelScope(shield=True):
                    await job.save()
            raise

    async def _supervise(self, job: Job, *, task_status: trio.TaskStatus[None]) -> None:
        pw = job.account
        env = _clean_env(pw) | job.env
        caps = {"pids": int(job.limits.get("procs", DEFAULT_PROCS))}
        if "mem" in job.limits:
            caps["memory"] = int(job.limits["mem"])  # all its processes together
        job.cgroups = await workers.run(self.cgroups.make, job.id, caps)
        try:
            acct = (pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)) if pw else None
            proc = await self.spawner.spawn(
                job.argv, env, job.cwd, acct, job.cgroups,
                _rlimits(job.limits, "pids" in self.cgroups.has),
            )  # fmt: skip
        except BaseException:
            self.cgroups.remove(job.cgroups)
            raise
        job.proc, job.pid, job.start = proc, proc.pid, time.time()
        with contextlib.suppress(psutil.Error):
            job.ctime = psutil.Process(proc.pid).create_time()
        log.info("job %d: %s started, pid %d, as %s", job.id, job.cmd_text(), proc.pid,
                 pw.pw_name if pw else "the daemon's account")  # fmt: skip
        try:
            await job.save()
            task_status.started()
            async with trio.open_nursery() as nursery:
                drained = trio.Event()
                nursery.start_soon(self._pumps, proc, job, drained)
                with trio.move_on_at(self._deadline(job)) as timer:
                    await proc.wait()
                if timer.cancelled_caught:
                    job.error = f"time limit of {_num(job.limits['time'])}s passed"
                    self._signal_group(job, signal.SIGKILL)
                    await proc.wait()
                # the group is the job: nothing it left behind outlives it (or its limits)
                self._signal_group(job, signal.SIGKILL)
                # the pipes end when the child does, unless something it left holds them
                with trio.move_on_after(PIPE_GRACE):
                    await drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if not proc.ended:  # the daemon is stopping: stop the child first
                    await self._stop(job, proc)
                await self._finish(job, proc)

    def _deadline(self, job: Job) -> float:
        t = job.limits.get("time")
        return trio.current_time() + t if t else math.inf

    async def _pumps(self, proc: Child, job: Job, drained: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, proc.stdout, job.stdout)
            nursery.start_soon(self._pump, proc.stderr, job.stderr)
        drained.set()

    async def _pump(self, pipe: trio.abc.ReceiveStream, spool: Spool) -> None:
        try:
            while data := await pipe.receive_some(CHUNK):
                await spool.append(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            spool.finish()
            await pipe.aclose()

    async def _stop(self, job: Job, proc: Child) -> None:
        job.error = "the node's daemon stopped"
        self._signal_group(job, signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            await proc.wait()
        if not proc.ended:
            self._signal_group(job, signal.SIGKILL)
            with trio.move_on_after(STOP_GRACE):
                await proc.wait()

    async def _finish(self, job: Job, proc: Child) -> None:
        await self._drop_cgroup(job)
        for s in (job.stdout, job.stderr):
            if not s.done:
                s.finish()
        if proc.stdin is not None:
            await proc.stdin.aclose()
        rc = proc.returncode
        job.end = time.time()
        if rc is not None and rc < 0:
            job.state, job.signal = "signalled", signame(-rc)
        else:
            job.state, job.exit = "exited", rc
        if rc is None:  # the fork server that was its parent died: its status went with it
            job.error = job.error or "the node's fork server stopped while it ran"
        if job.error == "the node's daemon stopped" or rc is None:
            job.state = "lost"  # it did not end by itself: nobody knows how it would have
        log.info("job %d ended: %s", job.id, job.wait_line().strip())
        self._ended(job)
        await job.save()

    async def _drop_cgroup(self, job: Job) -> None:
        # Killed members leave the cgroup once they are reaped, which takes a moment for
        # those not our children; a cgroup still busy after that is swept at next start.
        for delay in (0, 0.01, 0.05, 0.1, 0.25, 0.5):
            await trio.sleep(delay)
            if self.cgroups.remove(job.cgroups):
                job.cgroups = []
                return
            self.cgroups.kill(job.cgroups)
        log.warning("job %d: cgroups %s are still busy", job.id, job.cgroups)

    def _ended(self, job: Job) -> None:
        job.stdout.done = job.stderr.done = True
        job.ended.set()
        self._poke()

    def _signal_group(self, job: Job, sig: int) -> None:
        # the group is the job: a shell's children get the signal as well; a KILL reaches
        # all of its cgroup too (what left the group with setsid)
        if job.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, sig)
        if sig == signal.SIGKILL:
            self.cgroups.kill(job.cgroups)

    async def _remove(self, job: Job, why: str) -> None:
        if job.removed:
            return
        if job.alive:
            self._signal_group(job, signal.SIGKILL)
            with trio.move_on_after(STOP_GRACE + PIPE_GRACE):
                await job.ended.wait()
        job.removed = True
        self.jobs.pop(job.id, None)
        if not job.ended.is_set():  # a job that never started: wake its readers with EOF
            for s in (job.stdout, job.stderr):
                s.finish()
            job.ended.set()
        async with job.io_lock:
            await workers.run(shutil.rmtree, job.dir, True)
        log.info("job %d removed (%s)", job.id, why)

    # -- ctl words --------------------------------------------------------------------------

    def _table(self, job: Job) -> dict[str, Cmd]:
        def owner(fn: Callable[[list[str]], Any]) -> Callable[[Ctx, list[str]], Any]:
            async def checked(ctx: Ctx, args: list[str]) -> None:
                job.check_owner(ctx)
                r = fn(args)
                if r is not None:
                    await r

            return checked

        async def dir_(args: list[str]) -> None:
            job.check_new("dir")
            p = Path(args[0])
            if not p.is_absolute() or not await workers.run(p.is_dir):
                raise NineError("EINVAL", f"dir: {args[0]} is not an absolute path to a directory")
            job.cwd = str(p)
            await job.save()

        async def env(args: list[str]) -> None:
            job.check_new("env")
            pairs = [a.partition("=") for a in args]
            for k, eq, v in pairs:
                if not eq or not _NAME.match(k):
                    raise NineError("EINVAL", f"env: want NAME=VALUE, got {k + eq!r}")
                if "\0" in v:
                    raise NineError("EINVAL", f"env: the value of {k} holds NUL")
            job.env.update({k: v for k, _, v in pairs})
            await job.save()

        async def limit(args: list[str]) -> None:
            job.check_new("limit")
            kind, value = args
            if kind not in ("cpu", "mem", "time", "procs"):
                raise NineError("EINVAL", f"limit: no limit {kind!r}; one of cpu mem time procs")
            job.limits[kind] = _parse_limit(kind, value)
            await job.save()

        async def kill(args: list[str]) -> None:
            if job.state == "new":
                raise NineError("EINVAL", f"kill: job {job.id} has not started")
            if job.alive:
                self._signal_group(job, signal.SIGKILL)

        async def signal_(args: list[str]) -> None:
            sig = parse_signal(args[0])
            if not job.alive:
                raise NineError("EINVAL", f"signal: job {job.id} is not running")
            self._signal_group(job, sig)

        async def close_stdin(args: list[str]) -> None:
            if job.proc is None:
                raise NineError("EINVAL", f"close-stdin: job {job.id} has not started")
            job.stdin_closed = True
            if job.proc.stdin is not None:
                await job.proc.stdin.aclose()

        async def rm(args: list[str]) -> None:
            await self._remove(job, why="rm")

        C = Cmd
        return {
            "dir": C(owner(dir_), 1, 1, "PATH"),
            "env": C(owner(env), 1, None, "NAME=VALUE..."),
            "limit": C(owner(limit), 2, 2, "cpu|mem|time|procs N"),
            "exec": C(owner(lambda a: self._start(job, "exec", a)), 1, None, "ARGV..."),
            "run": C(owner(lambda a: self._start(job, "run", ["/bin/sh", "-c", a[0]])),
                     1, 1, "SHELL-COMMAND", raw=True),
            "kill": C(owner(kill)),
            "signal": C(owner(signal_), 1, 1, "NAME"),
            "close-stdin": C(owner(close_stdin)),
            "rm": C(owner(rm)),
        }  # fmt: skip

    # -- the files --------------------------------------------------------------------------

    def _entry(self, job: Job) -> Dir:
        async def on_error(ctx: Ctx, reason: str) -> None:
            if job.removed or ctx.user != job.owner:
                return
            log.info("job %d: ctl: %s", job.id, reason)
            job.error = reason
            await job.save()

        async def open_spool(spool: Spool, ctx: Ctx, mode: int) -> Handle:
            job.check_owner(ctx)
            if mode & 3 != m.OREAD:
                raise NineError("EACCES", "output is read-only")
            fd = await workers.run(os.open, spool.path, os.O_RDONLY)
            return SpoolReader(spool, fd)

        def open_stdin(ctx: Ctx, mode: int) -> Handle:
            job.check_owner(ctx)
            if mode & 3 != m.OWRITE:
                raise NineError("EACCES", "stdin is write-only")
            return StdinHandle(job)

        def open_wait(ctx: Ctx, mode: int) -> Handle:
            job.check_present()
            if mode & 3 != m.OREAD:
                raise NineError("EACCES", "wait is read-only")
            return WaitHandle(job)

        def status(ctx: Ctx) -> str:
            job.check_present()
            return job.status()

        d = JobDir(self, job, [
            OwnedCtl(job, "ctl", self._table(job), read=lambda ctx: job.ctl_line(),
                     on_error=on_error),
            Text("status", status),
            Stream("stdin", open_stdin, perm=0o222),
            Stream("stdout", lambda ctx, mode: open_spool(job.stdout, ctx, mode)),
            Stream("stderr", lambda ctx, mode: open_spool(job.stderr, ctx, mode)),
            Stream("wait", open_wait),
        ])  # fmt: skip
        return d

    def tree(self) -> Dir:
        async def clone(ctx: Ctx) -> str:
            return f"{(await self.create(ctx)).id}\n"

        clone_entry = Text("clone", clone)

        def listing(ctx: Ctx) -> list[Entry]:
            mine = sorted(self.owned_by(ctx.user), key=lambda j: j.id)
            return [clone_entry, *(self._dir_of(j) for j in mine)]

        def lookup(ctx: Ctx, name: str) -> Entry | None:
            if name == "clone":
                return clone_entry
            canonical = name.isdigit() and name == str(int(name))  # "07" is not job 7
            j = self.jobs.get(int(name)) if canonical else None
            return self._dir_of(j) if j is not None else None

        return Dir("jobs", listing, lookup=lookup)

    def _dir_of(self, job: Job) -> Dir:
        if job.entry is None:  # loaded from disk: made on first use
            job.entry = self._entry(job)
        return job.entry


class JobDir(Dir):
    """A job's directory; removing it is ``rm``."""

    def __init__(self, table: JobTable, job: Job, entries: list[Entry]) -> None:
        super().__init__(str(job.id), entries, perm=0o555)
        self.table, self.job = table, job
        self.mtime = int(job.created * 1e9)

    async def remove(self, ctx: Ctx) -> None:
        self.job.check_owner(ctx)
        await self.table._remove(self.job, why="removed")


class OwnedCtl(Ctl):
    """A job's ctl: only its owner may open it."""

    def __init__(self, job: Job, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.job = job

    async def open(self, ctx: Ctx, mode: int) -> Handle:
        self.job.check_owner(ctx)
        return await super().open(ctx, mode)
