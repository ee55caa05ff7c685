"""/storage: the passthrough to a real directory, through the real protocol and a real daemon.

Every test talks to a node daemon in a subprocess over a sealed TCP session; ``node.export``
is the directory the daemon serves. The escape tests plant what an attacker with a shell
on the node (or a client racing the server) could, and check that nothing outside the
export is read, changed or created.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import xxhash

from ninefs.protocol import messages as m
from ninefs.protocol.client import Client, connect
from ninefs.protocol.errors import NineError
from ninefs.protocol.keys import KnownNodes

from .cluster import make_identity, make_node

T = 20  # seconds: the most any one test may wait on the daemon


@contextmanager
def raises(*enames: str):
    with pytest.raises(NineError) as info:
        yield info
    assert info.value.ename in enames, info.value


async def walk(client: Client, *names: str) -> int:
    """A new fid for /storage/names..."""
    fid, _ = await client.walk(client.root, ["storage", *names])
    return fid


async def read_all(client: Client, fid: int) -> bytes:
    chunks, offset = [], 0
    while data := await client.read(fid, offset, client.iounit):
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the export, with a secret that must never be read."""
    d = tmp_path / "outside"
    d.mkdir()
    secret = d / "secret"
    secret.write_text("do not read\n")
    # atime far before mtime: under relatime (or strictatime) any read moves it
    os.utime(secret, ns=(0, secret.stat().st_mtime_ns))
    return d


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    probe = outside.parent / "atime-probe"
    probe.write_text("x")
    os.utime(probe, ns=(0, probe.stat().st_mtime_ns))
    probe.read_text()
    if probe.stat().st_atime_ns != 0:  # this filesystem records reads, so the check means something
        assert (outside / "secret").stat().st_atime_ns == 0, "the secret was read"
    probe.unlink()


async def test_read_write_create(client, node):
    ex: Path = node.export
    (ex / "hello.txt").write_bytes(b"hello world\n")
    with trio.fail_after(T):
        assert await client.read_file("/storage/hello.txt") == b"hello world\n"

        st = await client.stat_path("/storage/hello.txt")
        disk = os.stat(ex / "hello.txt")
        assert st.qid.type == m.QTFILE and st.name == "hello.txt" and st.size == 12
        assert st.mode == stat.S_IMODE(disk.st_mode)
        assert (st.atime, st.mtime, st.ctime) == (
            disk.st_atime_ns,
            disk.st_mtime_ns,
            disk.st_ctime_ns,
        )
        assert st.uid == pwd.getpwuid(disk.st_uid).pw_name and st.nlink == 1

        # reads and writes at offsets; reads past the end are empty
        fid = await walk(client, "hello.txt")
        r = await client.open(fid, m.ORDWR)
        assert r.flags == 0 and r.qid == st.qid
        assert await client.write(fid, 6, b"WORLD") == 5
        assert await client.read(fid, 0, 100) == b"hello WORLD\n"
        assert await client.read(fid, 3, 4) == b"lo W"
        assert await client.read(fid, 100, 10) == b""
        await client.fsync(fid)
        await client.clunk(fid)
        assert (ex / "hello.txt").read_bytes() == b"hello WORLD\n"

        # OTRUNC, then OAPPEND (whatever offset the write names)
        await client.write_file("/storage/hello.txt", b"new")
        assert (ex / "hello.txt").read_bytes() == b"new"
        fid = await walk(client, "hello.txt")
        await client.open(fid, m.OWRITE | m.OAPPEND)
        await client.write(fid, 0, b"+more")
        await client.clunk(fid)
        assert (ex / "hello.txt").read_bytes() == b"new+more"

        # a handle open for reading does not write
        fid = await walk(client, "hello.txt")
        await client.open(fid, m.OREAD)
        with raises("EBADF"):
            await client.write(fid, 0, b"x")
        await client.clunk(fid)

        # create: the perm asked for (not the daemon's umask), then OEXCL, then re-create
        fid = await walk(client)
        r = await client.create(fid, "made.txt", 0o640, m.ORDWR)
        assert r.qid.type == m.QTFILE and r.flags == 0
        assert await client.write(fid, 0, b"abc") == 3
        assert await client.read(fid, 0, 10) == b"abc"
        assert (await client.stat(fid)).name == "made.txt"
        await client.clunk(fid)
        assert stat.S_IMODE(os.stat(ex / "made.txt").st_mode) == 0o640
        fid = await walk(client)
        with raises("EEXIST"):
            await client.create(fid, "made.txt", 0o644, m.OWRITE | m.OEXCL)
        await client.create(fid, "made.txt", 0o644, m.OWRITE | m.OTRUNC)
        await client.clunk(fid)
        assert (ex / "made.txt").read_bytes() == b""

        with raises("ENOENT"):
            await client.walk_path("/storage/nope")
        fid = await walk(client, "made.txt")
        with raises("ENOTDIR"):
            await client.walk(fid, ["x"])
        await client.clunk(fid)


async def test_directories(client, node):
    ex: Path = node.export
    with trio.fail_after(T):
        fid = await walk(client)
        r = await client.create(fid, "d", m.DMDIR | 0o750, m.OREAD)
        assert r.qid.type == m.QTDIR
        assert await client.readdir(fid, 0) == []
        await client.clunk(fid)
        assert (ex / "d").is_dir() and stat.S_IMODE(os.stat(ex / "d").st_mode) == 0o750

        fid = await walk(client, "d")
        await client.create(fid, "f", 0o644, m.OWRITE)
        await client.write(fid, 0, b"12345")
        await client.clunk(fid)
        (ex / "d" / "sub").mkdir()
        os.symlink("f", ex / "d" / "ln")
        open(os.fsencode(ex / "d") + b"/not-utf8-\xff", "w").close()  # cannot travel: not listed

        entries = {e.name: e for e in await client.list_dir("/storage/d")}
        assert set(entries) == {"f", "sub", "ln"}
        for name, e in entries.items():
            disk = os.lstat(ex / "d" / name)
            assert e.size == disk.st_size and e.mtime == disk.st_mtime_ns
            assert e.mode & 0o7777 == stat.S_IMODE(disk.st_mode)
            assert e.qid == (await client.stat_path(f"/storage/d/{name}")).qid
        assert entries["f"].size == 5 and entries["f"].qid.type == m.QTFILE
        assert entries["sub"].mode & m.DMDIR and entries["sub"].qid.type == m.QTDIR
        assert entries["ln"].mode & m.DMSYMLINK and entries["ln"].qid.type == m.QTSYMLINK

        fid = await walk(client, "d")
        with raises("EISDIR"):
            await client.open(fid, m.OWRITE)
        await client.open(fid, m.OREAD)
        with raises("EISDIR"):  # a directory is read with Treaddir, never Tread
            await client.read(fid, 0, 100)
        await client.clunk(fid)
        fid = await walk(client, "d")
        with raises("EISDIR"):
            await client.wstat(fid, size=0)
        await client.clunk(fid)

        with raises("ENOTEMPTY"):
            await client.remove(await walk(client, "d"))
        for name in ("f", "ln", "sub"):
            await client.remove(await walk(client, "d", name))
        os.unlink(os.fsencode(ex / "d") + b"/not-utf8-\xff")
        await client.remove(await walk(client, "d"))
        assert not (ex / "d").exists()

        # the root itself stays
        with raises("EBUSY"):
            await client.remove(await walk(client))


async def test_readdir_2000_files_snapshot_and_fds(client, node):
    ex: Path = node.export
    for i in range(2000):
        (ex / f"f{i:04}").write_bytes(b"x" * (i % 7))
    with trio.fail_after(T):
        entries = await client.list_dir("/storage")
        assert sorted(e.name for e in entries) == [f"f{i:04}" for i in range(2000)]
        assert all(e.size == int(e.name[1:]) % 7 for e in entries)

        # offsets index the listing taken at open, however the directory changes after
        fid = await walk(client)
        await client.open(fid, m.OREAD)
        first = await client.readdir(fid, 0, 500)
        assert len(first) == 500
        (ex / "late").write_text("x")
        os.unlink(ex / first[0].name)
        rest = []
        while batch := await client.readdir(fid, 500 + len(rest), 700):
            rest.extend(batch)
        await client.clunk(fid)
        names = [e.name for e in first + rest]
        assert len(names) == 2000 and len(set(names)) == 2000 and "late" not in names

        # descriptors are bounded: a File's fd goes when the last fid naming it does
        pid = node.proc.pid
        before = len(os.listdir(f"/proc/{pid}/fd"))
        fids = [await walk(client, f"f{i:04}") for i in range(1, 301)]
        assert len(os.listdir(f"/proc/{pid}/fd")) >= before + 300
        for f in fids:
            await client.clunk(f)
        await client.list_dir("/")  # one more round trip: the clunks are all done
        assert len(os.listdir(f"/proc/{pid}/fd")) <= before + 5


async def test_large_file_and_concurrent_reads(client, node):
    data = os.urandom(8 << 20)
    with trio.fail_after(T):
        fid = await walk(client)
        await client.create(fid, "big", 0o644, m.OWRITE)
        assert await client.write(fid, 0, data) == len(data)
        await client.fsync(fid)
        await client.clunk(fid)
        assert (await client.stat_path("/storage/big")).size == len(data)
        want = xxhash.xxh128_hexdigest(data)
        assert xxhash.xxh128_hexdigest((node.export / "big").read_bytes()) == want
        assert xxhash.xxh128_hexdigest(await client.read_file("/storage/big")) == want

        # several readers at once, each on its own fid, each getting its own bytes
        got: dict[int, bytes] = {}

        async def reader(i: int) -> None:
            f = await walk(client, "big")
            await client.open(f, m.OREAD)
            got[i] = await client.read(f, i << 20, 1 << 20)
            await client.clunk(f)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i)
        assert all(got[i] == data[i << 20 : (i + 1) << 20] for i in range(8))

        # from the disk, not the page cache (the node reads what is not cached in a thread),
        # and half cached, half not: each read gets the file's own bytes
        def uncache(offset: int = 0) -> None:
            fd = os.open(node.export / "big", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        uncache()
        assert xxhash.xxh128_hexdigest(await client.read_file("/storage/big")) == want
        uncache(3 << 19)
        f = await walk(client, "big")
        await client.open(f, m.OREAD)
        assert await client.read(f, 1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]
        assert await client.read(f, (8 << 20) - 100, 1 << 20) == data[-100:]  # short: the end
        assert await client.read(f, 8 << 20, 1 << 20) == b""
        await client.clunk(f)


async def test_wstat_and_qids(client, node):
    ex: Path = node.export
    (ex / "f").write_bytes(b"0123456789")
    with trio.fail_after(T):
        fid = await walk(client, "f")
        q0 = (await client.stat(fid)).qid

        await client.wstat(fid, mode=0o600)
        assert stat.S_IMODE(os.stat(ex / "f").st_mode) == 0o600
        for mode in (0o4755, 0o2755, 0o6777):
            await client.wstat(fid, mode=mode)
            got = os.stat(ex / "f").st_mode
            assert not got & (stat.S_ISUID | stat.S_ISGID)
            assert stat.S_IMODE(got) == mode & 0o777

        await client.wstat(fid, size=3)
        assert (ex / "f").read_bytes() == b"012"
        await client.wstat(fid, size=5)
        assert (ex / "f").read_bytes() == b"012\0\0"

        await client.wstat(fid, atime=1_000_000_001_500, mtime=2_000_000_002_500)
        disk = os.stat(ex / "f")
        assert (disk.st_atime_ns, disk.st_mtime_ns) == (1_000_000_001_500, 2_000_000_002_500)
        await client.wstat(fid, mtime=3_000_000_000_000)
        disk = os.stat(ex / "f")
        assert (disk.st_atime_ns, disk.st_mtime_ns) == (1_000_000_001_500, 3_000_000_000_000)
        st = await client.stat(fid)
        assert (st.atime, st.mtime, st.size) == (1_000_000_001_500, 3_000_000_000_000, 5)

        # path stays, version moves with the contents
        assert st.qid.path == q0.path and st.qid.version != q0.version
        await client.clunk(fid)
        fid = await walk(client, "f")
        await client.open(fid, m.OWRITE)
        await client.write(fid, 0, b"z")
        st2 = await client.stat(fid)
        assert st2.qid.path == q0.path and st2.qid.version != st.qid.version
        await client.clunk(fid)

        # create never sets setuid or setgid either
        fid = await walk(client)
        await client.create(fid, "suid", 0o6755, m.OWRITE)
        await client.clunk(fid)
        fid = await walk(client)
        await client.create(fid, "sgid-dir", m.DMDIR | 0o2775, m.OREAD)
        await client.clunk(fid)
        assert stat.S_IMODE(os.stat(ex / "suid").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(ex / "sgid-dir").st_mode) == 0o775


async def test_rename_fsync_statfs(client, node):
    ex: Path = node.export
    (ex / "a").mkdir()
    (ex / "b").mkdir()
    (ex / "a" / "f").write_text("moving\n")
    with trio.fail_after(T):
        f = await walk(client, "a", "f")
        b = await walk(client, "b")
        q = (await client.stat(f)).qid
        await client.rename(f, b, "g")
        assert not (ex / "a" / "f").exists() and (ex / "b" / "g").read_text() == "moving\n"
        assert (await client.stat_path("/storage/b/g")).qid.path == q.path
        assert (await client.stat(f)).name == "g"

        # the fid follows the file: a second rename and a remove through it still work
        root = await walk(client)
        await client.rename(f, root, "h")
        assert (ex / "h").exists() and not (ex / "b" / "g").exists()
        (ex / "b" / "x").touch()
        with raises("EEXIST", "ENOTEMPTY"):  # a directory onto a non-empty one
            await client.rename(await walk(client, "a"), root, "b")
        await client.remove(f)
        assert not (ex / "h").exists()

        with raises("EBUSY"):
            await client.rename(await walk(client), b, "root")
        node_fid, _ = await client.walk(client.root, ["node"])
        with raises("EXDEV"):
            await client.rename(b, node_fid, "x")

        fid = await walk(client, "b", "x")
        await client.open(fid, m.OWRITE)
        await client.write(fid, 0, b"synced")
        await client.fsync(fid)
        await client.clunk(fid)
        fid = await walk(client, "b")
        await client.open(fid, m.OREAD)
        await client.fsync(fid)  # a directory syncs too
        await client.clunk(fid)

        sf = await client.statfs(root)
        vfs = os.statvfs(ex)
        assert (sf.bsize, sf.blocks, sf.files, sf.namelen) == (
            vfs.f_frsize, vfs.f_blocks, vfs.f_files, vfs.f_namemax,
        )  # fmt: skip


async def test_symlinks(client, node):
    ex: Path = node.export
    (ex / "target.txt").write_text("the target\n")
    with trio.fail_after(T):
        root = await walk(client)
        q = await client.symlink(root, "ln", "target.txt")
        assert q.type == m.QTSYMLINK
        assert os.readlink(ex / "ln") == "target.txt"
        fid = await walk(client, "ln")
        assert await client.readlink(fid) == "target.txt"
        st = await client.stat(fid)
        assert st.mode & m.DMSYMLINK and st.qid.type == m.QTSYMLINK and st.size == 10
        with raises("ELOOP"):
            await client.open(fid, m.OREAD)
        with raises("ENOTDIR"):
            await client.walk(fid, ["x"])
        await client.remove(fid)
        assert not (ex / "ln").exists() and (ex / "target.txt").exists()

        with raises("EINVAL"):
            await client.readlink(await walk(client, "target.txt"))
        with raises("EEXIST"):
            await client.symlink(root, "target.txt", "elsewhere")


async def test_dotdot_never_leaves_the_node_tree(client, node):
    """`..` from the export's top leads to the node's root (as a mount point's parent
    should), never to the host directory that holds the export."""
    (node.export / "sub").mkdir()
    (node.export / "inside").write_text("x")
    (node.export.parent / "outside").write_text("host file")
    with trio.fail_after(T):
        root = await client.stat(client.root)
        for names in (["storage", ".."], ["storage", "..", ".."], ["storage", "sub", "..", ".."],
                      ["storage", "..", "..", "..", ".."]):  # fmt: skip
            fid, qids = await client.walk(client.root, names)
            assert qids[-1] == root.qid, names
            await client.open(fid, m.OREAD)
            names_there = {e.name for e in await client.readdir(fid, 0)}
            assert "storage" in names_there and "outside" not in names_there
            await client.clunk(fid)
        fid, _ = await client.walk(client.root, ["storage", "sub", "..", "..", "storage", "inside"])
        assert await read_all_open(client, fid) == b"x"
        with pytest.raises(NineError):
            await client.walk(client.root, ["storage", "..", "outside"])


async def read_all_open(client: Client, fid: int) -> bytes:
    await client.open(fid, m.OREAD)
    try:
        return await read_all(client, fid)
    finally:
        await client.clunk(fid)


async def test_symlinks_out_of_the_export(client, node, outside):
    ex: Path = node.export
    os.symlink("/etc", ex / "etc")
    os.symlink(str(outside), ex / "abs")
    os.symlink(os.path.relpath(outside, ex), ex / "rel")
    os.symlink(str(outside / "secret"), ex / "secret-link")
    with trio.fail_after(T):
        for link, inner in (("etc", "passwd"), ("abs", "secret"), ("rel", "secret")):
            fid = await walk(client, link)
            assert (await client.stat(fid)).qid.type == m.QTSYMLINK
            assert await client.readlink(fid) == os.readlink(ex / link)
            with raises("ENOTDIR"):
                await client.walk(fid, [inner])
            with raises("ELOOP"):
                await client.open(fid, m.OREAD)
            with raises("ENOTDIR"):
                await client.create(fid, "planted", 0o644, m.OWRITE)
            with raises("ENOTDIR"):
                await client.symlink(fid, "planted", "x")
            await client.clunk(fid)
            with raises("ENOENT", "ENOTDIR"):  # one Twalk through the link: a partial walk
                await client.walk(client.root, ["storage", link, inner])

        fid = await walk(client, "secret-link")
        assert await client.readlink(fid) == str(outside / "secret")
        with raises("ELOOP"):
            await client.open(fid, m.OREAD)
        with raises("ELOOP"):
            await client.open(fid, m.OWRITE | m.OTRUNC)
        with raises("EOPNOTSUPP", "ENOTSUP"):  # one errno, two names
            await client.wstat(fid, mode=0o777)
        with raises("EINVAL"):
            await client.wstat(fid, size=0)
        await client.clunk(fid)
        # create through an existing link name neither follows it nor writes the target
        root = await walk(client)
        with raises("ELOOP"):
            await client.create(root, "secret-link", 0o644, m.OWRITE | m.OTRUNC)
        await client.clunk(root)
        root = await walk(client)
        with raises("EEXIST"):
            await client.create(root, "secret-link", 0o644, m.OWRITE | m.OEXCL)
        await client.clunk(root)

    assert_untouched(outside)  # first: reading the secret here would move its atime
    assert (outside / "secret").read_bytes() == b"do not read\n"
    assert stat.S_IMODE(os.stat(outside / "secret").st_mode) != 0o777
    assert not (Path("/etc") / "planted").exists()


async def test_directory_swapped_for_a_symlink(client, node, outside):
    ex: Path = node.export
    for d in ("moved", "gone"):
        (ex / d).mkdir()
        (ex / d / "inner").write_text(f"inside {d}\n")
    with trio.fail_after(T):
        moved = await walk(client, "moved")
        gone = await walk(client, "gone")
        # between walks, each directory is replaced on disk by a link out of the export
        os.rename(ex / "moved", ex / "elsewhere")
        os.symlink(str(outside), ex / "moved")
        shutil.rmtree(ex / "gone")
        os.symlink(str(outside), ex / "gone")

        # the old fid still names the directory it was walked to, wherever it went
        with raises("ENOENT"):
            await client.walk(moved, ["secret"])
        fid, _ = await client.walk(moved, ["inner"])
        assert await read_all_open(client, fid) == b"inside moved\n"
        fid, _ = await client.walk(moved, [])
        await client.create(fid, "planted", 0o644, m.OWRITE)
        await client.clunk(fid)
        assert (ex / "elsewhere" / "planted").exists()
        fid, _ = await client.walk(moved, [])
        await client.open(fid, m.OREAD)
        assert {e.name for e in await client.readdir(fid, 0)} == {"inner", "planted"}
        await client.clunk(fid)

        # ... or, removed, nothing at all
        with raises("ENOENT"):
            await client.walk(gone, ["secret"])
        fid, _ = await client.walk(gone, [])
        with raises("ENOENT"):
            await client.create(fid, "planted", 0o644, m.OWRITE)
        with raises("ENOENT"):
            await client.symlink(gone, "planted", "x")
        with raises("ENOENT"):
            await client.create(gone, "planted-dir", m.DMDIR | 0o755, m.OREAD)

        # and a fresh walk by name meets the link and stops there
        for name in ("moved", "gone"):
            with raises("ENOENT", "ENOTDIR"):
                await client.walk(client.root, ["storage", name, "secret"])
    assert_untouched(outside)


async def test_special_files_refused(client, node):
    ex: Path = node.export
    os.mkfifo(ex / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(ex / "sock"))
    specials = ["fifo", "sock"]
    try:
        os.mknod(ex / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        specials.append("zero")
    except PermissionError:
        pass  # no CAP_MKNOD here: the FIFO and the socket still stand for the rest
    try:
        with trio.fail_after(T):
            names = {e.name for e in await client.list_dir("/storage")}
            assert set(specials) <= names
            for name in specials:
                fid = await walk(client, name)
                st = await client.stat(fid)
                assert st.qid.type == m.QTFILE and not st.mode & (m.DMDIR | m.DMSYMLINK)
                for mode in (m.OREAD, m.OWRITE, m.ORDWR, m.OWRITE | m.OTRUNC):
                    with trio.fail_after(5), raises("EPERM"):
                        await client.open(fid, mode)
                with raises("EINVAL"):
                    await client.wstat(fid, size=0)
                await client.clunk(fid)
                root = await walk(client)
                with trio.fail_after(5), raises("EPERM"):
                    await client.create(root, name, 0o644, m.OWRITE | m.OTRUNC)
                await client.clunk(root)
    finally:
        sock.close()


async def test_read_only_key(tmp_path):
    who = make_identity(tmp_path / "ro-home")
    n = make_node(tmp_path, "ro", who, read_only=True)
    (n.export / "f").write_bytes(b"keep me")
    (n.export / "d").mkdir()
    n.start()
    try:
        with trio.fail_after(T):
            async with connect(n.addr, who.key, who.user, KnownNodes(who.home / "known")) as c:
                assert await c.read_file("/storage/f") == b"keep me"
                assert {e.name for e in await c.list_dir("/storage")} == {"f", "d"}
                await c.statfs(await walk(c))
                with raises("EROFS"):
                    await c.write_file("/storage/f", b"x", truncate=False)
                fid = await walk(c, "f")
                for mode in (m.OWRITE, m.ORDWR, m.OREAD | m.OTRUNC):
                    with raises("EROFS"):
                        await c.open(fid, mode)
                with raises("EROFS"):
                    await c.wstat(fid, mode=0o777)
                with raises("EROFS"):
                    await c.rename(fid, await walk(c, "d"), "g")
                root = await walk(c)
                with raises("EROFS"):
                    await c.create(root, "new", 0o644, m.OWRITE)
                with raises("EROFS"):
                    await c.create(root, "newdir", m.DMDIR | 0o755, m.OREAD)
                with raises("EROFS"):
                    await c.symlink(root, "ln", "f")
                with raises("EROFS"):
                    await c.remove(fid)
        assert sorted(os.listdir(n.export)) == ["d", "f"]
        assert (n.export / "f").read_bytes() == b"keep me"
        assert stat.S_IMODE(os.stat(n.export / "f").st_mode) != 0o777
    finally:
        n.stop()
