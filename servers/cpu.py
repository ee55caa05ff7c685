"""/cpu: ncpu, info, load, usage."""

from __future__ import annotations

import os
import platform
import time

import psutil

from .toolkit import Dir, Text

_last: list[tuple[float, list]] = []  # the two most recent cpu_times samples


def _model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usage() -> list[float]:
    """Percent busy per cpu over the last second or so (sampled on demand, no thread)."""
    now = time.monotonic()
    if not _last or now - _last[-1][0] >= 0.5:
        _last.append((now, psutil.cpu_times(percpu=True)))
        del _last[:-2]
        if len(_last) == 1:  # first call: sample over a short interval
            time.sleep(0.05)
            _last.append((time.monotonic(), psutil.cpu_times(percpu=True)))
    (_, a), (_, b) = _last[0], _last[-1]
    out = []
    for x, y in zip(a, b, strict=False):
        busy = (sum(y) - y.idle - getattr(y, "iowait", 0)) - (
            sum(x) - x.idle - getattr(x, "iowait", 0)
        )
        total = sum(y) - sum(x)
        out.append(100.0 * busy / total if total > 0 else 0.0)
    return out


def load_line() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def tree() -> Dir:
    return Dir("cpu", [
        Text("ncpu", lambda ctx: f"{psutil.cpu_count() or 1}\n"),
        Text("info", lambda ctx: f"{_model()}\n"),
        Text("load", lambda ctx: load_line() + "\n"),
        Text("usage", lambda ctx: "".join(f"cpu{i} {p:.1f}\n" for i, p in enumerate(_usage()))),
    ])  # fmt: skip
