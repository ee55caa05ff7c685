"""servers/workers.py: the node's threads for blocking calls (as trio.to_thread, cheaper)."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from ninefs.servers import workers

T = 20


async def test_results_and_errors_come_back_to_the_caller():
    with trio.fail_after(T):
        assert await workers.run(lambda a, b=0: a + b, 2, b=3) == 5
        assert await workers.run(threading.get_ident) != threading.get_ident()
        with pytest.raises(FileNotFoundError):
            await workers.run(os.stat, "/no/such/file")
        assert await workers.run(lambda: "again") == "again"  # the thread goes on


async def test_a_call_never_outlives_its_caller_and_keeps_nothing():
    """A cancelled caller still waits for its call (which may be writing into the caller's
    buffer), and once it returns or raises the buffer is the caller's alone again."""
    started, release = threading.Event(), threading.Event()
    buf = bytearray(8)

    def fill(view: memoryview) -> None:
        started.set()
        release.wait(T)
        view[:] = b"finished"

    with trio.fail_after(T):
        with memoryview(buf) as view:
            with trio.CancelScope() as scope:

                async def cancel_once_started() -> None:
                    await trio.to_thread.run_sync(started.wait, T)
                    scope.cancel()
                    release.set()

                async with trio.open_nursery() as n:
                    n.start_soon(cancel_once_started)
                    await workers.run(fill, view[:])
            assert buf == b"finished"
        del buf[4:]  # no view of it is left anywhere: it can be resized

        buf = bytearray(8)

        def fail(view: memoryview) -> None:
            raise OSError(5, "bad disk")

        with memoryview(buf) as view:
            try:
                await workers.run(fail, view[2:])
            except OSError as e:
                assert e.errno == 5
        del buf[4:]  # once the error is handled, nothing of the call is left either


async def test_more_calls_than_threads_all_complete():
    gate = threading.Barrier(workers.MAX_THREADS + 4, timeout=T)
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await workers.run(lambda: gate.wait() * 0 + i))

    with trio.fail_after(T):
        async with trio.open_nursery() as n:
            for i in range(workers.MAX_THREADS + 4):
                n.start_soon(one, i)
    assert sorted(results) == list(range(workers.MAX_THREADS + 4))
