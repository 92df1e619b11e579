"""ACPI fixed hardware, as far as a VM needs it: the PM1a event and control blocks and
the reset register the FADT points at (kvmm/acpi/tables.py), at the ports of
:data:`kvmm.layout.ACPI_PM`::

    +0  PM1_STS  16 bits  status, write 1 to clear        (ACPI 6.x 4.8.3.1.1, PM1 Status Registers)
    +2  PM1_EN   16 bits  enables                           (4.8.3.1.2, PM1 Enable Registers)
    +4  PM1_CNT  16 bits  control: SCI_EN, SLP_TYP, SLP_EN  (4.8.3.2.1, PM1 Control Registers)
    +6  RESET     8 bits  the FADT's RESET_REG              (4.8.3.6, Reset Register)
    +7  reserved

Writing SLP_TYP = 5 (the DSDT's ``\\_S5``) with SLP_EN powers the machine off (4.8.3.2.1;
16.1.7, "Transitioning from the Working to the Soft Off State"): the run ends with the
"poweroff" outcome, status 0. No other sleep state is offered (the DSDT has no ``\\_S1``
to ``\\_S4``); a request for one is logged and answered as an immediate wake: WAK_STS sets
and the guest continues, as if a wake event had come at once. Writing the FADT's
RESET_VALUE to RESET resets the machine (the run ends with the "reset" outcome, as the
i8042's reset does).

The platform raises no fixed events (no power or sleep button, no PM timer, no RTC
alarm), so the only status bit a guest may see set is WAK_STS, and the SCI never fires.
SCI_EN reads 1 always: the FADT's SMI_CMD is 0 (no System Management Mode, so no legacy
mode to leave), and the machine is in ACPI mode from the start, as ACPICA's
``acpi_hw_get_mode`` takes it when SMI_CMD is 0.

Every access is taken a byte at a time, so a guest may use any width at any offset; bits
the specification reserves read 0 and are dropped on write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import SnapshotError
from ..ratelimit import RateLimitedLog
from ..state import check_range

LOG = logging.getLogger(__name__)

# Register offsets in the block.
PM1_STS = 0
PM1_EN = 2
PM1_CNT = 4
RESET = 6
BLOCK_SIZE = 8
PM1_EVT_LEN = 4  # the FADT's PM1_EVT_LEN: status and enable
PM1_CNT_LEN = 2

# PM1 status bits (4.8.3.1.1): TMR_STS 0, BM_STS 4, GBL_STS 5, PWRBTN_STS 8, SLPBTN_STS 9,
# RTC_STS 10, PCIEXP_WAKE_STS 14, WAK_STS 15.
STS_WAK = 1 << 15
STS_DEFINED = 0x1 | 0x30 | 0x700 | 0x4000 | STS_WAK
# PM1 enable bits (4.8.3.1.2): TMR_EN 0, GBL_EN 5, PWRBTN_EN 8, SLPBTN_EN 9, RTC_EN 10,
# PCIEXP_WAKE_DIS 14. Kept, so the guest reads back what it wrote; no event ever sets.
EN_DEFINED = 0x1 | 0x20 | 0x700 | 0x4000
# PM1 control bits (4.8.3.2.1): SCI_EN 0, BM_RLD 1, GBL_RLS 2 (write-only), SLP_TYP 12:10,
# SLP_EN 13 (write-only).
CNT_SCI_EN = 1 << 0
CNT_BM_RLD = 1 << 1
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13
CNT_STORED = CNT_SCI_EN | CNT_BM_RLD | CNT_SLP_TYP

# The sleep type the DSDT's \_S5 names for soft off, and the FADT's RESET_VALUE.
SLP_TYP_S5 = 5
RESET_VALUE = 0x01


@dataclass
class AcpiPmState:
    """The device's snapshot format: the three PM1 registers as the guest reads them."""

    status: int
    enable: int
    control: int


class AcpiPm:
    """``on_poweroff()`` at an S5 request, ``on_reset()`` at a write of RESET_VALUE to RESET."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset
        self.status = 0
        self.enable = 0
        self.control = CNT_SCI_EN
        self.sleep_requests = 0  # sleep states other than S5, answered by an immediate wake
        self._log = RateLimitedLog(LOG)  # every line here is the guest's doing

    # --- snapshots --------------------------------------------------------------------
    def save_state(self) -> AcpiPmState:
        return AcpiPmState(self.status, self.enable, self.control)

    def load_state(self, st: AcpiPmState) -> None:
        """Saved registers are untrusted: each must be a value a guest could have left
        (only the bits the register has; SCI_EN set; SLP_EN, being write-only, clear)."""
        for field, value, defined in (("status", st.status, STS_DEFINED), ("enable", st.enable, EN_DEFINED),
                                      ("control", st.control, CNT_STORED)):
            check_range(f"state.acpi_pm.{field}", value, 0, 0xFFFF)
            if value & ~defined:
                raise SnapshotError(f"state.acpi_pm.{field}: {value:#x} sets bits the register does not keep "
                                    f"({value & ~defined:#x})")
        if not st.control & CNT_SCI_EN:
            raise SnapshotError(f"state.acpi_pm.control: {st.control:#x} has SCI_EN clear (kvmm is always in ACPI mode)")
        self.status, self.enable, self.control = st.status, st.enable, st.control

    def counters(self) -> dict[str, int]:
        return {"acpi_sleep_requests": self.sleep_requests}

    # --- the registers ----------------------------------------------------------------
    def _byte(self, offset: int) -> int:
        if offset in (PM1_STS, PM1_STS + 1):
            return (self.status >> (8 * (offset - PM1_STS))) & 0xFF
        if offset in (PM1_EN, PM1_EN + 1):
            return (self.enable >> (8 * (offset - PM1_EN))) & 0xFF
        if offset in (PM1_CNT, PM1_CNT + 1):
            return (self.control >> (8 * (offset - PM1_CNT))) & 0xFF
        if 0 <= offset < BLOCK_SIZE:
            return 0  # RESET is write-only; +7 is reserved
        return 0xFF  # past the block: no device answers there

    def pio_read(self, offset: int, size: int) -> int:
        return sum(self._byte(offset + i) << (8 * i) for i in range(size))

    def pio_write(self, offset: int, size: int, value: int) -> None:
        written = {offset + i: (value >> (8 * i)) & 0xFF for i in range(size) if 0 <= offset + i < BLOCK_SIZE}
        status_clear = self._register(written, PM1_STS)
        if status_clear is not None:
            self.status &= ~status_clear[0]  # write 1 to clear
        enable = self._register(written, PM1_EN)
        if enable is not None:
            self.enable = ((self.enable & ~enable[1]) | enable[0]) & EN_DEFINED
        control = self._register(written, PM1_CNT)
        if control is not None:
            self._write_control(control[0], control[1])
        if RESET in written:
            self._write_reset(written[RESET])

    @staticmethod
    def _register(written: dict[int, int], base: int) -> tuple[int, int] | None:
        """The 16-bit register at ``base`` in a write: (its written bits, the mask of the
        bytes written), or None if the write does not touch it."""
        value = mask = 0
        for i in (0, 1):
            if base + i in written:
                value |= written[base + i] << (8 * i)
                mask |= 0xFF << (8 * i)
        return (value, mask) if mask else None

    def _write_control(self, value: int, mask: int) -> None:
        merged = (self.control & ~mask) | (value & mask)
        self.control = (merged & CNT_STORED) | CNT_SCI_EN  # GBL_RLS, SLP_EN: write-only
        if not value & mask & CNT_SLP_EN:
            return
        slp_typ = (merged & CNT_SLP_TYP) >> CNT_SLP_TYP_SHIFT
        if slp_typ == SLP_TYP_S5:
            self._log.info("guest requested ACPI S5 (soft off)")
            self.on_poweroff()
            return
        # A state the DSDT does not offer (only \_S5 is there): wake at once.
        self.sleep_requests += 1
        self.status |= STS_WAK
        self._log.warning("guest asked for ACPI sleep type %d, which kvmm does not offer (only S5, type %d): "
                          "waking it at once", slp_typ, SLP_TYP_S5)

    def _write_reset(self, value: int) -> None:
        if value == RESET_VALUE:
            self._log.info("guest reset the machine through the ACPI reset register")
            self.on_reset()
        else:
            self._log.warning("guest wrote %#x to the ACPI reset register (the FADT's RESET_VALUE is %#x): ignored",
                              value, RESET_VALUE)
