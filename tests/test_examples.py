"""examples/, run as a user runs them: each script against a real three-node cluster, mounted.

Every run is bounded by a subprocess timeout; nothing waits by sleeping (a job's ctl write
returns once it has started, and `wait` blocks until it has ended).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .cluster import Identity, MountProc, NodeProc

pytestmark = pytest.mark.fuse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))


def example(
    script: str, *args: str, mnt: Path | None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run examples/SCRIPT with MOUNTPOINT as its first argument (or, if None, none)."""
    env = {k: v for k, v in os.environ.items() if k != "NINEFS_MNT"}
    argv = ["sh", str(EXAMPLES / script), *([str(mnt)] if mnt else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def test_scripts_are_posix_sh_with_a_header() -> None:
    assert {s.name for s in SCRIPTS} >= {"run-everywhere.sh", "parallel-map.sh", "top.sh"}
    for s in SCRIPTS:
        lines = s.read_text().splitlines()
        assert lines[0] == "#!/bin/sh" and lines[1].startswith(f"# {s.name}: "), s.name
        assert os.access(s, os.X_OK), f"{s.name} is not executable"
        r = subprocess.run(["sh", "-n", str(s)], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-s", "sh", *map(str, SCRIPTS)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stdout


# The job's own node, from inside it: a job starts in its node's export (tmp/NODE/export).
WHERE = 'n=$(basename "$(dirname "$PWD")")'


def test_run_everywhere(mount: Path) -> None:
    r = example("run-everywhere.sh", f'{WHERE}; echo "hello from $n"; echo "warn $n" >&2; [ "$n" != n2 ]', mnt=mount)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        "n1: hello from n1",
        "n2: hello from n2",
        "n3: hello from n3",
        "n1 exit 0",
        "n2 exit 1",
        "n3 exit 0",
    ]
    assert r.stderr.splitlines() == ["n1: warn n1", "n2: warn n2", "n3: warn n3"]
    for n in ("n1", "n2", "n3"):  # it removes its jobs
        assert os.listdir(mount / "n" / n / "jobs") == ["clone"]

    # NINEFS_MNT instead of an argument; several words; a command reading stdin gets EOF
    env = dict(os.environ, NINEFS_MNT=str(mount))
    r = subprocess.run(["sh", str(EXAMPLES / "run-everywhere.sh"), "cat;", "echo", "done"],
                       capture_output=True, text=True, timeout=30, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["n1: done", "n2: done", "n3: done"] + [
        f"n{i} exit 0" for i in (1, 2, 3)
    ]


def test_parallel_map(mount: Path, cluster: list[NodeProc]) -> None:
    inputs = {f"f{i}.txt": i * 10 for i in (1, 2, 3, 4)} | {"it's a file.txt": 5}
    indir = mount / "n/n2/storage/in"
    indir.mkdir()
    for name, lines in inputs.items():
        (indir / name).write_text("".join(f"{k}\n" for k in range(1, lines + 1)))

    r = example("parallel-map.sh", "n2", "in", "counts", "wc", "-l", mnt=mount)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(
        [f"{name} exit 0" for name in inputs] + ["5 files, 0 failed"]
    )
    out = cluster[1].export / "counts"  # on n2's disk, where the data is
    assert {p.name: int(p.read_text()) for p in out.iterdir()} == inputs
    assert not (cluster[0].export / "counts").exists()
    assert not (cluster[2].export / "counts").exists()

    r = example("parallel-map.sh", "n2", "in", "packed", "gzip", "-9", mnt=mount)
    assert r.returncode == 0, r.stderr
    for name in inputs:
        packed = (cluster[1].export / "packed" / name).read_bytes()
        assert gzip.decompress(packed) == (cluster[1].export / "in" / name).read_bytes()

    # one that fails for some: seq 5 has no 7 in it
    r = example("parallel-map.sh", "n2", "in", "sevens", "grep", "-q", "7", mnt=mount)
    assert r.returncode == 1
    assert "it's a file.txt exit 1" in r.stdout.splitlines()
    assert "5 files, 1 failed" in r.stdout.splitlines()
    assert os.listdir(mount / "n/n2/jobs") == ["clone"]


def test_top(mount: Path) -> None:
    jobs = mount / "n/n1/jobs"
    jid = (jobs / "clone").read_text().strip()
    (jobs / jid / "ctl").write_text("limit time 60\nexec sleep 60\n")  # running once written
    try:
        r = example("top.sh", "-n", "2", "-d", "0.2", mnt=None, timeout=30)  # no mountpoint
        assert r.returncode == 2 and "usage" in r.stderr
        r = subprocess.run(["sh", str(EXAMPLES / "top.sh"), "-n", "2", "-d", "0.2", str(mount)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    finally:
        (jobs / jid / "ctl").write_text("rm\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8, r.stdout  # two screens: a header and three nodes each
    for screen in (lines[:4], lines[4:]):
        assert screen[0].split()[:5] == ["NODE", "LOAD", "CPUS", "FREE", "JOBS"]
        rows = [ln.split() for ln in screen[1:]]
        assert [row[0] for row in rows] == ["n1", "n2", "n3"]
        for _node, load, cpus, free, _jobs in rows:
            float(load)
            assert int(cpus) == os.cpu_count()
            assert re.fullmatch(r"\d+\.\dG", free) and float(free[:-1]) > 0
        assert [row[4] for row in rows] == ["1", "0", "0"]  # the sleep on n1


def test_submit(mount: Path, cluster: list[NodeProc]) -> None:
    script = 'echo "$MSG"; pwd; echo oops >&2; exit 4'
    r = example("submit.sh", "-n", "n3", "-e", "MSG=it's a test", "-t", "30", "-m", "1G",
                "--", "sh", "-c", script, mnt=mount)  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert r.stdout == f"it's a test\n{cluster[2].export}\n"  # it ran on n3, in its storage
    jid = r.stderr.splitlines()[0].removesuffix(": started")
    assert r.stderr.splitlines() == [f"{jid}: started", "oops", f"{jid}: exit 4"]
    status = (mount / "jobs" / jid / "status").read_text()
    assert "limits mem=1073741824 time=30" in status or "limits time=30 mem=1073741824" in status

    workdir = cluster[2].export / "sub dir"
    workdir.mkdir()
    r = example("submit.sh", "-d", str(workdir), "pwd", mnt=mount)
    assert (r.returncode, r.stdout) == (0, f"{workdir}\n"), r.stderr

    r = example("submit.sh", "-t", "0.5", "sleep", "30", mnt=mount)
    assert r.returncode == 1 and r.stderr.rstrip().endswith(": signal KILL")

    r = example("submit.sh", "no-such-program", mnt=mount)
    assert r.returncode == 1 and "No such file or directory" in r.stderr

    r = example("submit.sh", "-l", "gpu", "true", mnt=mount)  # no node has that label
    assert r.returncode == 1 and "did not start" in r.stderr


def test_submit_runs_where_it_is_told(mount: Path) -> None:
    """`-n n3` places the job on n3. Its id stays the one /jobs/clone gave (a user may hold
    it already); the job's ctl line says where it runs (docs/files.md, The namespace)."""
    r = example("submit.sh", "-n", "n3", "hostname", mnt=mount)
    assert r.returncode == 0, r.stderr
    jid = r.stderr.split(":")[0]
    where = (mount / "jobs" / jid / "ctl").read_text().split()[0]
    assert where.startswith("n3."), where


def test_namespace_file(tmp_path: Path, identity: Identity, cluster: list[NodeProc]) -> None:
    """examples/namespace, with the real addresses put in, mounted by `ninefs mount --ns`."""
    addrs = {n.name: n.addr for n in cluster}
    text = (EXAMPLES / "namespace").read_text()
    text, count = re.subn(
        r"^mount \S+ (\S+)", lambda mo: f"mount {addrs[mo[1]]} {mo[1]}", text, flags=re.M
    )
    assert count == 3
    ns = tmp_path / "ns-example"
    ns.write_text(text)
    for i, n in enumerate(cluster, 1):
        (n.export / f"from-n{i}").write_text(f"{i}\n")

    mp = MountProc(tmp_path / "ns-mnt", ns, identity.home)
    try:
        mp.start()
        root = mp.mountpoint
        assert sorted(os.listdir(root / "n")) == ["n1", "n2", "n3"]
        assert [ln.split()[2] for ln in (root / "nodes").read_text().splitlines()] == ["up"] * 3
        # the union: every node's storage in one directory, new files on the first (n1)
        assert {"from-n1", "from-n2", "from-n3"} <= set(os.listdir(root / "storage"))
        assert (root / "storage/from-n3").read_text() == "3\n"
        (root / "storage/new.txt").write_text("made through the union\n")
        assert (cluster[0].export / "new.txt").read_text() == "made through the union\n"
        assert not (cluster[1].export / "new.txt").exists()
        assert (root / "build/node/name").read_text() == "n2\n"
    finally:
        mp.stop()
