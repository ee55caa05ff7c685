"""Sealing frames after the handshake (sans-I/O): libsodium's secretstream, one per direction.

secretstream keeps a counter inside its state, so a frame that is replayed, reordered,
dropped or altered fails to open, and the connection that carried it is closed. Each side
sends its stream header (24 public bytes) as the first frame after the handshake.
"""

from __future__ import annotations

import nacl.bindings as nb
from nacl._sodium import ffi, lib

from .errors import ProtocolError

HEADER_BYTES = nb.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = nb.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_MAX_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_MESSAGEBYTES_MAX
_UCHARS = "unsigned char[]"
LEN_ROOM = 4  # the frame length that Channel.send writes in front of a sealed body


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


class Opener:
    """Opens incoming frame bodies in order; any failure is final for the connection."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != HEADER_BYTES:
            raise ProtocolError("bad stream header")
        self._state = nb.crypto_secretstream_xchacha20poly1305_state()
        nb.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self._broken = False
        self._tag = ffi.new("unsigned char *")

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        if self._broken:
            raise ProtocolError("stream already failed")
        # libsodium directly, into a buffer of our own: PyNaCl's binding wants bytes in and
        # copies its output once more; the checks are libsodium's, the same either way.
        # The plaintext is a fresh bytearray that the caller owns (decode may keep views).
        n = len(ciphertext) - ABYTES
        if n < 0 or n > _MAX_MESSAGE:
            self._broken = True
            raise ProtocolError("a sealed frame of a bad length")
        plaintext = bytearray(n)
        tag = self._tag
        rc = lib.crypto_secretstream_xchacha20poly1305_pull(
            self._state.statebuf, ffi.from_buffer(_UCHARS, plaintext), ffi.NULL, tag,
            ffi.from_buffer(_UCHARS, ciphertext), len(ciphertext), ffi.NULL, 0,
        )  # fmt: skip
        if rc != 0:
            self._broken = True
            raise ProtocolError("a sealed frame failed to open (altered, replayed or out of order)")
        if tag[0] != _TAG_MESSAGE:
            self._broken = True
            raise ProtocolError("unexpected stream tag")
        return plaintext
