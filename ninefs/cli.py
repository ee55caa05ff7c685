"""The `ninefs` command: serve, mount, umount, keygen, authorize, revoke, demo, ls, cat, stat, write."""

from __future__ import annotations

import argparse
import logging
import os
import stat as stmod
import sys
import time
from pathlib import Path

import nacl.signing
import trio

from ninefs import config
from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError, ProtocolError
from ninefs.protocol.handshake import HandshakeError
from ninefs.protocol.keys import (
    AuthorizedUsers,
    HostKeyChanged,
    KeyError_,
    decode_public,
    encode_public,
    fingerprint,
    parse_grant,
    write_private,
)
from ninefs.protocol.transport import parse_addr

log = logging.getLogger("ninefs")


class UsageError(Exception):
    pass


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- keys -----------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> None:
    path = config.key_path()
    if path.exists() and not args.force:
        key = config.identity()
        print(f"{path} exists; its public key:", file=sys.stderr)
    else:
        if args.force and path.exists():
            path.unlink()
        key = nacl.signing.SigningKey.generate()
        write_private(path, key)
        print(f"wrote {path}", file=sys.stderr)
    pub = bytes(key.verify_key)
    print(encode_public(pub))
    print(f"fingerprint {fingerprint(pub)}", file=sys.stderr)


def cmd_authorize(args: argparse.Namespace) -> None:
    line = f"{args.pubkey} {args.user}"
    if args.read_only:
        line += " ro"
    if args.trees:
        line += f" trees={args.trees}"
    if args.expires:
        line += f" expires={args.expires}"
    if args.source:
        line += f" from={args.source}"
    grant = parse_grant(line)
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    AuthorizedUsers(state / "authorized_users").add(grant)
    print(f"authorized {fingerprint(grant.key)} as {grant.user}: {grant.to_line()}")


def cmd_revoke(args: argparse.Namespace) -> None:
    key = decode_public(args.pubkey)
    if not AuthorizedUsers(Path(args.state) / "authorized_users").remove(key):
        raise UsageError(f"{fingerprint(key)} is not authorized in {args.state}")
    print(f"revoked {fingerprint(key)}")


# -- the daemon -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from ninefs.servers.daemon import NodeConfig, main

    name = args.name or os.uname().nodename.split(".")[0]
    cfg = NodeConfig(
        name=name,
        listen=args.listen,
        export=Path(args.export) if args.export else None,
        state=Path(args.state),
        labels=args.label or [],
        keep=args.keep,
        allow_root=args.allow_root,
        max_connections=args.max_connections,
        max_user_connections=args.max_user_connections,
        max_user_jobs=args.max_user_jobs,
    )
    main(cfg)


# -- one node, no FUSE ----------------------------------------------------------------------


async def _with_client(addr: str, user: str, fn):
    from ninefs.protocol.client import connect

    parse_addr(addr)
    async with connect(addr, config.identity(), user, config.known_nodes()) as c:
        return await fn(c)


def mode_string(mode: int) -> str:
    kind = "d" if mode & m.DMDIR else "l" if mode & m.DMSYMLINK else "-"
    return kind + stmod.filemode(mode & 0o7777)[1:]


def format_stat_line(st: m.Stat) -> str:
    t = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.mtime / 1e9))
    return f"{mode_string(st.mode)} {st.uid:<8} {st.gid:<8} {st.size:>10} {t} {st.name}"


def cmd_ls(args: argparse.Namespace) -> None:
    async def go(c):
        st = await c.stat_path(args.path)
        entries = await c.list_dir(args.path) if st.mode & m.DMDIR else [st]
        for e in entries:
            print(format_stat_line(e) if args.long else e.name)

    trio.run(_with_client, args.addr, args.user, go)


def cmd_cat(args: argparse.Namespace) -> None:
    async def go(c):
        fid = await c.walk_path(args.path)
        try:
            await c.open(fid, m.OREAD)
            offset = 0
            while data := await c.read(fid, offset, c.iounit, timeout=None):
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                offset += len(data)
        finally:
            await c._clunk_quietly(fid)

    trio.run(_with_client, args.addr, args.user, go)


def cmd_stat(args: argparse.Namespace) -> None:
    async def go(c):
        st = await c.stat_path(args.path)
        q = st.qid
        print(f"name {st.name}\nmode {mode_string(st.mode)} {st.mode & 0o7777:04o}\nsize {st.size}")
        print(f"qid {q.type:#04x} {q.version} {q.path:#018x}\nuid {st.uid}\ngid {st.gid}")
        print(f"mtime {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.mtime / 1e9))}")

    trio.run(_with_client, args.addr, args.user, go)


def cmd_write(args: argparse.Namespace) -> None:
    text = args.text if args.text.endswith("\n") else args.text + "\n"

    async def go(c):
        await c.write_file(args.path, text.encode())

    trio.run(_with_client, args.addr, args.user, go)


# -- the mount ------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> None:
    from ninefs.mount import mount_main

    mount_main(args)


def cmd_umount(args: argparse.Namespace) -> None:
    from ninefs.mount import unmount

    unmount(args.mountpoint)


def cmd_demo(args: argparse.Namespace) -> None:
    from ninefs.demo import demo_main

    demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ninefs", description="A group of machines as one file tree.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run a node daemon")
    s.add_argument("--name", help="the node's name (default: the host name)")
    s.add_argument(
        "--listen", default="0.0.0.0:5640", help="HOST:PORT or unix:PATH (default 0.0.0.0:5640)"
    )
    s.add_argument("--export", help="the directory served as /storage")
    s.add_argument("--state", default="/var/lib/ninefs", help="key, authorized_users, job spools")
    s.add_argument("--label", action="append", help="a label for placement (repeatable)")
    s.add_argument(
        "--keep", type=float, default=3600.0, help="seconds a finished job is kept (default 3600)"
    )
    s.add_argument(
        "--allow-root",
        "--allow-root-jobs",  # its name before it covered /storage too
        dest="allow_root",
        action="store_true",
        help="when running as root, let a user who maps to root (or to no local account) "
        "run jobs and use /storage as root",
    )
    s.add_argument("--max-connections", type=int, default=256, help="in all (default 256)")
    s.add_argument("--max-user-connections", type=int, default=64, help="per user (default 64)")
    s.add_argument(
        "--max-user-jobs", type=int, default=64, help="unfinished jobs per user (default 64)"
    )
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("mount", help="mount the cluster at MOUNTPOINT")
    s.add_argument("mountpoint")
    s.add_argument("--ns", help="namespace file (default $NINEFS_HOME/namespace)")
    s.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    s.add_argument("--user", default=None, help="attach as this user (default: login name)")
    s.add_argument("--log", help="log file when in the background")
    s.set_defaults(fn=cmd_mount)

    s = sub.add_parser("umount", help="unmount a ninefs mount")
    s.add_argument("mountpoint")
    s.set_defaults(fn=cmd_umount)

    s = sub.add_parser("keygen", help="make your key ($NINEFS_HOME/key) and print its public half")
    s.add_argument("--force", action="store_true", help="replace an existing key")
    s.set_defaults(fn=cmd_keygen)

    s = sub.add_parser("authorize", help="let a key use a node")
    s.add_argument("pubkey")
    s.add_argument("user")
    s.add_argument("--state", required=True, help="the node's state directory")
    s.add_argument("--read-only", action="store_true")
    s.add_argument("--trees", help="comma-separated trees it may reach, e.g. /cpu,/storage")
    s.add_argument("--expires", help="YYYY-MM-DD after which the key is refused")
    s.add_argument("--from", dest="source", help="comma-separated source networks (CIDR)")
    s.set_defaults(fn=cmd_authorize)

    s = sub.add_parser("revoke", help="take a key's access away")
    s.add_argument("pubkey")
    s.add_argument("--state", required=True)
    s.set_defaults(fn=cmd_revoke)

    s = sub.add_parser("demo", help="start local nodes, mount them, and show what to try")
    s.add_argument(
        "mountpoint", nargs="?", help="where to mount (default: a new temporary directory)"
    )
    s.add_argument("--nodes", type=int, default=3)
    s.set_defaults(fn=cmd_demo)

    for name, fn, hlp in (("ls", cmd_ls, "list a directory on one node"),
                          ("cat", cmd_cat, "print a file of one node"),
                          ("stat", cmd_stat, "show a file's attributes on one node")):  # fmt: skip
        s = sub.add_parser(name, help=hlp)
        s.add_argument("addr", help="HOST:PORT")
        s.add_argument("path")
        s.add_argument("--user", default=None)
        if name == "ls":
            s.add_argument("-l", dest="long", action="store_true", help="long listing")
        s.set_defaults(fn=fn)
    s = sub.add_parser("write", help="write TEXT to a file of one node, as echo TEXT > PATH")
    s.add_argument("addr")
    s.add_argument("path")
    s.add_argument("text")
    s.add_argument("--user", default=None)
    s.set_defaults(fn=cmd_write)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "user", "x") is None:
        args.user = config.default_user()
    try:
        args.fn(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (UsageError, KeyError_, HostKeyChanged, HandshakeError, ProtocolError, ValueError) as e:
        sys.exit(f"ninefs: {e}")
    except NineError as e:
        sys.exit(f"ninefs: {getattr(args, 'path', '')}: {e.message} ({e.ename})")
    except OSError as e:
        where = getattr(args, "addr", "") or getattr(args, "mountpoint", "")
        sys.exit(f"ninefs: {where}: {e.strerror or e}")
