"""The handshake (sans-I/O): signed ephemeral Diffie-Hellman, in the shape of SIGMA-I.

    1. C -> S  ["ninefs", 2, eC, nC, suites]               fresh X25519 key, 32 random bytes,
                                                           the ciphers it offers, best first
    2. S -> C  [eS, nS, suite, box_s(["node", S, sig_S(H1)])]  H1 = H(msg1 | eS | nS | suite)
    3. C -> S  box_c([C, user, sig_C(H2)])                  H2 = H(msg1 | msg2 | C | user)
    4. S -> C  box_s2(["ok" | "denied", text])

box_s/box_c are XSalsa20-Poly1305 under keys derived from the shared secret and H1, one per
direction. Traffic keys come from the shared secret and H3 = H(msg1 | msg2 | msg3), one per
direction; every frame after the handshake is sealed (see sealing.py) in the suite the node
chose from the client's offer. Each identity signs a transcript that holds both ephemeral
keys and the offer and the choice, so neither side can be impersonated, the exchange
replayed, or the cipher downgraded. docs/security.md walks through it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from .errors import ProtocolError
from .sealing import XCHACHA, local_suites

MAGIC = "ninefs"
HANDSHAKE_VERSION = 2
MAX_SUITES = 8  # in an offer
MAX_HANDSHAKE_MSG = 1024  # bytes; no handshake message is longer
_NONCE0 = bytes(24)
_NONCE1 = b"\x01" + bytes(23)


class HandshakeError(ProtocolError):
    """The peer failed the handshake: bad message, bad signature, or not admitted."""


class Refused(HandshakeError):
    """The node did not admit our key."""


@dataclass(frozen=True)
class TrafficKeys:
    send: bytes
    recv: bytes
    suite: str = XCHACHA  # how frames are sealed with them (sealing.py)


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def _kdf(secret: bytes, transcript: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(
        transcript, key=secret, person=label.ljust(16, b"\0"), digest_size=32
    ).digest()


def _unpack(data: bytes, n: int) -> list[Any]:
    if len(data) > MAX_HANDSHAKE_MSG:
        raise HandshakeError("handshake message too long")
    try:
        v = msgpack.unpackb(
            data, raw=False, max_array_len=8, max_map_len=0,
            max_str_len=MAX_HANDSHAKE_MSG, max_bin_len=128, max_ext_len=0,
        )  # fmt: skip
    except Exception:
        raise HandshakeError("undecodable handshake message") from None
    if type(v) is not list or len(v) != n:
        raise HandshakeError("malformed handshake message")
    return v


def _bin(v: Any, n: int) -> bytes:
    if type(v) is not bytes or len(v) != n:
        raise HandshakeError(f"expected {n} bytes")
    return v


def _shared(secret: nacl.public.PrivateKey, peer: bytes) -> bytes:
    try:
        s = nacl.bindings.crypto_scalarmult(bytes(secret), peer)
    except nacl.exceptions.RuntimeError:  # low-order point
        raise HandshakeError("bad ephemeral key") from None
    if s == bytes(32):
        raise HandshakeError("bad ephemeral key")
    return s


def _open(key: bytes, nonce: bytes, box: Any) -> bytes:
    if type(box) is not bytes:
        raise HandshakeError("malformed handshake box")
    try:
        return nacl.secret.SecretBox(key).decrypt(box, nonce)
    except nacl.exceptions.CryptoError:
        raise HandshakeError("handshake box failed to open") from None


def _verify(key: bytes, message: bytes, sig: bytes) -> None:
    try:
        nacl.signing.VerifyKey(key).verify(message, sig)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise HandshakeError("bad signature") from None


class ClientHandshake:
    """The client's side. ``hello()``, then ``on_reply(msg2)``; check ``node_key`` against
    the pinned key before sending what it returned; then ``on_verdict(msg4)``."""

    def __init__(
        self, identity: nacl.signing.SigningKey, user: str, suites: list[str] | None = None
    ) -> None:
        self._id = identity
        self._user = user
        self._suites = list(suites or local_suites())  # offered, best first
        self._suite = ""
        self._eph = nacl.public.PrivateKey.generate()
        self._msg1 = b""
        self._msg2 = b""
        self._secret = b""
        self._h1 = b""
        self._keys: TrafficKeys | None = None
        self.node_key: bytes = b""

    def hello(self) -> bytes:
        self._msg1 = msgpack.packb(
            [MAGIC, HANDSHAKE_VERSION, bytes(self._eph.public_key), nacl.utils.random(32),
             self._suites]
        )  # fmt: skip
        return self._msg1

    def on_reply(self, msg2: bytes) -> bytes:
        e_s, n_s, suite, box = _unpack(msg2, 4)
        e_s, n_s = _bin(e_s, 32), _bin(n_s, 32)
        if suite not in self._suites:
            raise HandshakeError(f"the node chose a cipher that was not offered: {suite!r:.40}")
        self._suite = suite
        self._msg2 = msg2
        self._secret = _shared(self._eph, e_s)
        self._h1 = _h(self._msg1, e_s, n_s, suite.encode())
        role, node_key, sig = _unpack(
            _open(_kdf(self._secret, self._h1, b"hs s2c"), _NONCE0, box), 3
        )
        if role != "node":
            raise HandshakeError("peer is not a node")
        self.node_key = _bin(node_key, 32)
        _verify(self.node_key, b"ninefs node " + self._h1, _bin(sig, 64))
        user = self._user.encode()
        pub = bytes(self._id.verify_key)
        h2 = _h(self._msg1, msg2, pub, user)
        sig_c = self._id.sign(b"ninefs user " + h2).signature
        inner = msgpack.packb([pub, self._user, sig_c])
        msg3 = (
            nacl.secret.SecretBox(_kdf(self._secret, self._h1, b"hs c2s"))
            .encrypt(inner, _NONCE0)
            .ciphertext
        )
        h3 = _h(self._msg1, msg2, msg3)
        self._keys = TrafficKeys(
            send=_kdf(self._secret, h3, b"traffic c2s"),
            recv=_kdf(self._secret, h3, b"traffic s2c"),
            suite=self._suite,
        )
        return msg3

    def on_verdict(self, msg4: bytes) -> TrafficKeys:
        verdict, text = _unpack(_open(_kdf(self._secret, self._h1, b"hs s2c"), _NONCE1, msg4), 2)
        if verdict != "ok":
            raise Refused(f"the node refused this key: {text}")
        assert self._keys is not None
        return self._keys


class ServerHandshake:
    """The node's side. ``on_hello(msg1)``, ``on_auth(msg3)`` gives the client's key and user
    name; then ``accept()`` or ``refuse(text)`` makes msg4."""

    def __init__(self, identity: nacl.signing.SigningKey, suites: list[str] | None = None) -> None:
        self._id = identity
        self._suites = list(suites or local_suites())  # what this node will use
        self._suite = ""
        self._eph = nacl.public.PrivateKey.generate()
        self._msg1 = b""
        self._msg2 = b""
        self._secret = b""
        self._h1 = b""
        self._keys: TrafficKeys | None = None

    def on_hello(self, msg1: bytes) -> bytes:
        magic, version, e_c, _n_c, offer = _unpack(msg1, 5)
        if magic != MAGIC or version != HANDSHAKE_VERSION:
            raise HandshakeError(f"not a ninefs {HANDSHAKE_VERSION} client")
        e_c = _bin(e_c, 32)
        _bin(_n_c, 32)
        if type(offer) is not list or not 0 < len(offer) <= MAX_SUITES:
            raise HandshakeError("bad cipher offer")
        # the client's order, among the suites this node will use
        suite = next((x for x in offer if type(x) is str and x in self._suites), None)
        if suite is None:
            raise HandshakeError("no cipher in common")
        self._suite = suite
        self._msg1 = msg1
        self._secret = _shared(self._eph, e_c)
        e_s, n_s = bytes(self._eph.public_key), nacl.utils.random(32)
        self._h1 = _h(msg1, e_s, n_s, suite.encode())
        sig = self._id.sign(b"ninefs node " + self._h1).signature
        inner = msgpack.packb(["node", bytes(self._id.verify_key), sig])
        box = (
            nacl.secret.SecretBox(_kdf(self._secret, self._h1, b"hs s2c"))
            .encrypt(inner, _NONCE0)
            .ciphertext
        )
        self._msg2 = msgpack.packb([e_s, n_s, suite, box])
        return self._msg2

    def on_auth(self, msg3: bytes) -> tuple[bytes, str]:
        if len(msg3) > MAX_HANDSHAKE_MSG:
            raise HandshakeError("handshake message too long")
        pub, user, sig = _unpack(_open(_kdf(self._secret, self._h1, b"hs c2s"), _NONCE0, msg3), 3)
        pub = _bin(pub, 32)
        if type(user) is not str or not 0 < len(user) <= 64 or "\0" in user or "/" in user:
            raise HandshakeError("bad user name")
        _verify(
            pub, b"ninefs user " + _h(self._msg1, self._msg2, pub, user.encode()), _bin(sig, 64)
        )
        h3 = _h(self._msg1, self._msg2, msg3)
        self._keys = TrafficKeys(
            send=_kdf(self._secret, h3, b"traffic s2c"),
            recv=_kdf(self._secret, h3, b"traffic c2s"),
            suite=self._suite,
        )
        return pub, user

    def _verdict(self, verdict: str, text: str) -> bytes:
        box = nacl.secret.SecretBox(_kdf(self._secret, self._h1, b"hs s2c"))
        return box.encrypt(msgpack.packb([verdict, text]), _NONCE1).ciphertext

    def accept(self) -> tuple[bytes, TrafficKeys]:
        assert self._keys is not None
        return self._verdict("ok", ""), self._keys

    def refuse(self, text: str = "access denied") -> bytes:
        return self._verdict("denied", text)
