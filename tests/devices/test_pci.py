"""PCI configuration mechanism #1 and BAR handling (PCI Local Bus 3.0, 3.2.2.3.2, 6.2.5.1)."""

from __future__ import annotations

import pytest

from kvmm.devices import pci as P
from kvmm.devices.bus import PioBus


class Window:
    def __init__(self) -> None:
        self.reads: list[int] = []

    def pio_read(self, offset: int, size: int) -> int:
        self.reads.append(offset)
        return 0x5A

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass


def cfg_addr(slot: int, reg: int, bus: int = 0, func: int = 0, enable: bool = True) -> int:
    return (0x8000_0000 if enable else 0) | (bus << 16) | (slot << 11) | (func << 8) | reg


@pytest.fixture
def setup() -> tuple[PioBus, P.PciBus, P.PciDevice, Window]:
    pio = PioBus()
    bus = P.PciBus(pio)
    dev = P.PciDevice(vendor=0x1AF4, device=0x1001, class_code=0x010000)
    win = Window()
    dev.add_io_bar(0, 0x40, win)
    dev.set_interrupt(16)
    bus.add(dev)
    return pio, bus, dev, win


def read_cfg(pio: PioBus, slot: int, reg: int, size: int = 4, **kw: int) -> int:
    pio.write(P.CONFIG_ADDRESS, 4, cfg_addr(slot, reg & ~3, **kw))
    return pio.read(P.CONFIG_DATA + (reg & 3), size)


def write_cfg(pio: PioBus, slot: int, reg: int, value: int, size: int = 4) -> None:
    pio.write(P.CONFIG_ADDRESS, 4, cfg_addr(slot, reg & ~3))
    pio.write(P.CONFIG_DATA + (reg & 3), size, value)


def test_host_bridge_at_slot_0_passes_linux_conf1_sanity_check(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    assert read_cfg(pio, 0, 0) == 0x1237_8086
    assert read_cfg(pio, 0, 0x0A, 2) == 0x0600  # class: host bridge


def test_config_address_reads_back(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    pio.write(P.CONFIG_ADDRESS, 4, 0x8000_0810)
    assert pio.read(P.CONFIG_ADDRESS, 4) == 0x8000_0810


def test_absent_device_function_bus_and_disabled_cycle_read_all_ones(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    assert read_cfg(pio, 9, 0) == 0xFFFF_FFFF
    assert read_cfg(pio, 1, 0, func=1) == 0xFFFF_FFFF
    assert read_cfg(pio, 1, 0, bus=1) == 0xFFFF_FFFF
    assert read_cfg(pio, 1, 0, enable=False) == 0xFFFF_FFFF


def test_byte_word_dword_access(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    assert read_cfg(pio, 1, 0, 4) == 0x1001_1AF4
    assert read_cfg(pio, 1, 2, 2) == 0x1001
    assert read_cfg(pio, 1, 1, 1) == 0x1A
    assert read_cfg(pio, 1, 0x3C, 1) == 16 and read_cfg(pio, 1, 0x3D, 1) == 1


def test_io_bar_is_placed_and_decoded(setup) -> None:  # type: ignore[no-untyped-def]
    pio, _, dev, win = setup
    bar = read_cfg(pio, 1, 0x10)
    assert bar & 1 == 1 and bar & ~3 >= P.IO_BAR_BASE and (bar & ~3) % 0x40 == 0
    assert read_cfg(pio, 1, 0x04, 2) & P.PCI_COMMAND_IO
    assert pio.read((bar & ~3) + 5, 1) == 0x5A and win.reads == [5]


def test_bar_sizing_returns_size_mask(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    orig = read_cfg(pio, 1, 0x10)
    write_cfg(pio, 1, 0x10, 0xFFFF_FFFF)
    assert read_cfg(pio, 1, 0x10) & 0xFFFF == (~(0x40 - 1) & 0xFFFF) | 1
    write_cfg(pio, 1, 0x10, orig)
    assert read_cfg(pio, 1, 0x10) == orig
    assert pio.read((orig & ~3), 1) == 0x5A  # decoding restored


def test_unimplemented_bar_reads_zero(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    write_cfg(pio, 1, 0x14, 0xFFFF_FFFF)
    assert read_cfg(pio, 1, 0x14) == 0


def test_guest_can_move_a_bar(setup) -> None:  # type: ignore[no-untyped-def]
    pio, _, _, win = setup
    old = read_cfg(pio, 1, 0x10) & ~3
    write_cfg(pio, 1, 0x10, 0xD001)
    assert read_cfg(pio, 1, 0x10) == 0xD001
    assert pio.read(0xD000, 1) == 0x5A
    assert pio.read(old, 1) == 0xFF  # the old window no longer decodes


def test_read_only_header_fields_ignore_writes(setup) -> None:  # type: ignore[no-untyped-def]
    pio, *_ = setup
    write_cfg(pio, 1, 0x00, 0)
    write_cfg(pio, 1, 0x08, 0xFFFF_FFFF)
    assert read_cfg(pio, 1, 0) == 0x1001_1AF4 and read_cfg(pio, 1, 0x08) == 0x0100_0000
    write_cfg(pio, 1, 0x3C, 0x0000_0A0B)  # interrupt line writable, pin read-only
    assert read_cfg(pio, 1, 0x3C, 1) == 0x0B and read_cfg(pio, 1, 0x3D, 1) == 1


# --- a refused BAR move (issue 19, defect 7) ---------------------------------------------

class Uart(Window):
    def pio_read(self, offset: int, size: int) -> int:
        return 0x3F


@pytest.mark.parametrize("victim", ["uart_0x3f8", "pci_config_0xcf8"])
def test_a_refused_bar_move_never_unregisters_the_owner_of_those_ports(setup, victim: str) -> None:  # type: ignore[no-untyped-def]
    """The guest moves BAR0 (64 ports) over ports another device owns: refused, the BAR
    decodes nothing. Moving it away again (back home) once unregistered the refused
    window, taking the UART at 0x3F8 or PCI configuration itself at 0xCF8 with it."""
    pio, _, dev, win = setup
    if victim == "uart_0x3f8":
        pio.register(0x3F8, 8, Uart())
        target, probe, expect = 0x3C0, 0x3F8, 0x3F
    else:
        target, probe, expect = 0xCC0, P.CONFIG_ADDRESS, None
    home = read_cfg(pio, 1, 0x10) & ~3
    write_cfg(pio, 1, 0x10, target | 1)  # refused: someone lives there
    assert pio.read(home, 1) == 0xFF and read_cfg(pio, 1, 0x10) == target | 1  # the register keeps what was written
    write_cfg(pio, 1, 0x10, home | 1)  # and back: only what the BAR held is freed
    assert pio.read(home + 5, 1) == 0x5A
    if expect is not None:
        assert pio.read(probe, 1) == expect
    else:  # configuration mechanism #1 still answers
        assert read_cfg(pio, 0, 0) == 0x1237_8086 and read_cfg(pio, 1, 0) == 0x1001_1AF4


def test_a_refused_bar_address_written_again_is_decoded_once_free(setup) -> None:  # type: ignore[no-untyped-def]
    pio, _, dev, win = setup
    other = Uart()
    pio.register(0xD000, 0x40, other)
    write_cfg(pio, 1, 0x10, 0xD001)
    assert pio.read(0xD000, 1) == 0x3F
    pio.unregister(0xD000, 0x40)
    write_cfg(pio, 1, 0x10, 0xD001)
    assert pio.read(0xD005, 1) == 0x5A


def test_a_refused_memory_bar_move_never_unregisters_another_devices_range() -> None:
    pio = PioBus()
    bus = P.PciBus(pio)
    a, b = P.PciDevice(0x1AF4, 0x1001, 0x010000), P.PciDevice(0x1AF4, 0x1001, 0x010000)
    wa, wb = MmioWindow(0xA), MmioWindow(0xB)
    a.add_mem_bar(1, 0x1000, wa)
    b.add_mem_bar(1, 0x1000, wb)
    bus.add(a), bus.add(b)
    a_home, b_home = a.bar_address(1), b.bar_address(1)
    write_cfg(pio, 1, 0x14, b_home)  # a's BAR onto b's: refused
    write_cfg(pio, 1, 0x14, a_home)  # and back
    assert bus.mmio.read(b_home, 4) == 0xB and bus.mmio.read(a_home, 4) == 0xA


class MmioWindow:
    def __init__(self, value: int) -> None:
        self.value = value

    def mmio_read(self, offset: int, size: int) -> int:
        return self.value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass
