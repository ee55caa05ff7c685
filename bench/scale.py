"""Many nodes in one namespace: 32 and 100 node daemons on loopback, one mount of them all.

Reported per size: time to mount (start of `ninefs mount -f` until it says it is up, all
nodes connected), time for `cat nodes`, RSS of the mount process and of one daemon.
"""

from __future__ import annotations

from . import rig

NAME = "scale"
DESCRIPTION = "32 and 100 nodes in one namespace: mount time, `cat nodes`, RSS"


def run(quick: bool = False) -> int:
    sizes = (8, 32) if quick else (32, 100)
    reps = 2 if quick else 3
    print(f"{rig.machine()}; {reps} mounts of each size", flush=True)
    rows = []
    for n in sizes:
        mount_s, cat_s, mrss, drss, nodes_up = [], [], [], [], []
        with rig.Rig(nodes=n) as r:
            for i in range(reps):
                if i:  # mount again against the same daemons
                    r.mount.stop()
                    t = rig.time.perf_counter()
                    r.mount.start()
                    r.mount_seconds = rig.time.perf_counter() - t
                mount_s.append(r.mount_seconds)
                out = ""
                for _ in range(5):
                    t = rig.time.perf_counter()
                    out = rig.run(["cat", str(r.mnt / "nodes")])
                    cat_s.append(rig.time.perf_counter() - t)
                nodes_up.append(sum(1 for ln in out.splitlines() if " up " in f" {ln} "))
                mrss.append(rig.rss_mb(r.mount.proc.pid))
                drss.append(rig.rss_mb(r.procs[-1].proc.pid))
        print(f"{n} nodes: {min(nodes_up)}-{max(nodes_up)} up in `cat nodes`", flush=True)
        rows += [
            rig.Row(f"{n} nodes: time to mount", "s", mount_s, target="< 5 s" if n >= 100 else ""),
            rig.Row(f"{n} nodes: cat nodes", "ms", [x * 1e3 for x in cat_s]),
            rig.Row(f"{n} nodes: mount RSS", "MB", mrss, target="< 200 MB" if n >= 100 else ""),
            rig.Row(f"{n} nodes: one daemon's RSS", "MB", drss),
        ]
    print(rig.table(rows))
    return 0
