"""A pids cgroup for each job, where the node may make one.

RLIMIT_NPROC counts every process of an account, not of one job, and does not bind root; a
process group is left by any process that calls setsid. A cgroup has neither hole: its
``pids.max`` bounds the processes of exactly one job, whoever it runs as, and its member
list names every process the job made, wherever they moved. So where the daemon can make
cgroups (a pids controller it may write: cgroup v1's pids hierarchy, or a v2 cgroup with
pids delegated to it) each job gets one, ``limit procs`` is its ``pids.max`` (a default
bound otherwise), and ending a job kills every member. Elsewhere jobs fall back to
RLIMIT_NPROC and the process group (servers/jobs.py).

The child joins its cgroup itself, between fork and exec, while it is still root; only
then does it become the job's account (a process may always move itself while root).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

DEFAULT_PROCS = 4096  # a job's bound on processes without `limit procs`: no fork bomb is unbounded


def _own_pids_dir() -> Path | None:
    """The cgroup directory of this process in a pids controller it can see, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in mounts:
        left, _, right = line.partition(" - ")
        fstype, _, opts = (right.split() + ["", "", ""])[:3]
        point = left.split()[4]
        if fstype == "cgroup" and "pids" in opts.split(","):
            v1 = v1 or point
        elif fstype == "cgroup2":
            v2 = v2 or point
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if v1 and "pids" in controllers.split(","):
            return Path(v1 + path)
        if v2 and controllers == "" and line.startswith("0::"):
            d = Path(v2 + path)
            with contextlib.suppress(OSError):
                if "pids" in (d / "cgroup.subtree_control").read_text().split():
                    return d
    return None


def _base(own: Path, node: str, state: Path) -> Path:
    tag = xxhash.xxh32_hexdigest(str(Path(state).resolve()).encode())
    return own / f"ninefs-{node}-{tag}"


class JobGroups:
    """The cgroups of one node's jobs: ``<own cgroup>/ninefs-<node>-<state>/job<id>``, one
    directory per state directory, which is what owns the job ids (two daemons on one
    machine never share one, and a restarted daemon finds its predecessor's)."""

    def __init__(self, base: Path | None) -> None:
        self.base = base  # None: no cgroups here

    @classmethod
    def open(cls, node: str, state: Path) -> JobGroups:
        """The node's cgroups, if this process may make them here."""
        own = _own_pids_dir()
        if own is None:
            log.info("no pids cgroup: `limit procs` is RLIMIT_NPROC, per account")
            return cls(None)
        base = _base(own, node, state)
        try:
            base.mkdir(exist_ok=True)
            probe = base / "probe"
            probe.mkdir(exist_ok=True)
            (probe / "pids.max").write_text("1\n")
            probe.rmdir()
        except OSError as e:
            log.info("cannot make pids cgroups under %s (%s): `limit procs` is RLIMIT_NPROC",
                     own, e.strerror)  # fmt: skip
            return cls(None)
        log.info("jobs get pids cgroups under %s", base)
        return cls(base)

    def make(self, job_id: int, procs: int) -> Path | None:
        """A new cgroup for a job, bounded at ``procs`` processes; None without cgroups."""
        if self.base is None:
            return None
        d = self.base / f"job{job_id}"
        self.kill(d)  # a stale one from a daemon before (ids are never reused, but be sure)
        self.remove(d)
        d.mkdir()
        (d / "pids.max").write_text(f"{procs}\n")
        return d

    @staticmethod
    def join(d: Path) -> None:
        """Move the calling process into ``d`` (in the child, before exec)."""
        with open(d / "cgroup.procs", "w") as f:
            f.write("0\n")  # 0: the writer itself

    @staticmethod
    def members(d: Path) -> list[int]:
        try:
            return [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill(self, d: Path | None) -> int:
        """SIGKILL every process in ``d``; how many were signalled."""
        if d is None:
            return 0
        n = 0
        for pid in self.members(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                n += 1
        return n

    @staticmethod
    def remove(d: Path | None) -> bool:
        """Remove ``d`` once it is empty; False if it still has members (or is gone)."""
        if d is None:
            return False
        try:
            d.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def sweep(self, keep: set[int]) -> None:
        """Kill and remove the cgroups of jobs not in ``keep`` (left by a daemon before)."""
        if self.base is None:
            return
        for d in self.base.glob("job*"):
            with contextlib.suppress(ValueError):
                if int(d.name[3:]) in keep:
                    continue
            if self.kill(d):
                log.info("killed what was left in %s", d)
            self.remove(d)

    def close(self) -> None:
        """At the daemon's end: remove the node's directory if no job left anything."""
        if self.base is not None:
            self.sweep(keep=set())
            self.remove(self.base)


def discard(node: str, state: Path) -> None:
    """Kill and remove whatever a node that is gone left in its cgroups (a daemon killed
    with SIGKILL cannot; its successor would, and tests that start none call this).
    ``state``: the node's job directory, as given to its JobTable."""
    own = _own_pids_dir()
    if own is None:
        return
    base = _base(own, node, state)
    deadline = time.monotonic() + 5
    while base.is_dir() and time.monotonic() < deadline:
        JobGroups(base).close()
        time.sleep(0.01)  # killed members leave once they are reaped
