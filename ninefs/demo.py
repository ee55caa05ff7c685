"""`ninefs demo`: local nodes on loopback, mounted, for a first look. Ctrl-C cleans up."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from ninefs import config
from ninefs.protocol.keys import AuthorizedUsers, Grant, load_or_create
from ninefs.servers.daemon import read_ready_line

from .mount import MountError, check_mountpoint, run_mount

START_TIMEOUT = 20.0

TRY = """\
ninefs demo: {n} nodes mounted at {mp}   (Ctrl-C to stop and clean up)

Try, in another terminal:
    cat {mp}/nodes
    ls {mp}/n/n1
    cat {mp}/n/n1/cpu/load
    id=$(cat {mp}/jobs/clone)
    echo 'run echo hello from $(hostname); uname -a' > {mp}/jobs/$id/ctl
    cat {mp}/jobs/$id/stdout
    cat {mp}/jobs/$id/wait
    cp /etc/hostname {mp}/n/n2/storage/ && ls -l {mp}/n/n2/storage
"""


def _start_node(base: Path, name: str, pub: bytes, user: str) -> tuple[subprocess.Popen, str]:
    state, export = base / name / "state", base / name / "storage"
    export.mkdir(parents=True)
    state.mkdir(parents=True)
    AuthorizedUsers(state / "authorized_users").add(Grant(pub, user))
    log = open(base / f"{name}.log", "wb")
    cmd = [sys.executable, "-m", "ninefs", "-v", "serve", "--name", name, "--listen", "127.0.0.1:0",
           "--state", str(state), "--export", str(export),
           "--allow-root"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    log.close()
    addr = read_ready_line(proc.stdout, START_TIMEOUT)
    if addr is None:
        raise RuntimeError(f"node {name} did not start; see {base / (name + '.log')}")
    return proc, addr


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _mounted(mp: Path) -> bool:
    # /proc, not a stat: a stat of a mount that nobody serves can hang
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mp) for line in f)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo_main(args: argparse.Namespace) -> None:
    if not 1 <= args.nodes <= 100:
        sys.exit("ninefs demo: --nodes must be between 1 and 100")
    # SIGTERM cleans up as Ctrl-C does, also while the nodes start (the mount itself
    # handles both once it runs)
    signal.signal(signal.SIGTERM, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="ninefs-demo-"))
    made_mp = args.mountpoint is None
    mp = (base / "cluster") if made_mp else Path(args.mountpoint).absolute()
    if made_mp:
        mp.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        check_mountpoint(mp)
        os.environ["NINEFS_HOME"] = str(base / "home")
        key = load_or_create(config.key_path())
        user = config.default_user()
        lines = []
        for i in range(1, args.nodes + 1):
            name = f"n{i}"
            print(f"starting node {name} ...", end=" ", flush=True, file=sys.stderr)
            proc, addr = _start_node(base, name, bytes(key.verify_key), user)
            procs.append(proc)
            lines.append(f"mount {addr} {name}")
            print(addr, file=sys.stderr)
        (base / "home" / "namespace").write_text("".join(x + "\n" for x in lines))

        def ready(ns: object) -> None:
            print(TRY.format(n=args.nodes, mp=mp), flush=True)

        trio.run(lambda: run_mount(mp, lines, user=user, ready=ready))
        print("ninefs demo: unmounted; stopping the nodes", file=sys.stderr)
    except (MountError, RuntimeError) as e:
        sys.exit(f"ninefs demo: {e}")
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs)
        if _mounted(mp):  # the mount did not come down by itself: detach it lazily
            subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
        if not _mounted(mp):  # never delete through a mount
            shutil.rmtree(base, ignore_errors=True)  # keys, state, logs, a mountpoint we made
