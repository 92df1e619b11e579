"""An 8250/16550A UART (COM1: ports 0x3F8-0x3FF, IRQ 4).

Register semantics follow the National Semiconductor PC16550D data sheet: DLAB (LCR bit
7) banks the divisor latch over RBR/THR and IER; IIR reports the highest-priority pending
interrupt (line status > received data > THR empty > modem status) and reading it clears
a THR-empty interrupt; MCR loopback routes THR into RBR and MCR outputs into MSR (Linux's
autoconfig relies on that to find the port). Transmission is instantaneous, so LSR reads
THRE|TEMT (0x60) when no input is waiting.

The interrupt line is driven as a level: ``set_irq(level)`` is called whenever it changes.
Output goes to ``sink`` (bytes); input arrives through :meth:`receive` from another thread,
hence the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..state import check_range

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 16
RX_BACKLOG_LIMIT = 4096  # host bytes waiting beyond the FIFO; input stops past this


@dataclass
class SerialState:
    """The UART's registers and pending input (its snapshot format)."""

    ier: int
    lcr: int
    mcr: int
    lsr_errors: int
    scr: int
    dll: int
    dlm: int
    fifo_enabled: bool
    thr_interrupt: bool
    rx: bytes


class Serial8250:
    def __init__(self, sink: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None,
                 on_thri_change: Callable[[bool], None] | None = None) -> None:
        self.sink = sink
        self.set_irq = set_irq or (lambda level: None)
        self.on_thri_change = on_thri_change
        self.lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.lsr_errors = 0
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fifo_enabled = False
        self.thr_interrupt = False  # THR-empty interrupt pending (cleared by reading IIR)
        self.rx: deque[int] = deque()
        self.irq_level = 0

    # --- host side -----------------------------------------------------------------------
    def receive(self, data: bytes) -> int:
        """Queue input for the guest; returns how many bytes were accepted."""
        with self.lock:
            room = RX_BACKLOG_LIMIT - len(self.rx)
            taken = data[: max(room, 0)]
            self.rx.extend(taken)
            self._update_irq()
        return len(taken)

    def save_state(self) -> SerialState:
        with self.lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.lsr_errors, self.scr, self.dll, self.dlm,
                               self.fifo_enabled, self.thr_interrupt, bytes(self.rx))

    def load_state(self, st: SerialState) -> None:
        for name in ("ier", "lcr", "mcr", "lsr_errors", "scr", "dll", "dlm"):
            check_range(f"serial.{name}", getattr(st, name), 0, 0xFF)
        check_range("serial.rx length", len(st.rx), 0, RX_BACKLOG_LIMIT)
        with self.lock:
            self.ier, self.lcr, self.mcr = st.ier & IER_MASK, st.lcr, st.mcr & MCR_MASK
            self.lsr_errors, self.scr, self.dll, self.dlm = st.lsr_errors & LSR_OE, st.scr, st.dll, st.dlm
            self.fifo_enabled, self.thr_interrupt = st.fifo_enabled, st.thr_interrupt
            self.rx = deque(st.rx)
            self.irq_level = 0
            self._update_irq()

    def rx_room(self) -> int:
        return RX_BACKLOG_LIMIT - len(self.rx)

    # --- guest side ----------------------------------------------------------------------
    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr_errors:
            cause = IIR_RLSI
        elif self.ier & IER_RDI and self.rx:
            cause = IIR_RDI
        elif self.ier & IER_THRI and self.thr_interrupt:
            cause = IIR_THRI
        else:
            cause = IIR_NO_INT
        return cause | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _update_irq(self) -> None:
        # OUT2 gates the interrupt line to the PIC on PC hardware; Linux sets it.
        level = 1 if (self._iir() & IIR_NO_INT) == 0 else 0
        if level != self.irq_level:
            self.irq_level = level
            self.set_irq(level)

    def _lsr(self) -> int:
        return (LSR_DR if self.rx else 0) | LSR_THRE | LSR_TEMT | self.lsr_errors

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    def pio_read(self, offset: int, size: int) -> int:
        with self.lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    return self.dll
                value = self.rx.popleft() if self.rx else 0
                self._update_irq()
                return value
            if offset == IER_DLM:
                return self.dlm if dlab else self.ier
            if offset == IIR_FCR:
                iir = self._iir()
                if iir & 0x0F == IIR_THRI:
                    self.thr_interrupt = False  # reading IIR clears THRE as the source
                    self._update_irq()
                return iir
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                value = self._lsr()
                if self.lsr_errors:
                    self.lsr_errors = 0
                    self._update_irq()
                return value
            if offset == MSR:
                return self._msr()
            return self.scr

    # on_thri_change is called (outside the lock) with True or False when the guest enables
    # or disables the THR-empty interrupt: the machine queues THR writes only while it is
    # disabled (kvmm/coalesced.py).

    @property
    def thri_enabled(self) -> bool:
        return bool(self.ier & IER_THRI)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        thri_changed = False
        with self.lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR_DLL:
                if dlab:
                    self.dll = value
                    return
                if self.mcr & MCR_LOOP:
                    if len(self.rx) < RX_FIFO_SIZE:
                        self.rx.append(value)
                    else:
                        self.lsr_errors |= LSR_OE
                else:
                    self.sink(bytes((value,)))
                # The byte left at once: THR is empty again and may interrupt.
                self.thr_interrupt = True
                self._update_irq()
            elif offset == IER_DLM:
                if dlab:
                    self.dlm = value
                    return
                enabling_thri = value & IER_THRI and not self.ier & IER_THRI
                thri_changed = bool(value & IER_THRI) != bool(self.ier & IER_THRI)
                self.ier = value & IER_MASK
                if enabling_thri:
                    # THR is empty, so enabling its interrupt raises it (16550 behaviour
                    # Linux's THRE test depends on).
                    self.thr_interrupt = True
                self._update_irq()
            elif offset == IIR_FCR:
                self.fifo_enabled = bool(value & FCR_ENABLE_FIFO)
                if value & FCR_CLEAR_RCVR:
                    self.rx.clear()
                self._update_irq()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & MCR_MASK
                self._update_irq()
            elif offset == SCR:
                self.scr = value
            # LSR and MSR are read-only
        if thri_changed and self.on_thri_change is not None:
            self.on_thri_change(self.thri_enabled)
