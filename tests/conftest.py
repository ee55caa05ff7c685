"""Shared fixtures: an identity, real node daemons in subprocesses, a connected client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ninefs.protocol.client import Client, connect
from ninefs.protocol.keys import KnownNodes

from .cluster import Identity, MountProc, NodeProc, make_identity, make_node, write_namespace


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


@pytest.fixture
def cluster(tmp_path: Path, identity: Identity) -> Iterator[list[NodeProc]]:
    """Three node daemons (n1, n2, n3) admitting ``identity``; all stopped afterwards."""
    nodes = [make_node(tmp_path, f"n{i}", identity) for i in (1, 2, 3)]
    try:
        for n in nodes:
            n.start()
        yield nodes
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def mount(tmp_path: Path, identity: Identity, cluster: list[NodeProc]) -> Iterator[Path]:
    """The three-node cluster mounted with FUSE; unmounted afterwards even if the test fails."""
    ns = write_namespace(tmp_path / "namespace", cluster)
    mp = MountProc(tmp_path / "mnt", ns, identity.home)
    try:
        mp.start()
        yield mp.mountpoint
    finally:
        mp.stop()
