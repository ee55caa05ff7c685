"""A cgroup for each job, where the node may make them: limits that hold for the whole job.

rlimits are per process (a job of ten processes under RLIMIT_AS 1G may use 10G) or per
account (RLIMIT_NPROC counts every process of the account, and does not bind root), and a
process group is left by any process that calls setsid. A cgroup has none of these holes:
its ``pids.max`` bounds the processes of exactly one job whoever it runs as, its memory
limit bounds the memory of all the job's processes together, and its member list names
every process the job made, wherever they moved. So where the daemon can make cgroups (a
pids or memory controller it may write: cgroup v1's hierarchies, or a v2 cgroup with the
controllers delegated to it) each job gets one in each: ``limit procs`` is its
``pids.max`` (DEFAULT_PROCS otherwise), ``limit mem`` its memory limit as well as the
per-process RLIMIT_AS, and ending a job kills every member. Without them, jobs fall back
to rlimits and the process group (servers/jobs.py).

The child joins its cgroups itself, between fork and exec, while it is still root; only
then does it become the job's account (a process may always move itself while root). The
fork server does that (servers/spawn_server.py): this module makes, kills and removes.
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
# controller -> its limit file in cgroup v1 and in v2
_LIMIT_FILES = {"pids": ("pids.max", "pids.max"), "memory": ("memory.limit_in_bytes", "memory.max")}


def _own_dirs() -> dict[str, tuple[Path, str]]:
    """For each controller we use: this process's cgroup directory in it, and the name of
    its limit file there. Empty where there are none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return {}
    v1: dict[str, str] = {}
    v2 = None
    for line in mounts:
        left, _, right = line.partition(" - ")
        fstype, _, opts = (right.split() + ["", "", ""])[:3]
        point = left.split()[4]
        if fstype == "cgroup":
            for c in _LIMIT_FILES:
                if c in opts.split(","):
                    v1.setdefault(c, point)
        elif fstype == "cgroup2":
            v2 = v2 or point
    out: dict[str, tuple[Path, str]] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c, (v1_file, v2_file) in _LIMIT_FILES.items():
            if c in v1 and c in controllers.split(","):
                out[c] = (Path(v1[c] + path), v1_file)
            elif v2 and line.startswith("0::") and c not in out:
                d = Path(v2 + path)
                with contextlib.suppress(OSError):
                    if c in (d / "cgroup.subtree_control").read_text().split():
                        out[c] = (d, v2_file)
    return out


def _base(own: Path, node: str, state: Path) -> Path:
    tag = xxhash.xxh32_hexdigest(str(Path(state).resolve()).encode())
    return own / f"ninefs-{node}-{tag}"


class JobGroups:
    """The cgroups of one node's jobs: ``<own cgroup>/ninefs-<node>-<state>/job<id>`` in each
    controller's hierarchy, one directory per state directory, which is what owns the job
    ids (two daemons on one machine never share one, and a restarted daemon finds its
    predecessor's)."""

    def __init__(self, bases: dict[str, tuple[Path, str]]) -> None:
        self.bases = bases  # controller -> (the node's directory, limit file); {}: none

    @classmethod
    def open(cls, node: str, state: Path) -> JobGroups:
        """The node's cgroups, in each controller where this process may make them."""
        bases = {}
        for c, (own, limit) in _own_dirs().items():
            base = _base(own, node, state)
            try:
                base.mkdir(exist_ok=True)
                probe = base / "probe"
                probe.mkdir(exist_ok=True)
                probe.rmdir()
            except OSError as e:
                log.info("cannot make %s cgroups under %s (%s)", c, own, e.strerror)
                continue
            bases[c] = (base, limit)
        if bases:
            log.info(
                "jobs get cgroups: %s", ", ".join(f"{c} under {b}" for c, (b, _) in bases.items())
            )
        else:
            log.info("no cgroups: jobs are bounded by rlimits only")
        return cls(bases)

    @property
    def has(self) -> set[str]:
        return set(self.bases)

    def make(self, job_id: int, limits: dict[str, int]) -> list[Path]:
        """New cgroups for a job (one per hierarchy), with ``limits`` (controller ->
        value) written; [] without cgroups."""
        dirs: list[Path] = []
        for c, (base, limit_file) in self.bases.items():
            d = base / f"job{job_id}"
            if d not in dirs:
                self.kill([d])  # a stale one from a daemon before (ids are never reused)
                self.remove([d])
                d.mkdir()
                dirs.append(d)
            if c in limits:
                (d / limit_file).write_text(f"{limits[c]}\n")
        return dirs

    @staticmethod
    def members(dirs: list[Path]) -> set[int]:
        out: set[int] = set()
        for d in dirs:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return out

    def kill(self, dirs: list[Path]) -> int:
        """SIGKILL every process in ``dirs``; how many were signalled."""
        n = 0
        for pid in self.members(dirs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                n += 1
        return n

    @staticmethod
    def remove(dirs: list[Path]) -> bool:
        """Remove ``dirs`` once they are empty; False if one still has members."""
        gone = True
        for d in dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone

    def sweep(self) -> None:
        """Kill and remove every job cgroup of this node (at start: what jobs of a daemon
        before left; at the end: what is left of ours)."""
        stale = [d for base, _ in self.bases.values() for d in base.glob("job*")]
        if self.kill(stale):
            log.info("killed what was left in %s", ", ".join(map(str, stale)))
        self.remove(stale)

    def close(self) -> None:
        """At the daemon's end: remove the node's directories if no job left anything."""
        self.sweep()
        self.remove([base for base, _ in self.bases.values()])


def discard(node: str, state: Path) -> None:
    """Kill and remove whatever a node that is gone left in its cgroups (a daemon killed
    with SIGKILL cannot; its successor would, and tests that start none call this).
    ``state``: the node's job directory, as given to its JobTable."""
    bases = {c: (_base(own, node, state), limit) for c, (own, limit) in _own_dirs().items()}
    bases = {c: (b, limit) for c, (b, limit) in bases.items() if b.is_dir()}
    groups = JobGroups(bases)
    deadline = time.monotonic() + 5
    while any(b.is_dir() for b, _ in bases.values()) and time.monotonic() < deadline:
        groups.close()
        time.sleep(0.01)  # killed members leave once they are reaped
