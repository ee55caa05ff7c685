"""Shared fixtures: an identity, real node daemons in subprocesses, a connected client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ninefs.protocol.client import Client, connect
from ninefs.protocol.keys import KnownNodes

from .cluster import Identity, NodeProc, make_identity, make_node


@pytest.fixture
def identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Identity:
    who = make_identity(tmp_path / "home")
    monkeypatch.setenv("NINEFS_HOME", str(who.home))
    return who


@pytest.fixture
def node(tmp_path: Path, identity: Identity) -> Iterator[NodeProc]:
    """One node daemon (name n1) with an export, admitting ``identity``; stopped afterwards."""
    n = make_node(tmp_path, "n1", identity)
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
async def client(node: NodeProc, identity: Identity) -> AsyncIterator[Client]:
    """A client connected and attached to ``node`` over real TCP."""
    async with connect(
        node.addr, identity.key, identity.user, KnownNodes(identity.home / "known_nodes")
    ) as c:
        yield c
