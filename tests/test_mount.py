"""The mount, driven the way a user drives it: shell commands on a real FUSE mount."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse


def sh(script: str, cwd: Path, timeout: float = 30) -> str:
    r = subprocess.run(
        ["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{script!r} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def test_design_session(mount: Path) -> None:
    """The session on DESIGN.md's first page, verbatim but for the mountpoint."""
    nodes = sh("cat nodes", mount).splitlines()
    assert [ln.split()[0] for ln in nodes] == ["n1", "n2", "n3"]
    assert all(ln.split()[2] == "up" for ln in nodes)
    assert len(sh("cat n/n1/cpu/load", mount).split()) == 3
    out = sh(
        """id=$(cat jobs/clone)
        echo 'run echo built; echo oops >&2; exit 3' > jobs/$id/ctl
        cat jobs/$id/stdout
        cat jobs/$id/wait
        echo $id""",
        mount,
    )
    built, status, jid = out.splitlines()
    assert built == "built" and status == "exit 3"
    assert jid.split(".")[0] in {"n1", "n2", "n3"}
    sh(
        "printf 'a,b\\n1,2\\n' > /tmp/results-$$.csv && cp /tmp/results-$$.csv n/n2/storage/results.csv",
        mount,
    )
    assert (mount / "n/n2/storage/results.csv").read_text() == "a,b\n1,2\n"


def test_bad_ctl_word_is_einval(mount: Path) -> None:
    # bash, not dash: dash's builtin echo reports every write error as "I/O error"
    r = subprocess.run(["bash", "-c", "id=$(cat jobs/clone); echo frobnicate > jobs/$id/ctl; rc=$?; cat jobs/$id/status; exit $rc"],
                       cwd=mount, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert "unknown command 'frobnicate'" in r.stdout
