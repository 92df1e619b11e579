"""virtio-9p in a real VM: a freestanding guest (tests/guests/p9_cat.c) speaks 9P2000.L to
kvmm's device through KVM (ioeventfd notifies, the used ring polled), and a VM with a
share refuses snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmm import Machine
from kvmm.errors import SnapshotError

from conftest import run_kvmm

pytestmark = pytest.mark.kvm


def test_guest_reads_a_shared_file_and_is_confined(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    (share / "escape").symlink_to("/etc/passwd")
    res = run_kvmm("--kernel", str(guests("p9_cat")), "--no-rng", "--mem", "64M", "--stats", "--console",
                   f"file:{tmp_path / 'console.log'}", "--share", f"{share},tag=hostfiles")
    console = (tmp_path / "console.log").read_text()
    assert res.returncode == 64 + 0x33, res.stderr.decode() + console
    assert console.splitlines() == ["tag: hostfiles", "read: hello from the host", "dotdot refused: errno 13",
                                    "symlink not opened: errno 40"]
    stats = res.stderr.decode()
    assert "9p0_read_bytes=20" in stats and "9p0_walks=2" in stats and "9p0_errors=2" in stats
    assert "queue_notify_ioeventfd=8" in stats and "queue_notify_exits=0" in stats


def test_a_vm_with_a_share_refuses_a_snapshot_and_keeps_running(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Machine(kernel=str(guests("hang")), mem="64M", rng=False, console_file=str(tmp_path / "console.log"),
                 shares=[f"{tmp_path},tag=data"]) as m:
        m.launch(timeout=60)
        m.console.expect("hanging", 30)
        with pytest.raises(SnapshotError, match="9p share"):
            m.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
        assert m.status()["state"] == "running"
    assert os.listdir(tmp_path) == ["console.log"]
