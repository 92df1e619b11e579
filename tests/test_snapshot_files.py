"""A snapshot's files as untrusted input, without a VM: the manifest's authentication
(kvmm/snapkey.py), the snapshot key's own checks, the temporaries a killed snapshot
leaves, and target names no file system takes (issue 19, defects 2, 8 and 10)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmm import snapshot as S
from kvmm.errors import SnapshotError

KEY_ENV = "KVMM_SNAPSHOT_KEY"  # kvmm.snapkey's; spelled out so this file also runs against older kvmm


def load_key(create: bool = False) -> bytes:
    from kvmm.snapkey import load_key as load

    return load(create=create)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own snapshot key (a user's key is not touched)."""
    path = tmp_path / "config" / "kvmm" / "snapshot.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


@dataclass
class TinyState:
    """Any dataclass serves as the state for the file-level checks."""

    value: int


def saved_config(disk: Path) -> S.SavedConfig:
    return S.SavedConfig(kernel="/boot/vmlinux", cmdline="console=ttyS0", mem_size=1 << 20, cpus=1,
                         disks=[S.disk_identity(str(disk), False, None)], nets=[], exitless=True, msix=True,
                         console_device="serial", rng=True, acpi=True)


def save_memory(fd: int) -> tuple[int, str]:
    os.ftruncate(fd, 1 << 20)
    return 0, hashlib.sha256().hexdigest()


def make_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 16))
    target = tmp_path / "snap"
    S.write_snapshot(target, saved_config(disk), TinyState(1), save_memory)  # type: ignore[arg-type]
    return target, disk


def forge(snap: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Edit the manifest and make it as consistent as someone without this user's key
    can: the plain SHA-256 (the format before issue 19) and an HMAC under a key of the
    forger's own."""
    data = json.loads((snap / "manifest.json").read_text())
    change(data)
    canonical = lambda field: json.dumps({**data, field: ""}, sort_keys=True, separators=(",", ":")).encode()  # noqa: E731
    if "checksum" in data:
        data["checksum"] = hashlib.sha256(canonical("checksum")).hexdigest()
    if "hmac" in data:
        data["hmac"] = hmac.new(os.urandom(32), canonical("hmac"), hashlib.sha256).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(data))


# --- defect 2: a forged manifest chooses no host file ------------------------------------
def test_forged_manifest_naming_a_host_file_as_disk_is_refused(tmp_path: Path) -> None:
    snap, _disk = make_snapshot(tmp_path)
    victim = tmp_path / "victim"  # any file the user can write: ~/.ssh/authorized_keys, ...
    victim.write_bytes(b"precious" * 1000)
    st = victim.stat()

    def point_at_victim(m: dict) -> None:  # type: ignore[type-arg]
        m["config"]["disks"][0].update(path=str(victim), size=st.st_size, mtime_ns=st.st_mtime_ns)

    forge(snap, point_at_victim)
    with pytest.raises(SnapshotError, match="fails its authentication"):
        S.read_snapshot(snap)


def test_manifest_made_under_another_users_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap, _disk = make_snapshot(tmp_path)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other-user.key"))
    load_key(create=True)
    with pytest.raises(SnapshotError, match="fails its authentication"):
        S.read_snapshot(snap)


def test_manifest_without_an_authentication_code_is_refused(tmp_path: Path) -> None:
    snap, _disk = make_snapshot(tmp_path)
    data = json.loads((snap / "manifest.json").read_text())
    del data["hmac"]
    (snap / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="no authentication code"):
        S.read_snapshot(snap)


def test_own_manifest_passes_authentication(tmp_path: Path) -> None:
    snap, _disk = make_snapshot(tmp_path)
    # TinyState is no MachineState: the read gets past the manifest and stops at the state.
    with pytest.raises(SnapshotError, match=r"^state: "):
        S.read_snapshot(snap)


def test_restore_without_a_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap, _disk = make_snapshot(tmp_path)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "none" / "snapshot.key"))
    with pytest.raises(SnapshotError, match="there is no snapshot key"):
        S.read_snapshot(snap)


def test_snapshot_key_is_made_with_mode_0600_in_a_0700_directory(own_key: Path) -> None:
    key = load_key(create=True)
    assert len(key) == 32 and own_key.read_bytes() == key
    assert (own_key.stat().st_mode & 0o777, own_key.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert load_key(create=True) == key  # made once


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.chmod(0o640), "has mode 0640"),
    (lambda p: p.write_bytes(b"short"), "is not 32 bytes"),
    (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "cannot open snapshot key"),
    (lambda p: (p.unlink(), os.mkfifo(p, 0o600)), "is a FIFO, not a regular file"),
])
def test_an_untrustworthy_snapshot_key_is_refused(own_key: Path, damage, match: str) -> None:  # type: ignore[no-untyped-def]
    load_key(create=True)
    damage(own_key)
    with pytest.raises(SnapshotError, match=match):
        load_key()


# --- defect 8: the temporaries of a killed snapshot ---------------------------------------
KILLED_WRITER = """
import os, sys, time
from dataclasses import dataclass
from kvmm import snapshot as S

@dataclass
class St:
    v: int

def stuck(fd):
    os.pwrite(fd, b"x" * (1 << 20), 0)  # part of guest RAM written ...
    print("writing", flush=True)
    time.sleep(600)                       # ... when SIGKILL comes

cfg = S.SavedConfig("/k", "", 1 << 20, 1, [], [], True, True, "serial", True, True)
S.write_snapshot(sys.argv[1], cfg, St(1), stuck)
"""


def test_a_snapshot_killed_mid_write_leaves_a_temporary_the_next_snapshot_removes(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "first")], cwd=ROOT,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = tmp_path / f".first.tmp-{proc.pid}"
    assert left.is_dir() and (left / "memory.bin").stat().st_size == 1 << 20
    assert not (tmp_path / "first").exists()  # never half a snapshot

    make_snapshot(tmp_path)  # the next snapshot into the same directory
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "busy")], cwd=ROOT,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        make_snapshot(tmp_path)
        assert (tmp_path / f".busy.tmp-{proc.pid}" / "memory.bin").exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_looking_directory_with_other_files_is_left_alone(tmp_path: Path) -> None:
    dead = _dead_pid()
    other = tmp_path / f".mine.tmp-{dead}"
    other.mkdir()
    (other / "notes.txt").write_text("not a snapshot's")
    assert S.remove_stale_temporaries(tmp_path) == []
    assert (other / "notes.txt").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- defect 10: target names no file system takes -----------------------------------------
@pytest.mark.parametrize("name,match", [
    ("with\0nul", "may not contain a NUL byte"),
    ("n" * 256, "at most 239"),
    ("n" * 240, "at most 239"),  # fits NAME_MAX, its temporary .NAME.tmp-PID does not
])
def test_a_snapshot_target_no_file_system_takes_is_a_snapshot_error(tmp_path: Path, name: str, match: str) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512))
    with pytest.raises(SnapshotError, match=match):
        S.write_snapshot(str(tmp_path / name), saved_config(disk), TinyState(1), save_memory)  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="NUL byte|is not a snapshot directory"):
        S.read_snapshot(str(tmp_path / name))


def test_longest_allowed_target_name_works(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(512))
    S.write_snapshot(tmp_path / ("n" * 239), saved_config(disk), TinyState(1), save_memory)  # type: ignore[arg-type]
    assert (tmp_path / ("n" * 239) / "manifest.json").exists()


# --- defect 6: snapshot files that are no regular files ------------------------------------
@pytest.mark.parametrize("name", ["manifest.json", "state.json", "memory.bin"])
def test_a_fifo_in_a_snapshot_is_refused_at_once(tmp_path: Path, name: str) -> None:
    snap, _disk = make_snapshot(tmp_path)
    (snap / name).unlink()
    os.mkfifo(snap / name)
    started = time.monotonic()
    with pytest.raises(SnapshotError, match="is a FIFO, not a regular file"):
        _read_in_thread(snap)
    assert time.monotonic() - started < 5


def _read_in_thread(snap: Path) -> None:
    """read_snapshot with a deadline: before issue 19 a FIFO blocked it for ever."""
    import threading

    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            S.read_snapshot(snap)
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if not outcome:
        # Unblock the reader (a writer on the FIFO) so the thread can end, then fail.
        for name in ("manifest.json", "state.json", "memory.bin"):
            if (snap / name).is_fifo():
                fd = os.open(snap / name, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        pytest.fail("read_snapshot blocked on a FIFO for 10 s")
    if outcome[0] is not None:
        raise outcome[0]
