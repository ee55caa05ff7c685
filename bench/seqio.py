"""Sequential read and write of one large file (dd, bs=1M) through the mount, against
sshfs (aes128-gcm) of the same directory and the local disk.

Reads: the reader's cached copy is dropped before each run (fadvise DONTNEED on the mounted
file), the node's copy stays in its page cache, so the wire and both ends are measured, not
the disk; the local rows give the disk (cold) and the page cache. Writes: dd from /dev/zero
into a new file, timed to close (no fsync: the disk's 220 MB/s would be the figure).
Runs alternate ninefs, sshfs, local.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import rig

NAME = "seqio"
DESCRIPTION = "sequential read/write of a 512 MiB file: ninefs vs sshfs vs local disk"


def _dd_read(path: Path) -> None:
    rig.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])


def _dd_write(path: Path, mib: int) -> None:
    rig.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}"])


def run(quick: bool = False) -> int:
    mib = 128 if quick else 512
    reps = 2 if quick else 5
    print(f"{rig.machine()}; {mib} MiB file, {reps} runs each, alternating", flush=True)
    with rig.Rig(nodes=1, sshfs=True) as r:
        src = r.export / "big.dat"
        with open(src, "wb") as f:
            block = os.urandom(rig.MiB)
            for _ in range(mib):
                f.write(block)
        os.sync()
        reads: dict[str, list[float]] = {"ninefs": [], "sshfs": [], "disk": [], "cache": []}
        writes: dict[str, list[float]] = {"ninefs": [], "sshfs": [], "local": []}
        size_mb = mib * rig.MiB / 1e6
        paths = {"ninefs": r.storage / "big.dat", "sshfs": r.sshfs_mnt / "big.dat"}
        for _ in range(reps):
            for kind, p in paths.items():
                rig.warm_file(src)  # the node's copy in its page cache
                rig.drop_file(p)
                reads[kind].append(size_mb / rig.timed(lambda p=p: _dd_read(p)))
            rig.drop_file(src)
            reads["disk"].append(size_mb / rig.timed(lambda: _dd_read(src)))
            reads["cache"].append(size_mb / rig.timed(lambda: _dd_read(src)))
            wpaths = {
                "ninefs": r.storage / "w.dat",
                "sshfs": r.sshfs_mnt / "w.dat",
                "local": r.export / "w.dat",
            }
            for kind, p in wpaths.items():
                writes[kind].append(size_mb / rig.timed(lambda p=p: _dd_write(p, mib)))
                (r.export / "w.dat").unlink()
                os.sync()
    rows = [
        rig.Row("seq read, MB/s", "MB/s", reads["ninefs"], "sshfs", reads["sshfs"], ">= 3x sshfs"),
        rig.Row("  local disk (cold)", "MB/s", reads["disk"]),
        rig.Row("  local page cache", "MB/s", reads["cache"]),
        rig.Row("seq write, MB/s", "MB/s", writes["ninefs"], "sshfs", writes["sshfs"], ">= 3x sshfs"),
        rig.Row("  local (page cache)", "MB/s", writes["local"]),
    ]  # fmt: skip
    print(rig.table(rows))
    return 0
