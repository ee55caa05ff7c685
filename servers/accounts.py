"""Whose rights a user's calls run with on a node: the local account of the same name.

A daemon running as root acts for each user as the local account of the same name: jobs
start as that account (servers/jobs.py), and /storage calls run with its filesystem
credentials, so the kernel checks every open, create, chmod and unlink against the file's
owner and mode exactly as it would for that user logged in. A user that maps to root or to
no local account gets nothing unless the node allows it (``serve --allow-root``), and then
acts as root. A daemon that is not root cannot change accounts and acts as itself.

Filesystem credentials (fsuid, fsgid, supplementary groups) are per thread in Linux, so a
storage call switches them around one system call, on whichever thread makes it, and puts
them back before it yields. glibc's setgroups() changes every thread of the process, so the
groups are set with the raw system call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import pwd
from collections.abc import Iterator
from dataclasses import dataclass

from ninefs.protocol.errors import NineError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# setgroups(2) without glibc's broadcast to every thread; the number differs by architecture.
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81, "s390x": 206}


@dataclass(frozen=True)
class Account:
    """A local account a node acts as: its passwd entry and every group it is in."""

    pw: pwd.struct_passwd
    groups: tuple[int, ...]

    @classmethod
    def of(cls, pw: pwd.struct_passwd) -> Account:
        return cls(pw, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """Run the enclosed system calls, on this thread only, with this account's
        filesystem credentials. Nothing inside may yield to other tasks."""
        try:
            _set_fs_creds(self.pw.pw_uid, self.pw.pw_gid, self.groups)
            yield
        finally:  # also after a switch that failed half-way: never leave a thread half-switched
            _set_fs_creds(*_DAEMON)


_DAEMON = (os.geteuid(), os.getegid(), tuple(os.getgroups()))


def _set_fs_creds(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    # Groups and gid while the thread still has its capabilities; the uid last, since
    # leaving fsuid 0 drops the thread's filesystem capabilities (and returning restores
    # them), so the order is reversed on the way back.
    if uid == 0:
        _checked(_libc.setfsuid, uid)
    nr = _SYS_SETGROUPS.get(platform.machine())
    if nr is None:
        raise NineError("EPERM", f"cannot switch accounts on {platform.machine()}")
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    if _libc.syscall(nr, len(groups), arr) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setgroups: {os.strerror(e)}")
    _checked(_libc.setfsgid, gid)
    if uid != 0:
        _checked(_libc.setfsuid, uid)


def _checked(fn: ctypes._CFuncPtr, ident: int) -> None:
    # setfsuid/setfsgid return the previous id and never an error: ask again to check.
    fn(ident)
    if fn(-1) != ident:
        raise OSError(1, f"{fn.__name__}({ident}) did not take effect")


def fs_ids() -> tuple[int, int]:
    """This thread's filesystem uid and gid (for tests and logs)."""
    with open("/proc/thread-self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])


@dataclass(frozen=True)
class Policy:
    """Which account a node acts as for a user (see the module's docstring)."""

    node: str
    allow_root: bool = False

    def account(self, user: str, what: str = "act") -> Account | None:
        """The account for ``user``; None: the daemon's own (it is not root, or the user
        acts as root by the node's leave). EPERM when the user may not act here."""
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            pw = None
        if pw is not None and pw.pw_uid != 0:
            return Account.of(pw)
        if self.allow_root:
            return None
        why = "is root" if pw is not None else "has no local account"
        raise NineError(
            "EPERM", f"{user!r} {why} on node {self.node}, and may not {what} as root here"
        )
