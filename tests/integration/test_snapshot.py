"""Snapshot, restore, pause and resume of a running guest, and the control socket.

The guest (tests/guests/snap_counter.c) prints "tick n" on each timer interrupt and writes
sector n of its disk, reading sector n-1 back. A snapshot taken mid-count, the kvmm
process killed, and the snapshot restored: the two consoles together read tick 1 ...
tick END-1 with no gap and no repeat, and the disk holds every sector.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmm import Machine, Outcome, VmResult
from kvmm.api import request
from kvmm.snapkey import load_key
from kvmm.snapshot import manifest_hmac

from conftest import run_kvmm

pytestmark = pytest.mark.kvm

END = 400  # snap_counter.c
EXIT_SNAPSHOT = 15
EXIT_COUNTER_DONE = 64 + 0x21


def wait_for(path: Path, text: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"kvmm ended early with status {proc.returncode}"
        assert time.monotonic() < deadline, "the control socket did not appear"
        time.sleep(0.05)


def expected_console(last: int) -> bytes:
    return b"".join(b"tick %d\n" % n for n in range(1, last + 1))


def check_disk(disk: Path, last: int) -> None:
    data = disk.read_bytes()
    bad = [n for n in range(1, last + 1) if data[n * 512 : (n + 1) * 512] != struct.pack("<Q", n) * 64]
    assert bad == [], f"sectors {bad[:10]} do not hold their tick number"


def test_counter_guest_continues_after_snapshot_kill_and_restore(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    disk, sock, snap = tmp_path / "disk.img", tmp_path / "vm.sock", tmp_path / "snap"
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    disk.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "kvmm", "-q", "--kernel", str(guests("snap_counter")), "--mem", "256M",
                             "--disk", str(disk), "--api-sock", str(sock), "--console", f"file:{first}"],
                            stdin=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        wait_for(first, b"tick 50\n")
        assert request(str(sock), "pause") == {"ok": True, "state": "paused"}
        paused_at = first.read_bytes()
        time.sleep(0.3)
        assert first.read_bytes() == paused_at, "the guest kept printing while paused"
        assert request(str(sock), "status")["state"] == "paused"
        res = run_kvmm("ctl", str(sock), "snapshot", str(snap))
        assert res.returncode == 0, res.stderr
        answer = json.loads(res.stdout)
        assert answer["ok"] and answer["path"] == str(snap)
        # Sparse: a 256 MiB guest that touched a few pages stores a few pages.
        assert answer["memory_bytes_stored"] < 16 << 20
        assert (snap / "memory.bin").stat().st_size == 256 << 20
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    count_at_kill = first.read_bytes().count(b"\n")
    assert count_at_kill >= 50

    res = run_kvmm("--restore", str(snap), "--console", f"file:{second}", timeout=120)
    assert res.returncode == EXIT_COUNTER_DONE, res.stderr.decode()
    assert b"restored in" in res.stderr
    # The restored guest continues exactly where the snapshot paused it.
    assert first.read_bytes() + second.read_bytes() == expected_console(END - 1)
    check_disk(disk, END - 1)


def test_pause_resume_and_shutdown_from_python(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    disk, log = tmp_path / "disk.img", tmp_path / "console.log"
    disk.write_bytes(bytes(1 << 20))
    with Machine(kernel=str(guests("snap_counter")), mem="64M", disks=[str(disk)], console_file=str(log),
                 api_socket=str(tmp_path / "vm.sock")) as m:
        m.launch(timeout=60)
        wait_for(log, b"tick 10\n")
        m.pause()
        assert m.paused and m.status()["state"] == "paused"
        m.console.flush()  # type: ignore[union-attr]
        held = log.read_bytes()
        time.sleep(0.3)
        assert log.read_bytes() == held
        m.resume()
        wait_for(log, b"tick %d\n" % (held.count(b"\n") + 20))
        assert request(str(tmp_path / "vm.sock"), "shutdown")["ok"]
        result = m.wait(timeout=10)
    assert result.outcome.value == "shutdown" and result.exit_status == 0
    text = log.read_bytes()
    complete = text[: text.rfind(b"\n") + 1]  # shutdown may land mid-line
    assert complete == expected_console(text.count(b"\n"))


def test_control_socket_rejects_bad_requests(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "vm.sock"
    with Machine(kernel=str(guests("spin_seconds")), mem="16M", api_socket=str(sock), console_file=str(tmp_path / "c")) as m:
        m.launch(timeout=60)
        assert request(str(sock), "reboot")["error"].startswith("unknown command 'reboot'")
        assert request(str(sock), "snapshot")["error"].startswith("snapshot needs")
        assert "takes no" in request(str(sock), "pause", path="x")["error"]
        existing = tmp_path / "exists"
        existing.mkdir()
        assert "already exists" in request(str(sock), "snapshot", path=str(existing))["error"]
        with __import__("socket").socket(__import__("socket").AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"not json\n{\"command\": 1}\n")
            time.sleep(0.2)
            lines = s.recv(4096).splitlines()
        assert [json.loads(x)["ok"] for x in lines] == [False, False]
        with __import__("socket").socket(__import__("socket").AF_UNIX) as s:
            s.connect(str(sock))  # nesting that exhausts the decoder: an answer, not a dead I/O thread
            s.sendall(b"[" * 30_000 + b"\n")
            time.sleep(0.3)
            assert json.loads(s.recv(4096))["error"] == "the request is not valid JSON"
        assert request(str(sock), "status")["state"] == "running"  # still serving
        assert "exits" in request(str(sock), "stats")
        m.stop(VmResult(Outcome.RESET, "test over"))


def test_api_socket_in_use_is_refused(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "vm.sock"
    with Machine(kernel=str(guests("spin_seconds")), mem="16M", api_socket=str(sock), console_file=str(tmp_path / "c")):
        res = run_kvmm("--kernel", str(guests("spin_seconds")), "--mem", "16M", "--api-sock", str(sock))
        assert res.returncode == 2 and b"in use by a running kvmm" in res.stderr
    assert not sock.exists()  # removed at close


# --- refusals: a snapshot is untrusted input ---------------------------------------------
@pytest.fixture(scope="module")
def paused_snapshot(guests, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A snapshot of the counter guest at tick 20 or later, and its disk (not run since)."""
    d = tmp_path_factory.mktemp("snap")
    disk, log = d / "disk.img", d / "console.log"
    disk.write_bytes(bytes(1 << 20))
    with Machine(kernel=str(guests("snap_counter")), mem="64M", disks=[str(disk)], console_file=str(log)) as m:
        m.launch(timeout=60)
        wait_for(log, b"tick 20\n")
        m.pause()
        m.snapshot(d / "snap")
    return d / "snap", disk


@pytest.fixture
def snap_copy(paused_snapshot: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the snapshot and of its disk (same content and mtime), so that
    each test may restore or damage its own."""
    copy, disk = tmp_path / "snap", tmp_path / "disk.img"
    shutil.copytree(paused_snapshot[0], copy)
    shutil.copyfile(paused_snapshot[1], disk)
    st = paused_snapshot[1].stat()
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    rewrite_manifest(copy, lambda m: m["config"]["disks"][0].update(path=str(disk)))
    return copy


def disk_of(snap: Path) -> Path:
    return snap.parent / "disk.img"


def restore_refused(snap: Path, disk: Path, *extra: str) -> str:
    """Restore ``snap`` expecting refusal; checks nothing was modified. Returns stderr."""
    before = {p.name: p.read_bytes() for p in snap.iterdir()}
    disk_before = (disk.read_bytes(), disk.stat().st_mtime_ns)
    res = run_kvmm("-q", "--restore", str(snap), "--console", f"file:{snap.parent / 'out.log'}", *extra, timeout=60)
    err = res.stderr.decode()
    assert res.returncode == EXIT_SNAPSHOT, err
    assert err.startswith("kvmm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == before
    assert (disk.read_bytes(), disk.stat().st_mtime_ns) == disk_before
    return err


def rewrite_manifest(snap: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((snap / "manifest.json").read_text())
    change(data)
    data["hmac"] = manifest_hmac(data, load_key())  # as this user's kvmm would
    (snap / "manifest.json").write_text(json.dumps(data))


def rewrite_state(snap: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Change state.json and make every checksum agree: only validation can refuse it."""
    import hashlib

    state = json.loads((snap / "state.json").read_text())
    change(state)
    raw = json.dumps(state).encode()
    (snap / "state.json").write_bytes(raw)
    rewrite_manifest(snap, lambda m: m["state"].update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))


def test_restore_of_the_untouched_snapshot_continues(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    log = snap_copy.parent / "out.log"
    res = run_kvmm("--restore", str(snap_copy), "--console", f"file:{log}", "--verify-memory", timeout=120)
    assert res.returncode == EXIT_COUNTER_DONE, res.stderr.decode()
    first = log.read_bytes().split(b"\n")[0]
    assert first.startswith(b"tick ") or first.isdigit() or first == b"", first  # continues mid-count


def test_manifest_checksum_mismatch_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    data = json.loads((snap_copy / "manifest.json").read_text())
    data["config"]["mem_size"] *= 2
    (snap_copy / "manifest.json").write_text(json.dumps(data))
    assert "fails its authentication" in restore_refused(snap_copy, disk_of(snap_copy))


def test_manifest_not_json_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    (snap_copy / "manifest.json").write_bytes(b"\x00\xff{")
    assert "not valid JSON" in restore_refused(snap_copy, disk_of(snap_copy))


def test_deeply_nested_manifest_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    # The manifest is parsed before it is authenticated: nesting that exhausts the JSON
    # decoder's recursion is an error message, not a traceback.
    (snap_copy / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert "not valid JSON" in restore_refused(snap_copy, disk_of(snap_copy))


def test_other_kvmm_version_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_manifest(snap_copy, lambda m: m.update(kvmm_version="0.0.1"))
    assert "made by kvmm 0.0.1" in restore_refused(snap_copy, disk_of(snap_copy))


def test_other_format_version_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_manifest(snap_copy, lambda m: m.update(version=1))
    assert "format version 1 is not supported" in restore_refused(snap_copy, disk_of(snap_copy))


def test_truncated_memory_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    os.truncate(snap_copy / "memory.bin", 32 << 20)
    assert "truncated" in restore_refused(snap_copy, disk_of(snap_copy))


def test_truncated_state_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    raw = (snap_copy / "state.json").read_bytes()
    (snap_copy / "state.json").write_bytes(raw[: len(raw) // 2])
    assert "does not match the manifest" in restore_refused(snap_copy, disk_of(snap_copy))


def test_changed_disk_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    disk = disk_of(snap_copy)
    with open(disk, "r+b") as f:  # same size, written after the snapshot
        f.write(b"x")
    assert "changed since the snapshot" in restore_refused(snap_copy, disk)


def test_missing_disk_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path, tmp_path: Path) -> None:
    rewrite_manifest(snap_copy, lambda m: m["config"]["disks"][0].update(path=str(tmp_path / "gone.img")))
    assert "No such file" in restore_refused(snap_copy, disk_of(snap_copy))


def test_corrupt_memory_is_refused_with_verify_memory(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    with open(snap_copy / "memory.bin", "r+b") as f:
        f.seek(0x200000)  # the guest's code
        f.write(b"\xcc" * 16)
    assert "fails its checksum" in restore_refused(snap_copy, disk_of(snap_copy), "--verify-memory")


def test_state_with_wrong_field_type_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_state(snap_copy, lambda s: s["serial"].update(ier="high"))
    assert "state.serial.ier: expected an integer" in restore_refused(snap_copy, disk_of(snap_copy))


def test_state_with_short_register_block_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_state(snap_copy, lambda s: s["vcpus"][0].update(regs="AAAA"))
    assert "state.vcpus[0]: KVM refused the saved regs" in restore_refused(snap_copy, disk_of(snap_copy))


def test_queue_outside_guest_ram_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    # virtio 0.9.5 2.3: the queue lives in guest memory; a PFN past RAM is refused as the
    # QUEUE_PFN register write would be.
    rewrite_state(snap_copy, lambda s: s["virtio"][0]["queues"][0].update(pfn=0xFFFF_F000))
    assert "state.virtio[0].queues[0]" in restore_refused(snap_copy, disk_of(snap_copy))


def test_features_never_offered_are_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_state(snap_copy, lambda s: s["virtio"][0].update(guest_features=1 << 31))
    assert "were never offered" in restore_refused(snap_copy, disk_of(snap_copy))


def test_acpi_pm_registers_are_saved_and_checked(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    # The guest is an ELF kernel: it has ACPI, and its PM registers are in the state
    # (SCI_EN always set); an impossible value is refused as a guest write could not make it.
    state = json.loads((snap_copy / "state.json").read_text())
    assert state["acpi_pm"] == {"status": 0, "enable": 0, "control": 1}
    assert json.loads((snap_copy / "manifest.json").read_text())["config"]["acpi"] is True
    rewrite_state(snap_copy, lambda s: s["acpi_pm"].update(control=1 << 13))  # SLP_EN is never stored
    assert "state.acpi_pm" in restore_refused(snap_copy, disk_of(snap_copy))


def test_acpi_pm_state_missing_for_an_acpi_machine_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_state(snap_copy, lambda s: s.update(acpi_pm=None))
    assert "lacks ACPI" in restore_refused(snap_copy, disk_of(snap_copy))


def test_vcpu_count_mismatch_is_refused(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    rewrite_state(snap_copy, lambda s: s["vcpus"].append(s["vcpus"][0]))
    assert "2 vCPUs" in restore_refused(snap_copy, disk_of(snap_copy))


def test_two_restores_of_one_snapshot_on_disk_copies(paused_snapshot: tuple[Path, Path], tmp_path: Path) -> None:
    # Guest RAM is mapped copy-on-write, so a snapshot serves any number of restores;
    # each gets its own disk copy (mtime preserved) through --disk.
    snap, disk = paused_snapshot
    results = []
    for name in ("a", "b"):
        copy = tmp_path / f"{name}.img"
        shutil.copy2(disk, copy)
        log = tmp_path / f"{name}.log"
        res = run_kvmm("-q", "--restore", str(snap), "--disk", str(copy), "--console", f"file:{log}", timeout=120)
        assert res.returncode == EXIT_COUNTER_DONE, res.stderr.decode()
        results.append((log.read_bytes(), copy.read_bytes()))
        check_disk(copy, END - 1)
    assert results[0] == results[1]  # the same continuation, twice
    assert disk.read_bytes() != results[0][1]  # the snapshot's own disk was not touched


def test_disk_override_must_match_the_snapshot(paused_snapshot: tuple[Path, Path], snap_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))  # same size, another mtime
    res = run_kvmm("-q", "--restore", str(snap_copy), "--disk", str(other), timeout=60)
    assert res.returncode == EXIT_SNAPSHOT and b"changed since the snapshot" in res.stderr
    res = run_kvmm("-q", "--restore", str(snap_copy), "--disk", str(other), "--disk", str(other), timeout=60)
    assert res.returncode == EXIT_SNAPSHOT and b"1 disk(s), 2 path(s)" in res.stderr
    res = run_kvmm("-q", "--restore", str(snap_copy), "--disk", f"{other},ro", timeout=60)
    assert res.returncode == 2 and b"takes a path only" in res.stderr


# --- issue 19: hostile snapshots and control-socket paths -------------------------------------
def forge_manifest(snap: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Edit the manifest as someone without this user's snapshot key can: recompute a
    plain SHA-256 (the format before issue 19) and an HMAC under the forger's own key."""
    import hashlib
    import hmac

    data = json.loads((snap / "manifest.json").read_text())
    change(data)

    def canonical(field: str) -> bytes:
        return json.dumps({**data, field: ""}, sort_keys=True, separators=(",", ":")).encode()

    if "checksum" in data:
        data["checksum"] = hashlib.sha256(canonical("checksum")).hexdigest()
    if "hmac" in data:
        data["hmac"] = hmac.new(os.urandom(32), canonical("hmac"), hashlib.sha256).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(data))


def test_forged_snapshot_cannot_give_the_guest_a_host_file(paused_snapshot: tuple[Path, Path], snap_copy: Path,
                                                            tmp_path: Path) -> None:
    # The counter guest writes a sector per tick to its disk: pointed at a host file, it
    # would overwrite it. The forger gives the file's real size and mtime.
    victim = tmp_path / "victim.txt"
    victim.write_bytes((b"the user's precious data\n" * 41944)[: 1 << 20])  # 1 MiB, as the snapshot's disk
    st = victim.stat()
    forge_manifest(snap_copy, lambda m: m["config"]["disks"][0].update(path=str(victim), size=st.st_size,
                                                                          mtime_ns=st.st_mtime_ns))
    before = victim.read_bytes()
    err = restore_refused(snap_copy, disk_of(snap_copy))
    assert "fails its authentication" in err
    assert victim.read_bytes() == before and victim.stat().st_mtime_ns == st.st_mtime_ns


def test_verify_memory_of_a_copy_with_another_hole_layout_ends(paused_snapshot: tuple[Path, Path], snap_copy: Path) -> None:
    # cp -a (cp --sparse=always) punches holes at 4 KiB inside the 64 KiB chunks kvmm
    # wrote: the digest used to loop for ever on such a file, --timeout or not.
    copied = snap_copy.parent / "copied"
    subprocess.run(["cp", "-a", str(snap_copy), str(copied)], check=True)
    memory = copied / "memory.bin"
    subprocess.run(["cp", "--sparse=always", str(paused_snapshot[0] / "memory.bin"), str(memory)], check=True)
    log = snap_copy.parent / "out.log"
    res = run_kvmm("-q", "--restore", str(copied), "--verify-memory", "--console", f"file:{log}", timeout=120)
    assert res.returncode == EXIT_COUNTER_DONE, res.stderr.decode()


@pytest.mark.parametrize("name,match", [("with\0nul", "may not contain a NUL byte"), ("n" * 256, "at most 239")])
def test_snapshot_to_a_name_no_file_system_takes_is_a_clean_refusal(guests, tmp_path: Path, name: str, match: str) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "vm.sock"
    with Machine(kernel=str(guests("spin_seconds")), mem="16M", api_socket=str(sock), console_file=str(tmp_path / "c")) as m:
        m.launch(timeout=60)
        answer = request(str(sock), "snapshot", path=str(tmp_path / name))
        assert answer["ok"] is False and match in answer["error"] and "internal error" not in answer["error"], answer
        assert request(str(sock), "status")["state"] == "running"
        m.stop(VmResult(Outcome.RESET, "test over"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary left behind


def test_control_socket_is_mode_0600(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "vm.sock"
    with Machine(kernel=str(guests("spin_seconds")), mem="16M", api_socket=str(sock), console_file=str(tmp_path / "c")):
        assert sock.stat().st_mode & 0o777 == 0o600
