"""Identity keys, the client's known-nodes file and the node's authorized-users file.

Keys are Ed25519. A public key is written as its 32 bytes in base64 (44 characters), a
fingerprint as ssh writes one (``SHA256:`` and unpadded base64 of the key's SHA-256).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

log = logging.getLogger(__name__)


class KeyError_(Exception):
    """A key file is missing, unreadable or malformed; the message says which and how to fix it."""


def encode_public(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_public(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"not a public key: {text!r:.60}") from None
    if len(key) != 32:
        raise KeyError_(f"not a public key (want 32 bytes, got {len(key)}): {text!r:.60}")
    return key


def fingerprint(key: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


def write_private(path: Path, key: nacl.signing.SigningKey) -> None:
    """Write a new key file readable only by its owner (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(bytes(key)).decode() + "\n")


def load_private(path: Path) -> nacl.signing.SigningKey:
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode & 0o777
            text = f.read().strip()
    except FileNotFoundError:
        raise KeyError_(f"no key at {path}: run `ninefs keygen` first") from None
    except OSError as e:
        raise KeyError_(f"cannot read key {path}: {e.strerror}") from None
    if mode & 0o077:
        # as ssh: a key others can read is no longer only ours, and is refused, not used
        raise KeyError_(
            f"{path} is open to others (mode {mode:04o}): run `chmod 600 {path}`, and if "
            "others may have read it, make a new key"
        )
    try:
        seed = base64.b64decode(text, validate=True)
        return nacl.signing.SigningKey(seed)
    except (binascii.Error, ValueError, TypeError):
        raise KeyError_(f"{path} is not a ninefs key file") from None


def load_or_create(path: Path) -> nacl.signing.SigningKey:
    """The key at ``path``, made on first use (a node's identity)."""
    if not path.exists():
        key = nacl.signing.SigningKey.generate()
        try:
            write_private(path, key)
            log.info("created identity key %s (%s)", path, fingerprint(bytes(key.verify_key)))
        except FileExistsError:
            pass  # another process made it first: use theirs
    return load_private(path)


class HostKeyChanged(Exception):
    """A node presented a key other than the one pinned for its address."""


class KnownNodes:
    """The client's pins: one ``ADDR PUBKEY`` per line, added on first use (as ssh's known_hosts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, bytes]:
        pins: dict[str, bytes] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return pins
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#"):
                try:
                    pins[parts[0]] = decode_public(parts[1])
                except KeyError_:
                    log.warning("%s: ignoring a malformed line", self.path)
        return pins

    def check(self, addr: str, key: bytes) -> None:
        """Accept a pinned key, pin an unknown one, refuse a changed one."""
        pinned = self._load().get(addr)
        if pinned == key:
            return
        if pinned is not None:
            raise HostKeyChanged(
                f"the key of node {addr} has changed: pinned {fingerprint(pinned)}, "
                f"offered {fingerprint(key)}. If the node was re-keyed on purpose, remove "
                f"its line from {self.path}"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "a") as f:
            f.write(f"{addr} {encode_public(key)}\n")
        log.warning("pinned new node %s with key %s", addr, fingerprint(key))


@dataclass(frozen=True)
class Grant:
    """What one authorized key may do on a node."""

    key: bytes
    user: str
    trees: tuple[str, ...] = ()  # empty: every tree
    read_only: bool = False
    expires: _dt.date | None = None
    source: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def to_line(self) -> str:
        words = [encode_public(self.key), self.user]
        if self.read_only:
            words.append("ro")
        if self.trees:
            words.append("trees=" + ",".join(self.trees))
        if self.expires:
            words.append(f"expires={self.expires.isoformat()}")
        if self.source:
            words.append("from=" + ",".join(str(n) for n in self.source))
        return " ".join(words)

    def admits(self, peer_ip: str | None, today: _dt.date | None = None) -> str | None:
        """None if this grant admits a connection now from ``peer_ip``; else the reason not."""
        today = today or _dt.date.today()
        if self.expires and today > self.expires:
            return f"key expired on {self.expires}"
        if self.source:
            if peer_ip is None:
                return "source address unknown"
            ip = ipaddress.ip_address(peer_ip)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped  # a dual-stack listener sees ::ffff:10.0.0.5
            if not any(ip in net for net in self.source):
                return f"source {peer_ip} not allowed"
        return None

    def may_reach(self, tree: str) -> bool:
        return not self.trees or tree in self.trees


def parse_grant(line: str) -> Grant:
    words = line.split()
    if len(words) < 2:
        raise KeyError_(
            "a line is: PUBKEY USER [ro] [trees=/a,/b] [expires=YYYY-MM-DD] [from=CIDR,...]"
        )
    key, user, opts = decode_public(words[0]), words[1], words[2:]
    trees: tuple[str, ...] = ()
    ro, expires, source = False, None, ()
    for o in opts:
        name, _, value = o.partition("=")
        try:
            if o == "ro":
                ro = True
            elif name == "trees":
                trees = tuple("/" + t.strip("/") for t in value.split(",") if t.strip("/"))
            elif name == "expires":
                expires = _dt.date.fromisoformat(value)
            elif name == "from":
                source = tuple(ipaddress.ip_network(n, strict=False) for n in value.split(","))
            else:
                raise KeyError_(f"unknown option {o!r}")
        except ValueError as e:
            raise KeyError_(f"bad option {o!r}: {e}") from None
    return Grant(key, user, trees, ro, expires, source)


class AuthorizedUsers:
    """The node's authorized-users file, re-read when it changes so edits need no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._grants: dict[bytes, Grant] = {}
        self.problem = ""  # why the file grants nothing, when it is unsafe

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._grants = None, {}  # fail closed: no file, no access
            return
        # The inode and ctime too: `revoke` replaces the file, and an edit within one
        # coarse mtime tick that keeps the size must still be seen.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode, st.st_uid)
        if stamp == self._stamp:
            return
        self.problem = self.unsafe(st)
        if self.problem:
            # as sshd's StrictModes: a file others may edit grants nothing (fail closed)
            log.error("%s: %s; no key is admitted until it is fixed", self.path, self.problem)
            self._stamp, self._grants = stamp, {}
            return
        grants: dict[bytes, Grant] = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                g = parse_grant(line)
                grants[g.key] = g
            except KeyError_ as e:
                log.warning("%s:%d: %s", self.path, n, e)
        self._stamp, self._grants = stamp, grants

    @staticmethod
    def unsafe(st: os.stat_result) -> str:
        """Why a file with this stat may not grant access ('' if it may)."""
        if st.st_uid not in (0, os.geteuid()):
            return f"owned by uid {st.st_uid}, not by this node's user or root"
        if st.st_mode & 0o022:
            return f"writable by others (mode {st.st_mode & 0o777:04o}): run chmod go-w"
        return ""

    def lookup(self, key: bytes) -> Grant | None:
        self._refresh()
        return self._grants.get(key)

    def add(self, grant: Grant) -> None:
        self.remove(grant.key)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "a") as f:
            f.write(grant.to_line() + "\n")

    def remove(self, key: bytes) -> bool:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return False
        keep = [ln for ln in lines if not ln.split() or ln.split()[0] != encode_public(key)]
        if len(keep) == len(lines):
            return False
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)
        return True
