"""What a Machine holds, it gives back: fds, threads and disk locks after close(), and
after a machine is dropped without close() (hostile input round two, defect 5)."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from kvmm import teardown
from kvmm.config import DiskConfig, NetConfig, ShareConfig
from kvmm.errors import DiskError, KvmmError
from kvmm.tap import Tap
from kvmm.virtio.blk import RawDisk
from kvmm.vm import Machine, Outcome, VmConfig

pytestmark = pytest.mark.kvm


def open_fds() -> int:
    """The process's fds once every closed machine's VM is destroyed (kvmm/teardown.py
    does that on its own thread, off close()'s path)."""
    assert teardown.wait_idle(30), "retired VMs were not destroyed within 30 s"
    return len(os.listdir("/proc/self/fd"))


def live_threads() -> int:
    """Threads, the teardown thread aside (it outlives the machines by design, idle)."""
    return sum(t.name != "kvmm-teardown" for t in threading.enumerate())


def mixes(tmp_path: Path) -> list[dict[str, object]]:
    """Device mixes without a tap, between them every device and wiring a machine can
    have: virtio-blk (read-write, read-only), virtio-console as the primary console,
    virtio-rng on and off, 9p shares (read-only, read-write), MSI-X on and off, exitless
    notifies on and off, a control socket."""
    disks = []
    for name in ("a.img", "b.img"):
        disk = tmp_path / name
        if not disk.exists():
            disk.write_bytes(bytes(1 << 20))
        disks.append(str(disk))
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    (share / "f").write_bytes(b"x")
    ro, rw = ShareConfig(str(share), "ro"), ShareConfig(str(share), "rw", read_only=False)
    return [
        {"rng": False},
        {"disks": [DiskConfig(disks[0])]},
        {"disks": [DiskConfig(disks[0]), DiskConfig(disks[1], read_only=True)], "console_device": "virtio"},
        {"disks": [DiskConfig(disks[0])], "exitless": False, "msix": False},
        {"disks": [DiskConfig(disks[1])], "msix": False, "api_socket": str(tmp_path / "api.sock")},
        {"shares": [ro]},
        {"shares": [ro, rw], "disks": [DiskConfig(disks[0])], "console_device": "virtio", "exitless": False},
        {"shares": [rw], "msix": False, "rng": False, "api_socket": str(tmp_path / "api.sock")},
        {"console_device": "virtio", "exitless": False, "msix": True},
        {"shares": [ro], "exitless": False, "msix": False, "console_device": "virtio", "rng": False},
    ]


def tap_mixes() -> list[dict[str, object]]:
    """virtio-net on a tap kvmm creates (and the kernel removes when its fd closes), with
    the other devices and wirings."""
    name = f"kvmmh{os.getpid() % 100000}"
    try:
        Tap(name).close()
    except KvmmError as exc:
        pytest.skip(f"virtio-net needs a tap, and this host gives none: {exc}")
    net = [NetConfig(name)]
    return [{"nets": net}, {"nets": net, "msix": False, "exitless": False}, {"nets": net, "console_device": "virtio"}]


def fifty_machines(kernel: str, console: str, mixes: list[dict[str, object]]) -> None:
    Machine(VmConfig(kernel=kernel, mem_size=16 << 20, console_path=console, stdin=False)).close()  # imports, caches
    fds, threads = open_fds(), live_threads()
    for i in range(50):
        mix = mixes[i % len(mixes)]
        m = Machine(VmConfig(kernel=kernel, mem_size=16 << 20, console_path=console, stdin=False, **mix))  # type: ignore[arg-type]
        if (i // len(mixes)) % 2:  # every mix both ways: run to its end, and closed unstarted
            assert m.run(timeout=30).outcome is Outcome.DEBUG_EXIT
        m.close()
    assert (open_fds(), live_threads()) == (fds, threads)


def test_fifty_machines_of_every_mix_return_every_fd_and_thread(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifty_machines(str(guests("serial_hello")), str(tmp_path / "console.log"), mixes(tmp_path))


def test_fifty_machines_with_a_nic_return_every_fd_and_thread(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifty_machines(str(guests("serial_hello")), str(tmp_path / "console.log"), tap_mixes() + mixes(tmp_path)[5:8])


def test_a_launched_machine_closed_while_running_returns_its_fds(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kernel = str(guests("hang"))
    fds, threads = open_fds(), live_threads()
    for mix in mixes(tmp_path):
        m = Machine(VmConfig(kernel=kernel, mem_size=16 << 20, console_path="/dev/null", stdin=False, **mix))  # type: ignore[arg-type]
        m.launch()
        m.close()
        assert m.wait(10).outcome is Outcome.INTERRUPTED
    assert (open_fds(), live_threads()) == (fds, threads)


def test_a_machine_dropped_without_close_unlocks_its_disk(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    m = Machine(VmConfig(kernel=str(guests("serial_hello")), mem_size=16 << 20, console_path="/dev/null",
                         stdin=False, disks=[DiskConfig(str(disk))]))
    with pytest.raises(DiskError, match="in use"):
        RawDisk(str(disk))
    del m
    gc.collect()
    RawDisk(str(disk)).close()  # the lock went with the machine
