"""The per-user key that authenticates snapshot manifests (docs/snapshots.md, "Trust").

A snapshot's manifest names host files: the disks a restore opens read-write, the taps
it attaches to. A plain checksum over it proves nothing, since anyone can recompute one
(issue 19: a forged manifest made kvmm attach a host file of the forger's choosing to
the guest, read-write). So the manifest carries an HMAC-SHA256 (RFC 2104) under a key
only the user can read: a manifest that verifies was written by a kvmm of this user,
and its disk paths are ones the user named when booting that VM. A snapshot from
elsewhere (another user, another host, a download) fails it and is refused, unless the
user gives kvmm that key (``KVMM_SNAPSHOT_KEY``), which is the user's say.

The key is 32 random bytes in ``$KVMM_SNAPSHOT_KEY``, else
``$XDG_CONFIG_HOME/kvmm/snapshot.key`` (``~/.config/kvmm/snapshot.key``), created with
mode 0600 (its directory 0700) by the first snapshot. A key file that is not a regular
file, not the user's own, readable or writable by group or others, or not 32 bytes is
refused: someone else could have written or read it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import SnapshotError
from .files import open_input

KEY_ENV = "KVMM_SNAPSHOT_KEY"
KEY_BYTES = 32  # SHA-256's block is 64 bytes; RFC 2104 section 3: at least the output length (32)


def key_path() -> Path:
    """Where this user's snapshot key lives (the module docstring says how it is chosen)."""
    given = os.environ.get(KEY_ENV)
    if given:
        return Path(given)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "kvmm" / "snapshot.key"


def _check(path: Path, fd_stat: os.stat_result) -> None:
    if fd_stat.st_uid != os.geteuid():
        raise SnapshotError(f"the snapshot key {path} belongs to uid {fd_stat.st_uid}, not to this user: refused")
    if stat.S_IMODE(fd_stat.st_mode) & 0o077:
        raise SnapshotError(f"the snapshot key {path} has mode {stat.S_IMODE(fd_stat.st_mode):04o}: others may read "
                            f"or change it, so it proves nothing (chmod 600 {path}, or delete it to make a new one)")


def load_key(create: bool = False) -> bytes:
    """This user's snapshot key; with ``create``, made first if there is none. Raises
    SnapshotError for a key file that cannot be trusted or read (or is missing, without
    ``create``)."""
    path = key_path()
    if create and not path.exists():
        _create(path)
    if not path.exists() and not path.is_symlink():
        raise SnapshotError(f"there is no snapshot key {path}: this user's kvmm has made no snapshot here, so no "
                            f"snapshot can be authenticated (one made elsewhere needs that kvmm's key: "
                            f"{KEY_ENV}=PATH)")
    fd = open_input(path, "snapshot key", SnapshotError, nofollow=True)
    try:
        _check(path, os.fstat(fd))  # on the descriptor: not a name another process could swap meanwhile
        key = os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot key {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise SnapshotError(f"the snapshot key {path} is not {KEY_BYTES} bytes: damaged (delete it to make a new one)")
    return key


def _create(path: Path) -> None:
    """32 random bytes at ``path``, mode 0600, appearing whole or not at all: written to a
    temporary file beside it and hard-linked into place, so two kvmm processes making
    their first snapshot at once agree on one key (the loser's link fails with EEXIST)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise SnapshotError(f"cannot create the snapshot key {path}: {exc.strerror}") from None


def sign(key: bytes, canonical_manifest: bytes) -> str:
    """The manifest's authentication code: HMAC-SHA256 of its canonical JSON, hex."""
    return hmac.new(key, canonical_manifest, hashlib.sha256).hexdigest()


def verify(key: bytes, canonical_manifest: bytes, code: str) -> bool:
    """Whether ``code`` is the manifest's HMAC under ``key`` (compared in constant time)."""
    return hmac.compare_digest(sign(key, canonical_manifest), code)
