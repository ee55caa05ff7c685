"""Where a user's ninefs files live: ``$NINEFS_HOME``, else ~/.config/ninefs."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from ninefs.protocol.keys import KnownNodes, load_private


def home() -> Path:
    env = os.environ.get("NINEFS_HOME")
    return Path(env) if env else Path.home() / ".config" / "ninefs"


def key_path() -> Path:
    return home() / "key"


def known_nodes() -> KnownNodes:
    return KnownNodes(home() / "known_nodes")


def namespace_path() -> Path:
    return home() / "namespace"


def identity():
    return load_private(key_path())


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"
