"""/mem: total, free, available; each one number of bytes."""

from __future__ import annotations

import psutil

from .toolkit import Dir, Text


def tree() -> Dir:
    def field(name: str) -> Text:
        return Text(name, lambda ctx: f"{getattr(psutil.virtual_memory(), name)}\n")

    return Dir("mem", [field("total"), field("free"), field("available")])
