"""Real node daemons in subprocesses, for tests and benchmarks.

``start_node`` runs ``python -m ninefs serve`` on a loopback port chosen by the kernel and
waits (with a deadline, never a sleep) for its ``listening ADDR`` line.
"""

from __future__ import annotations

import getpass
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from ninefs.protocol.keys import AuthorizedUsers, Grant, load_or_create
from ninefs.servers import cgroups
from ninefs.servers.daemon import read_ready_line

READY_TIMEOUT = 20.0


@dataclass
class NodeProc:
    name: str
    state: Path
    export: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    addr: str = ""
    log: Path = field(default_factory=Path)

    def start(self, listen: str | None = None) -> NodeProc:
        listen = listen or (self.addr if self.addr else "127.0.0.1:0")
        cmd = [sys.executable, "-m", "ninefs", "-v", "serve", "--name", self.name, "--listen", listen,
               "--state", str(self.state), "--export", str(self.export), *self.args]  # fmt: skip
        self.log = self.state.parent / f"{self.name}.log"
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=logf, env=self.env, start_new_session=True
        )
        logf.close()
        addr = read_ready_line(self.proc.stdout, READY_TIMEOUT)
        if addr is None:
            if self.proc.poll() is None:
                self.kill()
                raise TimeoutError(
                    f"node {self.name} did not start: {self.log.read_text()[-2000:]}"
                )
            raise RuntimeError(f"node {self.name} exited: {self.log.read_text()[-2000:]}")
        self.addr = addr
        return self

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()
        cgroups.discard(self.name, self.state / "jobs")  # what a SIGKILLed daemon's jobs left
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        cgroups.discard(self.name, self.state / "jobs")


@dataclass
class Identity:
    home: Path
    key: nacl.signing.SigningKey
    user: str

    @property
    def public(self) -> bytes:
        return bytes(self.key.verify_key)


def make_identity(home: Path, user: str | None = None) -> Identity:
    home.mkdir(parents=True, exist_ok=True)
    return Identity(home, load_or_create(home / "key"), user or getpass.getuser())


def make_node(
    base: Path,
    name: str,
    who: Identity | None,
    *,
    args: list[str] = (),
    allow_root: bool = True,
    **grant: object,
) -> NodeProc:
    """A node (not yet started) whose authorized-users file admits ``who``. ``allow_root``:
    the tests run as root, as user root, so by default the node lets users act as root."""
    state, export = base / name / "state", base / name / "export"
    state.mkdir(parents=True, exist_ok=True)
    export.mkdir(parents=True, exist_ok=True)
    if who is not None:
        AuthorizedUsers(state / "authorized_users").add(Grant(who.public, who.user, **grant))
    env = dict(os.environ)
    env.pop("NINEFS_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    args = [*(["--allow-root"] if allow_root else []), *args]
    return NodeProc(name, state, export, args, env)


@dataclass
class MountProc:
    """``ninefs mount -f`` in a subprocess, ready when it writes to the pipe we gave it."""

    mountpoint: Path
    ns_file: Path
    home: Path
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)

    def start(self) -> MountProc:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        env = dict(
            os.environ, NINEFS_HOME=str(self.home), NINEFS_READY_FD=str(w), PYTHONUNBUFFERED="1"
        )
        self.log = self.mountpoint.parent / f"mount-{self.mountpoint.name}.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ninefs", "-v", "mount", str(self.mountpoint), "-f", "--ns", str(self.ns_file)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, pass_fds=(w,), start_new_session=True,
            )  # fmt: skip
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            line = os.read(r, 4096) if ready else b""
        finally:
            os.close(r)
        if not line:
            self.stop()
            raise RuntimeError(f"mount did not start: {self.log.read_text()[-3000:]}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount and end the process, whatever state it is in (tests call this on failure)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        force_unmount(self.mountpoint)


def force_unmount(mountpoint: Path) -> None:
    """Detach a mount even if its daemon is dead or hung (never stat the mountpoint first)."""
    with open("/proc/self/mountinfo") as f:
        mounted = [ln.split() for ln in f if ln.split()[4] == str(mountpoint)]
    for parts in mounted:
        minor = parts[2].split(":")[1]
        abort = Path(f"/sys/fs/fuse/connections/{minor}/abort")
        if abort.exists():
            abort.write_text("1")
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def write_namespace(path: Path, nodes: list[NodeProc]) -> Path:
    path.write_text("".join(f"mount {n.addr} {n.name}\n" for n in nodes))
    return path
