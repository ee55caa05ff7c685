"""The message set and its msgpack codec (sans-I/O; docs/protocol.md is the normative spec).

A message body is a msgpack array ``[type, tag, field...]``. For ``Twrite`` and ``Rread`` the
payload bytes follow that array raw, so bulk data is never copied through msgpack.
Decoding is strict: every field is checked for type and range, and anything else raises
ProtocolError. Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from .errors import ProtocolError

VERSION = "9N2026"  # the protocol version string negotiated by Tversion
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16  # names in one Twalk, as in 9P2000
MAXNAME = 255  # bytes in one path element (UTF-8)
MAXSTR = 4096  # bytes in any other string field
MAXENTRIES = 65535  # entries in one Rreaddir
MAXCLUNK = 256  # fids in one Tclunkmany
MIN_MSIZE = 8192
MAX_MSIZE = 16 << 20
HEADER_ROOM = 64  # bytes of header that Rread/Twrite payloads must leave in msize

# qid.type bits (9P2000, plus 9P2000.u's symlink)
QTDIR = 0x80
QTAPPEND = 0x40
QTEXCL = 0x20
QTTMP = 0x04
QTSYMLINK = 0x02
QTFILE = 0x00

# stat.mode bits above the permission bits
DMDIR = 0x80000000
DMAPPEND = 0x40000000
DMEXCL = 0x20000000
DMTMP = 0x04000000
DMSYMLINK = 0x02000000

# Topen/Tcreate modes
OREAD = 0
OWRITE = 1
ORDWR = 2
OEXEC = 3
OTRUNC = 0x10
ORCLOSE = 0x40
OEXCL = 0x1000  # Tcreate: fail with EEXIST if the name exists
OAPPEND = 0x2000

# Ropen/Rcreate flags
OF_SYNTHETIC = 0x1  # contents made by the server: size 0, read until EOF, never cache
OF_STREAM = 0x2  # not seekable; a read may block until data arrives or the stream ends
OF_HEAD = 0x4  # Rwalkopen: data is the file's first bytes, read at open (as a Tread at 0)

WSTAT_KEYS = ("mode", "size", "atime", "mtime")


class Qid(NamedTuple):
    type: int
    version: int
    path: int


class Stat(NamedTuple):
    qid: Qid
    mode: int
    size: int
    atime: int  # nanoseconds since the epoch
    mtime: int
    ctime: int
    nlink: int
    uid: str
    gid: str
    name: str


class StatFs(NamedTuple):
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namelen: int


# Wire types, named in the annotations of the message classes below.
u8 = u16 = u32 = u64 = i64 = int
Name = Names = Str = str
Data = bytes
Wstat = dict


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ProtocolError(f"integer out of range [{lo}, {hi}]: {v!r:.40}")
        return v

    return check


_u8, _u16, _u32, _u64 = _int(0, 0xFF), _int(0, 0xFFFF), _int(0, 0xFFFFFFFF), _int(0, 2**64 - 1)
_i64 = _int(-(2**63), 2**63 - 1)


def _str(v: Any, limit: int = MAXSTR) -> str:
    if type(v) is not str:
        raise ProtocolError(f"expected a string, got {type(v).__name__}")
    if len(v) > limit or len(v.encode("utf-8", "surrogatepass")) > limit:
        raise ProtocolError(f"string longer than {limit} bytes")
    if "\0" in v:
        raise ProtocolError("NUL byte in a string")
    return v


def _name(v: Any) -> str:
    v = _str(v, MAXNAME)
    if not v or "/" in v:
        raise ProtocolError(f"bad path element {v!r:.40}")
    return v


def _list(v: Any, limit: int) -> list:
    if type(v) is not list or len(v) > limit:
        raise ProtocolError(f"expected a list of at most {limit} items")
    return v


def _names(v: Any) -> list[str]:
    return [_name(x) for x in _list(v, MAXWELEM)]


def _fids(v: Any) -> list[int]:
    return [_u32(x) for x in _list(v, MAXCLUNK)]


def _qid(v: Any) -> Qid:
    if type(v) is not list or len(v) != 3:
        raise ProtocolError("a qid is [type, version, path]")
    return Qid(_u8(v[0]), _u32(v[1]), _u64(v[2]))


def _qids(v: Any) -> list[Qid]:
    return [_qid(x) for x in _list(v, MAXWELEM)]


_SHORT = MAXNAME // 4  # a string this many characters long fits MAXNAME in any UTF-8


def _stat(v: Any) -> Stat:
    # The usual stat, checked in line (a listing decodes thousands): the same rules as
    # _stat_checked, which says why anything else is refused.
    if type(v) is list and len(v) == 10:
        q, mode, size, at, mt, ct, nlink, uid, gid, name = v
        if (
            type(q) is list and len(q) == 3
            and type(q[0]) is int and 0 <= q[0] <= 0xFF
            and type(q[1]) is int and 0 <= q[1] <= 0xFFFFFFFF
            and type(q[2]) is int and 0 <= q[2] < 2**64
            and type(mode) is int and 0 <= mode <= 0xFFFFFFFF
            and type(size) is int and 0 <= size < 2**64
            and type(at) is int and -(2**63) <= at < 2**63
            and type(mt) is int and -(2**63) <= mt < 2**63
            and type(ct) is int and -(2**63) <= ct < 2**63
            and type(nlink) is int and 0 <= nlink <= 0xFFFFFFFF
            and type(uid) is str and len(uid) <= _SHORT and "\0" not in uid
            and type(gid) is str and len(gid) <= _SHORT and "\0" not in gid
            and type(name) is str and len(name) <= _SHORT and "\0" not in name
        ):  # fmt: skip
            return Stat(Qid(q[0], q[1], q[2]), mode, size, at, mt, ct, nlink, uid, gid, name)
    return _stat_checked(v)


def _stat_checked(v: Any) -> Stat:
    if type(v) is not list or len(v) != 10:
        raise ProtocolError("a stat has 10 fields")
    return Stat(
        _qid(v[0]), _u32(v[1]), _u64(v[2]), _i64(v[3]), _i64(v[4]), _i64(v[5]),
        _u32(v[6]), _str(v[7], MAXNAME), _str(v[8], MAXNAME), _str(v[9], MAXNAME),
    )  # fmt: skip


def _stats(v: Any) -> list[Stat]:
    return [_stat(x) for x in _list(v, MAXENTRIES)]


def _statfs(v: Any) -> StatFs:
    if type(v) is not list or len(v) != 7:
        raise ProtocolError("a statfs has 7 fields")
    return StatFs(*(_u64(x) for x in v))


def _wstat(v: Any) -> dict[str, int]:
    if type(v) is not dict or len(v) > len(WSTAT_KEYS):
        raise ProtocolError("a wstat is a map of at most 4 changes")
    out = {}
    for k, x in v.items():
        if k not in WSTAT_KEYS:
            raise ProtocolError(f"unknown wstat key {k!r:.40}")
        out[k] = _u32(x) if k == "mode" else _u64(x) if k == "size" else _i64(x)
    return out


_CHECKERS: dict[str, Callable[[Any], Any]] = {
    "u8": _u8, "u16": _u16, "u32": _u32, "u64": _u64, "i64": _i64,
    "Str": _str, "Name": _name, "Names": _names, "list[u32]": _fids,
    "Qid": _qid, "list[Qid]": _qids, "Stat": _stat, "list[Stat]": _stats,
    "StatFs": _statfs, "Wstat": _wstat,
}  # fmt: skip


@dataclasses.dataclass(slots=True)
class Msg:
    """A message; ``tag`` pairs a reply with its request."""

    tag: int
    TYPE = 0  # set on each subclass by @_message


_BY_TYPE: dict[int, type[Msg]] = {}
_FIELDS: dict[type, tuple[tuple[str, Callable[[Any], Any]], ...]] = {}
_HAS_DATA: set[type] = set()


def _message(number: int) -> Callable[[type], type]:
    """Register a message class: its annotations, in order, are its wire fields."""

    def register(cls: type) -> type:
        cls = dataclasses.dataclass(slots=True)(cls)
        cls.TYPE = number
        fields = []
        for f in dataclasses.fields(cls)[1:]:
            if f.type == "Data":
                _HAS_DATA.add(cls)
            else:
                fields.append((f.name, _CHECKERS[f.type]))
        _FIELDS[cls] = tuple(fields)
        _BY_TYPE[number] = cls
        return cls

    return register


# The message set. Numbers follow 9P2000 where it has the message, 9P2000.L otherwise.
# fmt: off
@_message(100)
class Tversion(Msg): msize: u32; version: Str
@_message(101)
class Rversion(Msg): msize: u32; version: Str
@_message(104)
class Tattach(Msg): fid: u32; uname: Name; aname: Str
@_message(105)
class Rattach(Msg): qid: Qid
@_message(107)
class Rerror(Msg): ename: Str; message: Str
@_message(108)
class Tflush(Msg): oldtag: u16
@_message(109)
class Rflush(Msg): pass
@_message(110)
class Twalk(Msg): fid: u32; newfid: u32; names: Names
@_message(111)
class Rwalk(Msg): qids: list[Qid]
@_message(112)
class Topen(Msg): fid: u32; mode: u32
@_message(113)
class Ropen(Msg): qid: Qid; iounit: u32; flags: u32
@_message(114)
class Tcreate(Msg): fid: u32; name: Name; perm: u32; mode: u32
@_message(115)
class Rcreate(Msg): qid: Qid; iounit: u32; flags: u32
@_message(116)
class Tread(Msg): fid: u32; offset: u64; count: u32
@_message(117)
class Rread(Msg): data: Data
@_message(118)
class Twrite(Msg): fid: u32; offset: u64; data: Data
@_message(119)
class Rwrite(Msg): count: u32
@_message(120)
class Tclunk(Msg): fid: u32
@_message(121)
class Rclunk(Msg): pass
@_message(122)
class Tremove(Msg): fid: u32
@_message(123)
class Rremove(Msg): pass
@_message(124)
class Tstat(Msg): fid: u32
@_message(125)
class Rstat(Msg): stat: Stat
@_message(126)
class Twstat(Msg): fid: u32; changes: Wstat
@_message(127)
class Rwstat(Msg): pass
@_message(40)
class Treaddir(Msg): fid: u32; offset: u64; count: u32
@_message(41)
class Rreaddir(Msg): entries: list[Stat]
@_message(74)
class Trename(Msg): fid: u32; newdirfid: u32; newname: Name
@_message(75)
class Rrename(Msg): pass
@_message(50)
class Tfsync(Msg): fid: u32
@_message(51)
class Rfsync(Msg): pass
@_message(8)
class Tstatfs(Msg): fid: u32
@_message(9)
class Rstatfs(Msg): statfs: StatFs
@_message(16)
class Tsymlink(Msg): fid: u32; name: Name; target: Str
@_message(17)
class Rsymlink(Msg): qid: Qid
@_message(22)
class Treadlink(Msg): fid: u32
@_message(23)
class Rreadlink(Msg): target: Str
@_message(200)
class Tping(Msg): pass
@_message(201)
class Rping(Msg): pass
@_message(202)
class Twalkstat(Msg): fid: u32; newfid: u32; names: Names
@_message(203)
class Rwalkstat(Msg): qids: list[Qid]; stat: Stat
@_message(204)
class Twalkopen(Msg): fid: u32; newfid: u32; names: Names; mode: u32; count: u32
@_message(205)
class Rwalkopen(Msg): qid: Qid; iounit: u32; flags: u32; data: Data
@_message(206)
class Tclunkmany(Msg): fids: list[u32]
@_message(207)
class Rclunkmany(Msg): pass
# fmt: on

REQUESTS = frozenset(t for t in _BY_TYPE if t % 2 == 0)


def is_request(msg: Msg) -> bool:
    return msg.TYPE in REQUESTS


_pack = msgpack.Packer().pack  # one packer: packb makes a new one per call; resets on error


def encode(msg: Msg) -> bytes:
    """The body of one frame: the msgpack header, then the raw payload if the type has one."""
    cls = type(msg)
    header = [cls.TYPE, msg.tag]
    header.extend(getattr(msg, name) for name, _ in _FIELDS[cls])
    packed = _pack(header)
    if cls in _HAS_DATA:
        return packed + msg.data
    return packed


def encode_into(
    msg: Msg, room: int, tail: int, new: Callable[[int], bytearray] = bytearray
) -> tuple[bytearray, int]:
    """``encode(msg)`` laid out in a buffer of its own (``new(size)``: at least that long),
    ``room`` bytes in and ``tail`` bytes of room after it (Channel.send_prepared seals it
    there): a big payload is copied once, into its frame. Returns the buffer and the
    body's length."""
    cls = type(msg)
    data = msg.data if cls in _HAS_DATA else b""
    header = encode(cls(msg.tag, *(getattr(msg, name) for name, _ in _FIELDS[cls]),
                        *((b"",) if cls in _HAS_DATA else ())))  # fmt: skip
    n = len(header) + len(data)
    buf = new(room + n + tail)
    buf[room : room + len(header)] = header
    buf[room + len(header) : room + n] = data
    return buf, n


_VIEW_MIN = 64 << 10  # Rread payloads at least this long stay views of their frame
_HEAD_PEEK = 16 << 10  # headers of messages that carry payloads are far smaller than this


_LIMITS = dict(
    raw=False, strict_map_key=True, max_str_len=MAXSTR * 4, max_bin_len=0,
    max_array_len=MAXENTRIES, max_map_len=16, max_ext_len=0,
)  # fmt: skip
_SMALL = 4096  # frames up to this long are decoded by one unpackb call
_unpackb = functools.partial(msgpack.unpackb, **_LIMITS)


def _decode_big(view: memoryview) -> tuple[Any, memoryview]:
    # A fresh unpacker per frame: msgpack unpackers are never reused after an error.
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(view), 1), **_LIMITS)
    unpacker.feed(view[:_HEAD_PEEK])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        if len(view) <= _HEAD_PEEK:
            raise
        unpacker.feed(view[_HEAD_PEEK:])
        header = unpacker.unpack()
    return header, view[unpacker.tell() :]


def decode(body: bytes | bytearray | memoryview) -> Msg:
    """Decode one frame body; raises ProtocolError for anything that is not a valid message."""
    view = memoryview(body)
    try:
        if len(view) <= _SMALL:
            # A small frame in one call (no Unpacker to build): the header, and whatever
            # follows it (a small payload, or stray bytes) as ExtraData's copy of the rest.
            try:
                header, rest = _unpackb(view), view[len(view) :]
            except msgpack.ExtraData as e:
                header, rest = e.unpacked, view[len(view) - len(e.extra) :]
        else:
            header, rest = _decode_big(view)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many kinds; all mean a bad frame
        raise ProtocolError(f"undecodable header: {type(e).__name__}") from None
    if type(header) is not list or len(header) < 2:
        raise ProtocolError("a message header is [type, tag, ...]")
    cls = _BY_TYPE.get(header[0]) if type(header[0]) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {header[0]!r:.20}")
    fields = _FIELDS[cls]
    if len(header) != 2 + len(fields):
        raise ProtocolError(f"{cls.__name__} has {len(fields)} fields, got {len(header) - 2}")
    values = [_u16(header[1])]
    values.extend(check(v) for (_, check), v in zip(fields, header[2:], strict=True))
    if cls in _HAS_DATA:
        # A big Rread or Twrite keeps a view of the frame (one fresh buffer per frame, which
        # nothing else holds): the payload goes on to FUSE, or to pwrite, uncopied (the
        # session copies a Twrite's for trees that want bytes). Smaller payloads are bytes.
        big = (
            (cls is Rread or cls is Twrite)
            and len(rest) >= _VIEW_MIN
            and isinstance(body, bytearray)
        )
        values.append(rest if big else bytes(rest))
    elif len(rest):
        raise ProtocolError(f"{len(rest)} stray bytes after {cls.__name__}")
    return cls(*values)
