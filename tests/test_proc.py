"""/proc through the real protocol: formats, signalling a job's process, and refusals."""

from __future__ import annotations

import os

import psutil
import pytest
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.client import Client
from ninefs.protocol.errors import NineError
from ninefs.servers.toolkit import qid_path

from .cluster import NodeProc

T = 15


def fields(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines())


async def job(c: Client, text: str) -> tuple[str, int]:
    jid = (await c.read_file("/jobs/clone")).decode().strip()
    await c.write_file(f"/jobs/{jid}/ctl", text.encode())
    st = fields((await c.read_file(f"/jobs/{jid}/status")).decode())
    return jid, int(st["pid"])


async def test_listing_status_and_args(client: Client, node: NodeProc) -> None:
    daemon = node.proc.pid
    with trio.fail_after(T):
        names = {e.name for e in await client.list_dir("/proc")}
        assert {"1", str(daemon)} <= names and all(n.isdigit() for n in names)
        st = fields((await client.read_file(f"/proc/{daemon}/status")).decode())
        assert list(st) == ["pid", "name", "state", "ppid", "user", "rss", "cpu", "start"]
        p = psutil.Process(daemon)
        assert st["pid"] == str(daemon) and st["name"] == p.name()
        assert st["ppid"] == str(os.getpid()) and st["user"] == p.username()
        assert (
            int(st["rss"]) > 0 and float(st["cpu"]) >= 0 and st["state"] in ("sleeping", "running")
        )
        args = (await client.read_file(f"/proc/{daemon}/args")).decode()
        assert args.endswith("\n") and args.count("\n") == 1
        assert " -m ninefs -v serve --name n1 " in args
        assert [e.name for e in await client.list_dir(f"/proc/{daemon}")] == [
            "status",
            "args",
            "ctl",
        ]


async def test_lookup_of_missing_or_odd_pids(client: Client) -> None:
    with trio.fail_after(T):
        for name in ("999999999", "abc", "01", "-1"):
            with pytest.raises(NineError) as ei:
                await client.stat_path(f"/proc/{name}")
            assert ei.value.ename == "ENOENT"


async def test_qid_is_salted_with_the_create_time(client: Client) -> None:
    with trio.fail_after(T):
        _, pid = await job(client, "exec sleep 60")
        st = await client.stat_path(f"/proc/{pid}")
        assert st.mode & m.DMDIR
        assert st.qid.path != qid_path(f"/proc/{pid}")  # the plain path is not the qid


async def test_signal_a_jobs_process(client: Client) -> None:
    with trio.fail_after(T):
        a, pid_a = await job(client, "exec sleep 60")
        await client.write_file(f"/proc/{pid_a}/ctl", b"stop")
        await client.write_file(f"/proc/{pid_a}/ctl", b"cont")
        await client.write_file(f"/proc/{pid_a}/ctl", b"signal TERM")
        assert await client.read_file(f"/jobs/{a}/wait") == b"signal TERM\n"
        # a process of the job's group (the shell's child) may be signalled too
        b, _ = await job(client, "run sleep 60 & echo $!; wait $!")
        fid = await client.walk_path(f"/jobs/{b}/stdout")
        await client.open(fid, m.OREAD)
        child = int(await client.read(fid, 0, 100))  # the first line: blocks until it is there
        await client.clunk(fid)
        await client.write_file(f"/proc/{child}/ctl", b"kill")
        assert await client.read_file(f"/jobs/{b}/wait") == b"exit 137\n"  # 128 + KILL
        with pytest.raises(NineError) as ei:
            await client.write_file(f"/proc/{pid_a}/ctl", b"kill")
        assert ei.value.ename in ("ENOENT", "EPERM")  # gone, or no longer a running job's


async def test_eperm_for_processes_not_yours(client: Client, node: NodeProc) -> None:
    with trio.fail_after(T):
        for pid in (1, node.proc.pid, os.getpid()):
            with pytest.raises(NineError) as ei:
                await client.write_file(f"/proc/{pid}/ctl", b"kill")
            assert ei.value.ename == "EPERM", (pid, ei.value)
        assert psutil.Process(node.proc.pid).is_running()
        with pytest.raises(NineError) as ei:
            await client.write_file(f"/proc/{os.getpid()}/ctl", b"signal NOPE")
        assert ei.value.ename == "EINVAL"
        with pytest.raises(NineError) as ei:
            await client.write_file(f"/proc/{os.getpid()}/ctl", b"explode")
        assert ei.value.ename == "EINVAL"
