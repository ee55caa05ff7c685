"""One conformance suite, run against every tree a node exports (as hugelgupf/p9 does).

Whatever a tree is made of (tables of synthetic entries, psutil facts, jobs, a real
directory), the protocol's rules hold for it: walk, stat, open, read and readdir agree.
"""

from __future__ import annotations

import os

import pytest
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError

T = 20
TREES = ["/node", "/cpu", "/mem", "/metrics", "/proc/1", "/jobs", "/storage"]


async def _files(client, path: str, depth: int = 2) -> list[tuple[str, m.Stat]]:
    """The files under ``path`` (itself included), at most ``depth`` levels down."""
    st = await client.stat_path(path)
    out = [(path, st)]
    if st.mode & m.DMDIR and depth > 0:
        for e in await client.list_dir(path):
            if e.name != "clone":  # opening clone makes a job: checked on its own below
                out.extend(await _files(client, f"{path.rstrip('/')}/{e.name}", depth - 1))
    return out


@pytest.fixture
async def populated(client, node):
    """A job that has run and a small directory in storage, so every tree has content."""
    (node.export / "d").mkdir()
    (node.export / "d" / "f").write_text("contents\n")
    jid = (await client.read_file("/jobs/clone")).decode().strip()
    await client.write_file(f"/jobs/{jid}/ctl", b"exec /bin/echo hi\n")
    with trio.fail_after(T):
        assert (
            (await client.read_file(f"/jobs/{jid}/wait", timeout=None))
            .decode()
            .startswith("exit 0")
        )
    return client


@pytest.mark.parametrize("tree", TREES)
async def test_walk_stat_open_agree(populated, tree):
    client = populated
    with trio.fail_after(T):
        for path, st in await _files(client, tree):
            names = [p for p in path.split("/") if p]
            fid, qids = await client.walk(client.root, names)
            try:
                # the walk's last qid is the file's qid, and its stat says the same
                assert qids[-1] == st.qid, path
                again = await client.stat(fid)
                assert again.qid.path == st.qid.path and again.name == names[-1], path
                assert bool(st.qid.type & m.QTDIR) == bool(st.mode & m.DMDIR), path
                # '..' leads back to the parent
                up, upq = await client.walk(fid, [".."])
                await client.clunk(up)
                parent = await client.stat_path("/" + "/".join(names[:-1]))
                assert upq[0] == parent.qid, path
                # a name that is not there: ENOENT, and the new fid is not made
                if st.mode & m.DMDIR:
                    with pytest.raises(NineError) as e:
                        await client.walk(fid, ["no-such-name"])
                    assert e.value.ename == "ENOENT"
                await _check_open(client, fid, path, st)
            finally:
                await client.clunk(fid)
            # and after the clunk the fid is gone
            with pytest.raises(NineError) as e:
                await client.stat(fid)
            assert e.value.ename == "EBADF"


async def _check_open(client, fid: int, path: str, st: m.Stat) -> None:
    if st.mode & m.DMSYMLINK or not st.mode & 0o444:
        return  # links are not opened; write-only files (a job's stdin) are written
    o, _ = await client.walk(fid, [])
    try:
        r = await client.open(o, m.OREAD)
        assert r.qid.path == st.qid.path
        if st.mode & m.DMDIR:
            listing = [e.name for e in await client.list_dir(path)]
            # offsets are stable within one open: a later batch continues the first
            first = await client.readdir(o, 0, 2)
            rest = await client.readdir(o, len(first), 10_000)
            assert [e.name for e in first + rest] == listing[: len(first + rest)], path
            with pytest.raises(NineError):
                await client.read(o, 0, 10)  # a directory is read with readdir
        else:
            if r.flags & m.OF_STREAM:
                return  # reads block until data: the jobs tests cover streams
            data = await client.read(o, 0, client.iounit)
            assert await client.read(o, 1 << 40, 100) == b""  # past the end: nothing
            if not r.flags & m.OF_SYNTHETIC:
                assert len(data) == st.size, path  # storage: the size is exact
            with pytest.raises(NineError):
                await client.readdir(o, 0, 10)  # a file is not a directory
    finally:
        await client.clunk(o)
    if st.mode & m.DMDIR:  # directories open only for reading
        w, _ = await client.walk(fid, [])
        try:
            with pytest.raises(NineError):
                await client.open(w, m.OWRITE)
        finally:
            await client.clunk(w)


async def test_read_only_files_refuse_writes(client):
    with trio.fail_after(T):
        for path in (
            "/node/name",
            "/cpu/load",
            "/mem/total",
            "/metrics",
            f"/proc/{os.getpid()}/status",
        ):
            fid = await client.walk_path(path)
            try:
                with pytest.raises(NineError) as e:
                    await client.open(fid, m.OWRITE)
                assert e.value.ename in ("EACCES", "EPERM"), path
            finally:
                await client.clunk(fid)
