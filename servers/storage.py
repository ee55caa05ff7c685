"""/storage: a real directory on the node, served read and write.

Nothing outside the export may be reached, whatever is on disk or changes there between
calls (QEMU CVE-2016-7116 and CVE-2016-9602, Samba CVE-2017-2619 are what happens
otherwise). So:

- every File holds an O_PATH|O_NOFOLLOW descriptor of the inode it was walked to, and a
  walk opens one name relative to its directory's descriptor: never a path, never realpath,
  never through a symbolic link. A walk onto a link gives the link itself; walking further
  is ENOTDIR; opening it is ELOOP. The FUSE client resolves links itself.
- '..' is the parent File the walk came from, and at the export root the root itself.
- calls that take a path (open, chmod, utime, truncate) are given /proc/self/fd/N, the
  kernel's link to exactly the walked inode, so a name swapped since the walk cannot
  redirect them.
- only regular files and directories are ever opened: FIFOs, devices and sockets are
  refused by the type seen at walk (an inode's type never changes), before any open that
  could block or reach a driver (QEMU CVE-2023-2861); the open itself is O_NONBLOCK and
  checked again with fstat.
- setuid and setgid bits are never set, by create or by wstat (QEMU GHSA-ppj8-867g-rgjr).

Every call that the kernel checks against a file's owner and mode (a walk's lookup, open,
create, chmod, truncate, utime, unlink, rename, a listing's stats) runs with the filesystem
credentials of the account the node acts as for the user (servers/accounts.py), so a user
reaches exactly what that account could; calls on an open descriptor need no check. The
session has already refused changes to keys that may only read. Data calls (read, write,
fsync, truncate, listing a directory) run in threads so one slow disk holds up no other
client; small metadata calls stay on the loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import stat as st_
import struct
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import xxhash

from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError
from ninefs.protocol.fs import File, Handle, Principal

from . import workers
from .accounts import Account, Policy
from .toolkit import Mount

log = logging.getLogger(__name__)

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_ACCESS = {m.OREAD: os.O_RDONLY, m.OWRITE: os.O_WRONLY, m.ORDWR: os.O_RDWR, m.OEXEC: os.O_RDONLY}
_PERM = 0o1777  # the bits create and chmod may set: never setuid or setgid
_MAX_OFFSET = 2**63 - 1


def tree(export: Path, policy: Policy) -> Mount:
    """The /storage entry of a node's root: the directory ``export``, read and write with
    the rights of the account ``policy`` gives the user."""
    export = Path(export)

    key = ("storage", str(export))

    def attach(ctx: Principal) -> StorageFile:
        # Once per connection (a path walked from the root passes here each time): the
        # account is settled when the connection is, as ssh settles it at login.
        root = ctx.extra.get(key)
        if root is None:
            acct = policy.account(ctx.user, "use /storage")
            # The export path is the operator's: following links in it is fine. Below it,
            # never.
            fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            root = ctx.extra[key] = StorageFile._adopt(fd, None, "storage", acct)
        return root

    return Mount("storage", attach)


def _as(acct: Account | None) -> contextlib.AbstractContextManager[None]:
    # Only around system calls: never across an await (the credentials are the thread's).
    return acct.acting() if acct is not None else contextlib.nullcontext()


def _run_as(acct: Account | None, call: Callable[[], Any]) -> Any:
    with _as(acct):
        return call()


async def _thread(fn: Callable[..., Any], *args: Any, _acct: Account | None = None,
                  **kwargs: Any) -> Any:  # fmt: skip
    call = functools.partial(fn, *args, **kwargs)
    if _acct is not None:
        call = functools.partial(_run_as, _acct, call)
    return await workers.run(call)


def _proc(fd: int) -> str:
    # The kernel's magic link to the very inode ``fd`` holds: no name is looked up again.
    return f"/proc/self/fd/{fd}"


def _check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise NineError("EINVAL", f"bad name {name!r:.40}")


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@functools.lru_cache(maxsize=512)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=512)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_DEV_INO = struct.Struct("<QQ").pack
_CHANGE = struct.Struct("<qqQ").pack
_S_IFMT, _S_IFDIR, _S_IFLNK = st_.S_IFMT(0o170000), st_.S_IFDIR, st_.S_IFLNK


def qid_of(st: os.stat_result) -> m.Qid:
    """The qid of an inode: path from (device, inode); version changes with the contents."""
    kind = st.st_mode & _S_IFMT
    qtype = m.QTDIR if kind == _S_IFDIR else m.QTSYMLINK if kind == _S_IFLNK else m.QTFILE
    path = xxhash.xxh3_64_intdigest(_DEV_INO(st.st_dev, st.st_ino))
    version = xxhash.xxh32_intdigest(_CHANGE(st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return m.Qid(qtype, version, path)


def stat_of(st: os.stat_result, name: str) -> m.Stat:
    # (a listing makes thousands: the kind is looked at once, constants are the module's)
    kind = st.st_mode & _S_IFMT
    mode = st.st_mode & 0o7777
    if kind == _S_IFDIR:
        mode |= m.DMDIR
    elif kind == _S_IFLNK:
        mode |= m.DMSYMLINK
    nlink = st.st_nlink
    return m.Stat(
        qid_of(st), mode, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
        nlink if nlink <= 0xFFFFFFFF else 0xFFFFFFFF, _user(st.st_uid), _group(st.st_gid), name,
    )  # fmt: skip


def _fits_str(s: str, limit: int = m.MAXSTR) -> bool:
    # os gives undecodable bytes as surrogates, which msgpack cannot send.
    try:
        return len(s.encode()) <= limit
    except UnicodeEncodeError:
        return False


def _fits_wire(name: str) -> bool:
    return _fits_str(name, m.MAXNAME)


class StorageFile(File):
    """One inode under the export, as walked: its O_PATH descriptor, its parent, its name."""

    def __init__(
        self, fd: int, st: os.stat_result, parent: StorageFile | None, name: str,
        acct: Account | None,
    ) -> None:  # fmt: skip
        self._fd = fd
        self._acct = acct  # whose rights every checked call runs with
        self._st = st  # as walked; the type of an inode never changes
        self._loc = (parent, name)  # one attribute, so a rename updates it in one step
        self._qid = qid_of(st)
        # Bounded descriptors: the O_PATH fd lives as long as some fid (or child) uses it.
        weakref.finalize(self, os.close, fd)

    @classmethod
    def _adopt(
        cls, fd: int, parent: StorageFile | None, name: str, acct: Account | None
    ) -> StorageFile:
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, st, parent, name, acct)

    @classmethod
    def _at(cls, parent: StorageFile, name: str) -> StorageFile:
        """The inode ``name`` in ``parent`` names now; a link is the link itself. The
        lookup needs search permission on ``parent``, checked for the user's account."""
        with _as(parent._acct):
            fd = os.open(name, _PATH, dir_fd=parent._fd)
        return cls._adopt(fd, parent, name, parent._acct)

    @property
    def qid(self) -> m.Qid:
        return self._qid

    @property
    def is_dir(self) -> bool:
        return st_.S_ISDIR(self._st.st_mode)

    @property
    def is_link(self) -> bool:
        return st_.S_ISLNK(self._st.st_mode)

    def _need_dir(self) -> None:
        if not self.is_dir:
            raise NineError("ENOTDIR", f"{self._loc[1]} is not a directory")

    def _still_there(self) -> tuple[StorageFile, str]:
        """Parent and name, if the name still names this inode (for unlink and rename,
        which only take names)."""
        parent, name = self._loc
        if parent is None:
            raise NineError("EBUSY", "the export root cannot be removed or renamed")
        with _as(self._acct):
            now = os.stat(name, dir_fd=parent._fd, follow_symlinks=False)
        if not _same(now, self._st):
            raise NineError("ESTALE", f"{name} was replaced since it was walked")
        return parent, name

    # -- walking and looking -----------------------------------------------------------

    async def walk(self, name: str) -> File:
        if name == ".":
            return self
        if name == "..":
            return self._loc[0] or self.up or self
        self._need_dir()
        _check_name(name)
        try:
            return StorageFile._at(self, name)
        except OSError as e:
            # NineError, so the session can answer a partial walk
            raise NineError(e.errno or 0, f"{name}: {e.strerror}") from None

    async def stat(self) -> m.Stat:
        return stat_of(os.fstat(self._fd), self._loc[1])

    async def readlink(self) -> str:
        if not self.is_link:
            raise NineError("EINVAL", "not a symbolic link")
        target = os.readlink("", dir_fd=self._fd)  # "" with an O_PATH fd: this very link
        if not _fits_str(target):
            raise NineError("EILSEQ", "link target is not UTF-8")
        return target

    async def statfs(self) -> m.StatFs:
        s = await _thread(os.statvfs, self._fd)
        return m.StatFs(s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                        s.f_namemax)  # fmt: skip

    # -- opening and creating ----------------------------------------------------------

    def _reopen(self, flags: int) -> int:
        """An fd open for I/O on exactly the walked inode, which must be a regular file or
        a directory; never blocks, never follows a link, never opens a device."""
        kind = st_.S_IFMT(self._st.st_mode)
        if kind == st_.S_IFLNK:
            raise NineError("ELOOP", "a symbolic link cannot be opened; read it with readlink")
        if kind not in (st_.S_IFREG, st_.S_IFDIR):
            log.info("refused to open %s: mode %o", self._loc[1], self._st.st_mode)
            raise NineError("EPERM", "only regular files and directories can be opened")
        with _as(self._acct):  # the open is checked against the inode's owner and mode
            fd = os.open(_proc(self._fd), flags | _OPEN)
        try:
            st = os.fstat(fd)
            if not _same(st, self._st) or st_.S_IFMT(st.st_mode) != kind:
                raise NineError("ESTALE", "the file changed while it was opened")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def open(self, mode: int) -> Handle:
        acc = mode & 3
        if self.is_dir:
            if acc not in (m.OREAD, m.OEXEC) or mode & m.OTRUNC:
                raise NineError("EISDIR", "a directory opens only for reading")
            fd = self._reopen(os.O_RDONLY | os.O_DIRECTORY)
            return await DirHandle.load(fd, self._acct)
        fd = self._reopen(_ACCESS[acc] | (os.O_APPEND if mode & m.OAPPEND else 0))
        h = StorageHandle(fd)
        if mode & m.OTRUNC:
            # truncated after the checks, never by the open: a special file is never touched
            try:
                await _thread(os.ftruncate, fd, 0)
            except BaseException:
                await h.close()
                raise
        return h

    async def create(self, name: str, perm: int, mode: int) -> tuple[File, Handle]:
        self._need_dir()
        _check_name(name)
        if perm & m.DMSYMLINK:
            raise NineError("EINVAL", "make symbolic links with symlink")
        bits = perm & _PERM
        acc = mode & 3
        if perm & m.DMDIR:
            if acc not in (m.OREAD, m.OEXEC) or mode & m.OTRUNC:
                raise NineError("EISDIR", "a directory opens only for reading")
            with _as(self._acct):
                os.mkdir(name, 0o700, dir_fd=self._fd)
            child = StorageFile._at(self, name)
            if not child.is_dir:
                raise NineError("ESTALE", f"{name} was replaced while it was made")
            # the perm asked for, exactly: the daemon's umask is not the user's
            with _as(self._acct):
                os.chmod(_proc(child._fd), bits)
            return child, await child.open(m.OREAD)
        flags = _ACCESS[acc] | (os.O_APPEND if mode & m.OAPPEND else 0)
        try:
            # O_CREAT|O_EXCL never follows a link and only ever makes a new regular file
            with _as(self._acct):
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _OPEN,
                             0o600, dir_fd=self._fd)  # fmt: skip
        except FileExistsError:
            if mode & m.OEXCL:
                raise
            child = StorageFile._at(self, name)  # it exists: open it as a walk would
            return child, await child.open(mode)
        try:
            os.fchmod(fd, bits)  # the new file is the user's own: the daemon may set its bits
            os.set_blocking(fd, True)
            path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            child = StorageFile._adopt(path_fd, self, name, self._acct)
        except BaseException:
            os.close(fd)
            raise
        return child, StorageHandle(fd)

    async def symlink(self, name: str, target: str) -> File:
        self._need_dir()
        _check_name(name)
        with _as(self._acct):
            os.symlink(target, name, dir_fd=self._fd)  # the text is stored, never followed here
        return StorageFile._at(self, name)

    # -- changing ----------------------------------------------------------------------

    async def remove(self) -> None:
        try:
            parent, name = self._still_there()
            await _thread(os.rmdir if self.is_dir else os.unlink, name, dir_fd=parent._fd,
                          _acct=self._acct)  # fmt: skip
        except OSError as e:
            # NineError: a clunk with ORCLOSE expects one when the remove fails
            raise NineError(e.errno or 0, e.strerror or "") from None

    async def rename(self, newdir: File, newname: str) -> None:
        if not isinstance(newdir, StorageFile):
            raise NineError("EXDEV", "can only rename within /storage")
        newdir._need_dir()
        _check_name(newname)
        parent, name = self._still_there()
        await _thread(os.rename, name, newname, src_dir_fd=parent._fd, dst_dir_fd=newdir._fd,
                      _acct=self._acct)  # fmt: skip
        # The fid names the file, which now lives here: later removes and renames use this.
        self._loc = (newdir, newname)

    async def wstat(self, changes: dict[str, int]) -> None:
        path = _proc(self._fd)
        if "size" in changes:
            if self.is_dir:
                raise NineError("EISDIR", "a directory has no size to set")
            if not st_.S_ISREG(self._st.st_mode):
                raise NineError("EINVAL", "only a regular file can be truncated")
        if "mode" in changes:
            with _as(self._acct):  # only the owner may
                os.chmod(path, changes["mode"] & _PERM)  # EOPNOTSUPP for links, from the kernel
        if "size" in changes:
            await _thread(os.truncate, path, changes["size"], _acct=self._acct)
        if "atime" in changes or "mtime" in changes:  # last: a truncate sets mtime
            now = os.fstat(self._fd)
            times = (changes.get("atime", now.st_atime_ns), changes.get("mtime", now.st_mtime_ns))
            with _as(self._acct):
                os.utime(path, ns=times)


class StorageHandle(Handle):
    """An open regular file: positioned reads and writes on its own descriptor."""

    flags = 0  # a real file: cacheable, with an exact size
    head = True
    takes_views = True  # pwrite takes any buffer

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._wrote = False

    async def read(self, offset: int, count: int) -> bytes:
        buf = bytearray(count)
        with memoryview(buf) as view:
            got = await self.read_into(offset, view)
        del buf[got:]
        return bytes(buf)

    async def read_into(self, offset: int, buf: memoryview) -> int:
        """As ``read``, into ``buf`` (the reply's frame: Session.read's fast path). What
        the page cache holds is copied on the loop (RWF_NOWAIT: never waits for the disk);
        only the rest goes to a thread, so a slow disk holds up no other request."""
        if offset > _MAX_OFFSET:
            raise NineError("EINVAL", "offset out of range")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            got = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            got = 0
        except OSError as e:
            # a filesystem (or kernel) without RWF_NOWAIT: the thread reads it all
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            got = 0
        if got == len(buf) or offset + got >= os.fstat(self._fd).st_size:
            return got  # all of it, or all there is
        return got + await _thread(os.preadv, self._fd, [buf[got:]], offset + got)

    async def write(self, offset: int, data: bytes) -> int:
        if offset > _MAX_OFFSET:
            raise NineError("EINVAL", "offset out of range")
        # with O_APPEND, Linux's pwrite appends whatever the offset: that is OAPPEND
        self._wrote = True
        return await _thread(os.pwrite, self._fd, data, offset)

    async def fsync(self) -> None:
        await _thread(os.fsync, self._fd)

    async def close(self) -> None:
        if self._wrote:
            await _thread(os.close, self._fd)  # may flush to a slow filesystem
        else:
            os.close(self._fd)  # nothing written: close(2) has nothing to wait for


class DirHandle(StorageHandle):
    """An open directory: its names, read once at open, and their stats, taken as readdir
    first reaches them (a big listing streams: the first entries go out while the node is
    still looking at the rest). Offsets index a fixed list however the directory changes
    meanwhile; a name removed before its stat was taken is left out of it."""

    head = False  # read as readdir, never as bytes
    read_into = None  # type: ignore[assignment]  # Tread of a directory: read gives EISDIR

    def __init__(self, fd: int, names: list[os.DirEntry[str]], acct: Account | None) -> None:
        super().__init__(fd)
        self.entries: list[m.Stat] = []  # stats taken so far, in order
        self._names, self._next = names, 0  # and how far into the names they have reached
        self._acct = acct
        self._lock = trio.Lock()  # readdirs in flight take stats in order

    @classmethod
    async def load(cls, fd: int, acct: Account | None) -> DirHandle:
        try:
            names = await _thread(_names, fd, _acct=acct)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, names, acct)

    async def read(self, offset: int, count: int) -> bytes:
        raise NineError("EISDIR", "a directory is read with readdir")

    async def readdir(self, offset: int, count: int) -> list[m.Stat]:
        if offset + count > len(self.entries) and self._next < len(self._names):
            async with self._lock:
                while offset + count > len(self.entries) and self._next < len(self._names):
                    batch = self._names[self._next : self._next + max(count, 64)]
                    # stats need search permission on the directory: the user's account's
                    self.entries += await _thread(_stats, batch, _acct=self._acct)
                    self._next += len(batch)
        return self.entries[offset : offset + count]


def _names(fd: int) -> list[os.DirEntry[str]]:
    """The directory's entries (their stats come later, relative to ``fd``: DirEntry.stat
    is fstatat on the descriptor given to scandir, which stays open with the handle)."""
    out = []
    with os.scandir(fd) as it:  # scandir works on a duplicate and leaves fd as it was
        for e in it:
            if not _fits_wire(e.name):
                log.warning("not listing %r: its name is not UTF-8 or too long", e.name)
                continue
            out.append(e)
    if out:
        # stats need search permission: without it the open fails, as it always has, not
        # the first readdir (the stat is kept by the DirEntry)
        with contextlib.suppress(FileNotFoundError):
            out[0].stat(follow_symlinks=False)
    return out


def _stats(entries: list[os.DirEntry[str]]) -> list[m.Stat]:
    out = []
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)  # fstatat relative to fd, never following
        except FileNotFoundError:
            continue  # removed since it was listed
        out.append(stat_of(st, e.name))
    return out
