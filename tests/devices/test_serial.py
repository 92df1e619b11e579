"""The 8250/16550A register model, checked against the PC16550D data sheet."""

from __future__ import annotations

import pytest

from kvmm.devices import serial as S


class Uart:
    def __init__(self) -> None:
        self.out = bytearray()
        self.irq_changes: list[int] = []
        self.dev = S.Serial8250(self.out.extend, self.irq_changes.append)

    def r(self, off: int) -> int:
        return self.dev.pio_read(off, 1)

    def w(self, off: int, v: int) -> None:
        self.dev.pio_write(off, 1, v)

    @property
    def irq(self) -> int:
        return self.dev.irq_level


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_idle_lsr_reads_thre_and_temt(uart: Uart) -> None:
    assert uart.r(S.LSR) == 0x60


def test_thr_write_goes_to_output(uart: Uart) -> None:
    for c in b"ok\n":
        uart.w(S.RBR_THR_DLL, c)
    assert bytes(uart.out) == b"ok\n"


def test_dlab_banks_divisor_latch_over_thr_and_ier(uart: Uart) -> None:
    uart.w(S.LCR, 0x83)
    uart.w(S.RBR_THR_DLL, 0x01)  # DLL: not transmitted
    uart.w(S.IER_DLM, 0x02)
    assert (uart.r(S.RBR_THR_DLL), uart.r(S.IER_DLM)) == (0x01, 0x02)
    assert uart.out == b""
    uart.w(S.LCR, 0x03)
    assert uart.r(S.IER_DLM) == 0  # IER untouched by the DLM write
    assert uart.r(S.LCR) == 0x03


def test_ier_keeps_only_the_four_defined_bits(uart: Uart) -> None:
    # Linux's autoconfig detects XScale UARTs by a sticky bit 6 (UUE); a 16550A has none.
    uart.w(S.IER_DLM, 0xFF)
    assert uart.r(S.IER_DLM) == 0x0F


def test_iir_reports_fifo_enabled_as_16550a(uart: Uart) -> None:
    assert uart.r(S.IIR_FCR) == S.IIR_NO_INT
    uart.w(S.IIR_FCR, S.FCR_ENABLE_FIFO)
    assert uart.r(S.IIR_FCR) & 0xC0 == 0xC0


def test_enabling_thri_raises_thre_interrupt_and_iir_read_clears_it(uart: Uart) -> None:
    uart.w(S.IER_DLM, S.IER_THRI)
    assert uart.irq == 1
    assert uart.r(S.IIR_FCR) & 0x0F == S.IIR_THRI
    assert uart.irq == 0
    assert uart.r(S.IIR_FCR) & 0x0F == S.IIR_NO_INT


def test_thr_write_rearms_thre_interrupt(uart: Uart) -> None:
    uart.w(S.IER_DLM, S.IER_THRI)
    uart.r(S.IIR_FCR)
    uart.w(S.RBR_THR_DLL, ord("x"))
    assert uart.irq == 1 and uart.r(S.IIR_FCR) & 0x0F == S.IIR_THRI


def test_received_data_sets_dr_and_interrupts_when_enabled(uart: Uart) -> None:
    uart.w(S.IER_DLM, S.IER_RDI)
    assert uart.dev.receive(b"ab") == 2
    assert uart.r(S.LSR) & S.LSR_DR
    assert uart.irq == 1
    assert uart.r(S.IIR_FCR) & 0x0F == S.IIR_RDI
    assert uart.r(S.RBR_THR_DLL) == ord("a")
    assert uart.irq == 1
    assert uart.r(S.RBR_THR_DLL) == ord("b")
    assert uart.irq == 0 and uart.r(S.LSR) == 0x60
    assert uart.r(S.RBR_THR_DLL) == 0  # empty RBR reads 0, no underflow


def test_rx_interrupt_has_priority_over_thre(uart: Uart) -> None:
    uart.w(S.IER_DLM, S.IER_RDI | S.IER_THRI)
    uart.dev.receive(b"z")
    assert uart.r(S.IIR_FCR) & 0x0F == S.IIR_RDI


def test_no_interrupt_without_ier(uart: Uart) -> None:
    uart.dev.receive(b"q")
    assert uart.irq == 0 and uart.irq_changes == []


def test_fcr_clears_receive_fifo(uart: Uart) -> None:
    uart.dev.receive(b"junk")
    uart.w(S.IIR_FCR, S.FCR_ENABLE_FIFO | S.FCR_CLEAR_RCVR)
    assert not uart.r(S.LSR) & S.LSR_DR


def test_loopback_routes_mcr_to_msr_as_linux_autoconfig_expects(uart: Uart) -> None:
    # serial8250 autoconfig: MCR = LOOP | OUT2 | RTS must read back MSR & 0xF0 == 0x90.
    uart.w(S.MCR, S.MCR_LOOP | S.MCR_OUT2 | S.MCR_RTS)
    assert uart.r(S.MSR) & 0xF0 == 0x90
    uart.w(S.MCR, S.MCR_LOOP | S.MCR_DTR | S.MCR_OUT1)
    assert uart.r(S.MSR) & 0xF0 == S.MSR_DSR | S.MSR_RI


def test_loopback_routes_thr_to_rbr_not_output(uart: Uart) -> None:
    uart.w(S.MCR, S.MCR_LOOP)
    uart.w(S.RBR_THR_DLL, 0x5A)
    assert uart.out == b""
    assert uart.r(S.LSR) & S.LSR_DR and uart.r(S.RBR_THR_DLL) == 0x5A


def test_loopback_overrun_sets_oe_and_lsr_read_clears_it(uart: Uart) -> None:
    uart.w(S.MCR, S.MCR_LOOP)
    for i in range(S.RX_FIFO_SIZE + 1):
        uart.w(S.RBR_THR_DLL, i)
    assert uart.r(S.LSR) & S.LSR_OE
    assert not uart.r(S.LSR) & S.LSR_OE


def test_scratch_register_holds_a_byte(uart: Uart) -> None:
    uart.w(S.SCR, 0xA5)
    assert uart.r(S.SCR) == 0xA5


def test_msr_outside_loopback_reports_carrier(uart: Uart) -> None:
    assert uart.r(S.MSR) == S.MSR_DCD | S.MSR_DSR | S.MSR_CTS


def test_host_input_is_bounded(uart: Uart) -> None:
    taken = uart.dev.receive(b"x" * (S.RX_BACKLOG_LIMIT + 100))
    assert taken == S.RX_BACKLOG_LIMIT
    assert uart.dev.receive(b"more") == 0


def test_irq_line_only_toggles_on_change(uart: Uart) -> None:
    uart.w(S.IER_DLM, S.IER_RDI)
    uart.dev.receive(b"a")
    uart.dev.receive(b"b")
    assert uart.irq_changes == [1]


def test_console_line_buffer_is_bounded_for_a_guest_that_never_ends_a_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmm.console import LINE_LIMIT, ConsoleOutput

    seen: list[bytes] = []
    out = ConsoleOutput(path=str(tmp_path / "c.log"))
    out.listeners.append(seen.append)
    for _ in range(3 * LINE_LIMIT // 4096):
        out.write(b"x" * 4096)
    assert len(out._line) <= LINE_LIMIT
    out.write(b"end\n")
    assert len(seen) == 1 and len(seen[0]) <= LINE_LIMIT + 4 and seen[0].endswith(b"xxend")
    out.close()
    assert (tmp_path / "c.log").stat().st_size == 3 * LINE_LIMIT + 4  # the output itself is complete
