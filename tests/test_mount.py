"""The mount, driven the way a user drives it: shell commands on a real FUSE mount."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from .cluster import Identity, MountProc, NodeProc, force_unmount, make_node, write_namespace

pytestmark = pytest.mark.fuse

NINEFS = [sys.executable, "-m", "ninefs"]


def sh(script: str, cwd: Path, timeout: float = 30) -> str:
    r = subprocess.run(
        ["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{script!r} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def fails(script: str, cwd: Path, timeout: float = 30) -> str:
    """Run with bash (dash's builtins report some errors as 'I/O error'); it must fail.
    Returns its stderr, where the strerror text of the errno shows."""
    r = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode != 0, f"{script!r} did not fail: {r.stdout} {r.stderr}"
    return r.stderr


def errno_of(code: str, cwd: Path) -> str:
    """The errno name a Python snippet's OSError carries ('' if it raised none)."""
    prog = f"import errno, os\ntry:\n    {code}\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    r = subprocess.run([sys.executable, "-c", prog], cwd=cwd, capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def mounted(mp: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mp) for line in f)


# -- the first page of DESIGN.md -----------------------------------------------------------


def test_design_session(mount: Path) -> None:
    """The session on DESIGN.md's first page, verbatim but for the mountpoint."""
    nodes = sh("cat nodes", mount).splitlines()
    assert [ln.split()[0] for ln in nodes] == ["n1", "n2", "n3"]
    assert all(ln.split()[2] == "up" for ln in nodes)
    assert len(sh("cat n/n1/cpu/load", mount).split()) == 3
    out = sh(
        """id=$(cat jobs/clone)
        echo 'run echo built; echo oops >&2; exit 3' > jobs/$id/ctl
        cat jobs/$id/stdout
        cat jobs/$id/wait
        echo $id""",
        mount,
    )
    built, status, jid = out.splitlines()
    assert built == "built" and status == "exit 3"
    assert jid.split(".")[0] in {"n1", "n2", "n3"}
    sh(
        "printf 'a,b\\n1,2\\n' > /tmp/results-$$.csv && cp /tmp/results-$$.csv n/n2/storage/results.csv",
        mount,
    )
    assert (mount / "n/n2/storage/results.csv").read_text() == "a,b\n1,2\n"


def test_bad_ctl_word_is_einval(mount: Path) -> None:
    # bash, not dash: dash's builtin echo reports every write error as "I/O error"
    r = subprocess.run(["bash", "-c", "id=$(cat jobs/clone); echo frobnicate > jobs/$id/ctl; rc=$?; cat jobs/$id/status; exit $rc"],
                       cwd=mount, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert "unknown command 'frobnicate'" in r.stdout


# -- storage -------------------------------------------------------------------------------


def test_storage_with_the_shell(mount: Path, cluster: list[NodeProc], tmp_path: Path) -> None:
    exp = cluster[0].export
    src = tmp_path / "src.txt"
    src.write_bytes(b"x" * 5000)
    s = "n/n1/storage"
    sh(f"cp {src} {s}/a && cat {s}/a > {tmp_path}/out && cmp {src} {tmp_path}/out", mount)
    assert (exp / "a").read_bytes() == b"x" * 5000
    sh(f"cp {s}/a {tmp_path}/back && cmp {src} {tmp_path}/back", mount)
    # ls -l shows true sizes; appending grows the file
    sh(f"echo hello > {s}/h && echo world >> {s}/h", mount)
    assert sh(f"cat {s}/h", mount) == "hello\nworld\n"
    sizes = {ln.split()[-1]: int(ln.split()[4]) for ln in sh(f"ls -l {s}", mount).splitlines()[1:]}
    assert sizes == {"a": 5000, "h": 12}
    # > truncates through the open (O_TRUNC), truncate(1) through setattr
    sh(f"echo short > {s}/a", mount)
    assert sh(f"cat {s}/a; stat -c %s {s}/a", mount) == "short\n6\n"
    sh(f"truncate -s 3 {s}/h && truncate -s 10 {s}/a", mount)
    assert (exp / "h").read_bytes() == b"hel"
    assert sh(f"stat -c %s {s}/a {s}/h", mount).split() == ["10", "3"]
    assert (exp / "a").read_bytes() == b"short\n\0\0\0\0"
    # new files and directories have the attributes asked for (umask applied)
    sh(f"umask 022 && mkdir {s}/m && touch {s}/m/t && mkdir -m 701 {s}/m/u", mount)
    assert sh(f"stat -c '%a %F' {s}/m {s}/m/u; stat -c '%a %s %F' {s}/m/t", mount).splitlines() == [
        "755 directory", "701 directory", "644 0 regular empty file",
    ]  # fmt: skip
    sh(f"rm -r {s}/m", mount)
    # directories, and mv within and across them: the renamed file stays readable
    sh(f"mkdir {s}/d {s}/d/e && echo deep > {s}/d/e/f && mv {s}/h {s}/d/h2", mount)
    assert sh(f"cat {s}/d/h2; echo; ls {s}/d", mount) == "hel\ne\nh2\n"
    sh(f"mv {s}/d {s}/D && cat {s}/D/e/f && mv {s}/D/e {s}/e2 && mv {s}/D/h2 {s}/h3", mount)
    assert sh(f"cat {s}/e2/f {s}/h3; echo; ls {s}; ls {s}/D", mount).split() == [
        "deep", "hel", "D", "a", "e2", "h3",
    ]  # fmt: skip
    assert fails(f"cat {s}/D/e/f", mount).endswith("No such file or directory\n")
    # a renamed directory's old inode is moved, not left behind: stat it often, both ways
    for _ in range(3):
        sh(f"mv {s}/e2 {s}/D/e && stat {s}/D/e/f >/dev/null && mv {s}/D/e {s}/e2", mount)
        assert sh(f"cat {s}/e2/f", mount) == "deep\n"
    # mv over an existing file replaces it
    sh(f"echo new > {s}/n && mv {s}/n {s}/h3", mount)
    assert sh(f"cat {s}/h3; ls {s}", mount).split() == ["new", "D", "a", "e2", "h3"]
    # symbolic links
    sh(f"ln -s h3 {s}/link && ln -s /nowhere {s}/dangling", mount)
    assert sh(f"readlink {s}/link {s}/dangling; cat {s}/link", mount) == "h3\n/nowhere\nnew\n"
    assert os.readlink(exp / "link") == "h3"
    assert sh(f"stat -c %F {s}/link", mount) == "symbolic link\n"
    # chmod and touch -d
    sh(f"chmod 640 {s}/h3 && chmod 700 {s}/D", mount)
    assert sh(f"stat -c %a {s}/h3 {s}/D", mount).split() == ["640", "700"]
    assert (exp / "h3").stat().st_mode & 0o777 == 0o640
    sh(f"touch -d '2001-02-03 04:05:06 UTC' {s}/h3", mount)
    assert sh(f"TZ=UTC stat -c %y {s}/h3", mount).startswith("2001-02-03 04:05:06")
    assert int((exp / "h3").stat().st_mtime) == 981173106
    sh(f"touch {s}/new-empty && test -f {s}/new-empty && test ! -s {s}/new-empty", mount)
    # rm, rmdir
    sh(f"rm {s}/link {s}/dangling {s}/new-empty && rmdir {s}/D && rm -r {s}/e2", mount)
    assert sorted(p.name for p in exp.iterdir()) == ["a", "h3"]
    assert sh(f"ls -a {s}", mount).split() == [".", "..", "a", "h3"]
    assert sh(f"ls -a {s}/..", mount).split() == [".", "..", "cpu", "jobs", "mem", "metrics",
                                                  "node", "proc", "storage"]  # fmt: skip
    # df on the mount gives the storage's filesystem
    df = sh("df -P . | tail -1", mount).split()
    assert df[0] == "ninefs" and int(df[1]) > 0
    # a file changed on the node's disk shows through the mount at the next open
    (exp / "a").write_text("changed on the node\n")
    assert sh(f"cat {s}/a", mount) == "changed on the node\n"


def test_storage_errors_keep_their_errno(mount: Path, cluster: list[NodeProc]) -> None:
    s1, s2 = "n/n1/storage", "n/n2/storage"
    sh(f"mkdir {s1}/full && echo x > {s1}/full/f && echo y > {s1}/y", mount)
    assert "No such file or directory" in fails(f"cat {s1}/nope", mount)
    assert "No such file or directory" in fails(f"rm {s1}/nope", mount)
    assert "No such file or directory" in fails(f"mkdir {s1}/no/such", mount)
    assert "Directory not empty" in fails(f"rmdir {s1}/full", mount)
    assert "File exists" in fails(f"mkdir {s1}/full", mount)
    assert "Not a directory" in fails(f"ls {s1}/y/z", mount)
    assert "Is a directory" in fails(f"echo x > {s1}/full", mount)
    assert errno_of(f"os.rmdir('{s1}/y')", mount) == "ENOTDIR"
    assert errno_of(f"os.rmdir('{s1}/full')", mount) == "ENOTEMPTY"
    assert errno_of(f"os.open('{s1}/y', os.O_CREAT | os.O_EXCL | os.O_WRONLY)", mount) == "EEXIST"
    assert errno_of(f"os.rename('{s1}/y', '{s2}/y')", mount) == "EXDEV"
    assert errno_of(f"os.rename('{s1}/full', '{s1}/full/f/x')", mount) in ("ENOTDIR", "EINVAL")
    assert errno_of(f"os.link('{s1}/y', '{s1}/y2')", mount) == "EPERM"
    assert errno_of(f"os.mkfifo('{s1}/fifo')", mount) == "EPERM"
    # across nodes, mv copies and removes (as it does between filesystems)
    sh(f"mv {s1}/y {s2}/y && cat {s2}/y && test ! -e {s1}/y", mount)
    assert (cluster[1].export / "y").read_text() == "y\n"
    # the namespace's own files and directories
    assert "Permission denied" in fails("echo x > nodes", mount)
    assert "Permission denied" in fails("mkdir n/foo", mount)
    assert "Permission denied" in fails("echo x > jobs/clone", mount)
    assert "No such file or directory" in fails("cat n/n9/cpu/load", mount)
    assert errno_of("os.chmod('ctl', 0o600)", mount) == "EPERM"
    # synthetic files: touch and the shell's O_TRUNC are harmless, chmod is refused
    sh("touch n/n1/cpu/load && : > ctl && id=$(cat jobs/clone) && : > jobs/$id/ctl", mount)
    assert "Operation not permitted" in fails("chmod 600 n/n1/cpu/load", mount)
    assert "Permission denied" in fails("echo 1 > n/n1/cpu/load", mount)


def test_big_file_round_trip(mount: Path, cluster: list[NodeProc], tmp_path: Path) -> None:
    """100 MiB in and out through the mount, byte for byte (figures: run with -s)."""
    src, back = tmp_path / "big.in", tmp_path / "big.out"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    want = xxhash.xxh128(src.read_bytes()).hexdigest()
    t0 = time.monotonic()
    sh(f"cp {src} n/n2/storage/big", mount, timeout=120)
    t1 = time.monotonic()
    sh(f"cp n/n2/storage/big {back}", mount, timeout=120)
    t2 = time.monotonic()
    assert xxhash.xxh128((cluster[1].export / "big").read_bytes()).hexdigest() == want
    assert xxhash.xxh128(back.read_bytes()).hexdigest() == want
    assert sh("stat -c %s n/n2/storage/big", mount) == f"{100 << 20}\n"
    print(f"\n100 MiB through the mount: in {t1 - t0:.2f} s ({100 / (t1 - t0):.0f} MiB/s), "
          f"out {t2 - t1:.2f} s ({100 / (t2 - t1):.0f} MiB/s)")  # fmt: skip


# -- jobs ----------------------------------------------------------------------------------


def test_twenty_jobs_in_parallel(mount: Path) -> None:
    out = sh(
        """for i in $(seq 1 20); do
            ( id=$(cat jobs/clone) && echo "run echo out-$i; exit $((i % 4))" > jobs/$id/ctl && echo "$i $id" ) &
        done
        wait""",
        mount,
        timeout=60,
    )
    ids = dict(line.split() for line in out.splitlines())
    assert len(ids) == 20 and len(set(ids.values())) == 20
    assert all(re.fullmatch(r"n[123]\.\d+", j) for j in ids.values()), ids
    assert len({j.split(".")[0] for j in ids.values()}) > 1, ids
    script = "".join(
        f"cat jobs/{j}/stdout; cat jobs/{j}/wait; head -1 jobs/{j}/status\n" for j in ids.values()
    )
    lines = sh(script, mount, timeout=60).splitlines()
    for n, (i, j) in enumerate(ids.items()):
        assert lines[3 * n : 3 * n + 3] == [
            f"out-{i}",
            f"exit {int(i) % 4}",
            f"id {j.split('.')[1]}",
        ]
    listed = set(sh("ls jobs", mount).split())
    assert "clone" in listed and set(ids.values()) <= listed
    assert sh(f"ls jobs/{j}", mount).split() == [
        "ctl",
        "status",
        "stderr",
        "stdin",
        "stdout",
        "wait",
    ]


def test_cluster_job_ctl_node(mount: Path) -> None:
    out = sh(
        """id=$(cat jobs/clone)
        echo 'node n3' > jobs/$id/ctl
        echo 'exec echo placed' > jobs/$id/ctl
        cat jobs/$id/stdout jobs/$id/wait
        echo $id""",
        mount,
    )
    placed, status, jid = out.splitlines()
    assert (placed, status) == ("placed", "exit 0")
    # the id the user holds still names it (and `ls jobs` lists it by that id); its ctl
    # says where it ran: on n3
    assert jid in sh("ls jobs", mount).split()
    where = sh(f"cat jobs/{jid}/ctl", mount).split()
    assert re.fullmatch(r"n3\.\d+", where[0]) and where[1] == "exited", where
    assert sh(f"cat n/n3/jobs/{where[0].split('.')[1]}/stdout", mount) == "placed\n"
    # after the start, placement words are refused
    err = fails(
        f"echo 'node n1' > jobs/{jid}/ctl; rc=$?; echo 'label gpu' > jobs/{jid}/ctl || exit $rc",
        mount,
    )
    assert err.count("Invalid argument") == 2, err
    assert "Invalid argument" in fails("id=$(cat jobs/clone); echo 'node' > jobs/$id/ctl", mount)


# -- the namespace -------------------------------------------------------------------------


def test_union_bind_and_ctl(mount: Path, cluster: list[NodeProc]) -> None:
    n1, n2, n3 = (n.export for n in cluster)
    (n1 / "one").write_text("from n1\n")
    (n2 / "two").write_text("from n2\n")
    (n3 / "three").write_text("from n3\n")
    assert sh("ls n/n1/storage", mount).split() == ["one"]
    sh("echo 'bind -a /n/n2/storage /n/n1/storage' > ctl", mount)
    assert sh("ls n/n1/storage", mount).split() == ["one", "two"]
    assert sh("cat n/n1/storage/two n/n1/storage/one", mount) == "from n2\nfrom n1\n"
    sh("echo made > n/n1/storage/new && mkdir n/n1/storage/newdir", mount)
    assert (n1 / "new").read_text() == "made\n" and (n1 / "newdir").is_dir()
    assert not (n2 / "new").exists()
    # a bind that replaces: n1's storage now shows n3's
    sh("echo 'bind /n/n3/storage /n/n1/storage' > ctl", mount)
    assert sh("ls n/n1/storage", mount).split() == ["three"]
    assert "No such file or directory" in fails("cat n/n1/storage/one", mount)
    sh("echo 'bind -b /n/n2/storage /n/n3/storage' > ctl", mount)
    assert sh("ls n/n1/storage", mount).split() == ["three", "two"]  # through n3's union
    sh("echo 'bind -a /n/n1/node /nodeinfo' > ctl", mount)
    # reading ctl gives the namespace as a namespace file would make it
    mounts = "".join(f"mount {n.addr} {n.name}\n" for n in cluster)
    assert sh("cat ctl", mount) == mounts + (
        "bind /n/n3/storage /n/n1/storage\n"
        "bind -b /n/n2/storage /n/n3/storage\n"
        "bind /n/n1/node /nodeinfo\n"
    )
    assert sh("cat nodeinfo/name", mount) == "n1\n"
    # mount and unmount at run time
    sh(f"echo 'mount {cluster[1].addr} again' > ctl", mount)
    assert sh("ls n", mount).split() == ["again", "n1", "n2", "n3"]
    assert sh("cat n/again/node/name", mount) == "n2\n"
    assert f"mount {cluster[1].addr} again" in sh("cat ctl", mount)
    sh("echo 'unmount again' > ctl", mount)
    assert sh("ls n", mount).split() == ["n1", "n2", "n3"]
    assert "No such file or directory" in fails("ls n/again", mount)
    assert [ln.split()[0] for ln in sh("cat nodes", mount).splitlines()] == ["n1", "n2", "n3"]
    # bad lines are EINVAL, and change nothing
    for bad in (
        "frob x",
        "bind -x /n/n1 /n/n2",
        "mount nowhere:port n5",
        "mount 127.0.0.1:1 a/b",
        "bind /n/n1",
        "unmount",
    ):
        assert "Invalid argument" in fails(f"echo '{bad}' > ctl", mount), bad
    assert "No such file or directory" in fails("echo 'unmount n9' > ctl", mount)
    assert "No such file or directory" in fails("echo 'bind /nothing /n/x' > ctl", mount)
    assert "No such file or directory" in fails("echo 'bind -a /n/n2/nothing /n/x' > ctl", mount)
    assert sh("ls n", mount).split() == ["n1", "n2", "n3"]


@pytest.fixture
def labelled(tmp_path: Path, identity: Identity, cluster: list[NodeProc]) -> Iterator[tuple[Path, list[NodeProc]]]:  # fmt: skip
    """n1..n3 and a fourth node, gpu, started with --label gpu; mounted from a namespace file
    with comments and binds."""
    gpu = make_node(tmp_path, "gpu", identity, args=["--label", "gpu"]).start()
    try:
        ns = tmp_path / "namespace.commented"
        ns.write_text(
            "# the cluster, as a user writes it\n"
            f"mount {cluster[0].addr} n1   # the first\n"
            f"mount {cluster[1].addr} n2\n"
            "\n"
            f"  mount {gpu.addr} gpu\n"
            "bind -a /n/n2/storage /n/n1/storage  # n2's files show in n1's\n"
            "bind /n/gpu/node /n/n1/gpunode\n"
        )
        mp = MountProc(tmp_path / "mnt2", ns, identity.home)
        try:
            mp.start()
            yield mp.mountpoint, [cluster[0], cluster[1], gpu]
        finally:
            mp.stop()
    finally:
        gpu.stop()


def test_namespace_file_and_label(labelled: tuple[Path, list[NodeProc]]) -> None:
    mp, (n1, n2, gpu) = labelled
    assert sh("ls n", mp).split() == ["gpu", "n1", "n2"]
    (n2.export / "from-n2").write_text("2\n")
    assert "from-n2" in sh("ls n/n1/storage", mp).split()
    assert sh("cat n/n1/gpunode/name n/n1/gpunode/labels", mp) == "gpu\ngpu\n"
    # ctl reads back what the file made, without its comments
    assert sh("cat ctl", mp) == (
        f"mount {n1.addr} n1\nmount {n2.addr} n2\nmount {gpu.addr} gpu\n"
        "bind -a /n/n2/storage /n/n1/storage\nbind /n/gpu/node /n/n1/gpunode\n"
    )
    out = sh(
        """for i in 1 2 3; do
            id=$(cat jobs/clone)
            echo 'label gpu' > jobs/$id/ctl
            echo 'run cat /proc/sys/kernel/hostname >/dev/null; echo on-gpu' > jobs/$id/ctl
            cat jobs/$id/stdout
            cut -d' ' -f1 jobs/$id/ctl
        done""",
        mp,
    )
    lines = out.splitlines()
    assert lines[0::2] == ["on-gpu"] * 3
    assert all(re.fullmatch(r"gpu\.\d+", w) for w in lines[1::2]), lines
    assert len(set(lines[1::2])) == 3
    # no node has the label: the start fails, and says why
    err = fails("id=$(cat jobs/clone); echo 'label tpu' > jobs/$id/ctl; echo 'exec true' > jobs/$id/ctl", mp)  # fmt: skip
    assert "Host is down" in err, err


# -- blocking reads --------------------------------------------------------------------------


def test_blocked_wait_holds_only_itself(mount: Path) -> None:
    jid = sh("id=$(cat jobs/clone); echo 'exec sleep 60' > jobs/$id/ctl; echo $id", mount).strip()
    node = jid.split(".")[0]
    waiters = [subprocess.Popen(["cat", f"jobs/{jid}/wait"], cwd=mount, stdout=subprocess.PIPE)
               for _ in range(3)]  # fmt: skip
    try:
        # wait until the three reads are in the node's hands: the job's status says nothing
        # about readers, so look at the readers themselves (blocked in a read of the mount)
        deadline = time.monotonic() + 10
        while not all(_in_fuse_read(p.pid) for p in waiters):
            assert time.monotonic() < deadline, "the readers never blocked"
            time.sleep(0.02)
        t0 = time.monotonic()
        out = sh(
            f"""cat nodes
            cat n/{node}/cpu/load n/n1/node/name n/n2/node/name n/n3/node/name
            ls n/{node}/storage jobs >/dev/null
            echo ok > n/{node}/storage/while-blocked && cat n/{node}/storage/while-blocked
            head -3 jobs/{jid}/status""",
            mount,
            timeout=10,
        )
        assert time.monotonic() - t0 < 5
        assert "ok\n" in out and "state running" in out
        assert all(p.poll() is None for p in waiters)
        # SIGTERM to one reader ends it (the node is told: Tflush), the others wait on
        t0 = time.monotonic()
        waiters[0].send_signal(signal.SIGTERM)
        assert waiters[0].wait(5) == -signal.SIGTERM
        assert time.monotonic() - t0 < 1.5
        assert all(p.poll() is None for p in waiters[1:])
        assert "state running" in sh(f"cat jobs/{jid}/status", mount)
        # the job ends: the others read its end
        sh(f"echo kill > jobs/{jid}/ctl", mount)
        for p in waiters[1:]:
            out, _ = p.communicate(timeout=10)
            assert out == b"signal KILL\n"
    finally:
        for p in waiters:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def _in_fuse_read(pid: int) -> bool:
    """``pid`` sleeps in the kernel waiting on a FUSE request."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] in ("S", "D") and ("fuse" in wchan or "request_wait_answer" in wchan)


def test_interrupting_a_blocked_wait(mount: Path) -> None:
    jid = sh("id=$(cat jobs/clone); echo 'exec sleep 60' > jobs/$id/ctl; echo $id", mount).strip()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a foreground process, as if the user pressed Ctrl-C in the terminal
        p = subprocess.Popen(["cat", f"jobs/{jid}/wait"], cwd=mount, stdout=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not _in_fuse_read(p.pid):
                assert time.monotonic() < deadline, "cat never blocked"
                time.sleep(0.02)
            t0 = time.monotonic()
            p.send_signal(sig)
            assert p.wait(5) == -sig
            assert time.monotonic() - t0 < 1.5, time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    # the job still runs; the mount said it flushed the read on the wire
    assert "state running" in sh(f"cat jobs/{jid}/status", mount)
    log = (mount.parent / f"mount-{mount.name}.log").read_text()
    assert log.count("interrupted by a signal") == 2, log[-2000:]
    sh(f"echo kill > jobs/{jid}/ctl && cat jobs/{jid}/wait", mount)


# -- the CLI --------------------------------------------------------------------------------


def test_cli_mount_and_umount(tmp_path: Path, identity: Identity, cluster: list[NodeProc]) -> None:
    ns = write_namespace(tmp_path / "ns", cluster)
    mp = tmp_path / "bg"
    mp.mkdir()
    env = dict(os.environ, NINEFS_HOME=str(identity.home))
    try:
        r = subprocess.run([*NINEFS, "mount", str(mp), "--ns", str(ns), "--log", str(tmp_path / "bg.log")],
                           capture_output=True, text=True, timeout=30, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert mounted(mp)
        pid = int(re.search(r"pid (\d+)", r.stdout).group(1))
        assert sh("cat n/n2/node/name", mp) == "n2\n"
        r = subprocess.run([*NINEFS, "umount", str(mp)], capture_output=True, text=True,
                           timeout=30, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert not mounted(mp)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
            assert time.monotonic() < deadline, "the mount process did not end"
            time.sleep(0.05)
        # umount of something that is not mounted: one line, non-zero
        r = subprocess.run([*NINEFS, "umount", str(mp)], capture_output=True, text=True,
                           timeout=30, env=env)  # fmt: skip
        assert r.returncode != 0 and r.stderr.startswith("ninefs umount:")
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        force_unmount(mp)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_cli_mount_errors(tmp_path: Path, identity: Identity) -> None:
    ns = tmp_path / "ns"
    ns.write_text("mount 127.0.0.1:9 n1\n")
    env = dict(os.environ, NINEFS_HOME=str(identity.home))

    def mount_err(mp: Path, **extra: str) -> str:
        r = subprocess.run([*NINEFS, "mount", str(mp), "--ns", str(ns)], capture_output=True,
                           text=True, timeout=30, env=dict(env, **extra))  # fmt: skip
        assert r.returncode != 0 and not mounted(mp)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        return lines[0]

    assert "does not exist" in mount_err(tmp_path / "missing")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").touch()
    assert "not empty" in mount_err(full)
    empty = tmp_path / "empty"
    empty.mkdir()
    err = mount_err(empty, NINEFS_HOME=str(tmp_path / "nokey"))
    assert "no key" in err and "ninefs keygen" in err


def test_demo(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("NINEFS_HOME", None)
    p = subprocess.Popen([*NINEFS, "demo", "--nodes", "2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True, start_new_session=True)  # fmt: skip
    mp = None
    try:
        deadline = time.monotonic() + 40
        text = ""
        while "Try" not in text:
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            line = p.stdout.readline()
            text += line
            if m := re.search(r"mounted at (\S+)", line):
                mp = Path(m.group(1))
        assert mp is not None and mounted(mp)
        base = mp.parent
        assert base.parent == tmp_path and base.name.startswith("ninefs-demo-")
        assert [ln.split()[0] for ln in sh("cat nodes", mp).splitlines()] == ["n1", "n2"]
        out = sh("id=$(cat jobs/clone); echo 'run echo hi' > jobs/$id/ctl; cat jobs/$id/stdout", mp)
        assert out == "hi\n"
        sh("cp /etc/hostname n/n2/storage/ && ls -l n/n2/storage", mp)
        nodes = [int(x) for x in subprocess.run(["pgrep", "-f", f"ninefs -v serve .*{base}"],
                 capture_output=True, text=True).stdout.split()]  # fmt: skip
        assert len(nodes) == 2
        os.killpg(p.pid, signal.SIGINT)
        p.wait(30)
        assert not mounted(mp)
        assert not base.exists()
        assert all(_state(pid) in ("gone", "Z") for pid in nodes)
        assert not subprocess.run(["pgrep", "-f", str(base)], capture_output=True).stdout
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        if mp is not None:
            force_unmount(mp)


def test_many_files_stay_within_the_fid_limit(mount: Path, cluster) -> None:
    """ls -l, stat and open-read-close of 5,000 files: more than a node's per-connection fid
    limit (4096), so the mount must not hold a fid for every inode it has seen."""
    d = cluster[0].export / "many"
    d.mkdir()
    for i in range(5000):
        (d / f"f{i:04d}").write_text(f"{i}\n")
    listing = sh("ls -l n/n1/storage/many | tail -n +2 | wc -l", mount, timeout=120)
    assert int(listing) == 5000
    out = sh(
        "cd n/n1/storage/many && stat -c %s f* | sort -u && cat f* | wc -l", mount, timeout=120
    )
    assert out.split() == ["2", "3", "4", "5", "5000"]


def test_bad_namespace_line_is_one_clear_error(tmp_path: Path, identity) -> None:
    ns = tmp_path / "ns"
    ns.write_text("# a comment\nfrobnicate everything\n")
    mp = tmp_path / "mp"
    mp.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "ninefs", "mount", str(mp), "-f", "--ns", str(ns)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NINEFS_HOME": str(identity.home)},
    )  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"{ns}:2" in r.stderr and "unknown command 'frobnicate'" in r.stderr
    force_unmount(mp)


# -- writes travel behind the writer, and never fail silently --------------------------------


WRITER = r"""
import errno, os, sys
path, total = sys.argv[1], int(sys.argv[2])
failed = []
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
written = 0
try:
    while written < total:
        written += os.write(fd, b"x" * (1 << 20))
except OSError as e:
    failed.append(("write", errno.errorcode[e.errno]))
for what, call in (("fsync", os.fsync), ("close", os.close)):
    try:
        call(fd)
    except OSError as e:
        failed.append((what, errno.errorcode[e.errno]))
print(written, failed)
"""


def test_a_write_the_node_refuses_reaches_the_writer(tmp_path: Path, identity: Identity) -> None:
    """The node's disk fills while writes are queued behind the writer: the writer learns
    it (from a later write, fsync or close), never a clean close over lost data."""
    node = make_node(tmp_path, "n1", identity)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(node.export)],
                   check=True, timeout=30)  # fmt: skip
    mp = None
    try:
        node.start()
        mp = MountProc(tmp_path / "mnt", write_namespace(tmp_path / "ns", [node]), identity.home)
        mp.start()
        out = subprocess.run([sys.executable, "-c", WRITER, str(mp.mountpoint / "n/n1/storage/f"),
                              str(16 << 20)], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        written, failed = out.stdout.split(" ", 1)
        assert "ENOSPC" in failed, out.stdout  # by write, fsync or close: but told
        assert int(written) <= 16 << 20
        # what reached the disk is the writer's bytes (queued writes land in any order, so
        # one past a refused one may leave a hole: zeros)
        assert set((node.export / "f").read_bytes()) <= {ord("x"), 0}
        # the mount and the node go on: a small file still fits, after removing the big one
        sh("rm n/n1/storage/f; echo fine > n/n1/storage/g; cat n/n1/storage/g", mp.mountpoint)
    finally:
        if mp is not None:
            mp.stop()
        node.stop()
        subprocess.run(["umount", "-l", str(node.export)], timeout=30)


def test_queued_writes_are_seen_by_their_writer(mount: Path, cluster: list[NodeProc]) -> None:
    """What a handle wrote, it reads back and stats at once, before any close; a rewrite of
    the same range lands last; another process sees it all after the close."""
    prog = r"""
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(8):
    os.write(fd, bytes([65 + i]) * (1 << 20))
assert os.fstat(fd).st_size == 8 << 20, os.fstat(fd).st_size
os.pwrite(fd, b"z" * (1 << 20), 0)       # over the first MiB, queued right behind it
os.pwrite(fd, b"y" * 10, 5)               # and over that again
data = os.pread(fd, 8 << 20, 0)
assert data[:5] == b"zzzzz" and data[5:15] == b"y" * 10 and data[15:1 << 20] == b"z" * ((1 << 20) - 15)
assert data[1 << 20:] == b"".join(bytes([65 + i]) * (1 << 20) for i in range(1, 8))
os.ftruncate(fd, 3 << 20)
os.write(fd, b"tail")                     # at 8 MiB: the truncate came first, then this
os.close(fd)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", prog, str(mount / "n/n1/storage/q")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
    disk = (cluster[0].export / "q").read_bytes()
    assert len(disk) == (8 << 20) + 4 and disk.endswith(b"tail")
    assert disk[: 3 << 20].count(b"\0") == 0 and disk[3 << 20 : 8 << 20] == bytes(5 << 20)
    assert sh("stat -c %s n/n1/storage/q", mount) == f"{(8 << 20) + 4}\n"


def test_a_cached_listing_never_hides_this_mounts_own_changes(mount: Path) -> None:
    """A storage directory's listing is reused for a second (`ls -l` twice lists once), but
    whatever the mount itself changes there shows in the very next listing."""
    d = "n/n1/storage/d"

    def ls() -> list[tuple[str, str]]:
        lines = sh(f"ls -l {d}", mount).splitlines()[1:]  # past "total N"
        return [(ln.split()[8], ln.split()[4]) for ln in lines]  # name, size

    sh(f"mkdir {d}", mount)
    assert ls() == []
    sh(f"echo hi > {d}/a", mount)
    assert ls() == [("a", "3")]
    sh(f"printf 12345 >> {d}/a", mount)
    assert ls() == [("a", "8")]
    sh(f"mkdir {d}/sub && ln -s a {d}/link", mount)
    assert [name for name, _ in ls()] == ["a", "link", "sub"]
    sh(f"mv {d}/a {d}/b", mount)
    assert [name for name, _ in ls()] == ["b", "link", "sub"]
    sh(f": > {d}/b", mount)
    assert ("b", "0") in ls()
    sh(f"truncate -s 4096 {d}/b", mount)
    assert ("b", "4096") in ls()
    sh(f"rm {d}/b {d}/link && rmdir {d}/sub", mount)
    assert ls() == []
    # a writer's file, listed while it is still open, never shows a size from before
    prog = (f"import os\nfd = os.open('{d}/w', os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "os.write(fd, b'x' * (3 << 20))\nprint(os.popen('ls -l " + d + "').read())\n"
            "os.close(fd)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", prog], cwd=mount, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert str(3 << 20) in out.stdout, out.stdout
    assert ls() == [("w", str(3 << 20))]


def _requests(mount: Path) -> int:
    """Node n1's count of requests received (read through the mount: a few of its own)."""
    text = (mount / "n/n1/metrics").read_text()
    return int(re.search(r"^ninefs_requests_total (\d+)$", text, re.M).group(1))


def test_stat_of_a_whole_directory_lists_it_once(mount: Path, cluster: list[NodeProc]) -> None:
    """Statahead: stat of every file in a storage directory (find, du, make) costs the node
    one listing, not a walk for each file; the sizes are the node's, a change the mount makes
    shows at once, and one made on the node's disk within the attribute timeout."""
    d = cluster[0].export / "ahead"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"x" * i)
    prog = (
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "print(' '.join(str(os.stat(f'{d}/f{i:03d}').st_size) for i in range(300)))\n"
    )

    def sizes() -> list[int]:
        out = subprocess.run([sys.executable, "-c", prog, str(mount / "n/n1/storage/ahead")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [int(x) for x in out.stdout.split()]

    before = _requests(mount)
    assert sizes() == list(range(300))
    used = _requests(mount) - before
    assert used < 30, f"stat of 300 files took {used} requests"  # a walk each: over 300

    sh("printf 12345 > n/n1/storage/ahead/f007", mount)  # through the mount: seen at once
    assert sizes()[7] == 5
    (d / "f009").write_bytes(b"y" * 1000)  # behind the mount's back: seen within a second
    with_deadline = time.monotonic() + 10
    while sizes()[9] != 1000:
        assert time.monotonic() < with_deadline, "a change on the node's disk never showed"
    assert (mount / "n/n1/storage/ahead/f009").read_bytes() == b"y" * 1000


def test_a_streamed_read_is_fetched_in_big_windows_and_never_stale(
    mount: Path, cluster: list[NodeProc]
) -> None:
    """Read-ahead: a file read from start to end costs the node one Tread per READAHEAD
    (two of the kernel's 1 MiB reads), and every byte is right; a read out of sequence
    fetches only itself; a write through the mount is seen by a reader whose window held
    the old bytes."""
    size = 24 << 20
    blob = hashlib.sha256(b"seed").digest() * (size // 32)
    (cluster[0].export / "big.bin").write_bytes(blob)
    path = mount / "n/n1/storage/big.bin"

    before = _requests(mount)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(blob).digest()
    used = _requests(mount) - before
    assert used <= 18, f"24 MiB read in {used} requests"  # 1 MiB Treads: over 24

    fd = os.open(path, os.O_RDONLY)
    try:
        for off in (20 << 20, 3 << 20, 11 << 20, 7 << 20):  # out of sequence: still right
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 1 << 20, off) == blob[off : off + (1 << 20)]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 1 << 20, 0) == blob[: 1 << 20]  # windows from 0 are held now
        new = b"N" * 4096
        with open(path, "r+b") as w:
            w.seek((1 << 20) + 12345)
            w.write(new)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel forgets its copy
        got = os.pread(fd, 1 << 20, 1 << 20)
        assert got[12345 : 12345 + 4096] == new, "a window kept bytes the mount overwrote"
        assert got[:12345] == blob[1 << 20 : (1 << 20) + 12345]
    finally:
        os.close(fd)


def test_a_big_listing_streams_and_may_be_left_early(mount: Path, cluster: list[NodeProc]) -> None:
    """A storage directory with no listing kept arrives behind the open, batch by batch,
    never far ahead of its reader: a reader that stops early (`ls | head`) is fine, leaves
    nothing half-listed behind, and the next reader gets every name, each with its size."""
    d = cluster[0].export / "stream"
    d.mkdir()
    n = 9000  # more than STREAM_AHEAD and many batches
    for i in range(n):
        (d / f"f{i:05d}").write_bytes(b"x" * (i % 7))
    prog = r"""
import os, sys
d = sys.argv[1]
for _ in range(5):  # left early, five times
    with os.scandir(d) as it:
        first = next(it).name
sizes = {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(d)}
print(len(sizes), all(sizes[f"f{i:05d}"] == i % 7 for i in range(int(sys.argv[2]))))
"""
    out = subprocess.run([sys.executable, "-c", prog, str(mount / "n/n1/storage/stream"), str(n)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(n), "True"]
    assert int(sh("ls n/n1/storage/stream | wc -l", mount, timeout=60)) == n
