"""/jobs (placeholder while the real table is written)."""

from __future__ import annotations

from pathlib import Path

import trio

from .toolkit import Dir


class JobTable:
    def __init__(self, state: Path, *, node: str, keep: float = 3600.0) -> None:
        self.state, self.node, self.keep = state, node, keep

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def tree(self) -> Dir:
        return Dir("jobs", [])

    def counts(self) -> dict[str, int]:
        return {}
