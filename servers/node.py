"""/node: name, uptime, os, arch, labels, version."""

from __future__ import annotations

import platform
import time

import psutil

from .toolkit import Dir, Text

VERSION = "0.1.0"


def tree(name: str, labels: list[str]) -> Dir:
    return Dir("node", [
        Text("name", lambda ctx: f"{name}\n"),
        Text("uptime", lambda ctx: f"{int(time.time() - psutil.boot_time())}\n"),
        Text("os", lambda ctx: f"{platform.system()} {platform.release()}\n"),
        Text("arch", lambda ctx: f"{platform.machine()}\n"),
        Text("labels", lambda ctx: "".join(f"{x}\n" for x in labels)),
        Text("version", lambda ctx: f"ninefs {VERSION}\n"),
    ])  # fmt: skip
