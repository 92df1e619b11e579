"""Small freestanding guests on /dev/kvm: each runs in well under a second of guest time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_kvmm
from kvmm import teardown
from kvmm.errors import ConfigError
from kvmm.vm import EXIT_DEBUG_BASE, Machine, Outcome, VmConfig
from kvmm.x86 import prepare_vm

pytestmark = pytest.mark.kvm


def test_serial_output_and_debug_exit_status(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--kernel", str(guests("serial_hello")), "--mem", "64M")
    assert res.stdout == b"hello from the guest\n"
    assert res.returncode == EXIT_DEBUG_BASE + 42


def test_console_to_file(tmp_path: Path, guests) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "console.log"
    res = run_kvmm("-q", "--kernel", str(guests("serial_hello")), "--mem", "64M", "--console", f"file:{out}")
    assert res.returncode == EXIT_DEBUG_BASE + 42
    assert res.stdout == b""
    assert out.read_bytes() == b"hello from the guest\n"


def test_i8042_reset_ends_vm_with_status_0(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("i8042_reset")), "--mem", "64M")
    assert res.returncode == 0
    assert res.stdout == b"resetting\n"
    assert b"guest reset through the i8042" in res.stderr


def test_acpi_poweroff_found_through_the_tables_ends_vm_with_status_0(guests) -> None:  # type: ignore[no-untyped-def]
    # The guest walks RSDP -> XSDT -> FADT -> PM1a_CNT and the DSDT's \_S5, then writes
    # SLP_TYP | SLP_EN: the "poweroff" outcome, status 0.
    res = run_kvmm("--kernel", str(guests("acpi_poweroff")), "--mem", "64M")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ACPI S5: SLP_TYP 5 to PM1a_CNT 0x0000000000000604\n"
    assert b"guest powered off through ACPI (S5)" in res.stderr


def test_acpi_reset_register_ends_vm_with_status_0(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("acpi_reset")), "--mem", "64M")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ACPI reset through port 0x0000000000000606\n"
    assert b"guest reset through the ACPI reset register" in res.stderr


def test_no_acpi_leaves_the_tables_and_ports_out(guests) -> None:  # type: ignore[no-untyped-def]
    # Without an RSDP the guest stops at its first step (debug-exit 1: status 64 + 1).
    res = run_kvmm("-q", "--kernel", str(guests("acpi_poweroff")), "--mem", "64M", "--no-acpi")
    assert res.returncode == EXIT_DEBUG_BASE + 1, res.stderr


def test_triple_fault_ends_vm_with_status_0(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("triple_fault")), "--mem", "64M")
    assert res.returncode == 0
    assert b"triple fault" in res.stderr


def test_emulation_failure_reports_rip_and_exits_4(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("bad_fetch")), "--mem", "64M")
    assert res.returncode == 4
    err = res.stderr.decode()
    assert "kvmm: error: vCPU 0:" in err and "RIP 0xd0000000" in err and "instruction bytes" in err


def test_int3_reaches_the_guest_handler(guests) -> None:  # type: ignore[no-untyped-def]
    # On software-nested KVM kvmm injects the #BP the emulator cannot; on hardware it is native.
    res = run_kvmm("-q", "--kernel", str(guests("int3")), "--mem", "64M")
    assert res.stdout == b"breakpoint handled\n"
    assert res.returncode == EXIT_DEBUG_BASE + 3


def test_serial_input_from_stdin(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--kernel", str(guests("serial_echo")), "--mem", "64M", stdin=b"hello kvmm\n")
    assert res.stdout == b"ready\nHELLO KVMM\n"
    assert res.returncode == EXIT_DEBUG_BASE


def test_cmos_shows_host_utc_time(guests) -> None:  # type: ignore[no-untyped-def]
    before = time.gmtime()
    res = run_kvmm("-q", "--kernel", str(guests("cmos_time")), "--mem", "64M")
    after = time.gmtime()
    assert res.returncode == EXIT_DEBUG_BASE
    stamp = res.stdout.decode().split()[1]
    assert time.strftime("%Y%m%d%H%M%S", before) <= stamp <= time.strftime("%Y%m%d%H%M%S", after)


def test_machine_api_result_and_stats(guests) -> None:  # type: ignore[no-untyped-def]
    out = Path("/dev/null")
    with Machine(VmConfig(kernel=str(guests("serial_hello")), mem_size=64 << 20, console_path=str(out), stdin=False)) as m:
        result = m.run()
        assert result.outcome is Outcome.DEBUG_EXIT and result.debug_value == 42
        assert m.stats.exits["IoExit"] >= len("hello from the guest\n")
        assert m.console is not None and m.console.last_lines[-1] == b"hello from the guest"


def test_two_vcpus_start_with_the_bsp_running(guests) -> None:  # type: ignore[no-untyped-def]
    # The AP waits for INIT/SIPI in the in-kernel LAPIC; the BSP alone runs the guest.
    res = run_kvmm("-q", "--kernel", str(guests("serial_hello")), "--mem", "64M", "--cpus", "2")
    assert res.returncode == EXIT_DEBUG_BASE + 42 and res.stdout == b"hello from the guest\n"


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_all_threads_and_flushes_disks(guests, tmp_path: Path, sig: int, status: int) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "kvmm", "--kernel", str(guests("hang")), "--mem", "64M",
                             "--disk", str(disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"hanging\n"  # the vCPU is now in KVM_RUN for good
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == status, err.decode()
    assert f"stopped by {signal.Signals(sig).name}".encode() in err
    # The image lock was released with the process: a new user may open it read-write.
    from kvmm.virtio.blk import RawDisk

    RawDisk(str(disk)).close()


def test_timeout_ends_a_hung_guest(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("--kernel", str(guests("hang")), "--mem", "64M", "--timeout", "1")
    assert res.returncode == 5 and b"time limit" in res.stderr


def test_regression_panic_then_i8042_reset_reports_panic(guests) -> None:  # type: ignore[no-untyped-def]
    # Bug: the i8042 reset path ended the VM as a plain reset (status 0) after a panic.
    res = run_kvmm("--kernel", str(guests("panic_reset")), "--mem", "64M")
    assert res.returncode == 3
    assert b"kvmm: error: guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root fs" in res.stderr


def test_regression_fwait_does_not_stop_the_vcpu(guests) -> None:  # type: ignore[no-untyped-def]
    # Bug: a Linux guest on kvm_pvm died with "KVM could not emulate ... (9b ...)" when a
    # task exited (fpu__drop). kvmm emulates fwait there; on hardware it runs natively.
    res = run_kvmm("-q", "--kernel", str(guests("fwait")), "--mem", "64M")
    assert res.stdout == b"fwait done\n" and res.returncode == EXIT_DEBUG_BASE + 9, res.stderr


# Each instruction kvmm emulates (kvmm/emulate.py HANDLERS) executed by a guest that checks
# the architectural result itself (registers, flags, memory, the exceptions it raises);
# tests/test_emulate.py::test_every_emulated_mnemonic_has_a_test_guest keeps the lists in step.
EMULATION_GUESTS = [
    ("emu_cmpxchg16b", b"cmpxchg16b ok\n", 16, ("cmpxchg16b",)),
    ("emu_mxcsr", b"mxcsr ok\n", 17, ("ldmxcsr", "stmxcsr")),
    ("emu_xgetbv", b"xgetbv ok\n", 18, ("xgetbv",)),
    ("emu_smap", b"clac/stac ok\n", 19, ("clac", "stac")),
    ("emu_popcnt", b"popcnt ok\n", 20, ("popcnt",)),
    ("emu_lsl", b"lsl/lar ok\n", 21, ("lsl", "lar")),
    ("int3", b"breakpoint handled\n", 3, ("int3",)),
    ("fwait", b"fwait done\n", 9, ("fwait",)),
]


@pytest.mark.parametrize("guest, expected, status, mnemonics", EMULATION_GUESTS, ids=[g[0] for g in EMULATION_GUESTS])
def test_instruction_kvmm_emulates_gives_the_architectural_result(guests, guest: str, expected: bytes, status: int,  # type: ignore[no-untyped-def]
                                                                  mnemonics: tuple[str, ...]) -> None:
    from kvmm.host import detect_host

    started = time.monotonic()
    res = run_kvmm("--kernel", str(guests(guest)), "--mem", "64M", "--stats")
    if b"skipped" in res.stdout:
        pytest.skip(res.stdout.decode().strip())
    assert res.stdout == expected and res.returncode == EXIT_DEBUG_BASE + status, (res.stdout, res.stderr)
    if detect_host().emulate:  # on kvm_pvm kvmm did the work; on hardware KVM the CPU did
        for m in mnemonics:
            assert f"emulated_{m}=".encode() in res.stderr, res.stderr
    assert time.monotonic() - started < 20


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's 64 KiB flat images (scripts/bench_guests/flat.S)."""
    out = tmp_path_factory.mktemp("flat")
    subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "bench_guests" / "build.sh"), str(out)],
                   check=True, capture_output=True)
    return out


def test_flat_real_mode_image_runs_and_resets(flat_images: Path) -> None:
    # The same bytes QEMU takes as -bios and kvmtool as -k: 65536 THR writes, then an
    # i8042 reset. Every byte reaches the console; the reset ends the VM with status 0.
    res = run_kvmm("-q", "--kernel-format", "flat", "--kernel", str(flat_images / "flat_serial.bin"), "--mem", "16M")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"x" * 65536


def test_flat_image_takes_no_initrd(flat_images: Path) -> None:
    res = run_kvmm("-q", "--kernel-format", "flat", "--kernel", str(flat_images / "flat_reset.bin"),
                   "--initrd", str(flat_images / "flat_reset.bin"))
    assert res.returncode == 2 and b"takes no --initrd" in res.stderr


def test_machine_runs_on_a_prepared_vm(flat_images: Path) -> None:
    # The kvmm command creates RAM and VM before importing the device code (kvmm/cli.py).
    prepared = prepare_vm(16 << 20)
    config = VmConfig(kernel=str(flat_images / "flat_reset.bin"), kernel_format="flat", mem_size=16 << 20,
                      console_path="/dev/null", stdin=False, rng=False)
    with Machine(config, prepared=prepared) as m:
        assert m.platform.vm is prepared.vm and m.platform.mem is prepared.mem
        assert m.run(timeout=30).outcome is Outcome.RESET
    assert teardown.wait_idle(30)  # the VM's destroy runs off close()'s path (kvmm/teardown.py)
    assert prepared.vm.fd == -1 and prepared.kvm.fd == -1  # the machine owned and closed them


def test_machine_refuses_and_closes_a_prepared_vm_of_another_size(flat_images: Path) -> None:
    prepared = prepare_vm(16 << 20)
    config = VmConfig(kernel=str(flat_images / "flat_reset.bin"), kernel_format="flat", mem_size=32 << 20)
    with pytest.raises(ConfigError, match="prepared VM has 16777216 bytes"):
        Machine(config, prepared=prepared)
    assert teardown.wait_idle(30)
    assert prepared.vm.fd == -1 and prepared.kvm.fd == -1



def coalesced_pio_supported() -> bool:
    from kvmm.kvm import ioctls as K
    from kvmm.kvm.system import Kvm

    with Kvm() as kvm:
        return bool(kvm.check_extension(K.KVM_CAP_COALESCED_MMIO) and kvm.check_extension(K.KVM_CAP_COALESCED_PIO))


def exit_stats(stderr: bytes) -> dict[str, int]:
    line = stderr.decode().split("kvmm: exits: ")[1].splitlines()[0]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split(", "))}


MESSAGE = b"interrupt-driven output\n" + bytes(b"0123456789" * 100) + b"\n"


@pytest.mark.parametrize("exitless", [True, False])
def test_interrupt_driven_uart_then_polled_burst(guests, exitless: bool) -> None:  # type: ignore[no-untyped-def]
    # Enabling the THR-empty interrupt must stop the coalescing of THR writes (each write
    # has to raise THRE at once); disabling it may start it again. A lost interrupt
    # leaves the guest halted until the timeout.
    res = run_kvmm("-q", "--kernel", str(guests("serial_irq")), "--mem", "16M", "--stats", "--timeout", "30",
                   *([] if exitless else ["--no-exitless"]))
    assert res.returncode == EXIT_DEBUG_BASE + 0x23, res.stderr
    assert res.stdout == MESSAGE
    stats = exit_stats(res.stderr)
    if exitless and coalesced_pio_supported():
        assert stats["coalesced_pio_writes"] >= 900 and stats["IoExit"] < 200
    else:
        assert stats["coalesced_pio_writes"] == 0 and stats["IoExit"] > 1000


def test_polled_serial_output_is_coalesced(flat_images: Path) -> None:
    if not coalesced_pio_supported():
        pytest.skip("this host's KVM lacks KVM_CAP_COALESCED_PIO")
    res = run_kvmm("-q", "--kernel-format", "flat", "--kernel", str(flat_images / "flat_serial.bin"), "--mem", "16M",
                   "--stats")
    assert res.returncode == 0 and res.stdout == b"x" * 65536
    stats = exit_stats(res.stderr)
    # 65536 THR writes, about one exit per ring-full (170 entries) instead of one each.
    assert stats["coalesced_pio_writes"] > 60000 and stats["IoExit"] < 1000
