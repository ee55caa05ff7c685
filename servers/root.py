"""A node's whole tree: /node /cpu /mem /proc /jobs /storage /metrics, as one table."""

from __future__ import annotations

from ninefs.protocol.errors import NineError
from ninefs.protocol.fs import File, Principal, Tree

from . import cpu, mem, node
from .toolkit import Dir, Entry, SynthFile


class NodeTree(Tree):
    """The root every connection attaches to, trimmed to what the connection's key may reach."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.root = Dir("", self._visible, lookup=self._lookup)

    def _visible(self, ctx: Principal) -> list[Entry]:
        g = ctx.grant
        return [e for e in self.entries if g is None or g.may_reach("/" + e.name)]

    def _lookup(self, ctx: Principal, name: str) -> Entry | None:
        return next((e for e in self._visible(ctx) if e.name == name), None)

    async def attach(self, principal: Principal, aname: str) -> File:
        if aname.strip("/"):
            raise NineError("ENOENT", f"no tree {aname!r}; attach to the root")
        return SynthFile(self.root, principal, "/")


def base_entries(name: str, labels: list[str]) -> list[Entry]:
    return [node.tree(name, labels), cpu.tree(), mem.tree()]
