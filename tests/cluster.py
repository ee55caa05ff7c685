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
import time
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from ninefs.protocol.keys import AuthorizedUsers, Grant, load_or_create

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
        deadline = time.monotonic() + READY_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not r:
                self.kill()
                raise TimeoutError(
                    f"node {self.name} did not start: {self.log.read_text()[-2000:]}"
                )
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"node {self.name} exited: {self.log.read_text()[-2000:]}")
            line += chunk
        self.addr = line.split()[1].decode()
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
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


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
    base: Path, name: str, who: Identity | None, *, args: list[str] = (), **grant: object
) -> NodeProc:
    """A node (not yet started) whose authorized-users file admits ``who``."""
    state, export = base / name / "state", base / name / "export"
    state.mkdir(parents=True, exist_ok=True)
    export.mkdir(parents=True, exist_ok=True)
    if who is not None:
        AuthorizedUsers(state / "authorized_users").add(Grant(who.public, who.user, **grant))
    env = dict(os.environ)
    env.pop("NINEFS_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return NodeProc(name, state, export, list(args), env)
