"""/jobs through the real protocol: a real daemon in a subprocess, real sockets, real children.

Every wait has a deadline (trio.fail_after); nothing sleeps to synchronise: a test waits by
reading `wait`, `stdout` or another file that blocks until the thing has happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.client import Client, connect
from ninefs.protocol.errors import NineError
from ninefs.protocol.keys import AuthorizedUsers, Grant, KnownNodes

from .cluster import Identity, NodeProc, make_identity, make_node

T = 15  # seconds any one step may take


# -- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def connected(node: NodeProc, who: Identity):
    async with connect(node.addr, who.key, who.user, KnownNodes(who.home / "known_nodes")) as c:
        yield c


async def clone(c: Client) -> str:
    jid = (await c.read_file("/jobs/clone")).decode()
    assert jid.endswith("\n") and jid.strip().isdigit()
    return jid.strip()


async def ctl(c: Client, jid: str, text: str) -> None:
    await c.write_file(f"/jobs/{jid}/ctl", text.encode())


async def read(c: Client, jid: str, name: str) -> str:
    return (await c.read_file(f"/jobs/{jid}/{name}")).decode()


async def status(c: Client, jid: str) -> dict[str, str]:
    lines = (await read(c, jid, "status")).splitlines()
    return dict(line.split(" ", 1) for line in lines)


async def start(c: Client, text: str) -> str:
    jid = await clone(c)
    await ctl(c, jid, text)
    return jid


async def wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (a pidfd turns readable then: no polling, works for a
    process that is not our child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(T):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def expect_error(ename: str, coro) -> NineError:
    with pytest.raises(NineError) as ei:
        await coro
    assert ei.value.ename == ename, ei.value
    return ei.value


# -- a job's life ----------------------------------------------------------------------------


async def test_whole_life(client: Client, tmp_path: Path) -> None:
    """dir, env, stdin to stdout while it runs, stderr, the exit code, status and ctl."""
    work = tmp_path / "work dir"
    work.mkdir()
    with trio.fail_after(T):
        jid = await clone(client)
        assert (await read(client, jid, "ctl")) == f"{jid} new -\n"
        assert (await status(client, jid))["state"] == "new"
        await ctl(client, jid, f"dir '{work}'\nenv GREETING=hello 'MSG=a b'")
        await ctl(
            client,
            jid,
            "exec /bin/sh -c 'read line; echo got $line; echo $GREETING $MSG; pwd;"
            " echo ${PYTHONUNBUFFERED-clean}; echo oops >&2; exit 3'",
        )
        # a reader that is there before the output waits for it
        fid = await client.walk_path(f"/jobs/{jid}/stdout")
        r = await client.open(fid, m.OREAD)
        assert r.flags == m.OF_SYNTHETIC | m.OF_STREAM
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def reader() -> None:
                while data := await client.read(fid, 0, 8192):
                    got.append(data)

            nursery.start_soon(reader)
            await client.write_file(f"/jobs/{jid}/stdin", b"from stdin\n")
        await client.clunk(fid)
        out = b"".join(got).decode()
        assert out == f"got from stdin\nhello a b\n{work}\nclean\n"
        assert await read(client, jid, "wait") == "exit 3\n"
        assert await read(client, jid, "stderr") == "oops\n"
        st = await status(client, jid)
        assert st["state"] == "exited" and st["exit"] == "3" and st["signal"] == "-"
        assert st["dir"] == str(work) and st["owner"] == client.user
        assert st["stdout"] == str(len(out)) and st["error"] == "-"
        assert int(st["pid"]) > 0 and float(st["end"]) >= float(st["start"]) > 0
        assert await read(client, jid, "ctl") == f"{jid} exited {st['pid']} exit 3\n"
        await expect_error("ENOENT", client.stat_path(f"/jobs/0{jid}"))  # one name per job
        # too late for these now
        await expect_error("EINVAL", ctl(client, jid, "env X=1"))
        await expect_error("EINVAL", ctl(client, jid, "exec true"))
        assert "already started" in (await status(client, jid))["error"]


async def test_run_uses_the_shell_and_close_stdin(client: Client) -> None:
    with trio.fail_after(T):
        jid = await start(client, "run wc -l | tr -d ' '; echo \"$((6 * 7))\"")
        await client.write_file(f"/jobs/{jid}/stdin", b"a\nb\n")
        await client.write_file(f"/jobs/{jid}/stdin", b"c\n")  # echo opens stdin each time
        await ctl(client, jid, "close-stdin")
        assert await read(client, jid, "wait") == "exit 0\n"
        assert await read(client, jid, "stdout") == "3\n42\n"
        await expect_error("EPIPE", client.write_file(f"/jobs/{jid}/stdin", b"late\n"))


async def test_big_writes_to_stdin_and_storage_arrive_whole(client: Client, node: NodeProc) -> None:
    """Writes of 64 KiB and more reach a tree as views of their frame where it takes them
    (storage) and as bytes where it does not (stdin): both arrive byte for byte."""
    blob = os.urandom(300_000)
    with trio.fail_after(T):
        jid = await start(client, "exec sha256sum")
        await client.write_file(f"/jobs/{jid}/stdin", blob)
        await ctl(client, jid, "close-stdin")
        assert await read(client, jid, "wait") == "exit 0\n"
        assert (await read(client, jid, "stdout")).split()[0] == hashlib.sha256(blob).hexdigest()
        (node.export / "big").write_bytes(b"")
        await client.write_file("/storage/big", blob)
        assert (node.export / "big").read_bytes() == blob


async def test_signal_and_kill(client: Client) -> None:
    with trio.fail_after(T):
        a = await start(client, "exec sleep 60")
        b = await start(client, "exec sleep 60")
        assert (await status(client, a))["state"] == "running"
        await ctl(client, a, "signal TERM")
        await ctl(client, b, "kill")
        assert await read(client, a, "wait") == "signal TERM\n"
        assert await read(client, b, "wait") == "signal KILL\n"
        st = await status(client, b)
        assert st["state"] == "signalled" and st["signal"] == "KILL" and st["exit"] == "-"
        await ctl(client, b, "kill")  # killing what has ended is harmless
        await expect_error("EINVAL", ctl(client, b, "signal HUP"))


async def test_limits_are_enforced(client: Client) -> None:
    with trio.fail_after(T):
        cpu = await start(client, "limit cpu 1\nexec /bin/sh -c 'while :; do :; done'")
        mem = await start(
            client, f"limit mem 200M\nexec {sys.executable} -c 'x = bytearray(1 << 30)'"
        )
        tmo = await start(client, "limit time 0.5\nexec sleep 60")
        assert await read(client, mem, "wait") == "exit 1\n"
        assert "MemoryError" in await read(client, mem, "stderr")
        assert (await status(client, mem))["limits"] == f"mem={200 << 20}"
        assert await read(client, tmo, "wait") == "signal KILL\n"
        assert "time limit" in (await status(client, tmo))["error"]
        assert await read(client, cpu, "wait") == "signal XCPU\n"
        st = await status(client, cpu)
        assert st["limits"] == "cpu=1" and float(st["end"]) - float(st["start"]) >= 0.9


def _cgroups_here(controller: str = "pids") -> bool:
    from ninefs.servers.cgroups import _own_dirs

    return controller in _own_dirs()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sleepers(tag: str) -> list[psutil.Process]:
    # live processes running `sleep <tag>` (zombies have already ended)
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["cmdline"] == ["sleep", tag] and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


@pytest.mark.skipif(not _cgroups_here(), reason="no pids cgroup on this machine")
async def test_limit_procs_holds_for_root_and_counts_one_job(client: Client) -> None:
    """`limit procs` is the job's pids cgroup: it binds a job running as root (the tests'
    user), and counts only this job's processes, not the account's."""
    tag = f"{os.getpid()}.5"
    with trio.fail_after(T):
        # the account (root) has far more than 6 processes already: only the job's count
        bomb = await start(
            client, f"limit procs 6\nrun for i in $(seq 20); do sleep {tag} & done; wait"
        )
        assert await read(client, bomb, "wait") != "exit 0\n"
        assert "fork" in (await read(client, bomb, "stderr")).lower()
        # the same loop without the limit runs: the default bound is far higher
        ok = await start(client, "run for i in $(seq 20); do true & done; wait; echo done")
        assert (await read(client, ok, "wait"), await read(client, ok, "stdout")) == (
            "exit 0\n",
            "done\n",
        )
        while _sleepers(tag):  # what the bomb forked went with it
            await trio.sleep(0.02)


@pytest.mark.skipif(not _cgroups_here("memory"), reason="no memory cgroup on this machine")
async def test_limit_mem_holds_for_the_whole_job(client: Client) -> None:
    """RLIMIT_AS bounds each process; the job's memory cgroup bounds them together: two
    processes of 120 MiB each fit `limit mem 200M` one by one, not both at once."""
    eat = f"{sys.executable} -c 'import time; x = b\"\\1\" * (120 << 20); time.sleep(3)'"
    with trio.fail_after(T):
        alone = await start(client, f"limit mem 200M\nrun {eat}; echo $?")
        both = await start(
            client,
            f"limit mem 200M\nrun {eat} & a=$!; {eat} & b=$!; wait $a; echo $?; wait $b; echo $?",
        )
        assert (await read(client, alone, "wait"), await read(client, alone, "stdout")) == (
            "exit 0\n",
            "0\n",
        )
        assert await read(client, both, "wait") == "exit 0\n"
        codes = (await read(client, both, "stdout")).split()
        assert "137" in codes, codes  # one was killed (SIGKILL) when the job went over


@pytest.mark.skipif(not _cgroups_here(), reason="no pids cgroup on this machine")
async def test_what_leaves_the_process_group_still_ends_with_the_job(client: Client) -> None:
    with trio.fail_after(T):
        # $! is the background child, which setsid and then sleep replace in place
        jid = await start(client, "run setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $!")
        assert await read(client, jid, "wait") == "exit 0\n"
        pid = int(await read(client, jid, "stdout"))
        while _alive(pid):  # killed with the job's cgroup, though it left the group
            await trio.sleep(0.02)


async def test_big_output_streams_and_late_reader_reads_all(client: Client) -> None:
    """1 MiB and more (well past a pipe buffer) on both streams; a reader that arrives after
    the end reads everything from the start."""
    expected = "".join(f"{i}\n" for i in range(1, 200_001)).encode()
    assert len(expected) > 1 << 20
    with trio.fail_after(T):
        jid = await start(client, "run seq 1 200000; seq 1 200000 >&2")
        live = await client.read_file(f"/jobs/{jid}/stdout")
        assert live == expected
        assert await read(client, jid, "wait") == "exit 0\n"
        assert await client.read_file(f"/jobs/{jid}/stdout") == expected
        assert await client.read_file(f"/jobs/{jid}/stderr") == expected
        st = await status(client, jid)
        assert st["stdout"] == str(len(expected)) == st["stderr"]


async def test_spool_is_bounded(client: Client) -> None:
    from ninefs.servers.jobs import SPOOL_MAX

    with trio.fail_after(T):
        jid = await start(client, f"exec head -c {SPOOL_MAX + (1 << 20)} /dev/zero")
        assert await read(client, jid, "wait") == "exit 0\n"  # drained, so it never blocked
        assert (await status(client, jid))["stdout"] == f"{SPOOL_MAX} truncated"


# -- bad words -------------------------------------------------------------------------------


BAD_WORDS = [
    ("frobnicate", "unknown command 'frobnicate'"),
    ("limit cpu lots", "not a number"),
    ("limit time -1", "must be positive"),
    ("limit disk 1", "no limit 'disk'"),
    ("limit mem 12T", "bad size"),
    ("env 1X=2", "NAME=VALUE"),
    ("env X", "NAME=VALUE"),
    ("dir relative/path", "absolute path"),
    ("dir /no/such/dir", "absolute path"),
    ("signal", "usage: signal NAME"),
    ("exec", "usage: exec ARGV"),
    ("exec 'unclosed", "No closing quotation"),
    ("kill", "has not started"),
    ("close-stdin", "has not started"),
]


async def test_bad_ctl_is_einval_with_reason_in_status(client: Client) -> None:
    with trio.fail_after(T):
        jid = await clone(client)
        for text, reason in BAD_WORDS:
            err = await expect_error("EINVAL", ctl(client, jid, text))
            assert reason in err.message, (text, err)
            st = await status(client, jid)
            assert reason in st["error"] and st["state"] == "new", (text, st)
        await ctl(client, jid, "exec true")  # a job that was told wrong still runs
        assert await read(client, jid, "wait") == "exit 0\n"
        await expect_error("EINVAL", ctl(client, jid, "signal NOPE"))
        assert "unknown signal 'NOPE'" in (await status(client, jid))["error"]


async def test_several_lines_run_in_order_and_stop_at_first_error(client: Client) -> None:
    with trio.fail_after(T):
        jid = await clone(client)
        await expect_error("EINVAL", ctl(client, jid, "env A=1\nlimit cpu x\nenv B=2"))
        await ctl(client, jid, "exec /bin/sh -c 'echo ${A-unset} ${B-unset}'")
        assert await read(client, jid, "wait") == "exit 0\n"
        assert await read(client, jid, "stdout") == "1 unset\n"


async def test_exec_of_a_missing_program_fails(client: Client) -> None:
    with trio.fail_after(T):
        jid = await clone(client)
        await expect_error("ENOENT", ctl(client, jid, "exec /no/such/program"))
        st = await status(client, jid)
        assert st["state"] == "failed" and "/no/such/program" in st["error"]
        assert await read(client, jid, "wait") == "exit 127\n"
        assert await read(client, jid, "stdout") == ""


# -- going away ------------------------------------------------------------------------------


async def test_rm_kills_and_removes(client: Client) -> None:
    with trio.fail_after(T):
        jid = await start(client, "exec sleep 60")
        pid = int((await status(client, jid))["pid"])
        fid = await client.walk_path(f"/jobs/{jid}/wait")
        await client.open(fid, m.OREAD)
        await ctl(client, jid, "rm")
        assert jid not in [e.name for e in await client.list_dir("/jobs")]
        await expect_error("ENOENT", client.stat_path(f"/jobs/{jid}"))
        assert await client.read(fid, 0, 100) == b"signal KILL\n"  # an open file still reads
        await client.clunk(fid)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        # a job removed before it ran: open readers get end of file
        fresh = await clone(client)
        fids = []
        for name in ("wait", "stdout"):
            fids.append(f := await client.walk_path(f"/jobs/{fresh}/{name}"))
            await client.open(f, m.OREAD)
        async with trio.open_nursery() as nursery:
            for f in fids:
                nursery.start_soon(client.read, f, 0, 100)
            await ctl(client, fresh, "rm")
        for f in fids:
            assert await client.read(f, 0, 100) == b""
            await client.clunk(f)
        # removing the directory is rm as well
        done = await start(client, "exec true")
        assert await read(client, done, "wait") == "exit 0\n"
        dfid = await client.walk_path(f"/jobs/{done}")
        await client.remove(dfid)
        await expect_error("ENOENT", client.stat_path(f"/jobs/{done}"))


async def test_job_survives_its_client(node: NodeProc, identity: Identity) -> None:
    with trio.fail_after(T):
        async with connected(node, identity) as c1:
            jid = await start(c1, "exec /bin/sh -c 'read x; echo got $x'")
        async with connected(node, identity) as c2:
            assert (await status(c2, jid))["state"] == "running"
            await c2.write_file(f"/jobs/{jid}/stdin", b"later\n")
            assert await read(c2, jid, "wait") == "exit 0\n"
            assert await read(c2, jid, "stdout") == "got later\n"


async def test_other_users_cannot_touch_or_see(node: NodeProc, identity: Identity, tmp_path):
    other = make_identity(tmp_path / "other-home", "someone-else")
    AuthorizedUsers(node.state / "authorized_users").add(Grant(other.public, other.user))
    with trio.fail_after(T):
        async with connected(node, identity) as mine, connected(node, other) as theirs:
            jid = await start(mine, "exec /bin/cat")
            assert [e.name for e in await theirs.list_dir("/jobs")] == ["clone"]
            assert jid in [e.name for e in await mine.list_dir("/jobs")]
            await expect_error("EACCES", ctl(theirs, jid, "kill"))
            await expect_error("EACCES", theirs.write_file(f"/jobs/{jid}/stdin", b"x"))
            await expect_error("EACCES", theirs.read_file(f"/jobs/{jid}/stdout"))
            assert (await status(theirs, jid))["owner"] == identity.user
            theirs_job = await clone(theirs)
            assert theirs_job not in [e.name for e in await mine.list_dir("/jobs")]
            await ctl(mine, jid, "close-stdin")
            assert await read(mine, jid, "wait") == "exit 0\n"


async def test_fifty_concurrent_jobs(client: Client) -> None:
    results: dict[int, tuple[str, str, str]] = {}

    async def one(i: int) -> None:
        jid = await start(client, f"env N={i}\nexec /bin/sh -c 'echo job $N; exit $(($N % 7))'")
        results[i] = (jid, await read(client, jid, "wait"), await read(client, jid, "stdout"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert len({jid for jid, _, _ in results.values()}) == 50
    for i, (_, wait, out) in results.items():
        assert wait == f"exit {i % 7}\n" and out == f"job {i}\n"
    metrics = (await client.read_file("/metrics")).decode()
    assert 'ninefs_jobs{state="exited"} 50' in metrics


# -- restarts --------------------------------------------------------------------------------


async def test_daemon_restart_keeps_finished_jobs(node: NodeProc, identity: Identity) -> None:
    with trio.fail_after(T):
        async with connected(node, identity) as c:
            done = await start(c, "run echo finished; echo err >&2; exit 4")
            assert await read(c, done, "wait") == "exit 4\n"
            running = await start(c, "exec sleep 60")
            pid = int((await status(c, running))["pid"])
            fresh = await clone(c)  # made, never started
            server = _fork_server(node)
    await trio.to_thread.run_sync(node.stop)  # SIGTERM: the daemon stops its jobs
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    await wait_gone(server.pid)  # and its fork server, last
    await trio.to_thread.run_sync(node.start)
    with trio.fail_after(T):
        async with connected(node, identity) as c:
            assert await read(c, done, "wait") == "exit 4\n"
            assert await read(c, done, "stdout") == "finished\n"
            assert await read(c, done, "stderr") == "err\n"
            assert (await status(c, done))["state"] == "exited"
            st = await status(c, running)
            assert st["state"] == "lost" and st["end"] != "-"
            assert await read(c, running, "wait") == "lost\n"
            assert await read(c, running, "stdout") == ""
            assert (await status(c, fresh))["state"] == "new"
            newer = await clone(c)
            assert int(newer) > max(int(done), int(running), int(fresh))
            await ctl(c, fresh, "exec echo still usable")
            assert await read(c, fresh, "stdout") == "still usable\n"


async def test_daemon_crash_loses_running_jobs(node: NodeProc, identity: Identity) -> None:
    with trio.fail_after(T):
        async with connected(node, identity) as c:
            jid = await start(c, "exec sleep 60")
            pid = int((await status(c, jid))["pid"])
            server = _fork_server(node)
    await trio.to_thread.run_sync(node.kill)  # SIGKILL: no chance to record anything
    await wait_gone(server.pid)  # the fork server sees its daemon go, and goes
    assert psutil.pid_exists(pid)  # its own session: it outlived the daemon
    await trio.to_thread.run_sync(node.start)
    with trio.fail_after(T):
        async with connected(node, identity) as c:
            st = await status(c, jid)
            assert st["state"] == "lost" and "stopped" in st["error"]
            assert await read(c, jid, "wait") == "lost\n"
            assert int(await clone(c)) > int(jid)
    # the new daemon ended the orphan, whose output nobody could read any more
    await wait_gone(pid)


def _fork_server(node: NodeProc) -> psutil.Process:
    (one,) = [p for p in psutil.Process(node.proc.pid).children()
              if any("spawn_server" in a for a in p.cmdline())]  # fmt: skip
    return one


async def test_fork_server_death_loses_its_jobs_and_the_next_launch_starts_another(
    client: Client, node: NodeProc
) -> None:
    """Jobs are the children of the node's fork server: if it dies, their statuses die with
    it. Each is then lost (and its process group ended), never left running unsupervised
    or reported as a clean exit, and the next launch starts a new fork server."""
    with trio.fail_after(T):
        jid = await start(client, "exec sleep 60")
        pid = int((await status(client, jid))["pid"])
        server = _fork_server(node)
        assert psutil.Process(pid).ppid() == server.pid  # the daemon forks nothing itself
        server.kill()
        assert await read(client, jid, "wait") == "lost\n"
        st = await status(client, jid)
        assert st["state"] == "lost" and "fork server" in st["error"], st
        await wait_gone(pid)
        again = await start(client, "exec echo again")
        assert await read(client, again, "wait") == "exit 0\n"
        assert await read(client, again, "stdout") == "again\n"
        assert _fork_server(node).pid != server.pid


async def test_a_job_holds_no_descriptor_but_its_own_three(client: Client) -> None:
    """Nothing of the daemon or of its fork server (the socket that starts jobs as root)
    reaches a job: it has stdin, stdout and stderr, and only what it opens itself."""
    with trio.fail_after(T):
        jid = await start(client, "exec ls /proc/self/fd")
        assert await read(client, jid, "wait") == "exit 0\n"
        assert (await read(client, jid, "stdout")).split() == ["0", "1", "2", "3"]  # 3: ls's


async def test_a_fork_that_fails_fails_only_its_own_launch(client: Client, node: NodeProc):
    """The fork server cannot fork (its pids cgroup is full): that launch fails with
    EAGAIN and the reason, and the jobs it already runs are not touched."""
    pids = Path("/sys/fs/cgroup/pids")
    if not (pids / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy here")
    with trio.fail_after(T):
        first = await start(client, "run read line; echo got $line")  # waits on stdin
        server = _fork_server(node)
        home = next(line.split(":", 2)[2] for line in open(f"/proc/{server.pid}/cgroup")
                    if line.split(":")[1] == "pids")  # fmt: skip
        full = pids / f"ninefs-test-{os.getpid()}"
        full.mkdir()
        try:
            (full / "pids.max").write_text("1")
            (full / "cgroup.procs").write_text(str(server.pid))  # it alone: no room to fork
            jid = await clone(client)
            err = await expect_error("EAGAIN", ctl(client, jid, "exec /bin/true"))
            assert "cannot set up" in err.message, err
            assert (await status(client, jid))["state"] == "failed"
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have died (a bug)
                (pids / home.strip().lstrip("/") / "cgroup.procs").write_text(str(server.pid))
            full.rmdir()
        await client.write_file(f"/jobs/{first}/stdin", b"hello\n")
        assert await read(client, first, "wait") == "exit 0\n"
        assert await read(client, first, "stdout") == "got hello\n"
        again = await start(client, "exec echo fine")
        assert await read(client, again, "stdout") == "fine\n"
        assert _fork_server(node).pid == server.pid  # the same one all along


async def test_a_directory_gone_before_exec_fails_the_launch(client: Client, tmp_path: Path):
    with trio.fail_after(T):
        work = tmp_path / "work"
        work.mkdir()
        jid = await clone(client)
        await ctl(client, jid, f"dir {work}")
        work.rmdir()
        await expect_error("ENOENT", ctl(client, jid, "exec /bin/true"))
        st = await status(client, jid)
        assert st["state"] == "failed" and "No such file" in st["error"], st


async def test_finished_jobs_are_kept_only_keep_seconds(tmp_path: Path, identity: Identity):
    node = make_node(tmp_path, "short", identity, args=["--keep", "0.2"])
    await trio.to_thread.run_sync(node.start)
    try:
        with trio.fail_after(T):
            async with connected(node, identity) as c:
                done = await start(c, "exec true")
                assert await read(c, done, "wait") == "exit 0\n"
                idle = await clone(c)  # never started: kept as long, from when it was made
        await trio.to_thread.run_sync(node.stop)
        await trio.sleep(0.3)  # not a synchronisation: the duration under test, passing
        await trio.to_thread.run_sync(node.start)
        with trio.fail_after(T):
            async with connected(node, identity) as c:
                assert [e.name for e in await c.list_dir("/jobs")] == ["clone"]
                for jid in (done, idle):
                    await expect_error("ENOENT", c.stat_path(f"/jobs/{jid}"))
                assert not (node.state / "jobs" / done).exists()
    finally:
        await trio.to_thread.run_sync(node.stop)


async def test_the_mount_keeps_no_job_it_need_not(node: NodeProc, identity: Identity) -> None:
    """A mount that launches jobs by the million must not hold each one: once told to run,
    a job is found from its id (``n1.7``) and dropped from the mount's table, unless the
    mount must restart it (`restart on-failure`)."""
    from ninefs.namespace import Namespace

    ns = Namespace(identity.key, identity.user, KnownNodes(identity.home / "known_nodes"))
    with trio.fail_after(T):
        async with trio.open_nursery() as nursery:
            await nursery.start(ns.run)
            conn = await ns.mount(node.addr, "n1")
            assert await conn.wait_state(T) == "up"
            ids = []
            for _ in range(20):
                job = await ns.clone()
                await ns.job_ctl_write(job.id, "exec /bin/true")
                ids.append(job.id)
            keep = await ns.clone()
            await ns.job_ctl_write(keep.id, "restart on-failure\nexec /bin/true")
            assert set(ns.jobs) == {keep.id}, sorted(ns.jobs)
            for jid in ids:  # each still found from its id alone
                assert (await ns.job_ctl_read(jid)).startswith(f"{jid} ".encode())
            # a restart asked for after the start would be lost with it: refused, not ignored
            with pytest.raises(NineError) as late:
                await ns.job_ctl_write(ids[0], "restart on-failure")
            assert late.value.ename == "EINVAL" and "started" in late.value.message
            nursery.cancel_scope.cancel()
