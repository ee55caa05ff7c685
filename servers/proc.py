"""/proc: the node's processes, from psutil (docs/files.md has the formats).

    /proc/<pid>/status   key value lines
    /proc/<pid>/args     the command line, one line
    /proc/<pid>/ctl      kill | stop | cont | signal NAME

Anyone may read; only some processes may be signalled (see ``_may_signal``). A process
directory's qid is salted with the process's create time, so a reused pid is a new file.
psutil reads /proc: that is a system call per file, so it runs in a thread.
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal

import psutil

from ninefs.protocol.errors import NineError

from . import workers
from .jobs import JobTable, parse_signal
from .toolkit import Cmd, Ctl, Ctx, Dir, Entry, Text

log = logging.getLogger(__name__)

_ATTRS = ["pid", "name", "status", "ppid", "username", "memory_info", "cpu_times", "create_time"]


def _process(pid: int, ctime: float) -> psutil.Process:
    """The process ``pid`` if it is still the one that was walked to; ENOENT if it is gone."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - ctime) < 0.01:
            return p
    except psutil.NoSuchProcess:
        pass
    except psutil.Error as e:
        raise NineError("EACCES", f"process {pid}: {e}") from None
    raise NineError("ENOENT", f"process {pid} has gone")


def _status(pid: int, ctime: float) -> str:
    p = _process(pid, ctime)
    try:
        with p.oneshot():
            info = p.as_dict(_ATTRS, ad_value=None)
    except psutil.NoSuchProcess:
        raise NineError("ENOENT", f"process {pid} has gone") from None
    mem, cpu = info["memory_info"], info["cpu_times"]
    rows = [
        ("pid", pid),
        ("name", info["name"] or "-"),
        ("state", info["status"] or "-"),
        ("ppid", info["ppid"] if info["ppid"] is not None else "-"),
        ("user", info["username"] or "-"),
        ("rss", mem.rss if mem else "-"),
        ("cpu", f"{cpu.user + cpu.system:.2f}" if cpu else "-"),
        ("start", f"{ctime:.2f}"),
    ]
    return "".join(f"{k} {v}\n" for k, v in rows)


def _args(pid: int, ctime: float) -> str:
    p = _process(pid, ctime)
    try:
        argv = p.cmdline()
        name = p.name()
    except psutil.NoSuchProcess:
        raise NineError("ENOENT", f"process {pid} has gone") from None
    except psutil.AccessDenied:
        argv, name = [], "?"
    # a kernel thread has no command line: show its name as ps does
    return (shlex.join(argv) if argv else f"[{name}]") + "\n"


def _local_uid(user: str) -> int | None:
    """The uid of a local non-root account named ``user``, when the daemon is root."""
    if os.geteuid() != 0:
        return None
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return None
    return uid if uid != 0 else None


def _may_signal(job_pids: set[int], user: str, p: psutil.Process) -> bool:
    """A user may signal a process of one of their running jobs (its pid, group or session)
    and, when the daemon is root, the processes of the local account of the same name.
    Never the daemon itself, and never anything else."""
    if p.pid == os.getpid():
        return False
    if p.pid in job_pids:
        return True
    for get in (os.getpgid, os.getsid):
        try:
            if get(p.pid) in job_pids:
                return True
        except OSError:
            pass
    uid = _local_uid(user)
    try:
        return uid is not None and p.uids().real == uid
    except psutil.Error:
        return False


class ProcDir(Dir):
    """One process: the pid and its create time, which together name it for good."""

    def __init__(self, jobs: JobTable, pid: int, ctime: float) -> None:
        self.jobs, self.pid, self.ctime = jobs, pid, ctime
        super().__init__(
            str(pid),
            [
                Text("status", self._read(_status)),
                Text("args", self._read(_args)),
                Ctl("ctl", self._table(), perm=0o220, on_error=self._on_error),
            ],
        )
        self.mtime = int(ctime * 1e9)

    def salt(self) -> str:
        return f"@{self.ctime:.2f}"

    def _read(self, fn):  # noqa: ANN001, ANN202 - a tiny adapter
        async def read(ctx: Ctx) -> str:
            return await workers.run(fn, self.pid, self.ctime)

        return read

    def _on_error(self, ctx: Ctx, reason: str) -> None:
        log.info("%s: /proc/%d/ctl: %s", ctx.user, self.pid, reason)

    def _table(self) -> dict[str, Cmd]:
        def sender(fixed: signal.Signals | None):  # noqa: ANN202
            async def send(ctx: Ctx, args: list[str]) -> None:
                sig = fixed if fixed is not None else parse_signal(args[0])
                await self._signal(ctx, sig)

            return send

        return {
            "kill": Cmd(sender(signal.SIGKILL)),
            "stop": Cmd(sender(signal.SIGSTOP)),
            "cont": Cmd(sender(signal.SIGCONT)),
            "signal": Cmd(sender(None), 1, 1, "NAME"),
        }

    async def _signal(self, ctx: Ctx, sig: signal.Signals) -> None:
        job_pids = self.jobs.live_pids(ctx.user)  # read on the trio thread, which owns it

        def check_and_send() -> None:
            p = _process(self.pid, self.ctime)
            if not _may_signal(job_pids, ctx.user, p):
                raise NineError("EPERM", f"{ctx.user} may not signal process {self.pid}")
            try:
                p.send_signal(sig)  # psutil checks the pid is still this process first
            except psutil.NoSuchProcess:
                raise NineError("ENOENT", f"process {self.pid} has gone") from None
            except psutil.AccessDenied:
                raise NineError("EPERM", f"cannot signal process {self.pid}") from None

        await workers.run(check_and_send)
        log.info("%s sent SIG%s to process %d", ctx.user, sig.name.removeprefix("SIG"), self.pid)


def tree(jobs: JobTable) -> Dir:
    """/proc: one directory per process; a lookup asks about one pid, not the whole list."""

    def scan() -> list[tuple[int, float]]:
        out = []
        for p in psutil.process_iter(["create_time"]):
            ct = p.info["create_time"]
            if ct is not None:
                out.append((p.pid, ct))
        return out

    async def listing(ctx: Ctx) -> list[Entry]:
        return [ProcDir(jobs, pid, ct) for pid, ct in await workers.run(scan)]

    def one(name: str) -> tuple[int, float] | None:
        try:
            return int(name), psutil.Process(int(name)).create_time()
        except psutil.Error:
            return None

    async def lookup(ctx: Ctx, name: str) -> Entry | None:
        if not name.isdigit() or name.startswith("0"):
            return None
        found = await workers.run(one, name)
        return ProcDir(jobs, *found) if found else None

    return Dir("proc", listing, lookup=lookup)
