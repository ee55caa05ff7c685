"""Threads for the node's blocking system calls (a pwrite, a read the page cache misses, a
listing): what trio.to_thread.run_sync does, for half its cost.

trio.to_thread.run_sync costs about 180 us of CPU a call here (a context copy, a capacity
limiter, the thread cache, a run_sync_soon wake-up through the scheduler); a thread of our
own that wakes exactly its caller through an eventfd costs about 80. Each thread runs one
call at a time, so its eventfd has one waiter. Calls are never abandoned: a cancelled
caller still waits for its call to end (as to_thread does by default), since the call
may be writing into the caller's buffer or using its descriptor.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

MAX_THREADS = 16  # beyond this many calls at once, trio's own threads take the rest


class _Thread:
    def __init__(self) -> None:
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], list[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="ninefs-io", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, box = self.calls.get()
            try:
                result = (True, call())
            except BaseException as e:  # handed to the caller, raised there
                result = (False, e)
            # nothing of the call may outlive it here: it may hold a view of the caller's
            # buffer, which the caller is free to resize once it has the result
            del call
            box.append(result)
            del box, result
            os.eventfd_write(self.wake, 1)


_idle: list[_Thread] = []
_made = 0


async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a thread; its result, or its exception raised here."""
    global _made
    await trio.lowlevel.checkpoint_if_cancelled()
    call = functools.partial(fn, *args, **kwargs)
    if _idle:
        t = _idle.pop()
    elif _made < MAX_THREADS:
        _made += 1
        t = _Thread()
    else:
        return await trio.to_thread.run_sync(call)
    box: list[Any] = []
    t.calls.put((call, box))
    with trio.CancelScope(shield=True):  # see the module's docstring
        while not box:
            await trio.lowlevel.wait_readable(t.wake)
            try:
                os.eventfd_read(t.wake)
            except BlockingIOError:
                pass  # woken by what an earlier call left: look again
    _idle.append(t)
    ((ok, value),) = box
    # An exception's traceback keeps this frame: let it keep none of the call's arguments
    # (a view of the caller's buffer), nor the exception itself (a cycle).
    del fn, args, kwargs, call, box
    if ok:
        return value
    try:
        raise value
    finally:
        del value
