"""``python -m bench [--quick] [--only NAME[,NAME...]] [--list]``: run the benchmark workloads.

To add a workload, write ``bench/NAME.py`` with ``NAME``, ``DESCRIPTION`` and
``run(quick: bool) -> int`` (0 on success; it prints its own table), and add its module
name to ``WORKLOADS``. Modules are imported only when they run, so one workload's missing
tool (sshfs, FUSE) never stops the others.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time

# In the order they run. Each entry is a module of this package.
WORKLOADS: list[str] = [
    "rtt",  # per-request overhead: µs per round trip for ping, synthetic and storage loops
    "protocol",  # the wire alone: sealed vs plain, latency and throughput over loopback TCP
    "seqio",  # sequential read/write through the mount vs sshfs and the local disk
    "meta",  # ls -l, stat, open-read-close of many small files vs sshfs
    "jobs",  # synthetic read latency, job launch vs ssh, jobs/s across 3 nodes
    "scale",  # 32 and 100 nodes in one namespace
]


def _load(name: str):
    return importlib.import_module(f"bench.{name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (each workload < 1 min)")
    p.add_argument("--only", default="", help="comma-separated workload names (see --list)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every workload's mounts, sshd and daemons are stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    if args.list:
        for name in WORKLOADS:
            try:
                print(f"{name:12} {_load(name).DESCRIPTION}")
            except Exception as e:  # an import failure: say so, keep listing
                print(f"{name:12} (cannot load: {e})")
        return 0

    chosen = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")

    failed = []
    for name in chosen:
        start = time.monotonic()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        try:
            rc = _load(name).run(quick=args.quick)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
        print(f"== {name}: {time.monotonic() - start:.1f} s{'' if rc == 0 else ', FAILED'}\n")
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
