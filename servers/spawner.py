"""Starting jobs through the node's fork server (servers/spawn_server.py), from trio.

``Spawner.run`` owns the fork server: started at the first launch, started again at the next
launch if it ever dies. ``spawn`` hands it one job and returns a ``Child`` once the command
has been exec'd, or raises what stopped it (OSError for the command or its directory,
SetupError for the rest). The fork server reaps the children and reports how each ended;
``Child.wait`` waits for that. If the fork server dies, every child it had is ``lost``: it
ended (or was killed with its process group) without a status anyone could read.

The concurrency contract: ``spawn`` may be called from many tasks at once; ``run`` must be
running (in a nursery that outlives every job's supervisor: it is shielded from
cancellation and ends only at ``close``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
SERVER = Path(__file__).with_name("spawn_server.py")
SPAWN_TIMEOUT = 30.0  # a fork server that neither starts a job nor fails it in this long is hung


class SetupError(Exception):
    """The child could not be made or set up (cgroups, account, limits) before exec;
    ``errno`` says why where there is one (EAGAIN: the fork server could not fork)."""

    def __init__(self, message: str, errno_: int = errno.EAGAIN) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass
class Child:
    """A job's process, as the fork server reports it (the daemon is not its parent)."""

    pid: int
    stdin: trio.lowlevel.FdStream | None
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    returncode: int | None = None  # as Popen's: -N for signal N
    ended: bool = False  # it exited, or it was lost with the fork server (returncode None)
    _done: trio.Event = field(default_factory=trio.Event)

    async def wait(self) -> int | None:
        await self._done.wait()
        return self.returncode

    def _end(self, rc: int | None) -> None:
        self.returncode, self.ended = rc, True
        self._done.set()


class Spawner:
    def __init__(self) -> None:
        self._wanted = trio.Event()  # someone wants to spawn: start the fork server
        self._ready = trio.Event()  # the fork server is up (or failed to start: _sock None)
        self._sock: trio.socket.SocketType | None = None
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._asked: dict[int, tuple[trio.MemorySendChannel[Child | dict], list[int]]] = {}
        self._children: dict[int, Child] = {}
        self._scope: trio.CancelScope | None = None

    def close(self) -> None:
        """End ``run`` (and the fork server): after every job's supervisor is done."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope(shield=True) as self._scope:
            task_status.started()
            while True:
                await self._wanted.wait()
                try:
                    await self._serve()
                except Exception:  # a bug here must not take the daemon's jobs table down
                    log.exception("the fork server's connection failed")
                finally:
                    self._wanted = trio.Event()
                    self._ready = trio.Event()

    async def _serve(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-S", str(SERVER), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            log.error("cannot start the fork server: %s", e)
            ours.close()
            self._ready.set()  # the waiting spawns fail, and the next one tries again
            return
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        self._ready.set()
        log.info("fork server started, pid %d", proc.pid)
        try:
            await self._read(self._sock)
        finally:
            sock, self._sock = self._sock, None
            sock.close()  # the fork server sees the end and exits
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5) as late:
                    await proc.wait()
                if late.cancelled_caught:
                    proc.kill()
                    await proc.wait()
            self._lost()

    async def _read(self, sock: trio.socket.SocketType) -> None:
        buf = bytearray()
        while True:
            while len(buf) >= _LEN.size and len(buf) >= _LEN.size + _LEN.unpack_from(buf)[0]:
                n = _LEN.unpack_from(buf)[0]
                self._dispatch(json.loads(bytes(buf[_LEN.size : _LEN.size + n])))
                del buf[: _LEN.size + n]
            data = await sock.recv(1 << 16)
            if not data:
                log.error("the fork server stopped")
                return
            buf += data

    def _dispatch(self, msg: dict) -> None:
        if "exit" in msg:
            child = self._children.pop(msg["exit"], None)
            if child is not None:
                child._end(msg["rc"])
            return
        asked = self._asked.pop(msg["id"], None)
        if asked is None:
            if "pid" in msg:
                # its spawn gave up waiting: nobody supervises it, so it must not run
                with contextlib.suppress(OSError):
                    os.killpg(msg["pid"], signal.SIGKILL)
            return
        out, mine = asked
        if "pid" in msg:
            # registered here, before any later message (its exit) is read
            streams = [trio.lowlevel.FdStream(fd) for fd in mine]
            child = Child(msg["pid"], *streams)
            self._children[child.pid] = child
            out.send_nowait(child)
        else:
            out.send_nowait(msg)

    def _lost(self) -> None:
        """The fork server is gone: its children can no longer be waited for."""
        for out, _ in self._asked.values():
            out.send_nowait({"stage": "setup", "errno": errno.EAGAIN,
                             "error": "the fork server stopped"})  # fmt: skip
        self._asked.clear()
        for pid, child in self._children.items():
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            child._end(None)
        self._children.clear()

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        account: tuple[int, int, list[int]] | None,
        cgroups: list[Path],
        limits: list[tuple[int, int, int]],
    ) -> Child:
        """Start ``argv`` in its own session with pipes for stdin, stdout and stderr, in
        ``cgroups``, as ``account`` (uid, gid, groups; None: the daemon's own), under
        ``limits`` (resource, soft, hard minus soft)."""
        self._wanted.set()
        await self._ready.wait()
        sock = self._sock
        if sock is None:
            raise SetupError("the fork server is not running")
        uid, gid, groups = account if account is not None else (None, None, [])
        rid = next(self._ids)
        body = json.dumps({
            "id": rid, "argv": argv, "env": env, "cwd": cwd, "uid": uid, "gid": gid,
            "groups": groups, "cgroups": [str(d / "cgroup.procs") for d in cgroups],
            "limits": limits,
        }).encode()  # fmt: skip
        ends = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # stdin, stdout, stderr
        theirs = [ends[0][0], ends[1][1], ends[2][1]]
        mine = [ends[0][1], ends[1][0], ends[2][0]]
        send, receive = trio.open_memory_channel[Child | dict](1)
        self._asked[rid] = (send, mine)
        reply: Child | dict | None = None
        try:
            # Once asked, the answer is awaited whatever happens: a job that was started
            # must get its supervisor (a cancelled launch is still taken at the next
            # checkpoint, after the caller holds the child).
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SPAWN_TIMEOUT):
                    async with self._send_lock:
                        data = _LEN.pack(len(body)) + body
                        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", *theirs))]
                        sent = await sock.sendmsg([data], fds)
                        while sent < len(data):
                            sent += await sock.send(data[sent:])
                    reply = await receive.receive()
        except (OSError, trio.ClosedResourceError) as e:  # it went away as we asked
            reply = {"stage": "setup", "errno": errno.EAGAIN, "error": f"the fork server: {e}"}
        finally:
            for fd in theirs:
                os.close(fd)
        if reply is None:  # it gave up; an answer may have come since, with no checkpoint
            with contextlib.suppress(trio.WouldBlock):
                reply = receive.receive_nowait()
        if isinstance(reply, Child):
            return reply
        self._asked.pop(rid, None)  # a late answer now finds nobody, and its child is ended
        for fd in mine:
            os.close(fd)
        if reply is None:
            raise SetupError(f"the fork server did not answer in {SPAWN_TIMEOUT:g}s")
        if reply["stage"] in ("exec", "dir"):
            raise OSError(reply["errno"], reply["error"])
        raise SetupError(reply["error"], reply.get("errno") or errno.EINVAL)
