"""A fresh VM per test (issue 21): RestorePool, the background teardown, the snapshot
read cache, and the kvmm_snapshot/kvmm_restored fixtures running the 200-test example
suite of docs/writing-vm-tests.md."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from kvmm import Machine, teardown
from kvmm.config import Outcome
from kvmm.errors import KvmmError, SnapshotError
from kvmm.pool import RestorePool
from kvmm.state import to_json

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def echo_snapshot(guests, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """serial_echo waiting for its input, with a disk, snapshotted."""
    tmp = tmp_path_factory.mktemp("echo")
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with Machine(kernel=str(guests("serial_echo")), mem="32M", disks=[str(disk)], rng=False,
                 console_file=str(tmp / "console.log")) as m:
        m.launch(timeout=60)
        m.console.expect(b"ready", timeout=60)
        m.snapshot(tmp / "snap")
    return tmp / "snap"


def disk_copy(snap: Path, tmp: Path, name: str) -> str:
    manifest = json.loads((snap / "manifest.json").read_text())
    copy = tmp / name
    shutil.copy2(manifest["config"]["disks"][0]["path"], copy)
    return str(copy)


def echo(m: Machine, word: str) -> None:
    m.launch(timeout=30)
    m.send(word + "\n")
    assert m.wait(30).outcome is Outcome.DEBUG_EXIT
    m.console.flush()
    assert m.console.transcript.endswith(word.upper().encode() + b"\n")


def census() -> tuple[int, int]:
    assert teardown.wait_idle(30), "retired VMs were not destroyed within 30 s"
    threads = [t for t in threading.enumerate() if t.name != "kvmm-teardown"]  # lives on idle for a while
    return len(os.listdir("/proc/self/fd")), len(threads)


def test_pool_restores_fresh_vms_and_returns_every_fd(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Machine.restore(echo_snapshot, console_path="/dev/null", disks=[disk_copy(echo_snapshot, tmp_path, "w.img")]) as m:
        echo(m, "warm up")  # the process's one-time imports and caches
    before = census()
    with RestorePool(echo_snapshot, ready=2) as pool:
        for i in range(30):
            copy = disk_copy(echo_snapshot, tmp_path, f"{i}.img")
            with pool.restore(console_path=str(tmp_path / f"c{i}.log"), disks=[copy]) as m:
                assert m.restored_from == str(echo_snapshot)
                echo(m, f"vm {i}")  # each VM starts where the snapshot stood: no earlier input
        assert pool.prepared >= 30
    assert census() == before


def test_machine_restore_loop_keeps_fds_and_threads_flat(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = disk_copy(echo_snapshot, tmp_path, "d.img")
    mtime = os.stat(copy).st_mtime_ns
    counts = []
    for i in range(40):
        os.utime(copy, ns=(mtime, mtime))
        with Machine.restore(echo_snapshot, console_path="/dev/null", disks=[copy]) as m:
            echo(m, f"loop {i}")
        if i in (9, 39):
            counts.append(census())
    assert counts[0] == counts[1]


def test_teardown_destroys_vms_off_the_callers_path(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """close() hands the VM's KVM fds to the teardown thread, bounded by MAX_PENDING."""
    base = census()
    machines = [Machine.restore(echo_snapshot, console_path="/dev/null",
                                disks=[disk_copy(echo_snapshot, tmp_path, f"t{i}.img")]) for i in range(3)]
    for m in machines:
        m.close()
    assert teardown.pending() <= teardown.MAX_PENDING
    assert census() == base


def test_pool_reports_a_snapshot_it_cannot_serve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SnapshotError):
        RestorePool(tmp_path / "missing")
    with pytest.raises(KvmmError, match="1-8 VMs"):
        RestorePool(tmp_path, ready=0)


def test_pool_prepares_for_the_memory_it_maps_and_fails_loudly(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    snap = tmp_path / "snap"
    shutil.copytree(echo_snapshot, snap)
    pool = RestorePool(snap, ready=1)
    try:
        deadline = time.monotonic() + 30
        while pool.prepared < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.truncate(snap / "memory.bin", 4096)  # the file the next prepared VM maps is now wrong
        m = pool.restore(console_path="/dev/null", disks=[disk_copy(echo_snapshot, tmp_path, "p.img")])
        m.close()  # the VM prepared before the damage was still whole... or the restore refused it
    except SnapshotError:
        pass
    finally:
        pool.close()
    with pytest.raises(SnapshotError):
        RestorePool(snap)


def test_snapshot_cache_serves_unchanged_files_and_rereads_changed_ones(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmm import snapshot as S

    snap = tmp_path / "snap"
    shutil.copytree(echo_snapshot, snap, copy_function=shutil.copy2)
    copy = disk_copy(echo_snapshot, tmp_path, "c.img")
    first = S.read_snapshot(snap, disk_paths=[copy])
    with Machine.restore(snap, console_path="/dev/null", disks=[copy]) as m:
        echo(m, "cached")
    # A run changed nothing the cache holds: devices copy what they load from the state.
    again = S.read_snapshot(snap, disk_paths=[disk_copy(echo_snapshot, tmp_path, "c2.img")])
    assert again.state is first.state
    assert to_json(again.state) == json.loads((snap / "state.json").read_text())
    # A changed file is read again, and its checks apply again.
    (snap / "state.json").write_bytes((snap / "state.json").read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(SnapshotError, match="does not match the manifest"):
        S.read_snapshot(snap, disk_paths=[copy])
    # A disk is checked on every restore, cached snapshot or not.
    shutil.copytree(echo_snapshot, tmp_path / "snap2", copy_function=shutil.copy2)
    S.read_snapshot(tmp_path / "snap2", disk_paths=[copy])
    with open(copy, "ab") as f:
        f.write(b"x")
    with pytest.raises(SnapshotError, match="changed since the snapshot"):
        S.read_snapshot(tmp_path / "snap2", disk_paths=[copy])


def test_fixtures_run_the_200_test_example_suite(pytester: pytest.Pytester, guests, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """docs/writing-vm-tests.md's suite: 200 tests, each on a fresh restored VM."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # this checkout's plugin
    for name in ("conftest.py", "test_fresh_vm.py"):
        pytester.makefile(".py", **{name[:-3]: (ROOT / "examples" / "fresh-vm-per-test" / name).read_text()})
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-q", "--kvmm-kernel", str(guests("serial_echo")))
    seconds = time.monotonic() - started
    result.assert_outcomes(passed=200)
    print(f"200 tests on fresh restored VMs: {seconds:.1f} s including pytest's start and the session's boot")


def test_pool_refuses_a_snapshot_rewritten_since_it_was_made(echo_snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Prepared VMs map the memory file as it was: a newer state must not meet old memory."""
    snap = tmp_path / "snap"
    shutil.copytree(echo_snapshot, snap, copy_function=shutil.copy2)
    with RestorePool(snap, ready=1) as pool:
        with pool.restore(console_path="/dev/null", disks=[disk_copy(echo_snapshot, tmp_path, "a.img")]) as m:
            echo(m, "before")
        st = os.stat(snap / "memory.bin")
        os.utime(snap / "memory.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(SnapshotError, match="changed since the restore pool was made"):
            pool.restore(console_path="/dev/null", disks=[disk_copy(echo_snapshot, tmp_path, "b.img")])
