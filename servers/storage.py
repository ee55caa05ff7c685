"""/storage (placeholder while the passthrough is written)."""

from __future__ import annotations

from pathlib import Path

from .toolkit import Dir


def tree(export: Path) -> Dir:
    return Dir("storage", [])
