"""Sealing frames after the handshake (sans-I/O): one sealed stream per direction, in the
cipher suite the handshake agreed (docs/protocol.md, section 4).

- ``xchacha20poly1305``: libsodium's secretstream, which keeps a counter in its state.
- ``aegis256``: libsodium's AEGIS-256 AEAD with a per-frame counter in the nonce. About
  five times faster where the CPU has AES instructions (and very slow where it has not,
  so a side offers it only with them: ``local_suites``).

Either way a frame that is replayed, reordered, dropped or altered fails to open, and the
connection that carried it is closed. Each side sends its stream header (public bytes: 24
for secretstream, 32 for AEGIS) as the first frame after the handshake.
"""

from __future__ import annotations

import os
from typing import NoReturn

import nacl.bindings as nb  # importing it runs sodium_init (CPU feature detection)
import nacl.utils
from nacl._sodium import ffi, lib

from .errors import ProtocolError

HEADER_BYTES = nb.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = nb.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_MAX_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_MESSAGEBYTES_MAX
_UCHARS = "unsigned char[]"
LEN_ROOM = 4  # the frame length that Channel.send writes in front of a sealed body

XCHACHA = "xchacha20poly1305"
AEGIS = "aegis256"
_AEGIS_NONCE = lib.crypto_aead_aegis256_npubbytes()  # 32
AEGIS_ABYTES = lib.crypto_aead_aegis256_abytes()  # 32
AEGIS_HEADER_BYTES = _AEGIS_NONCE
MAX_ABYTES = max(ABYTES, AEGIS_ABYTES)  # what sealing may add to a body, in any suite
_AEGIS_MAX = min(lib.crypto_aead_aegis256_messagebytes_max(), 1 << 62)
_COUNTER_END = 1 << 64
_INPLACE_MIN = 64 << 10  # frames at least this long are opened in place


def local_suites() -> list[str]:
    """The suites this machine offers (a client) or accepts (a node), best first: AEGIS-256
    only with AES instructions (libsodium's AES-GCM availability is that test: AES-NI and
    CLMUL, or ARM crypto). NINEFS_SUITES (comma-separated) narrows the list."""
    suites = [AEGIS, XCHACHA] if lib.crypto_aead_aes256gcm_is_available() else [XCHACHA]
    wanted = [x.strip() for x in os.environ.get("NINEFS_SUITES", "").split(",") if x.strip()]
    narrowed = [x for x in suites if x in wanted]
    return narrowed or suites  # naming none this machine has changes nothing


def sealer_for(suite: str, key: bytes) -> Sealer | AegisSealer:
    return AegisSealer(key) if suite == AEGIS else Sealer(key)


def opener_for(suite: str, key: bytes, header: bytes) -> Opener | AegisOpener:
    return AegisOpener(key, header) if suite == AEGIS else Opener(key, header)


class Sealer:
    """Seals outgoing frame bodies. ``header`` must reach the peer first."""

    def __init__(self, key: bytes) -> None:
        self._state = nb.crypto_secretstream_xchacha20poly1305_state()
        self.header = nb.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        return bytes(self.seal_framed(plaintext, 0))

    def seal_framed(
        self, plaintext: bytes | bytearray | memoryview, room: int = LEN_ROOM
    ) -> bytearray:
        """``room`` bytes (for the caller's frame length), then the sealed ``plaintext``,
        written in place by libsodium: no copy of the input or the output. libsodium runs
        without the GIL, so this may be called from a worker thread."""
        n = len(plaintext)
        if n > _MAX_MESSAGE:
            raise ValueError("message too long to seal")
        out = bytearray(room + n + ABYTES)
        rc = lib.crypto_secretstream_xchacha20poly1305_push(
            self._state.statebuf, ffi.from_buffer(_UCHARS, out) + room, ffi.NULL,
            ffi.from_buffer(_UCHARS, plaintext), n, ffi.NULL, 0, _TAG_MESSAGE,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError("sealing failed")
        return out


class _Stream:
    """What both suites' openers share: frames in order, and any failure final."""

    _broken = False

    def _plain_length(self, ciphertext: bytes | bytearray | memoryview, abytes: int,
                      most: int) -> int:  # fmt: skip
        if self._broken:
            raise ProtocolError("stream already failed")
        n = len(ciphertext) - abytes
        if n < 0 or n > most:
            self._fail("a sealed frame of a bad length")
        return n

    def _fail(self, why: str) -> NoReturn:
        self._broken = True  # a stream that failed never opens a frame again
        raise ProtocolError(why)


_ALTERED = "a sealed frame failed to open (altered, replayed or out of order)"


class Opener(_Stream):
    """Opens incoming frame bodies in order; any failure is final for the connection."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != HEADER_BYTES:
            raise ProtocolError("bad stream header")
        self._state = nb.crypto_secretstream_xchacha20poly1305_state()
        nb.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self._tag = ffi.new("unsigned char *")

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        # libsodium directly, into a buffer of our own: PyNaCl's binding wants bytes in and
        # copies its output once more; the checks are libsodium's, the same either way.
        # The plaintext is a fresh bytearray that the caller owns (decode may keep views).
        n = self._plain_length(ciphertext, ABYTES, _MAX_MESSAGE)
        plaintext = bytearray(n)
        tag = self._tag
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            self._state.statebuf, ffi.from_buffer(_UCHARS, plaintext), ffi.NULL, tag,
            ffi.from_buffer(_UCHARS, ciphertext), len(ciphertext), ffi.NULL, 0,
        )  # fmt: skip
        if rc != 0:
            self._fail(_ALTERED)
        if tag[0] != _TAG_MESSAGE:
            self._fail("unexpected stream tag")
        return plaintext


class _AegisNonces:
    """Frame i's nonce: the 32-byte header with i XORed into its last 8 bytes. The key is
    the connection's and the direction's own, so no nonce ever repeats under a key."""

    def __init__(self, header: bytes) -> None:
        self._prefix = header[:24]
        self._base = int.from_bytes(header[24:], "little")
        self._next = 0

    def next(self) -> bytes:
        i = self._next
        if i >= _COUNTER_END:
            raise ProtocolError("the stream has sealed 2**64 frames")
        self._next = i + 1
        return self._prefix + (self._base ^ i).to_bytes(8, "little")


class AegisSealer:
    """Sealer's interface, for the aegis256 suite."""

    def __init__(self, key: bytes) -> None:
        if len(key) != lib.crypto_aead_aegis256_keybytes():
            raise ValueError("bad key length")
        self._key = bytes(key)
        self.header = nacl.utils.random(AEGIS_HEADER_BYTES)
        self._nonces = _AegisNonces(self.header)

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        return bytes(self.seal_framed(plaintext, 0))

    def seal_framed(
        self, plaintext: bytes | bytearray | memoryview, room: int = LEN_ROOM
    ) -> bytearray:
        n = len(plaintext)
        if n > _AEGIS_MAX:
            raise ValueError("message too long to seal")
        out = bytearray(room + n + AEGIS_ABYTES)
        rc = lib.crypto_aead_aegis256_encrypt(
            ffi.from_buffer(_UCHARS, out) + room, ffi.NULL, ffi.from_buffer(_UCHARS, plaintext),
            n, ffi.NULL, 0, ffi.NULL, self._nonces.next(), self._key,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError("sealing failed")
        return out

    def seal_inplace(self, buf: bytearray, start: int, n: int) -> int:
        """Seal ``buf[start:start+n]`` where it lies, the tag right after it (``buf`` must
        have AEGIS_ABYTES of room there): a big reply built in its frame buffer is never
        copied. Returns the sealed length."""
        if n > _AEGIS_MAX or len(buf) < start + n + AEGIS_ABYTES:
            raise ValueError("no room to seal in place")
        with ffi.from_buffer(_UCHARS, buf) as whole:  # released after: buf may be resized
            p = whole + start
            rc = lib.crypto_aead_aegis256_encrypt(
                p, ffi.NULL, p, n, ffi.NULL, 0, ffi.NULL, self._nonces.next(), self._key
            )
        if rc != 0:
            raise RuntimeError("sealing failed")
        return n + AEGIS_ABYTES


class AegisOpener(_Stream):
    """Opener's interface, for the aegis256 suite: frames in order, any failure final."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != AEGIS_HEADER_BYTES or len(key) != lib.crypto_aead_aegis256_keybytes():
            raise ProtocolError("bad stream header")
        self._key = bytes(key)
        self._nonces = _AegisNonces(bytes(header))

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        n = self._plain_length(ciphertext, AEGIS_ABYTES, _AEGIS_MAX)
        # A frame in a bytearray of its own (a big one, received into place) is opened where
        # it lies and handed back shortened: no second buffer for a 1 MiB Rread.
        inplace = type(ciphertext) is bytearray and n >= _INPLACE_MIN
        plaintext = ciphertext if inplace else bytearray(n)
        with ffi.from_buffer(_UCHARS, ciphertext) as c:  # released: plaintext is resized below
            rc = lib.crypto_aead_aegis256_decrypt(
                c if inplace else ffi.from_buffer(_UCHARS, plaintext), ffi.NULL, ffi.NULL,
                c, len(ciphertext), ffi.NULL, 0, self._nonces.next(), self._key,
            )  # fmt: skip
        if rc != 0:
            self._fail(_ALTERED)
        if inplace:
            del plaintext[n:]  # the tag: shrinking a bytearray's end moves nothing
        return plaintext
