"""The trio shell around framing, handshake and sealing: a sealed, framed connection.

``dial`` opens TCP (``HOST:PORT``) or a Unix socket (``unix:PATH`` or an absolute path) and
runs the client's handshake; ``accept`` runs the node's. Both give a ``Channel`` whose
``send``/``receive`` move whole plaintext frame bodies.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import nacl.signing
import trio

from .errors import ProtocolError
from .framing import _LEN, LEN_SIZE, SPARES, FrameReader, frame
from .handshake import (
    MAX_HANDSHAKE_MSG,
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    TrafficKeys,
)
from .keys import KnownNodes
from .messages import MIN_MSIZE
from .sealing import MAX_ABYTES, AegisOpener, Opener, opener_for, sealer_for

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for the whole handshake, either side
BIG_FRAME = 64 << 10  # frames at least this long are received straight into their buffer
FRAME_TIMEOUT = 60.0  # seconds from a frame's first byte to its last, once the channel is up
DEFAULT_PORT = 5640


async def take(sem: trio.Semaphore) -> None:
    """``sem.acquire()`` without a trip through the scheduler when a unit is free (a
    pending cancellation is still taken, as acquire would)."""
    if sem.value:
        await trio.lowlevel.checkpoint_if_cancelled()
        sem.acquire_nowait()
    else:
        await sem.acquire()


class ConnectionClosed(Exception):
    """The peer closed the connection or it broke."""


def parse_addr(addr: str) -> tuple[str, str | int]:
    """("unix", path) or (host, port) for an address as users write it."""
    if addr.startswith("unix:"):
        return "unix", addr[5:]
    if addr.startswith("/"):
        return "unix", addr
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, DEFAULT_PORT
    host = host.strip("[]")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"bad address {addr!r}: want HOST:PORT") from None


def _tune(stream: trio.abc.Stream) -> None:
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    # Keepalive finds a peer that vanished without a FIN even when we have nothing to send.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


async def open_stream(addr: str) -> trio.abc.Stream:
    host, port = parse_addr(addr)
    if host == "unix":
        stream = await trio.open_unix_socket(str(port))
    else:
        stream = await trio.open_tcp_stream(host, int(port))
    _tune(stream)
    return stream


class Channel:
    """A framed connection sealed in both directions. ``send`` may be called from many tasks."""

    def __init__(
        self, stream: trio.abc.Stream, reader: FrameReader, keys: TrafficKeys, peer: str
    ) -> None:
        self.stream = stream
        self.peer = peer
        self._reader = reader
        self._sock = getattr(stream, "socket", None)  # big frames are received into place
        # trio's non-blocking stdlib socket under it, for sends that complete at once
        self._raw = getattr(self._sock, "_sock", None)
        if not isinstance(self._raw, socket.socket):
            self._raw = None
        self._suite = keys.suite
        self._sealer = sealer_for(keys.suite, keys.send)
        self._recv_key = keys.recv
        self._opener: Opener | AegisOpener | None = None
        self.node_key = b""
        self._send_lock = trio.Lock()
        self._header_sent = False
        self._broken = ""
        self.limit = 0
        self.set_limit(MIN_MSIZE)  # until Tversion settles msize

    def set_limit(self, plaintext_limit: int) -> None:
        self.limit = plaintext_limit
        self._reader.limit = plaintext_limit + MAX_ABYTES

    async def send(self, body: bytes) -> None:
        await self._send_sealed(lambda: self._sealer.seal_framed(body, LEN_SIZE))

    async def send_prepared(self, buf: bytearray, n: int, spare: bool = False) -> None:
        """Send the plaintext ``buf[LEN_SIZE:LEN_SIZE+n]``, built there by the caller with
        MAX_ABYTES of room after it: where the suite can, it is sealed in place (a big
        Rread read straight into its frame is never copied). ``spare``: ``buf`` came from
        SPARES and goes back there once sent."""

        def seal() -> bytearray | memoryview:
            inplace = getattr(self._sealer, "seal_inplace", None)
            if inplace is None:
                with memoryview(buf) as view:
                    return self._sealer.seal_framed(view[LEN_SIZE : LEN_SIZE + n], LEN_SIZE)
            return memoryview(buf)[: LEN_SIZE + inplace(buf, LEN_SIZE, n)]

        try:
            await self._send_sealed(seal)
        finally:
            if spare:
                SPARES.give(buf)

    async def _send_sealed(self, seal: Callable[[], bytearray | memoryview]) -> None:
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            # Uncontended: take the lock without a trip through the scheduler (acquire()
            # would yield even when the lock is free); a pending cancellation is still
            # taken below, before sealing.
            lock.acquire_nowait()
        try:
            # Sealing moves the stream's counter on, so a sealed frame must reach the peer
            # whole: take a pending cancellation now, before sealing; a send interrupted
            # after that (cancelled while blocked on a full socket) may have left half a
            # frame on the wire, and the channel is closed rather than left out of step.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._broken:
                raise ConnectionClosed(self._broken)
            # sealed in place behind room for the length: one buffer, no copies
            sealed = seal()
            try:
                _LEN.pack_into(sealed, 0, len(sealed) - LEN_SIZE)
                out = sealed if self._header_sent else frame(self._sealer.header) + sealed
                try:
                    await self._send_raw(out)
                except BaseException:
                    self._broken = "a send was interrupted in the middle of a frame"
                    with trio.CancelScope(shield=True):
                        await self.stream.aclose()
                    raise
            finally:
                if type(sealed) is memoryview:
                    sealed.release()  # a view of the caller's buffer: free it for reuse
            self._header_sent = True
        finally:
            lock.release()

    async def _send_raw(self, data: bytes | bytearray) -> None:
        try:
            sent = 0
            if self._raw is not None:
                # The whole frame usually fits the socket buffer: one send(2) with no trip
                # through the scheduler; whatever does not fit goes through trio below.
                try:
                    sent = self._raw.send(data)
                except BlockingIOError:
                    pass
                if sent == len(data):
                    return
            with memoryview(data) as view:
                await self.stream.send_all(view[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise ConnectionClosed(str(e) or "connection closed") from None

    async def _receive_raw(self) -> bytes:
        # A peer may be idle between frames for as long as it likes (keepalive finds one
        # that vanished), but a frame it has begun must be finished within FRAME_TIMEOUT:
        # a half-sent frame left hanging would hold its buffer and its connection forever.
        deadline = None
        while True:
            body = self._reader.next_frame()
            if body is not None:
                return body
            if self._reader.buffered and deadline is None:
                deadline = trio.current_time() + FRAME_TIMEOUT
            part = self._reader.start_frame(BIG_FRAME) if self._sock is not None else None
            if part is not None:
                return await self._receive_into(*part, deadline)
            try:
                size = max(self._reader.needed(), 65536)
                if deadline is None:  # between frames: no deadline, no cancel scope to set up
                    data = await self._receive_some(size)
                else:
                    with trio.move_on_at(deadline) as late:
                        data = await self._receive_some(size)
                    if late.cancelled_caught:
                        raise ProtocolError(f"a frame was not completed within {FRAME_TIMEOUT:g}s")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionClosed(str(e) or "connection closed") from None
            if not data:
                raise ConnectionClosed("connection closed by peer")
            body = self._reader.whole(data)
            if body is not None:
                return body
            self._reader.feed(data)

    async def _receive_some(self, size: int) -> bytes:
        """``stream.receive_some``, but when the bytes are there already, one recv(2) and
        no trip through the scheduler (trio's makes every receive a schedule point; the
        session's read loop yields often enough by itself)."""
        raw = self._raw
        if raw is None:
            return await self.stream.receive_some(size)
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return raw.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)

    async def _receive_into(self, body: bytearray, got: int, deadline: float) -> bytearray:
        """The rest of a big frame, received straight into its buffer."""
        view = memoryview(body)
        try:
            with trio.move_on_at(deadline) as late:
                while got < len(body):
                    n = await self._sock.recv_into(view[got:])
                    if not n:
                        raise ConnectionClosed("connection closed by peer")
                    got += n
            if late.cancelled_caught:
                raise ProtocolError(f"a frame was not completed within {FRAME_TIMEOUT:g}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise ConnectionClosed(str(e) or "connection closed") from None
        return body

    async def receive(self) -> bytes:
        """The next plaintext frame body; ConnectionClosed at the end, ProtocolError if bad."""
        if self._opener is None:
            header = bytes(await self._receive_raw())
            self._opener = opener_for(self._suite, self._recv_key, header)
        return self._opener.open(await self._receive_raw())

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def _hs_receive(stream: trio.abc.Stream, reader: FrameReader) -> bytes:
    while (body := reader.next_frame()) is None:
        data = await stream.receive_some(max(reader.needed(), 1))
        if not data:
            raise HandshakeError("connection closed during the handshake")
        reader.feed(data)
    return body


async def dial(
    addr: str, identity: nacl.signing.SigningKey, user: str, known: KnownNodes | None
) -> Channel:
    """Connect to a node and run the client's handshake; the node's key is checked against
    ``known`` (pinned on first use). Raises OSError, HandshakeError or HostKeyChanged."""
    stream = await open_stream(addr)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            reader = FrameReader(MAX_HANDSHAKE_MSG)
            hs = ClientHandshake(identity, user)
            await stream.send_all(frame(hs.hello()))
            msg3 = hs.on_reply(await _hs_receive(stream, reader))
            if known is not None:
                known.check(addr, hs.node_key)
            await stream.send_all(frame(msg3))
            keys = hs.on_verdict(await _hs_receive(stream, reader))
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    ch = Channel(stream, reader, keys, addr)
    ch.node_key = hs.node_key
    return ch


Authorizer = Callable[[bytes, str, str | None], tuple[object | None, str]]


class PublicReason(str):
    """A refusal reason the client may be told (a limit, not who is allowed): an authorizer
    returns one to have the client see it instead of the generic "access denied"."""


async def accept(
    stream: trio.abc.Stream, identity: nacl.signing.SigningKey, authorize: Authorizer
) -> tuple[Channel, str, object]:
    """Run the node's handshake on a fresh connection. ``authorize(key, user, peer_ip)``
    returns (grant, "") to admit or (None, reason) to refuse; the client is told only that
    it was refused, the reason goes to the log."""
    peer_ip = None
    try:
        peername = stream.socket.getpeername()  # type: ignore[attr-defined]
        peer_ip = peername[0] if isinstance(peername, tuple) else None
    except (AttributeError, OSError):
        pass
    _tune(stream)
    reader = FrameReader(MAX_HANDSHAKE_MSG)
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        hs = ServerHandshake(identity)
        await stream.send_all(frame(hs.on_hello(await _hs_receive(stream, reader))))
        key, user = hs.on_auth(await _hs_receive(stream, reader))
        grant, reason = authorize(key, user, peer_ip)
        if grant is None:
            text = reason if isinstance(reason, PublicReason) else "access denied"
            await stream.send_all(frame(hs.refuse(text)))
            raise HandshakeError(f"refused {user!r} from {peer_ip}: {reason}")
        msg4, keys = hs.accept()
        await stream.send_all(frame(msg4))
    return Channel(stream, reader, keys, peer_ip or "unix"), user, grant
