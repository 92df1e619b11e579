"""Boot the real guest kernel from kernels/ (minutes on software-nested KVM)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmm.loader.bzimage import parse_bzimage
from kvmm.vm import Outcome

pytestmark = [pytest.mark.kvm, pytest.mark.linux]

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 600  # generous: a boot takes 1-2 minutes on software-nested KVM

# Console milestones of a boot, in order.
MILESTONES = [
    r"Linux version 6\.1\.\d+",
    r"Command line: .*console=ttyS0",
    r"found SMP MP-table at \[mem 0x0009fc00-",
    r"Serial: 8250/16550 driver, 1 ports",
    r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",
    r"Freeing unused kernel image",
    r"Run /init as init process",
]


@pytest.fixture(scope="module")
def busybox_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("initramfs") / "initramfs.cpio"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mkinitramfs.py"), "--init", "busybox", "--compress", "none",
                    "-o", str(out)], check=True, capture_output=True)
    return out


def assert_in_order(log: str, patterns: list[str]) -> None:
    pos = 0
    for pat in patterns:
        m = re.compile(pat).search(log, pos)
        assert m, f"console milestone {pat!r} missing (after offset {pos}); console tail:\n{log[-3000:]}"
        pos = m.end()


def test_vmlinux_boots_to_init(kernel_dir: Path, busybox_initramfs: Path, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    m = kvmm_machine(kernel=kernel_dir / "vmlinux", initrd=busybox_initramfs, mem="512M", timeout=BOOT_TIMEOUT)
    m.console.expect(r"Run /init as init process", BOOT_TIMEOUT)
    if m.host.userspace_works:
        # Hardware KVM: the busybox shell comes up; leave it the way a user would.
        m.console.expect(r"user space is up", 60)
        m.send("reboot -f\n")
    result = m.wait(60)
    log = m.console.transcript.decode(errors="replace")
    assert_in_order(log, MILESTONES)
    assert "Kernel panic" not in log
    if m.host.userspace_works:
        assert result.outcome is Outcome.RESET, result
    else:
        assert result.outcome is Outcome.INIT_REACHED, result
        assert "/init" in result.message and "cannot make system calls" in result.message
    assert result.exit_status == 0
    times = m.boot_times()
    assert 0 < times["kernel_start"] < times["init_started"]
    print(f"\nboot milestones (s from start) on {m.host.name}: {times}; exits {dict(m.stats.exits)}")


def test_panic_is_recognisable_from_exit_status(kernel_dir: Path, tmp_path: Path) -> None:
    # No initrd and no root device: the kernel panics (VFS: unable to mount root fs) and,
    # with panic=-1, resets at once; kvmm reports that reset as a panic. With reboot=a
    # (Linux's default where ACPI is; kvmm's command line says reboot=k) the reset goes
    # through the FADT's reset register (acpi_reboot), not the i8042.
    console = tmp_path / "console.log"
    res = subprocess.run([sys.executable, "-m", "kvmm", "--kernel", str(kernel_dir / "vmlinux"), "--mem", "256M",
                          "--cmdline", "reboot=a", "--console", f"file:{console}"],
                         capture_output=True, timeout=BOOT_TIMEOUT, cwd=ROOT)
    log, err = console.read_text(errors="replace"), res.stderr.decode()
    assert "Kernel panic - not syncing" in log, log[-2000:]
    assert res.returncode == 3, err
    assert "kvmm: error: guest kernel panic: Kernel panic - not syncing" in err
    assert "guest reset the machine through the ACPI reset register" in err, err


def test_bzimage_payload_decompressed_on_the_host_boots_to_init(kernel_dir: Path, busybox_initramfs: Path, kvmm_machine,  # type: ignore[no-untyped-def]
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The default for a bzImage: kvmm decompresses its xz payload and enters startup_64
    # at the physical link address, as for the vmlinux of the same build.
    caplog.set_level(logging.INFO, "kvmm.loader.bzimage")
    m = kvmm_machine(kernel=kernel_dir / "bzImage", initrd=busybox_initramfs, mem="512M", stop_at_init=True,
                     timeout=BOOT_TIMEOUT)
    assert m.platform.boot.kind == "bzImage" and m.platform.boot.entry == 0x1000000  # phys_startup_64, not the decompressor
    assert re.search(r"bzImage: xz payload decompressed on the host \(\d+\.\d MiB in [\d.]+ s\), "
                     r"entering the kernel at 0x1000000", caplog.text), caplog.text
    result = m.wait(BOOT_TIMEOUT + 30)
    log = m.console.transcript.decode(errors="replace")
    assert_in_order(log, MILESTONES)
    assert "Kernel panic" not in log
    assert result.outcome is Outcome.INIT_REACHED and result.exit_status == 0, result
    print(f"\nbzImage boot milestones (s from start) on {m.host.name}: {m.boot_times()}")


def test_bzimage_is_entered_at_its_64bit_entry_point(kernel_dir: Path, kvmm_machine,  # type: ignore[no-untyped-def]
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # --kernel-format bzimage: the kernel's own decompressor. It runs in KVM's emulator on
    # software-nested hosts (minutes before any output), so this checks the path up to and
    # shortly after its entry point.
    caplog.set_level(logging.INFO, "kvmm.loader.bzimage")
    image = kernel_dir / "bzImage"
    hdr = parse_bzimage(image.read_bytes())
    m = kvmm_machine(kernel=image, mem="256M", timeout=5, kernel_format="bzimage")
    assert "bzImage: --kernel-format bzimage: entering its own decompressor at 0x100200" in caplog.text
    assert m.platform.boot.kind == "bzImage" and m.platform.boot.entry == 0x100000 + 0x200
    result = m.wait(60)
    regs = m.platform.vm.vcpus[0].get_regs()
    sregs = m.platform.vm.vcpus[0].get_sregs()
    if result.outcome is not Outcome.TIMEOUT:
        # Fast hardware boots all the way in 5 s and panics for want of a root file system.
        assert result.outcome in (Outcome.PANIC, Outcome.RESET), result
        return
    # Still decompressing: in long mode, executing inside the decompressor's buffer.
    assert sregs.efer & (1 << 10), "left long mode"
    assert 0x100000 <= regs.rip < 0x1000000 + hdr.init_size, hex(regs.rip)
    assert regs.rip != m.platform.boot.entry


@pytest.fixture
def spin_rootfs(tmp_path: Path) -> Path:
    """A fresh ext4 root whose /sbin/init spins without system calls (keeps the kernel
    alive). Fresh per test: a VM ended at init leaves its journal dirty."""
    out = tmp_path / "root.img"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mkrootfs.py"), "--init", "spin", "-o", str(out)],
                   check=True, capture_output=True)
    return out


def boot_until_init(kvmm_machine, kernel_dir: Path, disks: list[str], cmdline: str, cpus: int = 1) -> tuple[str, object, dict]:  # type: ignore[no-untyped-def,type-arg]
    m = kvmm_machine(kernel=kernel_dir / "vmlinux", mem="256M", cmdline=cmdline, cpus=cpus, disks=disks,
                     stop_at_init=True, timeout=BOOT_TIMEOUT)
    result = m.wait(BOOT_TIMEOUT + 30)
    report = m.exit_report()
    print(f"\nexits: {report}; boot milestones: {m.boot_times()}")
    return m.console.transcript.decode(errors="replace"), result, report


# Without acpi=off the project kernel takes the machine from kvmm's ACPI tables (its MP
# table parser stays for acpi=off, and for kernels without ACPI).
ACPI_SMP = [
    r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 KVMM  \)",
    r"ACPI: INT_SRC_OVR \(bus 0 bus_irq 9 global_irq 9 high level\)",
    r"ACPI: Using ACPI \(MADT\) for SMP configuration information",
    r"smp: Brought up 1 node, 2 CPUs",
    r"ACPI: PCI Root Bridge \[PCI0\] \(domain 0000 \[bus 00-ff\]\)",
    r"pci_bus 0000:00: root bus resource \[mem 0xe0000000-0xfebfffff window\]",
]


def test_root_on_virtio_blk_with_two_cpus_and_msix(kernel_dir: Path, spin_rootfs: Path, tmp_path: Path, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"\0" * (3 << 20))
    log, result, report = boot_until_init(kvmm_machine, kernel_dir, [str(spin_rootfs), f"{extra},ro"],
                                          "root=/dev/vda rw", cpus=2)
    assert_in_order(log, [
        *ACPI_SMP,
        r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks \(67\.1 MB/64\.0 MiB\)",
        r"virtio_blk virtio1: \[vdb\] 6144 512-byte logical blocks",
        r"EXT4-fs \(vda\): mounted filesystem",
        r"VFS: Mounted root \(ext4 filesystem\) on device 254:0",
        r"Run /sbin/init as init process",
    ])
    assert "Processor #1" not in log  # the MP table's processor entries went unread
    assert result.outcome is Outcome.INIT_REACHED, result  # type: ignore[attr-defined]
    # The guest chose MSI-X; every notify came by ioeventfd, every interrupt by irqfd.
    assert report["msi_interrupts"] > 0 and report["intx_interrupts"] == 0
    assert report["queue_notify_exits"] == 0 and report["queue_notify_ioeventfd"] > 0


def test_intx_routed_through_the_dsdt_prt_with_two_cpus(kernel_dir: Path, spin_rootfs: Path, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    # pci=nomsi: the disk's INTA goes through the DSDT's _PRT and its interrupt link GSIA
    # to IOAPIC input 16, the input the MP table names for slot 1.
    log, result, report = boot_until_init(kvmm_machine, kernel_dir, [str(spin_rootfs)], "root=/dev/vda rw pci=nomsi",
                                          cpus=2)
    assert_in_order(log, [
        *ACPI_SMP,
        r"ACPI: PCI: Interrupt link GSIA configured for IRQ 16",
        r"PCI: Using ACPI for IRQ routing",
        r"ACPI: \\_SB_\.GSIA: Enabled at IRQ 16",
        r"00:00: ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",  # COM1 from the DSDT (PNP0501)
        r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks",
        r"VFS: Mounted root \(ext4 filesystem\) on device 254:0",
        r"Run /sbin/init as init process",
    ])
    assert not re.search(r"PCI INT [A-D]: (no GSI|not connected)|can't derive routing|PCI->APIC IRQ transform", log)
    assert "ACPI Error" not in log and "ACPI BIOS Error" not in log and "ACPI Warning" not in log
    assert result.outcome is Outcome.INIT_REACHED, result  # type: ignore[attr-defined]
    assert report["intx_interrupts"] > 0 and report["msi_interrupts"] == 0


def test_mp_table_with_acpi_off_two_cpus_and_intx(kernel_dir: Path, spin_rootfs: Path, kvmm_machine) -> None:  # type: ignore[no-untyped-def]
    # The kernel told to ignore ACPI finds the same machine in the MP table: the second
    # CPU from its processor entries, INTx from its PCI interrupt entries.
    # The disk is read-only: VIRTIO_BLK_F_RO makes the kernel fall back to a r/o root.
    before = spin_rootfs.read_bytes()
    log, result, report = boot_until_init(kvmm_machine, kernel_dir, [f"{spin_rootfs},ro"],
                                          "root=/dev/vda rw pci=nomsi acpi=off", cpus=2)
    assert_in_order(log, [
        r"found SMP MP-table at \[mem 0x0009fc00-",
        r"Processor #1",
        r"smp: Brought up 1 node, 2 CPUs",
        r"virtio-pci 0000:00:01\.0: PCI->APIC IRQ transform: INT A -> IRQ 16",
        r"virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks",
        r"VFS: Mounted root \(ext4 filesystem\) readonly on device 254:0",
        r"Run /sbin/init as init process",
    ])
    assert "ACPI: Using ACPI" not in log and "ACPI: RSDP" not in log
    assert spin_rootfs.read_bytes() == before
    assert result.outcome is Outcome.INIT_REACHED, result  # type: ignore[attr-defined]
    assert report["intx_interrupts"] > 0 and report["msi_interrupts"] == 0
    assert report["queue_notify_exits"] == 0


@pytest.fixture
def netns():  # type: ignore[no-untyped-def]
    """A network namespace holding a tap with the host side's address 10.0.2.1/24.

    Everything stays inside this machine: the guest is 10.0.2.15 on that tap."""
    import os
    import shutil
    import uuid

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace and a tap")
    tag = uuid.uuid4().hex[:6]
    ns, tap = f"kvmm-{tag}", f"kvtap{tag}"
    run = lambda *cmd: subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True)  # noqa: E731
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        run("ip", "addr", "add", "10.0.2.1/24", "dev", tap)
        run("ip", "link", "set", tap, "up")
        run("ip", "link", "set", "lo", "up")
        yield ns, tap
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP_CMDLINE = "root=/dev/vda ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off"  # 10.0.2.15 on eth0


def kvmm_in_netns(ns: str, *args: str) -> subprocess.Popen[bytes]:
    """The kvmm command line, run inside the test's network namespace (where its tap is)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmm", *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_init(console: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the guest kernel has started /sbin/init (its console file says so)."""
    import time

    deadline = time.monotonic() + BOOT_TIMEOUT
    while "Run /sbin/init as init process" not in (console.read_text(errors="replace") if console.exists() else ""):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no init within the boot timeout"
        time.sleep(1)


def ping_guest(ns: str, count: int) -> str:
    """``ping`` from the host side of the tap to the guest; its output."""
    res = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-W", "10", "10.0.2.15"],
                         capture_output=True, text=True, timeout=120)
    print("\n" + res.stdout)
    return res.stdout


def test_network_virtio_console_and_rng(kernel_dir: Path, spin_rootfs: Path, tmp_path: Path, netns) -> None:  # type: ignore[no-untyped-def]
    import signal

    ns, tap = netns
    console = tmp_path / "console.log"
    proc = kvmm_in_netns(ns, "--kernel", str(kernel_dir / "vmlinux"), "--mem", "256M", "--disk", str(spin_rootfs),
                         "--net", f"tap={tap},mac={GUEST_MAC}", "--console", f"virtio,file:{console}",
                         "--stop-at-init", "no", "--stats", "--timeout", str(BOOT_TIMEOUT), "--cmdline", GUEST_IP_CMDLINE)
    try:
        wait_for_init(console, proc)
        replies = ping_guest(ns, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    log = console.read_text(errors="replace")
    assert "5 received" in replies, replies
    # Everything on the console came through hvc0 (the kernel's messages from before the
    # virtio-console probe are not replayed there, as with any hvc0-only console).
    assert_in_order(log, [
        r"virtio_blk virtio0: \[vda\]",
        r"IP-Config: Complete:",
        r"device=eth0, hwaddr=52:54:00:12:34:56, ipaddr=10\.0\.2\.15, mask=255\.255\.255\.0, gw=10\.0\.2\.1",
        r"Run /sbin/init as init process",
    ])
    stats = dict(kv.split("=") for kv in err.decode().split("kvmm: exits: ")[1].split("\n")[0].split(", "))
    print(f"stats: {stats}")
    assert int(stats["rng_requests"]) > 0  # the kernel's hwrng core read virtio-rng
    assert int(stats["virtio_console_bytes_out"]) == int(stats["console_bytes"]) > 1000
    assert int(stats["net0_rx_frames"]) >= 5 and int(stats["net0_tx_frames"]) >= 5


@pytest.mark.parametrize(
    "initrd,expect,timeout,status",
    [
        (True, r"Run /init as init process", BOOT_TIMEOUT, 0),
        (True, r"never printed", 5, 5),  # timeout
        (False, r"never printed", BOOT_TIMEOUT, 3),  # no root file system: panic
    ],
)
def test_smoke_against_the_guest_kernel(kernel_dir: Path, busybox_initramfs: Path, initrd: bool, expect: str,
                                        timeout: int, status: int) -> None:
    args = [sys.executable, "-m", "kvmm", "smoke", "--kernel", str(kernel_dir / "vmlinux"), "--mem", "256M",
            "--console", "file:/dev/null", "--expect", expect, "--timeout", str(timeout)]
    if initrd:
        args += ["--initrd", str(busybox_initramfs)]
    res = subprocess.run(args, capture_output=True, timeout=BOOT_TIMEOUT + 60, cwd=ROOT)
    assert res.returncode == status, res.stderr.decode()[-2000:]


def test_linux_snapshot_restore_keeps_answering_ping(kernel_dir: Path, spin_rootfs: Path, tmp_path: Path, netns) -> None:  # type: ignore[no-untyped-def]
    """A two-vCPU Linux guest at its spinning /init (root on virtio-blk, eth0 on a tap) is
    snapshotted, its kvmm killed, and restored: the kernel answers ping again."""
    import json
    import signal
    import time

    from kvmm.api import request

    ns, tap = netns
    sock, snap = tmp_path / "vm.sock", tmp_path / "snap"
    first, second = tmp_path / "first.log", tmp_path / "second.log"

    proc = kvmm_in_netns(ns, "--kernel", str(kernel_dir / "vmlinux"), "--mem", "256M", "--cpus", "2",
                         "--disk", str(spin_rootfs), "--net", f"tap={tap},mac={GUEST_MAC}", "--console", f"file:{first}",
                         "--stop-at-init", "no", "--api-sock", str(sock), "--timeout", str(BOOT_TIMEOUT),
                         "--cmdline", GUEST_IP_CMDLINE)
    try:
        wait_for_init(first, proc)
        assert "3 received" in ping_guest(ns, 3)
        answer = request(str(sock), "snapshot", path=str(snap))
        print(f"snapshot: {answer}")
        assert answer["ok"], answer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)

    restored = kvmm_in_netns(ns, "--restore", str(snap), "--console", f"file:{second}", "--api-sock", str(sock), "--stats",
                    "--timeout", "300")
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert restored.poll() is None, restored.communicate()[1].decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The host's side: the tap lost its carrier when the first kvmm died; until the
        # kernel's linkwatch brings it back (up to a second) the host drops what it sends.
        while "state UP" not in subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", tap],
                                               capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the tap's carrier did not come back"
            time.sleep(0.1)
        replies = ping_guest(ns, 5)
        status = request(str(sock), "status")
        assert request(str(sock), "shutdown")["ok"]
        _, err = restored.communicate(timeout=60)
    finally:
        if restored.poll() is None:
            restored.kill()
            restored.communicate()
    log = err.decode()
    print(log)
    assert "5 received" in replies, replies
    assert status["state"] == "running" and status["restored_from"] == str(snap)
    assert restored.returncode == 0, log
    m = re.search(r"restored in ([\d.]+) ms", log)
    assert m, log
    stats = dict(kv.split("=") for kv in log.split("kvmm: exits: ")[1].split("\n")[0].split(", "))
    assert int(stats["net0_rx_frames"]) >= 5 and int(stats["net0_tx_frames"]) >= 5
    print(json.dumps({"restore_ms": float(m.group(1)), "snapshot": answer}))
