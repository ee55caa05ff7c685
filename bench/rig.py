"""What the mount-level workloads share: a cluster on loopback, its FUSE mount, the sshfs
peer, drop-the-caches helpers and the report table.

``Rig`` starts node daemons and one ``ninefs mount`` (tests/cluster.py's NodeProc and
MountProc) in a temporary directory and, if asked, an sshfs mount of node n1's export
through /work/shared/bench/sshfs-peer (aes128-gcm; ``SSHFS_PEER`` names another copy).
Everything it starts is stopped on the way out, on error and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster import (  # noqa: E402  (the repo root must be on the path first)
    MountProc,
    NodeProc,
    force_unmount,
    make_identity,
    make_node,
    write_namespace,
)

SSHFS_PEER = Path(os.environ.get("SSHFS_PEER", "/work/shared/bench/sshfs-peer"))
MiB = 1 << 20


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return (
        f"{os.cpu_count()} vCPU {cpu}, kernel {os.uname().release}, Python {sys.version.split()[0]}"
    )


# -- caches --------------------------------------------------------------------------------


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (FUSE forgets its inodes)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def drop_file(path: Path) -> None:
    """Drop one file's pages from the page cache (for a FUSE file: the client's copy only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        while f.readinto(buf):
            pass


# -- the cluster ---------------------------------------------------------------------------


def start_nodes(base: Path, who, names: list[str]) -> list[NodeProc]:
    nodes = [make_node(base, n, who) for n in names]
    started: list[NodeProc] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futs = [pool.submit(n.start) for n in nodes]
        errors = []
        for n, fut in zip(nodes, futs, strict=True):
            try:
                fut.result()
                started.append(n)
            except Exception as e:
                errors.append(e)
    if errors:
        for n in started:
            n.stop()
        raise errors[0]
    return nodes


@dataclass
class Rig:
    nodes: int = 3
    sshfs: bool = False
    base: Path = field(default_factory=Path)
    procs: list[NodeProc] = field(default_factory=list)
    mount: MountProc | None = None
    mnt: Path = field(default_factory=Path)
    sshfs_mnt: Path | None = None
    mount_seconds: float = 0.0
    ns: Path = field(default_factory=Path)  # the namespace file the mount starts from

    def __enter__(self) -> Rig:
        self.base = Path(tempfile.mkdtemp(prefix="ninefs-bench-"))
        try:
            self.who = make_identity(self.base / "home")
            self.procs = start_nodes(self.base, self.who, [f"n{i + 1}" for i in range(self.nodes)])
            self.ns = write_namespace(self.base / "namespace", self.procs)
            self.mnt = self.base / "mnt"
            t = time.perf_counter()
            self.mount = MountProc(self.mnt, self.ns, self.who.home).start()
            self.mount_seconds = time.perf_counter() - t
            if self.sshfs:
                self.sshfs_mnt = self.base / "sshfs"
                sshfs_up(self.procs[0].export, self.sshfs_mnt)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def remount(self) -> None:
        """Stop the mount and start it again: its own caches start empty (as sshfs_remount)."""
        if self.mount is not None:
            self.mount.stop()
            self.mount = None
        self.mount = MountProc(self.mnt, self.ns, self.who.home).start()

    def close(self) -> None:
        if self.sshfs_mnt is not None:
            sshfs_down(self.sshfs_mnt)
            self.sshfs_mnt = None
        if self.mount is not None:
            self.mount.stop()
            self.mount = None
        for n in self.procs:
            with contextlib.suppress(Exception):
                n.stop()
        self.procs = []
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def export(self) -> Path:
        """Node n1's export: what /n/n1/storage and the sshfs mount both show."""
        return self.procs[0].export

    @property
    def storage(self) -> Path:
        return self.mnt / "n" / "n1" / "storage"


# -- the sshfs peer ------------------------------------------------------------------------


def _peer(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SSHFS_PEER), *args], capture_output=True, text=True, check=check, timeout=300
    )


def sshfs_up(src: Path, mnt: Path) -> None:
    if not SSHFS_PEER.exists():
        raise RuntimeError(f"{SSHFS_PEER} is missing (set SSHFS_PEER)")
    mnt.mkdir(parents=True, exist_ok=True)
    r = _peer("up", str(src), str(mnt), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"sshfs-peer up failed: {r.stderr.strip()[-500:]}")


def sshfs_remount(src: Path, mnt: Path) -> None:
    """Unmount and mount again (sshd stays up): sshfs's own caches start empty."""
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    sshfs_up(src, mnt)


def sshfs_down(mnt: Path) -> None:
    _peer("down", str(mnt), check=False)
    force_unmount(mnt)


def ssh(*cmd: str) -> None:
    _peer("ssh", *cmd)


# -- measuring and reporting ---------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(cmd: list[str], **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(v: float, unit: str) -> str:
    if v != v:
        return "-"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "ms":
        return f"{v:.2f} ms" if v < 10 else f"{v:.0f} ms"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:,.0f} {unit}"


@dataclass
class Row:
    label: str
    unit: str  # "MB/s", "s", "ms", "/s", "MB"
    ninefs: list[float]
    peer: str = ""
    other: list[float] = field(default_factory=list)
    target: str = ""
    hi: float = 0.9  # the upper percentile shown: p90 for repeated runs, p99 for latencies


def table(rows: list[Row]) -> str:
    head = ("", "ninefs p50", "p90|p99", "peer", "peer p50", "p90|p99", "ninefs/peer", "target")
    lines = [head]
    for r in rows:
        a, b = med(r.ninefs), med(r.other)
        ratio = f"{a / b:.2f}x" if r.other and b and a == a else ""
        lines.append((
            r.label, fmt(a, r.unit), fmt(pct(r.ninefs, r.hi), r.unit), r.peer,
            fmt(b, r.unit) if r.other else "", fmt(pct(r.other, r.hi), r.unit) if r.other else "",
            ratio, r.target,
        ))  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = []
    for i, x in enumerate(lines):
        out.append(
            "  ".join(
                [x[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(x[1:], widths[1:], strict=True)]
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    print(f"-- {title}", flush=True)
    yield


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return float("nan")
