"""The ACPI PM1 registers and reset register (kvmm/devices/acpi_pm.py) as a guest drives
them: the S5 power-off and the reset the FADT advertises, and every other write a
guest may make, which must neither stop the machine nor raise."""

from __future__ import annotations

import pytest

from kvmm.devices import acpi_pm as pm
from kvmm.devices.acpi_pm import AcpiPm, AcpiPmState
from kvmm.errors import SnapshotError

S5_REQUEST = (pm.SLP_TYP_S5 << pm.CNT_SLP_TYP_SHIFT) | pm.CNT_SLP_EN  # 0x3400


class Events:
    def __init__(self) -> None:
        self.poweroffs = 0
        self.resets = 0

    def device(self) -> AcpiPm:
        return AcpiPm(self.poweroff, self.reset)

    def poweroff(self) -> None:
        self.poweroffs += 1

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def ev() -> Events:
    return Events()


def test_s5_request_powers_off(ev: Events) -> None:
    # What ACPICA's acpi_hw_legacy_sleep writes for \_S5: SLP_TYP first, then with SLP_EN
    dev = ev.device()
    dev.pio_write(pm.PM1_CNT, 2, pm.CNT_SCI_EN | (pm.SLP_TYP_S5 << pm.CNT_SLP_TYP_SHIFT))
    assert ev.poweroffs == 0
    dev.pio_write(pm.PM1_CNT, 2, pm.CNT_SCI_EN | S5_REQUEST)
    assert ev.poweroffs == 1 and ev.resets == 0


def test_s5_request_by_a_byte_write_to_the_high_half(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_CNT + 1, 1, S5_REQUEST >> 8)
    assert ev.poweroffs == 1


def test_s5_request_in_a_dword_write_spanning_enable_and_control(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_EN, 4, (S5_REQUEST << 16) | 0x0100)
    assert ev.poweroffs == 1 and dev.enable == 0x0100


def test_slp_typ_without_slp_en_does_nothing(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_CNT, 2, pm.SLP_TYP_S5 << pm.CNT_SLP_TYP_SHIFT)
    dev.pio_write(pm.PM1_CNT, 1, 0xFF)  # the low byte: SLP_EN is in the high one
    assert ev.poweroffs == 0


@pytest.mark.parametrize("slp_typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_types_wake_at_once(ev: Events, slp_typ: int) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_CNT, 2, (slp_typ << pm.CNT_SLP_TYP_SHIFT) | pm.CNT_SLP_EN)
    assert ev.poweroffs == 0
    assert dev.pio_read(pm.PM1_STS, 2) & pm.STS_WAK  # the guest's wait for WAK_STS ends
    assert dev.counters() == {"acpi_sleep_requests": 1}
    dev.pio_write(pm.PM1_STS, 2, pm.STS_WAK)  # write 1 to clear
    assert dev.pio_read(pm.PM1_STS, 2) == 0


def test_slp_en_reads_zero_and_sci_en_one(ev: Events) -> None:
    dev = ev.device()
    assert dev.pio_read(pm.PM1_CNT, 2) == pm.CNT_SCI_EN  # ACPI mode from the start (SMI_CMD 0)
    dev.pio_write(pm.PM1_CNT, 2, 0xFFFF & ~pm.CNT_SLP_EN)
    value = dev.pio_read(pm.PM1_CNT, 2)
    assert value == pm.CNT_STORED  # SCI_EN, BM_RLD, SLP_TYP; reserved bits and GBL_RLS dropped
    dev.pio_write(pm.PM1_CNT, 2, 0)
    assert dev.pio_read(pm.PM1_CNT, 2) == pm.CNT_SCI_EN  # SCI_EN cannot be cleared


def test_enable_register_keeps_defined_bits(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_EN, 2, 0xFFFF)
    assert dev.pio_read(pm.PM1_EN, 2) == pm.EN_DEFINED
    dev.pio_write(pm.PM1_EN + 1, 1, 0)  # a byte write changes only its byte
    assert dev.pio_read(pm.PM1_EN, 2) == pm.EN_DEFINED & 0xFF


def test_status_never_sets_by_writing(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_STS, 2, 0xFFFF)
    assert dev.pio_read(pm.PM1_STS, 2) == 0


def test_reset_register(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.RESET, 1, 0x06)  # not the FADT's RESET_VALUE: ignored
    assert ev.resets == 0
    dev.pio_write(pm.RESET, 1, pm.RESET_VALUE)
    assert ev.resets == 1 and ev.poweroffs == 0
    assert dev.pio_read(pm.RESET, 1) == 0  # write-only


def test_accesses_past_the_block_are_inert(ev: Events) -> None:
    dev = ev.device()
    assert dev.pio_read(pm.BLOCK_SIZE - 1, 4) == 0xFFFFFF00  # reserved +7, then nothing
    dev.pio_write(pm.BLOCK_SIZE - 2, 4, 0xFFFF_FFFF)  # RESET gets 0xFF (not RESET_VALUE)
    assert ev.resets == 0 and ev.poweroffs == 0


def test_every_write_of_every_width_is_safe() -> None:
    """No value at any offset and width raises; only the two documented requests stop."""
    for offset in range(pm.BLOCK_SIZE):
        for size in (1, 2, 4):
            for value in (0, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0x3400, 0x2000, 0x01):
                ev = Events()
                dev = ev.device()
                dev.pio_write(offset, size, value)
                assert 0 <= dev.pio_read(offset, size) < 1 << (8 * size)


def test_state_round_trips(ev: Events) -> None:
    dev = ev.device()
    dev.pio_write(pm.PM1_EN, 2, 0x0100)
    dev.pio_write(pm.PM1_CNT, 2, 3 << pm.CNT_SLP_TYP_SHIFT | pm.CNT_SLP_EN)  # an S3 request: WAK_STS
    st = dev.save_state()
    other = Events().device()
    other.load_state(st)
    assert other.save_state() == st == AcpiPmState(pm.STS_WAK, 0x0100, pm.CNT_SCI_EN | 3 << pm.CNT_SLP_TYP_SHIFT)


@pytest.mark.parametrize("state", [
    AcpiPmState(1 << 1, 0, pm.CNT_SCI_EN),  # a reserved status bit
    AcpiPmState(0, 1 << 1, pm.CNT_SCI_EN),  # a reserved enable bit
    AcpiPmState(0, 0, pm.CNT_SCI_EN | pm.CNT_SLP_EN),  # SLP_EN is never stored
    AcpiPmState(0, 0, 0),  # SCI_EN is always set
    AcpiPmState(-1, 0, pm.CNT_SCI_EN),
    AcpiPmState(0, 1 << 16, pm.CNT_SCI_EN),
])
def test_impossible_saved_state_is_refused(ev: Events, state: AcpiPmState) -> None:
    with pytest.raises(SnapshotError):
        ev.device().load_state(state)
