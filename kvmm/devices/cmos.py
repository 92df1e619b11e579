"""MC146818 CMOS RTC at ports 0x70/0x71 showing the host's (UTC) time.

Register B reads 0x02 (24-hour clock, BCD), so the guest reads BCD fields; register A's
update-in-progress bit never sets, so the guest's read loop ends at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..state import check_length, check_range

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
REG_B_24H = 0x02
REG_D_VALID_RAM = 0x80


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


@dataclass
class CmosState:
    """The device's snapshot format: the index latch, the NMI mask and the 128 bytes of RAM."""

    index: int
    nmi_disabled: bool
    ram: bytes


class Cmos:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.index = 0
        self.nmi_disabled = False
        self.ram = bytearray(128)
        self.ram[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.ram[REG_B] = REG_B_24H
        self.ram[REG_D] = REG_D_VALID_RAM
        self._clock = clock or time.time

    def save_state(self) -> CmosState:
        return CmosState(self.index, self.nmi_disabled, bytes(self.ram))

    def load_state(self, st: CmosState) -> None:
        check_range("cmos.index", st.index, 0, 0x7F)
        check_length("cmos.ram", st.ram, len(self.ram))
        self.index, self.nmi_disabled, self.ram = st.index, st.nmi_disabled, bytearray(st.ram)

    def _time_register(self, reg: int) -> int | None:
        t = time.gmtime(self._clock())
        fields = {
            REG_SECONDS: t.tm_sec,
            REG_MINUTES: t.tm_min,
            REG_HOURS: t.tm_hour,
            REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1,
            REG_DAY: t.tm_mday,
            REG_MONTH: t.tm_mon,
            REG_YEAR: t.tm_year % 100,
            REG_CENTURY: t.tm_year // 100,
        }
        if reg not in fields:
            return None
        v = fields[reg]
        return v if self.ram[REG_B] & 0x04 else _bcd(v)  # REG_B bit 2: binary mode

    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        reg = self.index
        value = self._time_register(reg)
        if value is not None:
            return value
        if reg == REG_C:  # read-to-clear interrupt flags; kvmm raises none
            return 0
        return self.ram[reg]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
        elif self.index not in (REG_C, REG_D):
            self.ram[self.index] = value & 0xFF
