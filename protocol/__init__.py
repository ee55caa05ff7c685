"""The ninefs wire: message set and codec, framing, the secure channel, both ends of a session.

The modules ``messages``, ``framing``, ``handshake`` and ``sealing`` are sans-I/O: they never
touch a socket and never import trio. ``transport``, ``client`` and ``server`` are the thin
trio shell around them.
"""

from .errors import NineError, ProtocolError

__all__ = ["NineError", "ProtocolError"]
