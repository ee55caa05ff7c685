"""Access control: who gets in, what a grant lets them reach, and what their jobs may do.
Real daemons in subprocesses; grants changed through the `ninefs` CLI, without a restart."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import subprocess
import sys
import threading
from collections.abc import Iterator

import psutil
import pytest
import trio

from ninefs.protocol import messages as m
from ninefs.protocol.client import connect
from ninefs.protocol.errors import NineError
from ninefs.protocol.handshake import Refused
from ninefs.protocol.keys import KnownNodes, encode_public
from ninefs.protocol.transport import dial
from ninefs.servers.accounts import Account, fs_ids

from .cluster import make_identity, make_node
from .test_session import Raw, still_serving, wait_for_log

T = 20


async def cli(*args: str) -> str:
    with trio.fail_after(T):
        r = await trio.run_process(
            [sys.executable, "-m", "ninefs", *args], capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def known(who) -> KnownNodes:
    return KnownNodes(who.home / "known_nodes")


async def refused(node, who, user=None) -> str:
    with pytest.raises(Refused) as e:
        ch = await dial(node.addr, who.key, user or who.user, known(who))
        await ch.aclose()
    return str(e.value)


@pytest.fixture
def started(tmp_path):
    """Start nodes made by the test; stop them all afterwards."""
    nodes = []

    def start(*a, **kw):
        n = make_node(tmp_path, f"n{len(nodes) + 1}", *a, **kw)
        nodes.append(n)
        return n.start()

    yield start
    for n in nodes:
        n.stop()


# -- admission ---------------------------------------------------------------------------------


async def test_authorize_and_revoke_through_the_cli_without_a_restart(tmp_path, started):
    bob = make_identity(tmp_path / "bob", "bob")
    node = started(None)
    pub = encode_public(bob.public)
    with trio.fail_after(T):
        # unknown: refused before any file operation, generic to the client, real in the log
        assert (await refused(node, bob)).endswith("access denied")
        await wait_for_log(node, "is not in")
        await cli("authorize", pub, "bob", "--state", str(node.state))
        async with connect(node.addr, bob.key, "bob", known(bob)) as c:
            assert await c.read_file("/node/name") == b"n1\n"
        raw = await Raw.open(node.addr)
        await raw.handshake(bob.key, "bob")
        await raw.version()
        await cli("revoke", pub, "--state", str(node.state))
        assert (await refused(node, bob)).endswith("access denied")
        # the connection that was open is closed too, within a couple of seconds
        start = trio.current_time()
        await raw.expect_closed()
        assert trio.current_time() - start < 5
        await wait_for_log(node, "closing 127.0.0.1 (bob)")


async def test_attach_name_must_be_the_keys(node, identity, client):
    with trio.fail_after(T):
        assert "access denied" in await refused(node, identity, "mallory")
        raw = await Raw.open(node.addr)
        await raw.handshake(identity.key, identity.user)
        await raw.version()
        await raw.send(m.Tattach(1, 0, "mallory", ""))
        r = await raw.recv()
        assert isinstance(r, m.Rerror) and r.ename == "EACCES"
        await raw.send(m.Tattach(1, 0, identity.user, ""))
        assert isinstance(await raw.recv(), m.Rattach)


async def test_source_networks_and_expiry(tmp_path, started):
    bob = make_identity(tmp_path / "bob", "bob")
    node = started(bob, source=(ipaddress.ip_network("10.0.0.0/8"),))
    pub, state = encode_public(bob.public), str(node.state)
    today = dt.date.today()
    with trio.fail_after(T):
        await refused(node, bob)
        await wait_for_log(node, "source 127.0.0.1 not allowed")
        await cli("authorize", pub, "bob", "--state", state, "--from", "127.0.0.0/8,::1",
                  "--expires", today.isoformat())  # fmt: skip
        async with connect(node.addr, bob.key, "bob", known(bob)) as c:  # today is included
            assert await c.read_file("/node/name") == b"n1\n"
        yesterday = today - dt.timedelta(days=1)
        await cli("authorize", pub, "bob", "--state", state, "--expires", yesterday.isoformat())
        await refused(node, bob)
        await wait_for_log(node, f"key expired on {yesterday}")


async def test_trees_hide_and_refuse(tmp_path, started):
    bob = make_identity(tmp_path / "bob", "bob")
    node = started(bob, trees=("/node", "/cpu"))
    with trio.fail_after(T):
        async with connect(node.addr, bob.key, "bob", known(bob)) as c:
            assert sorted(s.name for s in await c.list_dir("/")) == ["cpu", "node"]
            for path in ("/storage", "/jobs/clone", "/proc", "/metrics", "/mem/free"):
                with pytest.raises(NineError) as e:
                    await c.walk_path(path)
                assert e.value.ename == "ENOENT"
            r = await c.rpc(m.Twalk(0, c.root, c.new_fid(), ["node", "..", "storage"]))
            assert len(r.qids) == 2  # back at the root, and still no storage there


async def test_read_only_refuses_every_change(tmp_path, started):
    bob = make_identity(tmp_path / "bob", "bob")
    node = started(bob, read_only=True)
    (node.export / "f").write_text("data\n")
    with trio.fail_after(T):
        async with connect(node.addr, bob.key, "bob", known(bob)) as c:
            assert await c.read_file("/storage/f") == b"data\n"
            assert await c.read_file("/cpu/ncpu")
            pid = os.getpid()
            d = await c.walk_path("/storage")
            attempts = [
                lambda: c.write_file("/storage/f", b"x"),  # write
                lambda: c.create(d, "new", 0o644, m.OWRITE),  # create
                lambda: c.read_file("/jobs/clone"),  # a job is a change
                lambda: c.write_file(f"/proc/{pid}/ctl", b"stop"),  # so is a signal
            ]
            for attempt in attempts:
                with pytest.raises(NineError) as e:
                    await attempt()
                assert e.value.ename == "EROFS"
            fid = await c.walk_path("/storage/f")
            for req in (m.Twstat(0, fid, {"mode": 0o777}), m.Topen(0, fid, m.OREAD | m.OTRUNC)):
                with pytest.raises(NineError) as e:
                    await c.rpc(req)
                assert e.value.ename == "EROFS"
            with pytest.raises(NineError) as e:
                await c.remove(fid)
            assert e.value.ename == "EROFS"
    assert (node.export / "f").read_text() == "data\n"
    assert sorted(p.name for p in node.export.iterdir()) == ["f"]
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED


# -- limits per user ------------------------------------------------------------------------


async def test_connections_per_user(tmp_path, started, identity):
    node = started(identity, args=["--max-user-connections", "2"])
    bob = make_identity(tmp_path / "bob", "bob")
    await cli("authorize", encode_public(bob.public), "bob", "--state", str(node.state))
    with trio.fail_after(T):
        a = await dial(node.addr, identity.key, identity.user, known(identity))
        b = await dial(node.addr, identity.key, identity.user, known(identity))
        why = await refused(node, identity)
        assert f"too many connections for {identity.user!r} (limit 2)" in why
        async with connect(node.addr, bob.key, "bob", known(bob)) as c:  # others unaffected
            assert await c.read_file("/node/name") == b"n1\n"
        await a.aclose()
        await wait_for_log(node, "(root) disconnected")
        async with connect(node.addr, identity.key, identity.user, known(identity)) as c:
            assert await c.read_file("/node/name") == b"n1\n"
        await b.aclose()


async def test_jobs_per_user(started, identity):
    node = started(identity, args=["--max-user-jobs", "2"])
    with trio.fail_after(T):
        async with connect(node.addr, identity.key, identity.user, known(identity)) as c:
            first = (await c.read_file("/jobs/clone")).decode().strip()
            await c.read_file("/jobs/clone")
            with pytest.raises(NineError) as e:
                await c.read_file("/jobs/clone")
            assert e.value.ename == "EAGAIN" and "limit 2" in e.value.message
            await c.write_file(f"/jobs/{first}/ctl", b"rm")
            await c.read_file("/jobs/clone")


# -- jobs run with the rights the node grants ------------------------------------------------


@pytest.fixture(scope="module")
def account() -> Iterator[pwd.struct_passwd]:
    """A local account for the duration of these tests (we are root), removed afterwards
    with every process it still has."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a local account")
    name = f"nfst{os.getpid() % 100000}"
    subprocess.run(["useradd", "-M", "-N", "-d", "/nonexistent", "-s", "/bin/sh", name],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for p in psutil.process_iter(["uids"]):
            if p.info["uids"] and p.info["uids"].real == uid:
                p.kill()
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


async def run(c, text: str) -> tuple[str, str, str]:
    jid = (await c.read_file("/jobs/clone")).decode().strip()
    await c.write_file(f"/jobs/{jid}/ctl", text.encode())
    wait = (await c.read_file(f"/jobs/{jid}/wait")).decode().strip()
    return wait, (await c.read_file(f"/jobs/{jid}/stdout")).decode(), jid


async def test_job_runs_as_the_mapped_account(tmp_path, started, account):
    who = make_identity(tmp_path / "acct", account.pw_name)
    node = started(who, allow_root=False)
    with trio.fail_after(T):
        async with connect(node.addr, who.key, who.user, known(who)) as c:
            wait, out, _ = await run(c, "exec /usr/bin/id -u")
            assert (wait, out) == ("exit 0", f"{account.pw_uid}\n")
            wait, out, _ = await run(c, "exec /bin/grep NoNewPrivs /proc/self/status")
            assert out.split() == ["NoNewPrivs:", "1"]
            _, out, _ = await run(c, "exec /usr/bin/env")
            env = dict(line.split("=", 1) for line in out.splitlines())
            assert env["USER"] == env["LOGNAME"] == account.pw_name
            assert env["HOME"] == account.pw_dir
            # root's files are out of its reach: the export and the node's state
            target = node.export / "written-by-job"
            wait, _, _ = await run(c, f"run echo x > {target}")
            assert wait != "exit 0" and not target.exists()
            wait, _, _ = await run(c, f"run cat {node.state}/key")
            assert wait != "exit 0"


async def test_a_fork_bomb_is_contained(tmp_path, started, account, identity):
    who = make_identity(tmp_path / "acct", account.pw_name)
    node = started(who, allow_root=False)
    await cli("authorize", encode_public(identity.public), identity.user, "--state",
              str(node.state))  # fmt: skip
    with trio.fail_after(T * 2):
        async with (
            connect(node.addr, who.key, who.user, known(who)) as c,
            connect(node.addr, identity.key, identity.user, known(identity)) as other,
        ):
            jid = (await c.read_file("/jobs/clone")).decode().strip()
            await c.write_file(
                f"/jobs/{jid}/ctl", b"limit procs 40\nlimit time 3\nrun b(){ b|b& }; b; sleep 60"
            )
            for _ in range(10):  # the node keeps serving everyone while it runs
                assert await other.read_file("/node/name") == b"n1\n"
                await trio.sleep(0.1)
            # the shell either is killed at the time limit or gives up when it cannot fork
            assert (await c.read_file(f"/jobs/{jid}/wait")).decode() in ("signal KILL\n",
                                                                        "exit 2\n")  # fmt: skip
        # the whole group went with it
        while any(p.info["uids"] and p.info["uids"].real == account.pw_uid
                  for p in psutil.process_iter(["uids"])):  # fmt: skip
            await trio.sleep(0.05)


async def test_no_root_jobs_or_storage_unless_allowed(tmp_path, started, identity):
    node = started(identity, allow_root=False)  # identity is root, mapped to uid 0
    ghost = make_identity(tmp_path / "ghost", "no-such-account-here")
    await cli("authorize", encode_public(ghost.public), ghost.user, "--state", str(node.state))
    with trio.fail_after(T):
        for who in (identity, ghost):
            async with connect(node.addr, who.key, who.user, known(who)) as c:
                jid = (await c.read_file("/jobs/clone")).decode().strip()
                with pytest.raises(NineError) as e:
                    await c.write_file(f"/jobs/{jid}/ctl", b"exec /usr/bin/id -u")
                assert e.value.ename == "EPERM" and "as root here" in e.value.message
                assert "as root here" in (await c.read_file(f"/jobs/{jid}/status")).decode()
                with pytest.raises(NineError) as e:
                    await c.read_file("/storage/anything")
                assert e.value.ename == "EPERM" and "may not use /storage as root" in str(e.value)
                await still_serving(c)


# -- /storage with the rights of the user's account --------------------------------------


async def test_storage_acts_as_the_mapped_account(tmp_path, started, account):
    who = make_identity(tmp_path / "acct", account.pw_name)
    node = started(who, allow_root=False)
    ex = node.export  # root's, 0755, as an operator would leave it
    (ex / "public").write_text("for everyone\n")
    (ex / "public").chmod(0o644)
    (ex / "secret").write_text("root only\n")
    (ex / "secret").chmod(0o600)
    (ex / "locked").mkdir(mode=0o700)
    (ex / "locked" / "inside").write_text("x")
    (ex / "names").mkdir()
    (ex / "names" / "only").write_text("x")
    (ex / "names").chmod(0o744)  # others may read the names, not search it for their stats
    home = ex / "home"
    home.mkdir()
    os.chown(home, account.pw_uid, account.pw_gid)
    with trio.fail_after(T):
        async with connect(node.addr, who.key, who.user, known(who)) as c:
            assert await c.read_file("/storage/public") == b"for everyone\n"

            async def denied(call, *args, ename="EACCES", **kw):
                with pytest.raises(NineError) as e:
                    await call(*args, **kw)
                assert e.value.ename == ename, e.value

            await denied(c.read_file, "/storage/secret")
            await denied(c.write_file, "/storage/public", b"changed")
            await denied(c.read_file, "/storage/locked/inside")  # no search permission
            await denied(c.list_dir, "/storage/locked")
            await denied(c.open_path, "/storage/names", m.OREAD)  # at the open: listings have stats
            fid = await c.walk_path("/storage")
            await denied(c.create, fid, "new", 0o644, m.OWRITE)  # the export is root's
            await c.clunk(fid)
            fid = await c.walk_path("/storage/public")
            await denied(c.wstat, fid, mode=0o666, ename="EPERM")  # only the owner may chmod
            await denied(c.wstat, fid, size=0)
            await denied(c.remove, fid)  # removing needs write permission on the directory
            fid = await c.walk_path("/storage/home")
            await denied(c.rename, await c.walk_path("/storage/secret"), fid, "mine")

            # in the account's own directory it may do anything, and what it makes is its own
            for name, perm in (("notes", 0o644), ("sub", m.DMDIR | 0o750)):
                fid = await c.walk_path("/storage/home")
                await c.create(fid, name, perm, m.OREAD)
                await c.clunk(fid)
            await c.write_file("/storage/home/notes", b"mine, again\n")
            fid = await c.walk_path("/storage/home/notes")
            await c.wstat(fid, mode=0o640)
            await c.clunk(fid)
            for path, mode in ((home / "notes", 0o640), (home / "sub", 0o750)):
                st = os.stat(path)
                assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), path
                assert st.st_mode & 0o7777 == mode, path
            assert (home / "notes").read_text() == "mine, again\n"
            assert {s.name for s in await c.list_dir("/storage/home")} == {"notes", "sub"}
            await c.remove(await c.walk_path("/storage/home/notes"))
            assert not (home / "notes").exists()

        # nothing outside what it may touch changed, and the daemon is still itself:
        # it writes its own root-only state for a job, which runs as the account
        assert (ex / "public").read_text() == "for everyone\n"
        assert (ex / "secret").read_text() == "root only\n"
        names = sorted(p.name for p in ex.iterdir())
        assert names == ["home", "locked", "names", "public", "secret"]
        async with connect(node.addr, who.key, who.user, known(who)) as c:
            wait, out, _ = await run(c, "exec /usr/bin/id -u")
            assert (wait, out) == ("exit 0", f"{account.pw_uid}\n")


def test_acting_switches_only_this_thread_and_always_back(account):
    """The mechanism under /storage's checks: fsuid/fsgid/groups change for the calling
    thread only, inside the block only, and come back even when the block raises."""
    acct = Account.of(account)
    me = fs_ids()
    seen: dict[str, tuple[int, int]] = {}
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(10)
        seen["other"] = fs_ids()  # while the main thread is switched
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pytest.raises(PermissionError), acct.acting():
        seen["inside"] = fs_ids()
        inside.set()
        done.wait(10)
        open("/etc/shadow").close()  # root's override is gone too
    t.join(10)
    assert seen == {"inside": (account.pw_uid, account.pw_gid), "other": me}
    assert fs_ids() == me
    open("/etc/shadow").close()  # and back


# -- files that others may read or change ---------------------------------------------------


async def test_a_key_others_can_read_is_refused_with_the_fix(tmp_path, started, identity):
    node = started(identity)
    key = identity.home / "key"
    key.chmod(0o644)
    with trio.fail_after(T):
        r = await trio.run_process(
            [sys.executable, "-m", "ninefs", "cat", node.addr, "/node/name"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert r.returncode != 0 and r.stdout == b""
    assert f"chmod 600 {key}" in r.stderr.decode() and "0644" in r.stderr.decode()
    key.chmod(0o600)
    assert await cli("cat", node.addr, "/node/name") == "n1\n"


async def test_an_authorized_users_file_others_may_write_grants_nothing(started, identity):
    node = started(identity)
    users = node.state / "authorized_users"
    with trio.fail_after(T):
        async with connect(node.addr, identity.key, identity.user, known(identity)) as c:
            await still_serving(c)
        users.chmod(0o666)
        assert "access denied" in await refused(node, identity)
        await wait_for_log(node, "writable by others (mode 0666)")
        users.chmod(0o644)  # fixed: admitted again, no restart
        async with connect(node.addr, identity.key, identity.user, known(identity)) as c:
            await still_serving(c)
