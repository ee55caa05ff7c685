"""The node's fork server: a small process that starts jobs for the daemon.

Run by servers/spawner.py as ``python -I -S spawn_server.py FD``; it imports nothing but
the standard library, on purpose. Forking the daemon (a 30-odd MB Python process with
threads) costs about 1 ms in the parent for its page tables, and the child then pays for
every page it touches before exec: some 4 ms of CPU a job in all, most of the cost of a
launch. This process is a few MB, so forking it is cheap, and the child does the same work
the daemon's child did: its own session, its cgroups (while still root), the job's account,
no new privileges, its rlimits, then exec.

The wire, on a Unix stream socket: each message is a 4-byte big-endian length and then that
much JSON. The daemon sends ``{"id", "argv", "env", "cwd", "uid", "gid", "groups",
"cgroups", "limits"}`` with the child's stdin, stdout and stderr as SCM_RIGHTS; the answer is
``{"id", "pid"}`` once the child has exec'd, or ``{"id", "stage", "errno", "error"}`` if it
could not (stage ``exec`` or ``dir``: the command or its directory; any other: the set-up).
``{"exit": pid, "rc": rc}`` follows when a child ends (rc as Popen's returncode: -N for a
signal). At end of file from the daemon it exits; its children, if any still run, are
left, as the daemon's own would be if it were killed, for the next daemon to end.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys

_LEN = struct.Struct(">I")
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded now: the child must not dlopen after fork
PR_SET_NO_NEW_PRIVS = 38
MAX_MESSAGE = 64 << 20


def _exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise EOFError
        out += got
    return bytes(out)


def _receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """One request and the descriptors that came with it; EOFError at the end."""
    head, anc, _flags, _addr = sock.recvmsg(_LEN.size, socket.CMSG_SPACE(3 * 4))
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    if not head:
        raise EOFError
    head += _exact(sock, _LEN.size - len(head))
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise ValueError(f"a request of {n} bytes")
    return json.loads(_exact(sock, n)), fds


def _send(sock: socket.socket, msg: dict) -> None:
    body = json.dumps(msg).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _child(req: dict, fds: list[int], report: int) -> None:
    """In the child: set up and exec; on failure write ``stage errno text`` to ``report``."""
    stage = "setup"
    try:
        for i, fd in enumerate(fds):
            os.dup2(fd, i, inheritable=True)
        os.closerange(3, report)
        os.closerange(report + 1, os.sysconf("SC_OPEN_MAX"))
        # what Python ignores, and exec would keep ignoring, goes back to the default
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        stage = "dir"
        os.chdir(req["cwd"])
        stage = "setup"
        os.setsid()
        for path in req["cgroups"]:  # while still root: a process may always move itself
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0\n")  # 0: the writer itself
            finally:
                os.close(fd)
        if req["uid"] is not None:
            os.setgroups(req["groups"])
            os.setresgid(req["gid"], req["gid"], req["gid"])
            os.setresuid(req["uid"], req["uid"], req["uid"])
        if _LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        for res, n, extra in req["limits"]:
            _, hard = resource.getrlimit(res)
            top = hard if hard != resource.RLIM_INFINITY else n + extra
            resource.setrlimit(res, (min(n, top), min(n + extra, top)))
        stage = "exec"
        os.execvpe(req["argv"][0], req["argv"], req["env"])
    except BaseException as e:
        code = getattr(e, "errno", None) or errno.EINVAL
        text = getattr(e, "strerror", None) or str(e)
        os.write(report, json.dumps([stage, code, text]).encode())
    finally:
        os._exit(127)


def _spawn(req: dict, fds: list[int]) -> dict:
    r, w = os.pipe2(os.O_CLOEXEC)  # closed by a successful exec: nothing to read
    try:
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(req, fds, w)
        os.close(w)
        w = -1
        failed = b""
        while chunk := os.read(r, 4096):
            failed += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if not failed:
        return {"id": req["id"], "pid": pid}
    os.waitpid(pid, 0)  # it never ran the command: reap it here, no exit message
    stage, code, text = json.loads(failed)
    return {"id": req["id"], "stage": stage, "errno": code, "error": text}


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)  # a job must never hold the daemon's end (and _child closes all)
    sock.setblocking(True)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon says when: end of file
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
                continue
            try:
                req, fds = _receive(sock)
            except EOFError:
                return
            try:
                reply = _spawn(req, fds)
            except Exception as e:  # fork failing (EAGAIN) fails this job, not the others
                code = getattr(e, "errno", None) or errno.EINVAL
                reply = {"id": req.get("id"), "stage": "setup", "errno": code, "error": str(e)}
            finally:
                for f in fds:
                    os.close(f)
            _send(sock, reply)
        _reap(sock)


if __name__ == "__main__":
    main(int(sys.argv[1]))
