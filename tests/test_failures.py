"""Failure transparency: what the mount promises when nodes die, hang or are cut off.

Real node daemons, a real FUSE mount, real signals (SIGKILL, SIGSTOP), and for partitions a
network namespace with a veth pair that the test makes and always deletes (link-local
addresses inside it only: nothing leaves the machine). Every call on the mount runs in a
thread the test waits for with a deadline, so a hang fails the test instead of stalling it;
waiting for a state is polling a condition with a deadline (there is no event to wait on
across processes). docs/operations.md states the promises tested here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from ninefs.protocol.client import DATA_TIMEOUT, META_TIMEOUT

from .cluster import Identity, MountProc, NodeProc, make_node, write_namespace

pytestmark = pytest.mark.fuse

MARGIN = 2.5  # seconds a call may take beyond its deadline (a loaded 2-core machine)
DOWN_WITHIN = 10.0  # a hung or cut-off node is `down` within this (heartbeat, flush)
BACK_WITHIN = 10.0  # a node that is back is usable within this
FAST = 1.5  # what "at once" may take, and what calls on healthy nodes may take
PROMISED = {errno.EHOSTDOWN, errno.EIO, errno.ETIMEDOUT}


# -- calls on the mount, each with a deadline --------------------------------------------------


class Stuck(AssertionError):
    pass


def in_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; its result or exception, or Stuck after ``timeout``."""
    out: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            out.put((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    try:
        ok, val = out.get(timeout=timeout)
    except queue.Empty:
        raise Stuck(f"{getattr(fn, '__name__', fn)} took longer than {timeout}s") from None
    if not ok:
        raise val
    return val


@dataclass
class Outcome:
    value: Any = None
    err: int | None = None
    took: float = 0.0

    @property
    def errname(self) -> str:
        return errno.errorcode.get(self.err, str(self.err)) if self.err else "ok"


def attempt(fn: Callable[[], Any], timeout: float = DATA_TIMEOUT + 10) -> Outcome:
    """Run ``fn`` with a deadline; what it gave or which errno, and how long it took."""
    t0 = time.monotonic()
    try:
        value = in_thread(fn, timeout)
        return Outcome(value, None, time.monotonic() - t0)
    except OSError as e:
        return Outcome(None, e.errno, time.monotonic() - t0)


def read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while data := os.read(fd, 1 << 16):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def ctl(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> float:
    """Poll ``cond`` (each call itself bounded) until it is true; the seconds it took."""
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < timeout:
        try:
            if in_thread(cond, timeout):
                return time.monotonic() - t0
        except (OSError, Stuck) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def states(mnt: Path) -> dict[str, str]:
    """Node name -> state, from /nodes."""
    text = in_thread(lambda: read_file(mnt / "nodes"), FAST * 2).decode()
    return {ln.split()[0]: ln.split()[2] for ln in text.splitlines()}


def nodes_line(mnt: Path, name: str) -> str:
    text = in_thread(lambda: read_file(mnt / "nodes"), FAST * 2).decode()
    return next(ln for ln in text.splitlines() if ln.split()[0] == name)


def usable(mnt: Path, name: str) -> bool:
    return (
        states(mnt).get(name) == "up"
        and len(read_file(mnt / "n" / name / "cpu" / "load").split()) == 3
    )


def new_job(mnt: Path, where: str, command: str) -> str:
    """A job on node ``where`` (through /n/NODE/jobs) running ``command``; its id there."""
    jobs = mnt / "n" / where / "jobs"
    jid = in_thread(lambda: read_file(jobs / "clone"), FAST * 4).decode().strip()
    in_thread(lambda: ctl(jobs / jid / "ctl", f"run {command}\n"), FAST * 4)
    return jid


class Watch:
    """A thread that keeps reading files of healthy nodes and /nodes; the longest call."""

    def __init__(self, mnt: Path, names: list[str]) -> None:
        self.paths = [mnt / "nodes"] + [mnt / "n" / n / "cpu" / "load" for n in names]
        self.longest, self.errors, self.calls = 0.0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.paths:
                t0 = time.monotonic()
                try:
                    read_file(p)
                except OSError as e:
                    self.errors.append((p, e.errno))
                self.longest = max(self.longest, time.monotonic() - t0)
                self.calls += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DATA_TIMEOUT)


def blocked_reader(mnt: Path, path: str) -> subprocess.Popen:
    """``cat PATH`` in the mount, returned once it has the file open (its read then blocks)."""
    p = subprocess.Popen(["cat", path], cwd=mnt, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip

    def opened() -> bool:
        fds = Path(f"/proc/{p.pid}/fd")
        return any(os.readlink(fd).endswith(path) for fd in fds.iterdir())

    try:
        wait_until(opened, 10, f"cat {path} opened it", every=0.02)
    except BaseException:
        p.kill()
        p.wait(5)
        raise
    return p


def by_name(cluster: list[NodeProc], name: str) -> NodeProc:
    return next(n for n in cluster if n.name == name)


@contextlib.contextmanager
def mounted(tmp_path: Path, identity: Identity, nodes: list[NodeProc], name: str) -> Iterator[Path]:
    mp = MountProc(tmp_path / name, write_namespace(tmp_path / f"ns-{name}", nodes), identity.home)
    try:
        mp.start()
        yield mp.mountpoint
    finally:
        mp.stop()


# -- a node in a network namespace of the test's own ------------------------------------------


@dataclass
class NetNode:
    ns: str
    host_if: str
    node: NodeProc
    netem: bool = False

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def shape(self, spec: str) -> None:
        """tc netem on the test's own veth (``delay 200ms loss 20%``), or nothing with ""."""
        if spec:
            _run(["tc", "qdisc", "replace", "dev", self.host_if, "root", "netem", *spec.split()])
        else:
            _run(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check)


@contextlib.contextmanager
def netns_node(
    tmp_path: Path, identity: Identity, monkeypatch: pytest.MonkeyPatch, name: str = "p1"
) -> Iterator[NetNode]:
    """A node daemon inside a network namespace made here, reached over a veth pair with
    link-local addresses; the daemon, the pair and the namespace are gone afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 for a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, peer_if = f"ninefs-t{tag}", f"nf{tag}h", f"nf{tag}p"
    net = f"169.254.{20 + os.getpid() % 200}"
    if _ip("netns", "add", ns, check=False).returncode != 0:
        pytest.skip("ip netns is not available here")
    node = make_node(tmp_path, name, identity)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", peer_if)
        _ip("-n", ns, "link", "set", peer_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        wrapper = tmp_path / f"python-in-{ns}"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        with monkeypatch.context() as mp:
            mp.setattr(sys, "executable", str(wrapper))
            node.start(listen=f"{net}.2:0")
        probe = ["tc", "qdisc", "add", "dev", host_if, "root", "netem", "delay", "1ms"]
        netem = _run(probe, check=False).returncode == 0
        nn = NetNode(ns, host_if, node, netem)
        nn.shape("")
        yield nn
    finally:
        node.kill()
        node.stop()
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


# -- a node killed ------------------------------------------------------------------------------


def test_sigkill_node(cluster: list[NodeProc], mount: Path) -> None:
    n1 = by_name(cluster, "n1")
    f = mount / "n/n1/storage/kept"
    in_thread(lambda: write_file(f, b"before\n", fsync=True), FAST * 4)
    old = in_thread(lambda: os.open(f, os.O_RDWR), FAST * 4)
    jid = new_job(mount, "n1", "sleep 60")
    waiter = blocked_reader(mount, f"n/n1/jobs/{jid}/wait")
    try:
        assert attempt(lambda: os.pread(old, 100, 0), FAST * 4).value == b"before\n"
        with Watch(mount, ["n2", "n3"]) as watch:
            t_kill = time.monotonic()
            n1.kill()
            # the blocked `cat wait` wakes with an error: the connection broke under it
            _, err = waiter.communicate(timeout=DOWN_WITHIN)
            assert waiter.returncode != 0 and "Input/output error" in err, err
            assert time.monotonic() - t_kill < 5
            wait_until(lambda: states(mount)["n1"] == "down", 5, "n1 down in /nodes")
            line = nodes_line(mount, "n1")
            assert " since " in line, line
            # new opens and lookups under it: EHOSTDOWN at once
            for probe in (
                lambda: read_file(mount / "n/n1/cpu/load"),
                lambda: os.stat(mount / "n/n1/mem/free"),
                lambda: os.listdir(mount / "n/n1/storage"),
            ):
                o = attempt(probe, FAST * 4)
                assert o.err == errno.EHOSTDOWN and o.took < FAST, (o.errname, o.took)
            # the handle opened on the old connection: EIO, for reads and writes, and again
            for _ in range(2):
                assert attempt(lambda: os.pread(old, 10, 0), FAST * 4).err == errno.EIO
                assert attempt(lambda: os.pwrite(old, b"x", 0), FAST * 4).err == errno.EIO
            assert usable(mount, "n2") and usable(mount, "n3")
        assert not watch.errors and watch.longest < FAST, (watch.errors, watch.longest)

        n1.start(listen=n1.addr)
        took = wait_until(lambda: usable(mount, "n1"), BACK_WITHIN, "n1 usable again")
        # an old handle stays dead: its state on the node is gone
        assert attempt(lambda: os.pread(old, 10, 0), FAST * 4).err == errno.EIO
        assert in_thread(lambda: read_file(f), FAST * 4) == b"before\n"
        # (a new open refills the page cache, which an old handle may then read from; its
        # writes and fsyncs always reach the mount, and fail)
        assert attempt(lambda: os.pwrite(old, b"lost?", 0), FAST * 4).err == errno.EIO
        assert attempt(lambda: os.fsync(old), FAST * 4).err == errno.EIO
        assert in_thread(lambda: read_file(f), FAST * 4) == b"before\n"
        print(f"n1 usable {took:.1f}s after its restart")
    finally:
        waiter.kill()
        waiter.wait(5)
        with contextlib.suppress(OSError, Stuck):
            in_thread(lambda: os.close(old), FAST * 4)


# -- a node hung ---------------------------------------------------------------------------------


def test_sigstop_node(cluster: list[NodeProc], mount: Path) -> None:
    n2 = by_name(cluster, "n2")
    jid = new_job(mount, "n2", "sleep 60")
    assert usable(mount, "n2")
    waiter = blocked_reader(mount, f"n/n2/jobs/{jid}/wait")
    try:
        with Watch(mount, ["n1", "n3"]) as watch:
            n2.signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            try:
                # calls under the hung node end within their deadline, with a promised errno
                meta = attempt(lambda: os.stat(mount / "n/n2/mem/total"), META_TIMEOUT * 3)
                assert meta.err in PROMISED, meta.errname
                assert meta.took < META_TIMEOUT + MARGIN, meta.took
                seen = set()

                def down() -> bool:
                    seen.add(states(mount)["n2"])
                    return "down" in seen

                wait_until(down, DOWN_WITHIN, "n2 down in /nodes")
                assert "suspect" in seen or meta.err == errno.EIO, seen
                assert time.monotonic() - t_stop < DOWN_WITHIN
                # the blocked `cat wait` woke with an error once n2 was given up
                _, err = waiter.communicate(timeout=FAST * 2)
                assert waiter.returncode != 0 and "Input/output error" in err, err
                o = attempt(lambda: read_file(mount / "n/n2/cpu/load"), FAST * 4)
                assert o.err == errno.EHOSTDOWN and o.took < FAST, (o.errname, o.took)
            finally:
                n2.signal(signal.SIGCONT)
            took = wait_until(lambda: usable(mount, "n2"), BACK_WITHIN, "n2 usable again")
        # the other nodes and /nodes never stalled while n2 hung
        assert not watch.errors and watch.longest < FAST, (watch.errors, watch.longest)
        assert watch.calls > 20
        print(
            f"n2: first call {meta.errname} after {meta.took:.1f}s, states seen {sorted(seen)}; "
            f"usable {took:.1f}s after SIGCONT; others' longest call {watch.longest:.2f}s"
        )
    finally:
        waiter.kill()
        waiter.wait(5)


def test_a_listing_whose_node_stops_fails_and_never_hangs(
    cluster: list[NodeProc], mount: Path
) -> None:
    """A big storage directory's entries arrive behind its open, never far ahead of the
    reader: when the node stops mid-listing, reading on fails within the call deadline
    (with a promised errno), and the listing is whole again once the node is back."""
    n2 = by_name(cluster, "n2")
    big = n2.export / "big"
    big.mkdir()
    for i in range(20000):  # far more than the mount fetches ahead of its reader
        (big / f"f{i:05d}").touch()
    path = mount / "n/n2/storage/big"
    it = in_thread(lambda: os.scandir(path), META_TIMEOUT)  # the open: entries follow it
    try:
        n2.signal(signal.SIGSTOP)
        try:
            o = attempt(lambda: sum(1 for _ in it), META_TIMEOUT * 3)
            assert o.err in PROMISED, (o.errname, o.value)
            assert o.took < META_TIMEOUT + MARGIN, o.took
        finally:
            n2.signal(signal.SIGCONT)
    finally:
        it.close()
    wait_until(lambda: usable(mount, "n2"), BACK_WITHIN, "n2 usable again")
    assert len(in_thread(lambda: os.listdir(path), META_TIMEOUT * 3)) == 20000


def test_a_read_ahead_whose_node_stops_fails_and_never_hangs(
    cluster: list[NodeProc], mount: Path
) -> None:
    """A file read in sequence is fetched ahead of the kernel's reads, several reads
    waiting on one fetch: when the node stops mid-file, each of them fails within the data
    deadline (with a promised errno), none hangs, and the file reads whole once it is back."""
    n2 = by_name(cluster, "n2")
    block = hashlib.sha256(b"ahead").digest() * (1 << 15)  # 1 MiB
    with open(n2.export / "long.bin", "wb") as f:
        for _ in range(64):
            f.write(block)
    path = mount / "n/n2/storage/long.bin"
    f = in_thread(lambda: open(path, "rb"), META_TIMEOUT)
    try:
        assert in_thread(lambda: f.read(4 << 20), DATA_TIMEOUT) == block * 4
        n2.signal(signal.SIGSTOP)
        try:
            o = attempt(lambda: f.read(), DATA_TIMEOUT * 3)  # the other 60 MiB
            assert o.err in PROMISED, (o.errname, None if o.value is None else len(o.value))
            assert o.took < DATA_TIMEOUT + MARGIN, o.took
        finally:
            n2.signal(signal.SIGCONT)
    finally:
        with contextlib.suppress(Exception):
            in_thread(f.close, META_TIMEOUT)
    wait_until(lambda: usable(mount, "n2"), BACK_WITHIN, "n2 usable again")
    whole = in_thread(lambda: path.read_bytes(), DATA_TIMEOUT * 3)
    assert whole == block * 64


# -- jobs belong to the node ---------------------------------------------------------------------


def test_jobs_survive_the_mount(
    tmp_path: Path, identity: Identity, cluster: list[NodeProc]
) -> None:
    """A job keeps running when its client goes (the mount restarts); the new mount reads its
    output whole, once, and its end."""
    script = "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 0.25; done"
    with mounted(tmp_path, identity, cluster, "mnt-a") as mnt:
        jid = new_job(mnt, "n3", script)
        first = in_thread(lambda: os.open(mnt / f"n/n3/jobs/{jid}/stdout", os.O_RDONLY), 5)
        assert in_thread(lambda: os.read(first, 100), 5).startswith(b"line1")
    with mounted(tmp_path, identity, cluster, "mnt-b") as mnt:
        out = in_thread(lambda: read_file(mnt / f"n/n3/jobs/{jid}/stdout"), 15).decode()
        assert out.split() == [f"line{i}" for i in range(1, 9)], out
        assert in_thread(lambda: read_file(mnt / f"n/n3/jobs/{jid}/wait"), 5) == b"exit 0\n"


def test_daemon_restart_keeps_jobs(cluster: list[NodeProc], mount: Path) -> None:
    """SIGTERM (n1) and SIGKILL (n2), then a daemon on the same address: finished jobs are
    still there, running ones `lost`, ids never reused."""
    jobs: dict[str, tuple[str, str]] = {}
    for name in ("n1", "n2"):
        done = new_job(mount, name, "echo finished")
        assert (
            in_thread(lambda n=name, d=done: read_file(mount / f"n/{n}/jobs/{d}/wait"), 10)
            == b"exit 0\n"
        )
        jobs[name] = (done, new_job(mount, name, "sleep 60"))
    n1, n2 = by_name(cluster, "n1"), by_name(cluster, "n2")
    n1.stop()
    n2.kill()
    wait_until(lambda: states(mount)["n1"] == states(mount)["n2"] == "down", 5, "both down")
    n1.start(listen=n1.addr)
    n2.start(listen=n2.addr)
    for name, (done, running) in jobs.items():
        wait_until(lambda n=name: usable(mount, n), BACK_WITHIN, f"{name} back")
        _check_restarted(mount / "n" / name / "jobs", done, running)


def _check_restarted(base: Path, done: str, running: str) -> None:
    assert in_thread(lambda: read_file(base / done / "wait"), 5) == b"exit 0\n"
    assert in_thread(lambda: read_file(base / done / "stdout"), 5) == b"finished\n"
    assert in_thread(lambda: read_file(base / running / "wait"), 5) == b"lost\n"
    status = in_thread(lambda: read_file(base / running / "status"), 5).decode()
    assert "lost" in status, status
    fresh = in_thread(lambda: read_file(base / "clone"), 5).decode().strip()
    assert int(fresh) > int(running), (fresh, running)


def test_clone_placement_and_restart_on_failure(cluster: list[NodeProc], mount: Path) -> None:
    """/jobs/clone skips nodes that are not up; a `restart on-failure` job whose node goes
    down runs again elsewhere, and its ctl says so."""
    jid = in_thread(lambda: read_file(mount / "jobs/clone"), 10).decode().strip()
    ctl_path = mount / "jobs" / jid / "ctl"
    in_thread(lambda: ctl(ctl_path, "restart on-failure\n"), 5)
    in_thread(lambda: ctl(ctl_path, "run echo start; sleep 4; echo finished\n"), 5)
    where = in_thread(lambda: read_file(ctl_path), 5).decode().split()
    assert where[1] == "running", where
    node = jid.split(".")[0]
    victim = by_name(cluster, node)
    victim.kill()
    wait_until(lambda: states(mount)[node] == "down", 5, f"{node} down")
    for _ in range(6):
        other = in_thread(lambda: read_file(mount / "jobs/clone"), 10).decode().strip()
        assert other.split(".")[0] != node, other

    def restarted() -> bool:
        return b"restarted 1 " in read_file(ctl_path)

    wait_until(restarted, 8, "the job restarted elsewhere")
    lines = in_thread(lambda: read_file(ctl_path), 5).decode().splitlines()
    assert any(f"restarted 1 {jid} -> " in ln and f"({node} down)" in ln for ln in lines), lines
    assert in_thread(lambda: read_file(mount / "jobs" / jid / "wait"), 15) == b"exit 0\n"
    out = in_thread(lambda: read_file(mount / "jobs" / jid / "stdout"), 5)
    assert out == b"start\nfinished\n", out


def test_a_job_restarted_elsewhere_is_removed_from_its_node_when_it_returns(
    cluster: list[NodeProc], mount: Path
) -> None:
    """A node that was only hung (or cut off) kept running the job that `restart on-failure`
    started again elsewhere; once it is back, the mount removes that old copy."""
    jid = in_thread(lambda: read_file(mount / "jobs/clone"), 10).decode().strip()
    ctl_path = mount / "jobs" / jid / "ctl"
    in_thread(lambda: ctl(ctl_path, "restart on-failure\nrun sleep 120\n"), 5)
    node, rid = jid.split(".")
    old_ctl = mount / "n" / node / "jobs" / rid / "ctl"
    pid = int(in_thread(lambda: read_file(old_ctl), 5).split()[2])
    victim = by_name(cluster, node)
    victim.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: states(mount)[node] == "down", DOWN_WITHIN, f"{node} down")
        wait_until(lambda: b"restarted 1 " in read_file(ctl_path), 8, "restarted elsewhere")
        assert psutil.pid_exists(pid)  # the old copy still runs on the stopped node
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(lambda: usable(mount, node), BACK_WITHIN, f"{node} usable again")
    # within a few RESTART_TRACK rounds the old copy is gone, and the new one runs on
    wait_until(lambda: rid not in os.listdir(mount / "n" / node / "jobs"), 10, "old copy removed")
    wait_until(lambda: not psutil.pid_exists(pid), 5, "old copy's process ended")
    now = in_thread(lambda: read_file(ctl_path), 5).decode().split()
    assert now[1] == "running" and now[0] != jid, now


# -- a node cut off by the network ---------------------------------------------------------------


def test_partition(
    tmp_path: Path, identity: Identity, cluster: list[NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    with netns_node(tmp_path, identity, monkeypatch) as p1:
        n1 = by_name(cluster, "n1")
        with mounted(tmp_path, identity, [n1, p1.node], "mnt-p") as mnt:
            wait_until(lambda: usable(mnt, "p1"), BACK_WITHIN, "p1 up")
            old = in_thread(lambda: os.open(mnt / "n/p1/node/name", os.O_RDONLY), 5)
            with Watch(mnt, ["n1"]) as watch:
                p1.cut()
                t_cut = time.monotonic()
                o = attempt(lambda: read_file(mnt / "n/p1/mem/free"), DATA_TIMEOUT)
                assert o.err in PROMISED and o.took < META_TIMEOUT + MARGIN, (o.errname, o.took)
                wait_until(lambda: states(mnt)["p1"] == "down", DOWN_WITHIN, "p1 down")
                print(f"p1 down {time.monotonic() - t_cut:.1f}s after the cut")
                o = attempt(lambda: read_file(mnt / "n/p1/cpu/load"), FAST * 4)
                assert o.err == errno.EHOSTDOWN and o.took < FAST, (o.errname, o.took)
                p1.heal()
                took = wait_until(lambda: usable(mnt, "p1"), BACK_WITHIN, "p1 usable after heal")
                print(f"p1 usable {took:.1f}s after the heal")
            assert attempt(lambda: os.pread(old, 10, 0), 5).err == errno.EIO
            with contextlib.suppress(OSError, Stuck):
                in_thread(lambda: os.close(old), 5)
            assert not watch.errors and watch.longest < FAST, (watch.errors, watch.longest)


# -- chaos ----------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every call the load made: kind, node, errno, seconds; and the data fsynced."""

    calls: list[tuple[str, str, int | None, float]] = field(default_factory=list)
    synced: dict[Path, bytes] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, node: str, err: int | None, took: float) -> None:
        with self.lock:
            self.calls.append((kind, node, err, took))


# A syscall's calls to a node run one after another, and the first that fails ends it: a
# syscall is bounded by one deadline beyond the calls that were answered (and a hung node is
# given up within DOWN_WITHIN, which ends most calls sooner).
CHAOS_BOUND = {"meta": META_TIMEOUT + MARGIN, "read": DATA_TIMEOUT + MARGIN,
               "write": DATA_TIMEOUT + MARGIN}  # fmt: skip


def _load(mnt: Path, names: list[str], ledger: Ledger, stop: threading.Event, w: int) -> None:
    rng = random.Random(w)
    i = 0

    def call(kind: str, node: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.monotonic()
        try:
            r = fn(*args)
        except OSError as e:
            ledger.record(kind, node, e.errno, time.monotonic() - t0)
            raise
        ledger.record(kind, node, None, time.monotonic() - t0)
        return r

    while not stop.is_set():
        i += 1
        node = rng.choice(names)
        op = rng.choice(("write", "write", "read", "read", "job", "nodes"))
        with contextlib.suppress(OSError):
            if op == "write":
                path = mnt / "n" / node / "storage" / f"chaos-{w}-{i}"
                data = os.urandom(rng.randrange(1, 200_000))
                fd = call("meta", node, os.open, path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    call("write", node, os.write, fd, data)
                    call("write", node, os.fsync, fd)
                finally:
                    call("meta", node, os.close, fd)
                with ledger.lock:
                    ledger.synced[path] = data
            elif op == "read":
                with ledger.lock:
                    mine = [p for p in ledger.synced if p.parts[-3] == node]
                if mine and rng.random() < 0.5:
                    path = rng.choice(mine)
                    got = call("read", node, read_file, path)
                    assert got == ledger.synced[path], f"{path} reads back different"
                else:
                    call("read", node, read_file, mnt / "n" / node / "cpu" / "load")
            elif op == "job":
                jid = call("meta", "*", lambda: read_file(mnt / "jobs/clone")).decode().strip()
                call(
                    "write",
                    jid.split(".")[0],
                    ctl,
                    mnt / "jobs" / jid / "ctl",
                    "run true\n",
                )
            else:
                call("meta", "-", lambda: read_file(mnt / "nodes"))
        stop.wait(0.02)


def test_chaos(
    tmp_path: Path, identity: Identity, cluster: list[NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """≤ 60 s: reads, writes (fsynced) and job launches while nodes are killed and restarted,
    hung for 10 s, and (where a network namespace can be made) cut off or slowed."""
    n1, n2, n3 = cluster
    ledger = Ledger()
    with contextlib.ExitStack() as stack:
        try:
            net: NetNode | None = stack.enter_context(netns_node(tmp_path, identity, monkeypatch))
        except pytest.skip.Exception:
            net = None
        nodes = [*cluster, *([net.node] if net else [])]
        names = [n.name for n in nodes]
        mnt = stack.enter_context(mounted(tmp_path, identity, nodes, "mnt-chaos"))
        wait_until(lambda: all(s == "up" for s in states(mnt).values()), BACK_WITHIN, "all up")
        stop = threading.Event()
        workers = [threading.Thread(target=_load, args=(mnt, names, ledger, stop, w), daemon=True)
                   for w in range(4)]  # fmt: skip
        t0 = time.monotonic()

        def at(t: float) -> None:  # the fault schedule: a timetable, not synchronisation
            time.sleep(max(0.0, t0 + t - time.monotonic()))

        for t in workers:
            t.start()
        try:
            at(2)
            n1.kill()
            ledger.faults.append("SIGKILL n1")
            at(5)
            n1.start(listen=n1.addr)
            ledger.faults.append("restart n1")
            at(6)
            n2.signal(signal.SIGSTOP)
            ledger.faults.append("SIGSTOP n2 (10 s)")
            if net is not None:
                if net.netem:
                    net.shape("delay 300ms 100ms loss 20%")
                    ledger.faults.append("netem p1: delay 300ms, loss 20% (8 s)")
                else:
                    net.cut()
                    ledger.faults.append("link down p1 (8 s; netem unavailable)")
            at(14)
            if net is not None:
                net.shape("") if net.netem else net.heal()
            at(16)
            n2.signal(signal.SIGCONT)
            healed = time.monotonic()
        finally:
            n2.signal(signal.SIGCONT)
            if net is not None:
                net.heal()
                net.shape("")
        every = time.monotonic()
        for name in names:
            wait_until(lambda n=name: usable(mnt, n), 10, f"{name} usable after healing")
            probe = mnt / "n" / name / "storage" / "after-chaos"
            in_thread(lambda p=probe: write_file(p, b"ok", fsync=True), 10)
        usable_after = time.monotonic() - healed
        assert time.monotonic() - every < 10
        at(22)
        stop.set()
        for t in workers:
            t.join(DATA_TIMEOUT + 10)
            assert not t.is_alive(), "a load worker is stuck"
        # every fsynced write reads back identical
        for path, data in ledger.synced.items():
            assert in_thread(lambda p=path: read_file(p), 10) == data, path

    errs = Counter(errno.errorcode.get(e, str(e)) for _, _, e, _ in ledger.calls if e)
    longest = max((c for c in ledger.calls), key=lambda c: c[3])
    print("\nchaos summary")
    print(f"  faults      {'; '.join(ledger.faults)}")
    print(f"  operations  {len(ledger.calls)} calls, {len(ledger.synced)} fsynced files checked")
    print(f"  errors      {dict(errs) or 'none'}")
    print(f"  longest     {longest[3]:.2f}s ({longest[0]} on {longest[1]}, "
          f"{errno.errorcode.get(longest[2], 'ok') if longest[2] else 'ok'})")  # fmt: skip
    print(f"  usable      {usable_after:.1f}s after the last fault healed")
    bad = [c for c in ledger.calls if c[2] is not None and c[2] not in PROMISED | {errno.ENOENT}]
    assert not bad, bad
    slow = [c for c in ledger.calls if c[3] > CHAOS_BOUND[c[0]]]
    assert not slow, slow
    healthy = [c for c in ledger.calls if c[1] == "n3" and c[3] > FAST * 2]
    assert not healthy, healthy
    assert len(ledger.calls) > 100
