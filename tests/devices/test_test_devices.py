"""The devices test kernels written for QEMU expect: fw_cfg (ports 0x510/0x511),
pc-testdev, and the debug-exit conventions; and --cpu-features on the CPUID."""

from __future__ import annotations

import struct

import pytest

from kvmm.config import DebugExitConfig, Outcome, VmResult
from kvmm.cpuid import FEATURES, apply_features, parse_cpu_features
from kvmm.devices.bus import MmioBus, PioBus
from kvmm.devices.debug import DebugExit
from kvmm.devices.fw_cfg import FW_CFG_PORT, FwCfg, fw_cfg_items
from kvmm.devices.testdev import TESTDEV_IOMEM, PcTestDev
from kvmm.errors import ConfigError
from kvmm.kvm.structs import ffi
from kvmm.memory import GuestMemory


def fw_cfg_bus(ram: int = 128 << 20, cpus: int = 3) -> PioBus:
    pio = PioBus()
    pio.register(FW_CFG_PORT, 2, FwCfg(fw_cfg_items(ram, cpus)))
    return pio


def read_item(pio: PioBus, key: int, n: int) -> bytes:
    pio.write(0x510, 2, key)
    return bytes(pio.read(0x511, 1) for _ in range(n))


def test_fw_cfg_signature_cpus_and_ram_as_kvm_unit_tests_read_them() -> None:
    pio = fw_cfg_bus()
    assert read_item(pio, 0x00, 4) == b"QEMU"
    assert struct.unpack("<H", read_item(pio, 0x05, 2))[0] == 3  # FW_CFG_NB_CPUS
    assert struct.unpack("<Q", read_item(pio, 0x03, 8))[0] == 128 << 20  # FW_CFG_RAM_SIZE
    assert struct.unpack("<I", read_item(pio, 0x01, 4))[0] == 1  # ID: traditional interface, no DMA


def test_fw_cfg_reads_past_an_item_or_of_an_unknown_key_return_zero() -> None:
    pio = fw_cfg_bus()
    assert read_item(pio, 0x00, 6) == b"QEMU\0\0"
    assert read_item(pio, 0x11, 8) == bytes(8)  # kvm-unit-tests' FW_CFG_MAX_RAM: 0 means no limit
    assert read_item(pio, 0xFFFF, 2) == bytes(2)


def test_fw_cfg_select_rewinds_and_a_byte_write_to_the_selector_selects_nothing() -> None:
    pio = fw_cfg_bus()
    assert read_item(pio, 0x00, 2) == b"QE"
    pio.write(0x510, 1, 0x05)  # a data write in QEMU's port interface: ignored
    assert bytes(pio.read(0x511, 1) for _ in range(2)) == b"MU"
    assert read_item(pio, 0x00, 1) == b"Q"


def test_pc_testdev_scratch_register_keeps_bytes_at_their_offsets() -> None:
    pio, mmio = PioBus(), MmioBus()
    mem = GuestMemory.allocate(1 << 20, check_available=False)
    PcTestDev(mem, lambda line, level: None).attach(pio, mmio)
    pio.write(0xE0, 4, 0x11223344)
    assert pio.read(0xE0, 1) == 0x44 and pio.read(0xE1, 1) == 0x33 and pio.read(0xE2, 2) == 0x1122
    pio.write(0xE9, 1, 0xAA)  # the byte view at 0xE8 is the same register
    assert pio.read(0xE0, 4) == 0x1122AA44


def test_pc_testdev_irq_ports_drive_their_line() -> None:
    pio, mmio, lines = PioBus(), MmioBus(), []
    mem = GuestMemory.allocate(1 << 20, check_available=False)
    PcTestDev(mem, lambda line, level: lines.append((line, level))).attach(pio, mmio)
    pio.write(0x200E, 1, 1)
    pio.write(0x200E, 1, 0)
    pio.write(0x2017, 1, 5)
    assert lines == [(14, 1), (14, 0), (23, 1)]


def test_regression_pc_testdev_wide_irq_write_is_bytes_to_consecutive_lines() -> None:
    # Bug: kvmm ignored kvm-unit-tests realmode's "outl $1, 0x200b" (QEMU splits it into
    # byte writes to 0x200b-0x200e), so IRQ 11 never came and the test hung in hlt.
    pio, mmio, lines = PioBus(), MmioBus(), []
    mem = GuestMemory.allocate(1 << 20, check_available=False)
    PcTestDev(mem, lambda line, level: lines.append((line, level))).attach(pio, mmio)
    pio.write(0x200B, 4, 1)
    pio.write(0x2016, 4, 0x0101)  # lines 22 and 23; the bytes past line 23 go nowhere
    assert lines == [(11, 1), (12, 0), (13, 0), (14, 0), (22, 1), (23, 1)]


def test_pc_testdev_iomem_and_page_flush() -> None:
    pio, mmio = PioBus(), MmioBus()
    mem = GuestMemory.allocate(1 << 20, check_available=False)
    dev = PcTestDev(mem, lambda line, level: None)
    dev.attach(pio, mmio)
    mmio.write(TESTDEV_IOMEM + 0x10, 4, 0xDEADBEEF)
    assert mmio.read(TESTDEV_IOMEM + 0x12, 2) == 0xDEAD
    mem.write(0x5000, b"kept")
    pio.write(0xE4, 4, 0x5123)  # the page is made inaccessible and accessible again
    assert dev.flush.flushes == 1 and mem.read(0x5000, 4) == b"kept"


def test_pc_testdev_flush_of_an_address_outside_ram_is_ignored() -> None:
    pio, mmio = PioBus(), MmioBus()
    mem = GuestMemory.allocate(1 << 20, check_available=False)
    dev = PcTestDev(mem, lambda line, level: None)
    dev.attach(pio, mmio)
    pio.write(0xE4, 4, 0xFFFF_F000)
    pio.write(0xE4, 2, 0x5000)  # not a 32-bit write
    assert dev.flush.flushes == 0


@pytest.mark.parametrize("value,status", [(0, 1), (1, 3), (0x26, 77), (0x80, 1), (0x12345, 0x8B)])
def test_qemu_debug_exit_status_is_v_shifted_left_or_one(value: int, status: int) -> None:
    # QEMU's isa-debug-exit: exit((v << 1) | 1); the process status is its low byte.
    result = VmResult(Outcome.DEBUG_EXIT, "", debug_value=value, debug_qemu=True)
    assert result.exit_status == status


def test_kvmm_debug_exit_status_is_64_plus_v() -> None:
    assert VmResult(Outcome.DEBUG_EXIT, "", debug_value=0x45).exit_status == 64 + 5


def test_qemu_debug_exit_takes_the_whole_access() -> None:
    seen: list[int] = []
    DebugExit(seen.append, full_width=True).pio_write(0, 4, 0x12345)
    DebugExit(seen.append).pio_write(0, 4, 0x12345)
    assert seen == [0x12345, 0x45]


@pytest.mark.parametrize("spec,expected", [("0xf4,4", (0xF4, 4)), ("0x501", (0x501, 1)), ("244,2", (244, 2))])
def test_debug_exit_option_parses_port_and_size(spec: str, expected: tuple[int, int]) -> None:
    assert DebugExitConfig.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", "f4", "0xf4,3", "0x10000", "0xffff,4", "-1"])
def test_debug_exit_option_refuses_bad_ports_and_sizes(spec: str) -> None:
    with pytest.raises(ConfigError, match="--debug-exit"):
        DebugExitConfig.parse(spec)


def cpuid_with(entries: list[tuple[int, int, dict[str, int]]]) -> object:
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, (function, index, regs) in enumerate(entries):
        c.entries[i].function, c.entries[i].index = function, index
        for reg, value in regs.items():
            setattr(c.entries[i], reg, value)
    return c


def test_cpu_features_clear_and_set_bits_kvm_supports() -> None:
    supported = cpuid_with([(1, 0, {"ecx": 1 << 21 | 1 << 24}), (7, 0, {"ebx": 1 << 10})])
    mine = cpuid_with([(1, 0, {"ecx": 1 << 21}), (7, 0, {"ebx": 1 << 10})])
    apply_features(mine, parse_cpu_features("-x2apic,+tsc-deadline,invpcid=off"), supported)
    assert mine.entries[0].ecx == 1 << 24 and mine.entries[1].ebx == 0  # type: ignore[attr-defined]


def test_cpu_feature_kvm_cannot_provide_is_refused() -> None:
    supported = cpuid_with([(1, 0, {"ecx": 0})])
    with pytest.raises(ConfigError, match=r"\+pcid: this host's KVM cannot provide it"):
        apply_features(cpuid_with([(1, 0, {})]), parse_cpu_features("+pcid"), supported)


@pytest.mark.parametrize("spec,match", [("x2apic", "expected \\+NAME"), ("+warp-drive", "unknown feature 'warp-drive'")])
def test_cpu_features_option_refuses_bad_names(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_cpu_features(spec)


def test_every_cpu_feature_names_one_bit_of_a_register() -> None:
    for name, f in FEATURES.items():
        assert f.reg in ("eax", "ebx", "ecx", "edx") and 0 <= f.bit < 32, name
