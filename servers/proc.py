"""/proc (placeholder)."""

from __future__ import annotations

from .toolkit import Dir


def tree(jobs: object) -> Dir:
    return Dir("proc", [])
