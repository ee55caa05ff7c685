"""The mount's write-behind (ninefs/writeback.py) on its own: a send we control stands in
for the node, so every ordering is forced, not hoped for. The mount tests drive the same
code through FUSE with a real node and a full disk (test_mount.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ninefs.protocol.errors import NineError
from ninefs.writeback import MAX_IN_FLIGHT, WriteBehind

T = 5


class Node:
    """A send whose writes finish when the test says, in any order it likes."""

    def __init__(self) -> None:
        self.started: list[tuple[int, int]] = []  # (offset, length), in the order sent
        self.gates: dict[int, trio.Event] = {}
        self.fail: dict[int, NineError] = {}
        self.short: set[int] = set()

    async def send(self, offset: int, data: bytes) -> int:
        self.started.append((offset, len(data)))
        gate = self.gates.setdefault(offset, trio.Event())
        await gate.wait()
        if offset in self.fail:
            raise self.fail[offset]
        return len(data) - 1 if offset in self.short else len(data)

    def finish(self, offset: int) -> None:
        self.gates.setdefault(offset, trio.Event()).set()


async def test_writes_return_at_once_and_drain_waits_for_them(nursery):
    node = Node()
    wb = WriteBehind(node.send, nursery, trio.Semaphore(64))
    with trio.fail_after(T):
        for i in range(4):
            assert await wb.write(i * 10, b"x" * 10) == 10  # queued, not yet done
        await trio.testing.wait_all_tasks_blocked()
        assert node.started == [(0, 10), (10, 10), (20, 10), (30, 10)]
        async with trio.open_nursery() as n:
            n.start_soon(wb.drain)
            await trio.testing.wait_all_tasks_blocked()
            for off in (30, 0, 20):
                node.finish(off)
            await trio.testing.wait_all_tasks_blocked()
            assert n.child_tasks  # drain still waits for the one at 10
            node.finish(10)


async def test_the_first_error_reaches_later_writes_and_drain(nursery):
    node = Node()
    wb = WriteBehind(node.send, nursery, trio.Semaphore(64))
    node.fail[10] = NineError("ENOSPC", "disk full")
    with trio.fail_after(T):
        await wb.write(0, b"a" * 10)
        await wb.write(10, b"b" * 10)
        node.finish(0)
        node.finish(10)
        await wb.settle()  # settle waits but does not raise: reads and stats use it
        with pytest.raises(NineError) as e:
            await wb.write(20, b"c")
        assert e.value.ename == "ENOSPC"
        for _ in range(2):  # and it stays: every close and fsync hears of it
            with pytest.raises(NineError) as e:
                await wb.drain()
            assert e.value.ename == "ENOSPC"


async def test_a_short_write_is_an_error(nursery):
    node = Node()
    wb = WriteBehind(node.send, nursery, trio.Semaphore(64))
    node.short.add(0)
    with trio.fail_after(T):
        await wb.write(0, b"x" * 100)
        node.finish(0)
        with pytest.raises(NineError) as e:
            await wb.drain()
        assert e.value.ename == "ENOSPC" and "99 of 100" in e.value.message


async def test_an_overlapping_write_waits_for_the_one_it_overlaps(nursery):
    node = Node()
    wb = WriteBehind(node.send, nursery, trio.Semaphore(64))
    with trio.fail_after(T):
        await wb.write(0, b"a" * 10)
        await wb.write(100, b"b" * 10)  # apart: goes at once
        async with trio.open_nursery() as n:
            n.start_soon(wb.write, 5, b"c" * 10)  # over the first
            await trio.testing.wait_all_tasks_blocked()
            assert node.started == [(0, 10), (100, 10)]
            node.finish(100)
            await trio.testing.wait_all_tasks_blocked()
            assert node.started == [(0, 10), (100, 10)]  # the one it overlaps is not done
            node.finish(0)
        await trio.testing.wait_all_tasks_blocked()  # the queued write's task has run
        assert node.started[-1] == (5, 10)
        node.finish(5)
        await wb.drain()


async def test_in_flight_bytes_are_bounded_per_file_and_per_mount(nursery):
    node = Node()
    slots = trio.Semaphore(3)
    a, b = (WriteBehind(node.send, nursery, slots) for _ in range(2))
    chunk = b"x" * (MAX_IN_FLIGHT // 2)
    with trio.fail_after(T):
        await a.write(0, chunk)
        await a.write(len(chunk), chunk)
        async with trio.open_nursery() as n:
            n.start_soon(a.write, 2 * len(chunk), chunk)  # over a's own bound
            await trio.testing.wait_all_tasks_blocked()
            assert len(node.started) == 2
            await b.write(1 << 40, b"y")  # b has room, and the mount has one slot left
            n.start_soon(b.write, (1 << 40) + 1, b"z")  # the mount's slots are all taken
            await trio.testing.wait_all_tasks_blocked()
            assert len(node.started) == 3
            node.finish(0)  # frees a slot and room in a: both waiters may go, one by one
            await trio.testing.wait_all_tasks_blocked()
            assert len(node.started) == 4
            for off, _ in list(node.started):
                node.finish(off)
            await trio.testing.wait_all_tasks_blocked()
            for off, _ in list(node.started):
                node.finish(off)
        await a.drain()
        await b.drain()


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()
