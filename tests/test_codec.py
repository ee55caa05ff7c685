"""The sans-I/O layers, with no sockets: the message codec, framing, the handshake, sealing.

Anything a peer can send must end in a decoded message or a ProtocolError: never another
exception, a hang or unbounded memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import msgpack
import nacl.bindings as nb
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ninefs.protocol import messages as m
from ninefs.protocol.errors import NineError, ProtocolError
from ninefs.protocol.framing import LEN_SIZE, FrameReader, frame
from ninefs.protocol.handshake import (
    MAX_HANDSHAKE_MSG,
    ClientHandshake,
    HandshakeError,
    Refused,
    ServerHandshake,
)
from ninefs.protocol.sealing import (
    ABYTES,
    AEGIS_ABYTES,
    HEADER_BYTES,
    Opener,
    Sealer,
    opener_for,
    sealer_for,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the codec ---------------------------------------------------------------------------

QID = m.Qid(m.QTDIR, 7, 2**64 - 1)
STAT = m.Stat(QID, m.DMDIR | 0o755, 2**40, -(2**63), 0, 2**63 - 1, 2, "glenda", "sys", "usr")
EXAMPLES: list[m.Msg] = [
    m.Tversion(m.NOTAG, 2 << 20, m.VERSION),
    m.Rversion(m.NOTAG, 8192, "unknown"),
    m.Tattach(1, 0, "glenda", ""),
    m.Rattach(1, QID),
    m.Rerror(2, "ENOENT", "no such file: ünïcode"),
    m.Tflush(3, 2),
    m.Rflush(3),
    m.Twalk(4, 0, 1, ["a", "..", "é" * 127]),
    m.Twalk(4, 0, 1, []),
    m.Rwalk(4, [QID] * m.MAXWELEM),
    m.Topen(5, 1, m.ORDWR | m.OTRUNC),
    m.Ropen(5, QID, 65536, m.OF_SYNTHETIC | m.OF_STREAM),
    m.Tcreate(6, 1, "new", 0o644 | m.DMDIR, m.OWRITE | m.OEXCL),
    m.Rcreate(6, QID, 0, 0),
    m.Tread(7, 1, 2**64 - 1, 2**32 - 1),
    m.Rread(7, b"\x00\xff" * 1000),
    m.Rread(7, b""),
    m.Twrite(8, 1, 0, bytes(range(256)) * 70),  # more than the decoder's first peek
    m.Rwrite(8, 17920),
    m.Tclunk(9, 1),
    m.Rclunk(9),
    m.Tremove(10, 1),
    m.Rremove(10),
    m.Tstat(11, 1),
    m.Rstat(11, STAT),
    m.Twstat(12, 1, {"mode": 0o600, "size": 0, "atime": -1, "mtime": 2**63 - 1}),
    m.Twstat(12, 1, {}),
    m.Rwstat(12),
    m.Treaddir(13, 1, 0, 1024),
    m.Rreaddir(13, [STAT] * 300),  # a header longer than the decoder's first peek
    m.Trename(14, 1, 2, "b"),
    m.Rrename(14),
    m.Tfsync(15, 1),
    m.Rfsync(15),
    m.Tstatfs(16, 1),
    m.Rstatfs(16, m.StatFs(4096, 1, 2, 3, 4, 5, 255)),
    m.Tsymlink(17, 1, "link", "../target/" + "x" * 4000),
    m.Rsymlink(17, QID),
    m.Treadlink(18, 1),
    m.Rreadlink(18, "/abs/target"),
    m.Tping(0xFFFE),
    m.Rping(0xFFFE),
    m.Twalkstat(19, 1, 2, ["jobs", "17", "status"]),
    m.Rwalkstat(19, [QID, QID, QID], STAT),
    m.Twalkopen(20, 1, 2, ["cpu", "load"], m.OREAD, 0),
    m.Rwalkopen(20, QID, 8192, m.OF_SYNTHETIC | m.OF_STREAM, b""),
    m.Twalkopen(21, 1, 2, ["storage", "small"], m.OREAD, 65536),
    m.Rwalkopen(21, QID, 8192, m.OF_HEAD, b"the first bytes\n"),
    m.Tclunkmany(22, [3, 4, 0xFFFFFFFE]),
    m.Rclunkmany(22),
]


def test_examples_cover_every_message_type():
    assert {type(x) for x in EXAMPLES} == set(m._BY_TYPE.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    body = m.encode(msg)
    assert m.decode(body) == msg
    assert m.decode(bytearray(body)) == msg
    assert m.decode(memoryview(body)) == msg
    assert m.is_request(msg) == type(msg).__name__.startswith("T")


def test_payload_follows_the_header_raw():
    body = m.encode(m.Rread(5, b"PAYLOAD"))
    assert body == msgpack.packb([117, 5]) + b"PAYLOAD"
    body = m.encode(m.Twrite(1, 2, 3, memoryview(b"xyz")))
    assert body == msgpack.packb([118, 1, 2, 3]) + b"xyz"


def test_header_room_covers_the_largest_payload_header():
    biggest = m.encode(m.Twrite(0xFFFF, 2**32 - 1, 2**64 - 1, b""))
    assert len(biggest) <= m.HEADER_ROOM
    assert len(m.encode(m.Rread(0xFFFF, b""))) <= m.HEADER_ROOM


# strategies for every wire type, from the annotations of the message classes
_name = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40
)
_strs = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60)
_qid = st.builds(m.Qid, st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
_u32, _u64, _i64 = (
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**63), 2**63 - 1),
)
_stat = st.builds(m.Stat, _qid, _u32, _u64, _i64, _i64, _i64, _u32, _strs, _strs, _strs)
STRATEGIES = {
    "u8": st.integers(0, 255), "u16": st.integers(0, 0xFFFF), "u32": _u32, "u64": _u64,
    "i64": _i64, "Str": _strs, "Name": _name,
    "Names": st.lists(_name, max_size=m.MAXWELEM),
    "Qid": _qid, "list[Qid]": st.lists(_qid, max_size=m.MAXWELEM),
    "list[u32]": st.lists(_u32, max_size=m.MAXCLUNK),
    "Stat": _stat, "list[Stat]": st.lists(_stat, max_size=5),
    "StatFs": st.builds(m.StatFs, *[_u64] * 7),
    "Wstat": st.fixed_dictionaries(
        {}, optional={"mode": _u32, "size": _u64, "atime": _i64, "mtime": _i64}
    ),
    "Data": st.binary(max_size=300),
}  # fmt: skip


@st.composite
def any_message(draw):
    cls = draw(st.sampled_from(sorted(m._BY_TYPE.values(), key=lambda c: c.TYPE)))
    values = [draw(st.integers(0, 0xFFFF))]
    values += [draw(STRATEGIES[f.type]) for f in dataclasses.fields(cls)[1:]]
    return cls(*values)


@FAST
@given(any_message())
def test_round_trip_property(msg):
    assert m.decode(m.encode(msg)) == msg


@FAST
@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_raise_protocol_error(data):
    try:
        msg = m.decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, m.Msg)


# msgpack values of every kind, in headers that start like real messages
_anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@FAST
@given(st.sampled_from(sorted(m._BY_TYPE)), st.lists(_anything, max_size=6), st.binary(max_size=8))
def test_structured_garbage_raises_only_protocol_error(type_, fields, tail):
    try:
        m.decode(msgpack.packb([type_, 1, *fields]) + tail)
    except ProtocolError:
        pass


def _raw(*header) -> bytes:
    return msgpack.packb(list(header))


BAD_HEADERS = {
    "not an array": msgpack.packb({"type": 116}),
    "short header": _raw(116),
    "unknown type": _raw(99, 1),
    "type as string": _raw("116", 1, 1, 0, 1),
    "tag too big": _raw(120, 0x10000, 1),
    "negative tag": _raw(120, -1, 1),
    "too few fields": _raw(116, 1, 1, 0),
    "too many fields": _raw(120, 1, 1, 2),
    "negative fid": _raw(120, 1, -1),
    "fid over u32": _raw(120, 1, 2**32),
    "offset as float": _raw(116, 1, 1, 0.0, 10),
    "count as bool": _raw(116, 1, 1, 0, True),
    "count as string": _raw(116, 1, 1, 0, "10"),
    "count as nil": _raw(116, 1, 1, 0, None),
    "fid as list": _raw(120, 1, [1]),
    "offset over u64 as negative": _raw(116, 1, 1, -(2**63), 10),
    "oldtag over u16": _raw(108, 1, 0x10000),
    "msize over u32": _raw(100, 1, 2**32, "9N2026"),
    "version not a string": _raw(100, 1, 8192, 9),
    "version overlong": _raw(100, 1, 8192, "x" * (m.MAXSTR + 1)),
    "version multibyte overlong": _raw(100, 1, 8192, "é" * (m.MAXSTR // 2 + 1)),
    "NUL in a string": _raw(107, 1, "EIO", "a\0b"),
    "empty name": _raw(104, 1, 0, "", ""),
    "slash in name": _raw(104, 1, 0, "a/b", ""),
    "name is slash": _raw(110, 1, 0, 1, ["/"]),
    "NUL in name": _raw(110, 1, 0, 1, ["a\0"]),
    "overlong name": _raw(110, 1, 0, 1, ["x" * (m.MAXNAME + 1)]),
    "overlong multibyte name": _raw(114, 1, 0, "é" * 128, 0, 0),
    "name not a string": _raw(110, 1, 0, 1, [5]),
    "names not a list": _raw(110, 1, 0, 1, "a"),
    "too many walk names": _raw(110, 1, 0, 1, ["a"] * (m.MAXWELEM + 1)),
    "too many walk qids": _raw(111, 1, [[0, 0, 0]] * (m.MAXWELEM + 1)),
    "qid of 2 fields": _raw(105, 1, [0, 0]),
    "qid type over u8": _raw(105, 1, [256, 0, 0]),
    "qid as map": _raw(105, 1, {"type": 0}),
    "stat of 9 fields": _raw(125, 1, [[0, 0, 0], 0, 0, 0, 0, 0, 0, "u", "g"]),
    "stat atime over i64": _raw(125, 1, [[0, 0, 0], 0, 0, 2**63, 0, 0, 0, "u", "g", "n"]),
    "stat name overlong": _raw(125, 1, [[0, 0, 0], 0, 0, 0, 0, 0, 0, "u", "g", "n" * 256]),
    "statfs of 6": _raw(9, 1, [0] * 6),
    "wstat unknown key": _raw(126, 1, 1, {"uid": 0}),
    "wstat five keys": _raw(126, 1, 1, {"mode": 0, "size": 0, "atime": 0, "mtime": 0, "x": 0}),
    "wstat negative size": _raw(126, 1, 1, {"size": -1}),
    "wstat mode over u32": _raw(126, 1, 1, {"mode": 2**32}),
    "wstat not a map": _raw(126, 1, 1, [["mode", 0]]),
    "wstat int key": msgpack.packb([126, 1, 1, {1: 0}]),
    "wstat list key": b"\x94\x7e\x01\x01\x81\x91\x01\x01",
    "stray bytes after a message with no payload": _raw(120, 1, 1) + b"\x00",
    "bin field": _raw(116, 1, b"\x01", 0, 10),
    "readdir over MAXENTRIES": b"\x93\x29\x01\xdd\x00\x01\x00\x00" + b"\xc0" * 0x10000,
    # bombs: length headers that promise far more than the frame holds
    "array32 header of 4G": b"\xdd\xff\xff\xff\xff",
    "map32 header of 4G": b"\x94\x7e\x01\x01\xdf\xff\xff\xff\xff",
    "names array32 of 4G": b"\x95\x6e\x01\x00\x01\xdd\xff\xff\xff\xff",
    "str32 of 4G": b"\x93\x78\x01\xdb\xff\xff\xff\xff",
    "bin32 of 4G": b"\x93\x78\x01\xc6\xff\xff\xff\xff",
    "deep nesting": b"\x93\x78\x01" + b"\x91" * 100_000 + b"\x00",
    "deep maps": b"\x94\x7e\x01\x01" + b"\x81\xa1k" * 50_000 + b"\x00",
    "fixext field": b"\x93\x78\x01\xd4\x01\x00",
    "ext32 of 4G": b"\x93\x78\x01\xc9\xff\xff\xff\xff\x01",
    "timestamp ext": b"\x93\x78\x01\xd6\xff\x00\x00\x00\x01",
    "reserved byte": b"\xc1",
    "empty body": b"",
    "nil": b"\xc0",
}


@pytest.mark.parametrize("body", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_message_is_protocol_error(body):
    with pytest.raises(ProtocolError):
        m.decode(body)


def test_limits_are_inclusive():
    m.decode(_raw(110, 1, 0, 1, ["x" * m.MAXNAME] * m.MAXWELEM))
    m.decode(_raw(110, 1, 0, 1, ["é" * (m.MAXNAME // 2)]))
    m.decode(_raw(107, 1, "EIO", "x" * m.MAXSTR))
    m.decode(_raw(126, 1, 1, {"mode": 2**32 - 1, "size": 2**64 - 1, "atime": -(2**63)}))


def test_nine_error_names():
    assert NineError("ENOENT", "gone").errno == 2
    e = NineError("EBOGUS", "what")
    assert e.ename == "EIO" and e.message == "what"
    assert NineError(13).ename == "EACCES"


# -- framing -----------------------------------------------------------------------------


def test_frames_split_anywhere():
    bodies = [b"", b"a", b"hello" * 100, bytes(5000)]
    stream = b"".join(frame(b) for b in bodies)
    for step in (1, 3, 7, 4096):
        r, out = FrameReader(8192), []
        for i in range(0, len(stream), step):
            r.feed(stream[i : i + step])
            while (body := r.next_frame()) is not None:
                out.append(body)
        assert out == bodies and r.buffered == 0


def test_length_is_big_endian():
    assert frame(b"xyz") == b"\x00\x00\x00\x03xyz"
    assert LEN_SIZE == 4


def test_four_gib_length_raises_before_buffering():
    r = FrameReader(m.MAX_MSIZE)
    r.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        r.next_frame()
    assert r.buffered == 4  # nothing was allocated for the body


def test_length_limit_is_exact():
    r = FrameReader(100)
    r.feed(frame(bytes(100)))
    assert r.next_frame() == bytes(100)
    r.feed(struct.pack(">I", 101))
    with pytest.raises(ProtocolError):
        r.next_frame()


def test_needed_counts_what_is_missing():
    r = FrameReader(100)
    assert r.needed() == 4
    r.feed(b"\x00\x00")
    assert r.needed() == 2
    r.feed(b"\x00\x0a" + b"12")
    assert r.needed() == 8 and r.next_frame() is None


@FAST
@given(st.binary(max_size=300), st.integers(1, 50))
def test_framing_garbage_raises_only_protocol_error(data, limit):
    r = FrameReader(limit)
    r.feed(data)
    try:
        while r.next_frame() is not None:
            pass
    except ProtocolError:
        pass


# -- the handshake ------------------------------------------------------------------------


def _keys():
    return nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()


def _run_to_msg3(user="alice"):
    ck, sk = _keys()
    c, s = ClientHandshake(ck, user), ServerHandshake(sk)
    msg1 = c.hello()
    msg2 = s.on_hello(msg1)
    return ck, sk, c, s, msg1, msg2


def test_full_handshake_in_memory():
    ck, sk, c, s, msg1, msg2 = _run_to_msg3()
    msg3 = c.on_reply(msg2)
    assert c.node_key == bytes(sk.verify_key)
    pub, user = s.on_auth(msg3)
    assert (pub, user) == (bytes(ck.verify_key), "alice")
    msg4, skeys = s.accept()
    ckeys = c.on_verdict(msg4)
    assert ckeys.send == skeys.recv and ckeys.recv == skeys.send and ckeys.send != ckeys.recv
    assert all(len(x) <= MAX_HANDSHAKE_MSG for x in (msg1, msg2, msg3, msg4))
    # and the keys carry traffic
    sealer = Sealer(ckeys.send)
    assert Opener(skeys.recv, sealer.header).open(sealer.seal(b"hi")) == b"hi"


def test_refusal_is_reported():
    _, _, c, s, _, msg2 = _run_to_msg3()
    s.on_auth(c.on_reply(msg2))
    with pytest.raises(Refused, match="refused"):
        c.on_verdict(s.refuse())


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def test_tampered_msg2_fails():
    _, _, c, _, _, msg2 = _run_to_msg3()
    for i in range(len(msg2)):
        for bit in (0x01, 0x80):
            bad = msg2[:i] + bytes([msg2[i] ^ bit]) + msg2[i + 1 :]
            with pytest.raises(HandshakeError):
                c.on_reply(bad)
    c.on_reply(msg2)  # the untouched message still works


def test_tampered_msg3_fails():
    _, _, c, s, _, msg2 = _run_to_msg3()
    msg3 = c.on_reply(msg2)
    for i in range(len(msg3)):
        with pytest.raises(HandshakeError):
            s.on_auth(_flip(msg3, i))
    with pytest.raises(HandshakeError):
        s.on_auth(msg3[:-1])
    assert s.on_auth(msg3)[1] == "alice"


def test_tampered_msg4_fails():
    _, _, c, s, _, msg2 = _run_to_msg3()
    s.on_auth(c.on_reply(msg2))
    msg4, _ = s.accept()
    with pytest.raises(HandshakeError):
        c.on_verdict(_flip(msg4, 3))


def test_msg2_from_another_session_fails():
    _, sk = _keys()
    old = ServerHandshake(sk).on_hello(ClientHandshake(sk, "x").hello())
    _, _, c, _, _, _ = _run_to_msg3()
    with pytest.raises(HandshakeError):
        c.on_reply(old)


def test_msg3_from_another_session_fails():
    _, _, c1, s1, _, m2 = _run_to_msg3()
    old_msg3 = c1.on_reply(m2)
    _, _, _, s2, _, _ = _run_to_msg3()
    with pytest.raises(HandshakeError):
        s2.on_auth(old_msg3)


def test_signature_by_another_key_fails():
    """A client that holds the session keys but signs with a key other than the one it names."""
    from ninefs.protocol import handshake as hs

    ck, _, c, s, msg1, msg2 = _run_to_msg3()
    c.on_reply(msg2)
    other = nacl.signing.SigningKey.generate()
    pub = bytes(ck.verify_key)
    h2 = hs._h(msg1, msg2, pub, b"alice")
    inner = msgpack.packb([pub, "alice", other.sign(b"ninefs user " + h2).signature])
    key = hs._kdf(c._secret, c._h1, b"hs c2s")
    msg3 = nacl.secret.SecretBox(key).encrypt(inner, bytes(24)).ciphertext
    with pytest.raises(HandshakeError, match="signature"):
        s.on_auth(msg3)


_E = nacl.utils.random(32)
_X = ["xchacha20poly1305"]
BAD_HELLOS = {
    "wrong magic": msgpack.packb(["ninefz", 2, _E, bytes(32), _X]),
    "old version": msgpack.packb(["ninefs", 1, _E, bytes(32)]),
    "wrong version": msgpack.packb(["ninefs", 3, _E, bytes(32), _X]),
    "short key": msgpack.packb(["ninefs", 2, bytes(31), bytes(32), _X]),
    "short nonce": msgpack.packb(["ninefs", 2, _E, bytes(31), _X]),
    "key as string": msgpack.packb(["ninefs", 2, "k" * 32, bytes(32), _X]),
    "low-order key": msgpack.packb(["ninefs", 2, bytes(32), bytes(32), _X]),
    "six fields": msgpack.packb(["ninefs", 2, _E, bytes(32), _X, 0]),
    "no offer": msgpack.packb(["ninefs", 2, _E, bytes(32), []]),
    "offer not a list": msgpack.packb(["ninefs", 2, _E, bytes(32), "xchacha20poly1305"]),
    "unknown ciphers only": msgpack.packb(["ninefs", 2, _E, bytes(32), ["rot13", 7]]),
    "too many ciphers": msgpack.packb(["ninefs", 2, _E, bytes(32), _X * 9]),
    "not msgpack": b"\xc1\xc1",
    "a map": msgpack.packb({"magic": "ninefs"}),
    "too long": msgpack.packb(["ninefs", 2, _E, bytes(32), _X]) + bytes(1024),
    "empty": b"",
}


@pytest.mark.parametrize("msg1", BAD_HELLOS.values(), ids=BAD_HELLOS.keys())
def test_bad_hello_fails(msg1):
    with pytest.raises(HandshakeError):
        ServerHandshake(nacl.signing.SigningKey.generate()).on_hello(msg1)


@FAST
@given(st.binary(max_size=1100))
def test_handshake_garbage_raises_only_handshake_error(data):
    s = ServerHandshake(nacl.signing.SigningKey.generate())
    for step in (s.on_hello, s.on_auth):
        try:
            step(data)
        except HandshakeError:
            pass
    c = ClientHandshake(nacl.signing.SigningKey.generate(), "u")
    c.hello()
    try:
        c.on_reply(data)
    except HandshakeError:
        pass


@pytest.mark.parametrize("suite", ["xchacha20poly1305", "aegis256"])
def test_independent_client_per_the_spec(suite):
    """A client written from docs/protocol.md alone (hashlib and raw NaCl), against the node,
    in each cipher suite."""

    def h(*parts):
        d = hashlib.blake2b(digest_size=32)
        for p in parts:
            d.update(len(p).to_bytes(4, "big") + p)
        return d.digest()

    def kdf(secret, transcript, label):
        person = label.ljust(16, b"\0")
        return hashlib.blake2b(transcript, key=secret, person=person, digest_size=32).digest()

    node, me = _keys()
    server = ServerHandshake(node, ["aegis256", "xchacha20poly1305"])
    e = nacl.public.PrivateKey.generate()
    offer = ["no-such-cipher", suite]
    msg1 = msgpack.packb(["ninefs", 2, bytes(e.public_key), nacl.utils.random(32), offer])
    msg2 = server.on_hello(msg1)
    e_s, n_s, chosen, box = msgpack.unpackb(msg2)
    assert chosen == suite
    secret = nb.crypto_scalarmult(bytes(e), e_s)
    h1 = h(msg1, e_s, n_s, suite.encode())
    role, node_pub, sig = msgpack.unpackb(
        nacl.secret.SecretBox(kdf(secret, h1, b"hs s2c")).decrypt(box, bytes(24))
    )
    assert role == "node" and node_pub == bytes(node.verify_key)
    nacl.signing.VerifyKey(node_pub).verify(b"ninefs node " + h1, sig)
    pub = bytes(me.verify_key)
    h2 = h(msg1, msg2, pub, b"bob")
    inner = msgpack.packb([pub, "bob", me.sign(b"ninefs user " + h2).signature])
    msg3 = nacl.secret.SecretBox(kdf(secret, h1, b"hs c2s")).encrypt(inner, bytes(24)).ciphertext
    assert server.on_auth(msg3) == (pub, "bob")
    msg4, skeys = server.accept()
    nonce1 = b"\x01" + bytes(23)
    verdict = msgpack.unpackb(
        nacl.secret.SecretBox(kdf(secret, h1, b"hs s2c")).decrypt(msg4, nonce1)
    )
    assert verdict == ["ok", ""]
    h3 = h(msg1, msg2, msg3)
    assert kdf(secret, h3, b"traffic c2s") == skeys.recv
    assert kdf(secret, h3, b"traffic s2c") == skeys.send
    assert skeys.suite == suite
    # the first frames of the sealed phase: a stream header, then a sealed Tversion and
    # a sealed Tping
    bodies = [msgpack.packb([100, 0xFFFF, 8192, "9N2026"]), msgpack.packb([200, 1])]
    c2s = kdf(secret, h3, b"traffic c2s")
    if suite == "xchacha20poly1305":
        state = nb.crypto_secretstream_xchacha20poly1305_state()
        header = nb.crypto_secretstream_xchacha20poly1305_init_push(state, c2s)
        tag = nb.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
        sealed = [nb.crypto_secretstream_xchacha20poly1305_push(state, b, None, tag)
                  for b in bodies]  # fmt: skip
    else:
        header = nacl.utils.random(32)
        nonces = [header[:24] + (int.from_bytes(header[24:], "little") ^ i).to_bytes(8, "little")
                  for i in range(2)]  # fmt: skip
        sealed = [nb.crypto_aead_aegis256_encrypt(b, None, n, c2s)
                  for b, n in zip(bodies, nonces, strict=True)]  # fmt: skip
    opener = opener_for(skeys.suite, skeys.recv, header)
    assert [m.decode(opener.open(x)) for x in sealed] == [
        m.Tversion(0xFFFF, 8192, "9N2026"),
        m.Tping(1),
    ]


# -- sealing ------------------------------------------------------------------------------


@pytest.fixture(params=["xchacha20poly1305", "aegis256"])
def stream(request):
    suite = request.param
    key = nacl.utils.random(32)
    sealer = sealer_for(suite, key)
    frames = [sealer.seal(b"frame %d" % i) for i in range(4)]
    return key, sealer.header, frames, suite


def test_seal_round_trip(stream):
    key, header, frames, suite = stream
    sizes = {"xchacha20poly1305": (HEADER_BYTES, ABYTES), "aegis256": (32, AEGIS_ABYTES)}
    assert (len(header), len(frames[0]) - len(b"frame 0")) == sizes[suite] != (0, 0)
    assert all(len(f) == len(frames[0]) for f in frames)
    o = opener_for(suite, key, header)
    assert [o.open(f) for f in frames] == [b"frame %d" % i for i in range(4)]


def _assert_broken(o, frames) -> None:
    for f in frames:  # even the right next frame never opens again
        with pytest.raises(ProtocolError):
            o.open(f)


def test_altered_frame_fails_and_stays_broken(stream):
    key, header, frames, suite = stream
    o = opener_for(suite, key, header)
    with pytest.raises(ProtocolError):
        o.open(_flip(frames[0], 5))
    _assert_broken(o, frames)


def test_replayed_frame_fails(stream):
    key, header, frames, suite = stream
    o = opener_for(suite, key, header)
    o.open(frames[0])
    with pytest.raises(ProtocolError):
        o.open(frames[0])
    _assert_broken(o, frames[1:])


def test_reordered_frames_fail(stream):
    key, header, frames, suite = stream
    o = opener_for(suite, key, header)
    with pytest.raises(ProtocolError):
        o.open(frames[1])
    _assert_broken(o, frames)


def test_dropped_frame_fails(stream):
    key, header, frames, suite = stream
    o = opener_for(suite, key, header)
    o.open(frames[0])
    with pytest.raises(ProtocolError):
        o.open(frames[2])
    _assert_broken(o, frames[1:])


@pytest.mark.parametrize("cut", [1, 17, len(b"frame 0") + 17])
def test_truncated_frame_fails(stream, cut):
    key, header, frames, suite = stream
    o = opener_for(suite, key, header)
    with pytest.raises(ProtocolError):
        o.open(frames[0][:-cut])
    _assert_broken(o, frames)


def test_wrong_key_or_header_fails(stream):
    key, header, frames, suite = stream
    with pytest.raises(ProtocolError):
        opener_for(suite, nacl.utils.random(32), header).open(frames[0])
    with pytest.raises(ProtocolError):
        opener_for(suite, key, _flip(header, 0)).open(frames[0])
    with pytest.raises(ProtocolError):
        opener_for(suite, key, _flip(header, len(header) - 1)).open(frames[0])
    with pytest.raises(ProtocolError):
        opener_for(suite, key, header[:-1])


def test_a_frame_of_one_suite_never_opens_in_the_other():
    key = nacl.utils.random(32)
    for a, b in (("xchacha20poly1305", "aegis256"), ("aegis256", "xchacha20poly1305")):
        sealer = sealer_for(a, key)
        frame_ = sealer.seal(b"hello")
        with pytest.raises(ProtocolError):
            opener_for(b, key, sealer.header).open(frame_)


def test_other_stream_tags_are_refused():
    key = nacl.utils.random(32)
    state = nb.crypto_secretstream_xchacha20poly1305_state()
    header = nb.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    final = nb.crypto_secretstream_xchacha20poly1305_push(
        state, b"x", None, nb.crypto_secretstream_xchacha20poly1305_TAG_FINAL
    )
    o = Opener(key, header)
    with pytest.raises(ProtocolError, match="tag"):
        o.open(final)
    _assert_broken(o, [final])


@FAST
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_opener_garbage_raises_only_protocol_error(frames):
    o = Opener(nacl.utils.random(32), nacl.utils.random(HEADER_BYTES))
    for f in frames:
        try:
            o.open(f)
        except ProtocolError:
            pass


# -- the cipher suite ---------------------------------------------------------------------


def _handshake(client_suites, node_suites):
    ck, sk = _keys()
    c = ClientHandshake(ck, "alice", client_suites)
    s = ServerHandshake(sk, node_suites)
    msg3 = c.on_reply(s.on_hello(c.hello()))
    s.on_auth(msg3)
    msg4, skeys = s.accept()
    return c.on_verdict(msg4), skeys


@pytest.mark.parametrize(
    "client, node, agreed",
    [
        (["aegis256", "xchacha20poly1305"], ["aegis256", "xchacha20poly1305"], "aegis256"),
        (["xchacha20poly1305", "aegis256"], ["aegis256", "xchacha20poly1305"], "xchacha20poly1305"),
        (["aegis256", "xchacha20poly1305"], ["xchacha20poly1305"], "xchacha20poly1305"),
        (["xchacha20poly1305"], ["aegis256", "xchacha20poly1305"], "xchacha20poly1305"),
    ],
)
def test_the_node_picks_the_clients_first_suite_it_has(client, node, agreed):
    ckeys, skeys = _handshake(client, node)
    assert ckeys.suite == skeys.suite == agreed
    sealer = sealer_for(ckeys.suite, ckeys.send)
    assert opener_for(skeys.suite, skeys.recv, sealer.header).open(sealer.seal(b"x")) == b"x"


def test_no_suite_in_common_fails():
    with pytest.raises(HandshakeError, match="no cipher in common"):
        _handshake(["aegis256"], ["xchacha20poly1305"])


def test_a_downgraded_offer_is_caught():
    """A man in the middle who strips AEGIS from the client's offer gets the node to
    choose XChaCha, but the node's box key and signature both cover the offer it saw: the
    client's check fails."""
    ck, sk = _keys()
    c = ClientHandshake(ck, "alice", ["aegis256", "xchacha20poly1305"])
    s = ServerHandshake(sk, ["aegis256", "xchacha20poly1305"])
    magic, version, e, n, _ = msgpack.unpackb(c.hello())
    msg2 = s.on_hello(msgpack.packb([magic, version, e, n, ["xchacha20poly1305"]]))
    with pytest.raises(HandshakeError, match="box failed to open|signature"):
        c.on_reply(msg2)
    # and a reply naming a suite the client never offered is refused outright
    c2 = ClientHandshake(ck, "alice", ["xchacha20poly1305"])
    msg2 = ServerHandshake(sk, ["aegis256", "xchacha20poly1305"]).on_hello(
        ClientHandshake(ck, "alice", ["aegis256"]).hello()
    )
    c2.hello()
    with pytest.raises(HandshakeError, match="not offered"):
        c2.on_reply(msg2)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_encode_into_lays_out_what_encode_gives(msg):
    buf, n = m.encode_into(msg, 4, 32)
    assert len(buf) == 4 + n + 32 and bytes(buf[4 : 4 + n]) == m.encode(msg)


@pytest.mark.parametrize("suite", ["xchacha20poly1305", "aegis256"])
def test_a_big_frame_sealed_in_its_buffer_opens_as_sent(suite):
    """Channel.send_prepared's path (seal in place where the suite can) and the opener's
    in-place path for big frames, against each other."""
    key = nacl.utils.random(32)
    sealer = sealer_for(suite, key)
    body = nacl.utils.random(200_000)
    buf = bytearray(4) + bytearray(body) + bytearray(32)
    inplace = getattr(sealer, "seal_inplace", None)
    if inplace is not None:
        sealed = bytearray(buf[4 : 4 + inplace(buf, 4, len(body))])
    else:
        sealed = bytearray(sealer.seal(bytes(buf[4 : 4 + len(body)])))
    assert opener_for(suite, key, sealer.header).open(sealed) == body


_edge_int = st.sampled_from(
    [0, 1, 0xFF, 0x100, 0xFFFFFFFF, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]
)
_odd = st.one_of(st.booleans(), st.none(), st.floats(allow_nan=False), st.binary(max_size=3))
_string = st.one_of(
    st.text(max_size=70), st.sampled_from(["a\0b", "\udcff" * 63, "é" * 64, "x" * 256])
)
_qid = st.one_of(st.lists(_edge_int, min_size=3, max_size=3), st.lists(_edge_int, max_size=4))
# mostly the right kind in each place, so that both acceptance and each refusal are reached
_stat_wire = st.tuples(
    st.one_of(_qid, _odd), *[st.one_of(_edge_int, _edge_int, _odd)] * 6,
    *[st.one_of(_string, _string, _odd)] * 3,
).map(list)  # fmt: skip


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_stat_wire, st.lists(_edge_int, max_size=11)))
def test_the_in_line_stat_check_agrees_with_the_full_one(v: list) -> None:
    """_stat's fast path accepts exactly what _stat_checked accepts, and builds the same."""

    def outcome(fn):
        try:
            return fn(v)
        except ProtocolError:
            return "refused"

    assert outcome(m._stat) == outcome(m._stat_checked)


def test_the_in_line_stat_check_takes_the_usual_stat() -> None:
    s = m.Stat(m.Qid(0, 7, 2**64 - 1), 0o644, 100, -1, 2**63 - 1, 0, 1, "alice", "users", "f")
    wire = [list(s.qid), *s[1:]]
    assert m._stat(wire) == m._stat_checked(wire) == s
    for bad in ([*wire[:9], "x" * 256], [*wire[:3], True, *wire[4:]], [[0, 7, -1], *wire[1:]]):
        with pytest.raises(ProtocolError):
            m._stat(bad)
