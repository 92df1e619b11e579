"""i8042 reset, CMOS RTC, POST/debug-exit ports and the port bus."""

from __future__ import annotations

import calendar

import pytest

from kvmm.devices.bus import PioBus
from kvmm.devices.cmos import Cmos
from kvmm.devices.debug import DebugExit, PostCode
from kvmm.devices.i8042 import I8042


def test_i8042_pulse_reset_command_resets() -> None:
    resets: list[int] = []
    dev = I8042(lambda: resets.append(1))
    assert dev.pio_read(4, 1) & 0x02 == 0  # input buffer empty: Linux may send the command
    dev.pio_write(4, 1, 0xAA)
    assert resets == []
    dev.pio_write(4, 1, 0xFE)
    assert resets == [1]
    dev.pio_write(0, 1, 0xFE)  # 0xFE on the data port is not a command
    assert resets == [1]


def cmos_read(dev: Cmos, reg: int) -> int:
    dev.pio_write(0, 1, reg)
    return dev.pio_read(1, 1)


def bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def test_cmos_reports_clock_time_in_bcd() -> None:
    t = calendar.timegm((2026, 11, 24, 17, 5, 59, 0, 0, 0))
    dev = Cmos(clock=lambda: t)
    assert cmos_read(dev, 0x0B) & 0x04 == 0  # BCD mode
    assert [bcd(cmos_read(dev, r)) for r in (0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00)] == [20, 26, 11, 24, 17, 5, 59]
    assert cmos_read(dev, 0x0A) & 0x80 == 0  # never "update in progress"


def test_cmos_binary_mode_when_guest_sets_reg_b_dm() -> None:
    t = calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0))
    dev = Cmos(clock=lambda: t)
    dev.pio_write(0, 1, 0x0B)
    dev.pio_write(1, 1, 0x06)
    assert cmos_read(dev, 0x00) == 5 and cmos_read(dev, 0x04) == 3


def test_cmos_nvram_and_nmi_mask_bit() -> None:
    dev = Cmos()
    dev.pio_write(0, 1, 0x80 | 0x40)
    assert dev.nmi_disabled
    dev.pio_write(1, 1, 0x99)
    assert cmos_read(dev, 0x40) == 0x99
    assert cmos_read(dev, 0x0D) & 0x80  # battery good


def test_post_code_counted_not_logged() -> None:
    dev = PostCode()
    for v in range(300):
        dev.pio_write(0, 1, v)
    assert dev.writes == 300 and dev.last == 299 & 0xFF


def test_debug_exit_reports_value() -> None:
    seen: list[int] = []
    DebugExit(seen.append).pio_write(0, 1, 0x2A)
    assert seen == [0x2A]


def test_bus_dispatches_by_offset_and_counts_unclaimed_ports() -> None:
    bus = PioBus()
    seen: list[tuple[int, int, int]] = []

    class Dev:
        def pio_read(self, offset: int, size: int) -> int:
            return 0x40 + offset

        def pio_write(self, offset: int, size: int, value: int) -> None:
            seen.append((offset, size, value))

    bus.register(0x100, 4, Dev())
    bus.write(0x102, 2, 0xBEEF)
    assert seen == [(2, 2, 0xBEEF)]
    assert bus.read(0x103, 1) == 0x43
    assert bus.read(0x200, 1) == 0xFF and bus.read(0x200, 4) == 0xFFFFFFFF
    bus.write(0x200, 1, 0)
    assert bus.unhandled[0x200] == 3


def test_bus_refuses_overlapping_devices() -> None:
    bus = PioBus()
    bus.register(0x100, 4, PostCode())
    with pytest.raises(ValueError):
        bus.register(0x103, 1, PostCode())
