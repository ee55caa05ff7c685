"""Sealing frames after the handshake (sans-I/O): libsodium's secretstream, one per direction.

secretstream keeps a counter inside its state, so a frame that is replayed, reordered,
dropped or altered fails to open, and the connection that carried it is closed. Each side
sends its stream header (24 public bytes) as the first frame after the handshake.
"""

from __future__ import annotations

import nacl.bindings as nb
import nacl.exceptions

from .errors import ProtocolError

HEADER_BYTES = nb.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = nb.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE


class Sealer:
    """Seals outgoing frame bodies. ``header`` must reach the peer first."""

    def __init__(self, key: bytes) -> None:
        self._state = nb.crypto_secretstream_xchacha20poly1305_state()
        self.header = nb.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)

    def seal(self, plaintext: bytes) -> bytes:
        return nb.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, None, _TAG_MESSAGE
        )


class Opener:
    """Opens incoming frame bodies in order; any failure is final for the connection."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != HEADER_BYTES:
            raise ProtocolError("bad stream header")
        self._state = nb.crypto_secretstream_xchacha20poly1305_state()
        nb.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self._broken = False

    def open(self, ciphertext: bytes) -> bytes:
        if self._broken:
            raise ProtocolError("stream already failed")
        try:
            plaintext, tag = nb.crypto_secretstream_xchacha20poly1305_pull(
                self._state, ciphertext, None
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            self._broken = True
            raise ProtocolError(
                "a sealed frame failed to open (altered, replayed or out of order)"
            ) from None
        if tag != _TAG_MESSAGE:
            self._broken = True
            raise ProtocolError("unexpected stream tag")
        return plaintext
