"""`ninefs mount` and `ninefs umount`: the namespace served through FUSE.

One mount per process (pyfuse3 keeps global state). In the background the command starts
itself again with ``-f`` and a pipe, and returns once that child says the mount is up.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from ninefs import config
from ninefs.protocol.errors import NineError, collapse_groups
from ninefs.protocol.keys import KnownNodes

from .fuse import NinefsOps
from .namespace import Namespace

log = logging.getLogger(__name__)

CONNECT_WAIT = 5.0  # seconds to wait for nodes to connect before the mount appears
GC_YOUNG = 10_000  # allocations between collections of the youngest objects (Python's: 700)
MAX_TASKS = 1000  # FUSE worker tasks: blocked reads (wait, stdout) each hold one


class MountError(Exception):
    pass


def check_mountpoint(path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
        )
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point")
    if any(path.iterdir()):
        raise MountError(f"mountpoint {path} is not empty")


def _tune(mountpoint: Path) -> None:
    """Raise the kernel's readahead and background limits for this mount (root only)."""
    # Never stat the mountpoint here: this process serves it, and the call would deadlock.
    try:
        major = minor = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == str(mountpoint):
                    major, minor = parts[2].split(":")
        if major is None:
            return
        with open(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb", "w") as f:
            f.write("4096")  # several 1 MiB reads in flight: measured 190 MB/s at 1 MiB, 270 at 4
        with open(f"/sys/fs/fuse/connections/{minor}/max_background", "w") as f:
            f.write("64")
    except OSError as e:
        log.debug("could not tune the mount: %s", e)


async def run_mount(
    mountpoint: Path,
    ns_lines: list[str],
    *,
    user: str,
    ready: Callable[[Namespace], None] | None = None,
    origin: str = "namespace",
) -> None:
    """Mount, serve until SIGINT/SIGTERM, unmount. ``ready(ns)`` runs once it is mounted."""
    identity = config.identity()
    ns = Namespace(identity, user, KnownNodes(config.home() / "known_nodes"))
    mounted = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(ns.run)
                await ns.load(ns_lines, origin)
                with trio.move_on_after(CONNECT_WAIT):
                    for conn in list(ns.nodes.values()):
                        await conn.wait_state(CONNECT_WAIT)
                ops = NinefsOps(ns, nursery)
                options = set(pyfuse3.default_options) | {"fsname=ninefs", "subtype=ninefs"}
                ops.on_init = lambda: _tune(mountpoint)
                pyfuse3.init(ops, str(mountpoint), options)
                mounted = True

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        log.info("unmounting on %s", signal.Signals(signum).name)
                        pyfuse3.terminate()
                        return

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(_watch_restarts, ns)
                if ready is not None:
                    ready(ns)
                await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            if mounted:
                pyfuse3.close(unmount=True)


async def _watch_restarts(ns: Namespace) -> None:
    """When a node goes down, jobs marked `restart on-failure` start again elsewhere."""
    last: dict[str, str] = {}
    while True:
        await trio.sleep(1.0)
        for name, conn in list(ns.nodes.items()):
            if conn.state == "up":
                ns.facts_refreshed(name)
            if conn.state == "down" and last.get(name) != "down":
                await ns.restart_lost_jobs(name)
            last[name] = conn.state


def read_namespace(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise MountError(
            f"no namespace file at {path}: write `mount HOST:PORT NAME` lines there"
        ) from None


def mount_main(args: argparse.Namespace) -> None:
    mountpoint = Path(args.mountpoint).absolute()
    ns_path = Path(args.ns) if args.ns else config.namespace_path()
    try:
        check_mountpoint(mountpoint)
        lines = read_namespace(ns_path)
        config.identity()  # fail now, clearly, if there is no key
    except MountError as e:
        sys.exit(f"ninefs mount: {e}")
    if not args.foreground:
        _background(args, mountpoint)
        return
    ready_fd = int(os.environ.pop("NINEFS_READY_FD", "-1"))

    def ready(ns: Namespace) -> None:
        states = ", ".join(f"{c.name} {c.state}" for c in ns.nodes.values())
        log.info("mounted at %s (%s)", mountpoint, states)
        if ready_fd >= 0:
            os.write(ready_fd, f"mounted ({states})\n".encode())
            os.close(ready_fd)

    # A cold `ls -l` of 5,000 files leaves tens of thousands of objects that live on
    # (vnodes, stats), and at the default threshold the cycle collector walked them again
    # and again (a quarter of the mount's CPU for the listing, in perf). Run less often,
    # and never through what start-up made, the mount's CPU for that `ls -l` fell from
    # about 60 to 40-45 ms. Young garbage cycles still go within 10,000 allocations.
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)
    try:
        with collapse_groups():
            trio.run(
                lambda: run_mount(
                    mountpoint, lines, user=args.user, ready=ready, origin=str(ns_path)
                )
            )
    except NineError as e:
        sys.exit(f"ninefs mount: {e.message}")
    except RuntimeError as e:
        sys.exit(f"ninefs mount: {e}")


def _background(args: argparse.Namespace, mountpoint: Path) -> None:
    logfile = Path(args.log) if args.log else config.home() / "mount.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "ninefs",
        "-v",
        "mount",
        str(mountpoint),
        "-f",
        "--user",
        args.user,
    ]
    if args.ns:
        cmd += ["--ns", args.ns]
    env = dict(os.environ, NINEFS_READY_FD=str(w))
    with open(logfile, "ab") as log_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f, env=env,
                                pass_fds=(w,), start_new_session=True)  # fmt: skip
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.readline()
    if not line:
        proc.wait(10)
        tail = logfile.read_text()[-1500:]
        sys.exit(f"ninefs mount: the mount did not start; from {logfile}:\n{tail}")
    print(f"{mountpoint}: {line.strip()}; pid {proc.pid}, log {logfile}")


def unmount(mountpoint: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ninefs umount: {r.stderr.strip() or 'failed'}")
