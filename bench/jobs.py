"""Synthetic files and jobs through the mount of a 3-node cluster.

- reading /n/n1/cpu/load from one process in a loop: open-read-close each time (what `cat`
  does), and pread at offset 0 on one open descriptor; p50 and p99 of each iteration;
- job launch end to end, `id=$(cat jobs/clone); echo 'exec /bin/true' > jobs/$id/ctl;
  cat jobs/$id/wait`, done with the same system calls from one Python process (and, as
  a shell script, with bash and cat), against `ssh localhost true` (the sshfs peer's sshd);
- jobs/s through /jobs/clone with many launches at once (threads in one process), placed by
  the cluster across the 3 nodes.
Each loop runs in its own process and times itself (interpreter start-up is not counted).
"""

from __future__ import annotations

import sys

from . import rig

NAME = "jobs"
DESCRIPTION = "synthetic read latency, job launch p50/p99 vs ssh, jobs/s across 3 nodes"

_LOOP = r"""
import os, sys, time, threading
mode, mnt, n = sys.argv[1], sys.argv[2], float(sys.argv[3])

def rd(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        out = b""
        while b := os.read(fd, 65536):
            out += b
        return out
    finally:
        os.close(fd)

def launch():
    jid = rd(f"{mnt}/jobs/clone").decode().strip()
    fd = os.open(f"{mnt}/jobs/{jid}/ctl", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"exec /bin/true\n")
    finally:
        os.close(fd)
    st = rd(f"{mnt}/jobs/{jid}/wait")
    if not st.startswith(b"exit 0"):
        raise SystemExit(f"job {jid}: {st!r}")

out = []
if mode == "cat":
    p = f"{mnt}/n/n1/cpu/load"
    for _ in range(int(n)):
        t = time.perf_counter_ns(); rd(p); out.append(time.perf_counter_ns() - t)
elif mode == "pread":
    fd = os.open(f"{mnt}/n/n1/cpu/load", os.O_RDONLY)
    for _ in range(int(n)):
        t = time.perf_counter_ns(); os.pread(fd, 4096, 0); out.append(time.perf_counter_ns() - t)
    os.close(fd)
elif mode == "launch":
    for _ in range(int(n)):
        t = time.perf_counter_ns(); launch(); out.append(time.perf_counter_ns() - t)
elif mode == "rate":
    threads, seconds = int(sys.argv[4]), n
    done, errors, stop = [0], [], time.monotonic() + seconds
    def worker():
        try:
            while time.monotonic() < stop:
                launch(); done[0] += 1
        except BaseException as e:
            errors.append(e)
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    if errors:
        raise SystemExit(f"{len(errors)} launchers failed: {errors[0]!r}")
    print(done[0] / (time.monotonic() - t0)); raise SystemExit
print(" ".join(str(x) for x in out))
"""


def _loop(mode: str, mnt, n: float, *extra: str) -> list[float]:
    out = rig.run([sys.executable, "-c", _LOOP, mode, str(mnt), str(n), *extra])
    return [float(x) for x in out.split()]


def run(quick: bool = False) -> int:
    n_read = 500 if quick else 3000
    n_launch = 40 if quick else 300
    n_ssh = 5 if quick else 20
    rate_s = 3 if quick else 10
    threads = 32
    reps = 1 if quick else 3
    print(f"{rig.machine()}; 3 nodes; {reps} run(s) of each loop", flush=True)
    cat, pread, launch, shell, sshs, rates = [], [], [], [], [], []
    with rig.Rig(nodes=3, sshfs=True) as r:
        mnt = r.mnt
        _loop("cat", mnt, 50)  # warm up
        _loop("launch", mnt, 5)
        script = "id=$(cat jobs/clone); echo 'exec /bin/true' > jobs/$id/ctl; cat jobs/$id/wait >/dev/null"
        for _ in range(reps):
            cat += [x / 1e6 for x in _loop("cat", mnt, n_read)]
            pread += [x / 1e6 for x in _loop("pread", mnt, n_read)]
            launch += [x / 1e6 for x in _loop("launch", mnt, n_launch)]
            for _ in range(n_launch // 10):
                shell.append(1e3 * rig.timed(lambda: rig.run(["bash", "-c", script], cwd=mnt)))
            for _ in range(n_ssh):
                sshs.append(1e3 * rig.timed(lambda: rig.ssh("true")))
            rates += _loop("rate", mnt, rate_s, str(threads))
    rows = [
        rig.Row("read n/n1/cpu/load: open-read-close", "ms", cat, target="p50 < 1 ms", hi=0.99),
        rig.Row("read n/n1/cpu/load: pread, open fd", "ms", pread, hi=0.99),
        rig.Row("job launch (clone, ctl, wait), ms", "ms", launch, "ssh true", sshs, "p50 < 20 ms", hi=0.99),  # noqa: E501
        rig.Row("  the same as a bash script", "ms", shell, "ssh true", sshs, hi=0.99),
        rig.Row(f"jobs/s via /jobs/clone, {threads} at once", "/s", rates, target=">= 100/s"),
    ]  # fmt: skip
    print(rig.table(rows))
    return 0
