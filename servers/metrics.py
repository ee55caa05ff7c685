"""/metrics: the node's figures in Prometheus text format."""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil

from .toolkit import Text


def _line(name: str, value: float, help_: str, kind: str = "gauge", labels: str = "") -> str:
    return f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{labels} {value}\n"


def entry(
    node: str, stats: Callable[[], dict[str, float]], jobs: Callable[[], dict[str, int]]
) -> Text:
    def render(ctx: object) -> str:
        vm = psutil.virtual_memory()
        l1, l5, l15 = os.getloadavg()
        out = [
            _line("ninefs_load1", l1, "1-minute load average"),
            _line("ninefs_load5", l5, "5-minute load average"),
            _line("ninefs_load15", l15, "15-minute load average"),
            _line("ninefs_cpus", psutil.cpu_count() or 1, "logical cpus"),
            _line("ninefs_memory_total_bytes", vm.total, "physical memory"),
            _line("ninefs_memory_available_bytes", vm.available, "memory available"),
        ]
        for k, v in sorted(stats().items()):
            kind = "counter" if k.endswith("_total") else "gauge"
            out.append(_line(f"ninefs_{k}", v, k.replace("_", " "), kind))
        out.append("# HELP ninefs_jobs jobs by state\n# TYPE ninefs_jobs gauge\n")
        out.extend(f'ninefs_jobs{{state="{s}"}} {n}\n' for s, n in sorted(jobs().items()))
        return "".join(out).replace("\n\n", "\n")

    return Text("metrics", render)
