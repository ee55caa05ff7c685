"""Errors that cross the wire, and the one error the decoder raises.

A 9P error is a string; ours carries an errno name as well, so the FUSE side can return
the exact errno. Only names in ``errno.errorcode`` travel; anything else becomes EIO.
"""

from __future__ import annotations

import contextlib
import errno as _errno
from collections.abc import Iterator

__all__ = ["NineError", "ProtocolError", "collapse_groups", "errno_name", "errno_number"]


def errno_number(name: str) -> int:
    """The errno number for a name such as ``"ENOENT"``; EIO for names we do not know."""
    number = getattr(_errno, name, None) if name in _errno.errorcode.values() else None
    return number if isinstance(number, int) else _errno.EIO


def errno_name(number: int) -> str:
    return _errno.errorcode.get(number, "EIO")


class NineError(Exception):
    """An error a file server returns for one request (an Rerror on the wire)."""

    def __init__(self, ename: str | int, message: str = "") -> None:
        if isinstance(ename, int):
            ename = errno_name(ename)
        if ename not in _errno.errorcode.values():
            ename = "EIO"
        self.ename = ename
        self.errno = errno_number(ename)
        self.message = message or ename
        super().__init__(f"{ename}: {self.message}")


class ProtocolError(Exception):
    """A frame or message that breaks the protocol. The connection that sent it is closed."""


@contextlib.contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise a nursery's group of one exception as that exception, so callers can catch
    NineError or ConnectionClosed plainly (trio wraps everything in groups)."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from None
