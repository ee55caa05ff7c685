"""Metadata and small files: `ls -l` of a directory of 5,000 files (cold and warm), stat of
each of them, and open-read-close of each (100 bytes), through the mount, sshfs of the same
directory, and locally.

Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` first (the kernel forgets every dentry and
inode, FUSE ones included), and ninefs and sshfs are mounted again so that their own caches
(ninefs's listings, sshfs's attributes and directories) are empty too.
Warm: the same command again at once. stat and open-read-close run in one Python process
(timed inside it, so interpreter start-up is not counted) and are cold.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import rig

NAME = "meta"
DESCRIPTION = "ls -l of 5,000 files cold/warm, stat 5,000, open-read-close 5,000 small files"

_LOOP = r"""
import os, sys, time
mode, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = [f"{d}/f{i:05d}" for i in range(n)]
t = time.perf_counter()
if mode == "stat":
    for p in paths:
        os.stat(p)
else:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 65536)
        os.close(fd)
print(time.perf_counter() - t)
"""


FAILED: dict[tuple[str, str], str] = {}  # (fs, measurement) -> the first error


def _loop(mode: str, d: Path, n: int) -> float:
    return float(rig.run([sys.executable, "-c", _LOOP, mode, str(d), str(n)]))


def _try(kind: str, key: str, fn) -> list[float]:
    """One measurement; a failure is reported under the table, not fatal to the rest."""
    try:
        return [fn()]
    except RuntimeError as e:
        FAILED.setdefault((kind, key), str(e).strip().splitlines()[-1][-160:])
        return []


def run(quick: bool = False) -> int:
    n = 1000 if quick else 5000
    reps = 2 if quick else 5
    print(f"{rig.machine()}; {n} files of 100 bytes, {reps} runs each", flush=True)
    kinds = ("ninefs", "sshfs", "local")
    res = {k: {m: [] for m in ("ls_cold", "ls_warm", "stat", "orc")} for k in kinds}
    with rig.Rig(nodes=1, sshfs=True) as r:
        src = r.export / "small"
        src.mkdir()
        for i in range(n):
            (src / f"f{i:05d}").write_bytes(b"x" * 99 + b"\n")
        dirs = {"ninefs": r.storage / "small", "sshfs": r.sshfs_mnt / "small", "local": src}

        def cold(kind: str) -> None:
            if kind == "sshfs":
                rig.sshfs_remount(r.export, r.sshfs_mnt)
            elif kind == "ninefs":
                r.remount()
            rig.drop_caches()

        for _ in range(reps):
            for kind in kinds:
                d = dirs[kind]
                ls = ["ls", "-l", str(d)]
                cold(kind)
                res[kind]["ls_cold"].append(rig.timed(lambda ls=ls: rig.run(ls)))
                res[kind]["ls_warm"].append(rig.timed(lambda ls=ls: rig.run(ls)))
                cold(kind)
                res[kind]["stat"] += _try(kind, "stat", lambda d=d: _loop("stat", d, n))
                cold(kind)
                res[kind]["orc"] += _try(kind, "orc", lambda d=d: _loop("orc", d, n))
    rows = []
    for key, label, target in (
        ("ls_cold", f"ls -l {n} files, cold", "<= 0.5x sshfs"),
        ("ls_warm", f"ls -l {n} files, warm", ""),
        ("stat", f"stat {n} files, cold", ""),
        ("orc", f"open-read-close {n} files, cold", "<= 1x sshfs"),
    ):
        rows.append(rig.Row(label, "s", res["ninefs"][key], "sshfs", res["sshfs"][key], target))
        rows.append(rig.Row("  local", "s", res["local"][key]))
    print(rig.table(rows))
    for (kind, key), err in FAILED.items():
        print(f"{kind} {key} failed: {err}")
    return 1 if FAILED else 0
