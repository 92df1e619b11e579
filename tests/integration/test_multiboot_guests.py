"""Multiboot test kernels on /dev/kvm (tests/guests/mb_*.c): the 32-bit entry state, the
boot information, modules and command lines, both debug-exit conventions, and what
kvm-unit-tests need of the platform in small (fw_cfg, APs through INIT/SIPI). Each runs
in about a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_kvmm
from kvmm.loader import bootparams as bp
from kvmm.memory import GuestMemory

pytestmark = pytest.mark.kvm


def info_lines(stdout: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stdout.decode().splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value)
    return out


def guest_checksum(data: bytes) -> int:
    total = 0
    for b in data:
        total = (total * 31 + b) & 0xFFFF_FFFF
    return total


@pytest.mark.parametrize("guest", ["mb_info", "mb_info_aout"])
def test_entry_state_and_boot_information(guests, tmp_path: Path, guest: str) -> None:  # type: ignore[no-untyped-def]
    # mb_info_aout is a flat binary: only the header's a.out-kludge addresses can load it.
    one, two, three = tmp_path / "one.bin", tmp_path / "two,x.bin", tmp_path / "three.bin"
    one.write_bytes(b"module one\n")
    two.write_bytes(bytes(range(256)) * 20)
    three.write_bytes(b"3")
    kernel = guests(guest)
    res = run_kvmm("-q", "--kernel", str(kernel), "--mem", "48M", "--cmdline", "alpha beta=2",
                   "--initrd", f"{one} first arg,{str(two).replace(',', ',,')}", "--module", f"{three} third")
    assert res.returncode == 64 + 0x21, res.stdout.decode() + res.stderr.decode()
    info = info_lines(res.stdout)
    assert info["entry"] == ["state: ok"]
    assert info["magic"] == ["0x2badb002"]
    assert info["cmdline"] == [f"{kernel} alpha beta=2"]  # the kernel's name, then its arguments
    assert info["loader"] == ["kvmm"]
    e820 = bp.e820_map(GuestMemory.allocate(48 << 20, check_available=False))
    assert info["mmap"] == [f"{e.addr:#x} {e.size:#x} {e.type}" for e in e820]
    assert int(info["mem_lower"][0], 16) == 639
    assert int(info["mem_upper"][0], 16) == ((48 << 20) - (1 << 20)) >> 10
    kernel_end = int(info["kernel_end"][0], 16)
    mods = [m.split(" ", 3) for m in info["module"]]
    assert [m[3] for m in mods] == [f"{one} first arg", str(two), f"{three} third"]
    for (start, size, csum, _), path in zip(mods, (one, two, three)):
        data = path.read_bytes()
        assert int(size, 16) == len(data) and int(csum, 16) == guest_checksum(data)
        assert int(start, 16) % 4096 == 0 and int(start, 16) >= kernel_end
    assert int(info["info"][0], 16) >= kernel_end


def test_multiboot_is_detected_by_header_and_can_be_forced(guests) -> None:  # type: ignore[no-untyped-def]
    for fmt in ("auto", "multiboot"):
        res = run_kvmm("-q", "--kernel", str(guests("mb_info")), "--mem", "16M", "--kernel-format", fmt)
        assert res.returncode == 64 + 0x21 and b"entry state: ok" in res.stdout


@pytest.mark.parametrize("port,width,value,extra,status", [
    (0x501, 1, 0x05, [], 64 + 5),  # kvmm's own convention, always there
    (0xF4, 4, 0x00, ["--debug-exit", "0xf4,4"], 1),  # QEMU's: (v << 1) | 1; kvm-unit-tests' pass
    (0xF7, 1, 0x26, ["--debug-exit", "0xf4,4"], 77),  # any port of the range; 77 = kvm-unit-tests' skip
    (0xF4, 4, 0x12345, ["--debug-exit", "0xf4,4"], 0x8B),  # the whole 32-bit value, low byte of the status
    (0x501, 2, 0x03, ["--debug-exit", "0x501,2"], 7),  # QEMU's convention replaces kvmm's at its port
])
def test_debug_exit_conventions(guests, port: int, width: int, value: int, extra: list[str], status: int) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--kernel", str(guests("mb_exit")), "--mem", "16M", *extra,
                   "--cmdline", f"port={port:#x} width={width} value={value:#x}")
    assert res.returncode == status, res.stdout.decode() + res.stderr.decode()
    assert res.stdout == b"exiting\n"


def test_debug_exit_port_without_the_option_does_nothing(guests) -> None:  # type: ignore[no-untyped-def]
    res = run_kvmm("-q", "--kernel", str(guests("mb_exit")), "--mem", "16M", "--timeout", "2",
                   "--cmdline", "port=0xf4 width=4 value=0")
    assert res.returncode == 5 and res.stdout == b"exiting\nstill running\n"


@pytest.mark.parametrize("cpus", [1, 2, 3])
def test_aps_come_up_through_init_sipi_and_fw_cfg_counts_them(guests, cpus: int) -> None:  # type: ignore[no-untyped-def]
    # kvm-unit-tests' start-up in small: the CPU count from fw_cfg, INIT + SIPI to all but
    # self, each AP in real mode at the SIPI vector, then protected mode, then checks in.
    res = run_kvmm("-q", "--kernel", str(guests("mb_smp")), "--mem", "32M", "--cpus", str(cpus), "--timeout", "60")
    out = res.stdout.decode()
    assert res.returncode == 64 + 0x22, out + res.stderr.decode()
    assert f"fw_cfg QEMU cpus {cpus} ram {32 << 20:#x}" in out
    ids = int(re.search(r"aps up (\d+) ids (0x[0-9a-f]+)", out).group(2), 16)  # type: ignore[union-attr]
    assert ids == sum(1 << i for i in range(1, cpus))  # APIC ids 1..N-1, each once


def test_a_linux_kernel_gets_no_fw_cfg(guests) -> None:  # type: ignore[no-untyped-def]
    # fw_cfg belongs to the multiboot platform: the 64-bit test guests see nothing there.
    from kvmm.config import VmConfig
    from kvmm.vm import Machine

    with Machine(VmConfig(kernel=str(guests("serial_hello")), mem_size=16 << 20, console_path="/dev/null",
                          stdin=False, rng=False)) as m:
        assert m.platform.pio.read(0x511, 1) == 0xFF


def test_multiboot_errors_are_one_line_with_status_10(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(guests("mb_info").read_bytes())
    at = data.find((0x1BADB002).to_bytes(4, "little"))
    bad = tmp_path / "video.elf"
    flags = 0x7  # + a video mode, which kvmm cannot give
    data[at + 4 : at + 12] = flags.to_bytes(4, "little") + ((-(0x1BADB002 + flags)) & 0xFFFFFFFF).to_bytes(4, "little")
    bad.write_bytes(data)
    cases = [
        (["--kernel", str(bad)], "requires a video mode"),
        (["--kernel", str(guests("serial_hello")), "--kernel-format", "multiboot"], "no multiboot header"),
        (["--kernel", str(guests("mb_info")), "--initrd", ",".join([str(bad)] * 65)], "at most 64"),
        (["--kernel", str(guests("mb_info")), "--module", str(tmp_path / "absent")], "does not exist"),
        (["--kernel", str(guests("mb_info")), "--mem", "1M"], "outside guest RAM"),
    ]
    for args, message in cases:
        res = run_kvmm(*args)
        lines = [line for line in res.stderr.decode().splitlines() if line.strip()]
        assert res.returncode == 10, (args, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("kvmm: error:") and message in lines[0], lines


def test_snapshot_of_a_multiboot_vm_is_refused(guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A snapshot records neither fw_cfg nor the --debug-exit/--pc-testdev/--cpu-features
    # set-up: a restored VM would silently lack them, so kvmm says no.
    from kvmm.config import VmConfig
    from kvmm.errors import SnapshotError
    from kvmm.vm import Machine

    with Machine(VmConfig(kernel=str(guests("mb_exit")), mem_size=16 << 20, console_path="/dev/null", stdin=False,
                          rng=False, cmdline="port=0x80 width=1 value=0")) as m:
        m.launch(timeout=30)
        with pytest.raises(SnapshotError, match="multiboot kernel"):
            m.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
