"""PCI MSI-X (PCI Local Bus 3.0, 6.8.2): the capability in config space and the vector
table and pending-bit array (PBA) in a memory BAR.

A vector fires only while MSI-X is enabled and neither the function nor the vector is
masked; otherwise its pending bit is set and it fires when unmasked (6.8.2.9).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ..state import check_length

LOG = logging.getLogger(__name__)

PCI_CAP_ID_MSIX = 0x11
MSIX_CAP_OFFSET = 0x40
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
ENTRY_SIZE = 16
VECTOR_MASKED = 0x1
TABLE_OFFSET = 0x000
PBA_OFFSET = 0x800
BAR_SIZE = 0x1000
MAX_VECTORS = PBA_OFFSET // ENTRY_SIZE


@dataclass
class MsixState:
    """The vector table and pending bits (enable and mask live in config space)."""

    entries: bytes
    pending: list[bool]


class MsixTable:
    """Vector table + PBA of one function, shared by config space and the BAR handler."""

    def __init__(self, nvec: int, bar: int, fire: Callable[[int], None],
                 route: Callable[[int, int, int], None] | None = None) -> None:
        assert 1 <= nvec <= MAX_VECTORS
        self.nvec = nvec
        self.bar = bar
        self.fire_vector = fire
        self.route = route or (lambda vec, address, data: None)
        self.entries = bytearray(ENTRY_SIZE * nvec)
        for v in range(nvec):
            struct.pack_into("<I", self.entries, v * ENTRY_SIZE + 12, VECTOR_MASKED)
        self.pending = [False] * nvec
        self.control = 0  # message control's writable bits (enable, function mask)
        self.lock = threading.RLock()

    def capability(self, next_ptr: int = 0) -> bytes:
        return struct.pack("<BBHII", PCI_CAP_ID_MSIX, next_ptr, (self.nvec - 1) | self.control,
                           TABLE_OFFSET | self.bar, PBA_OFFSET | self.bar)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    def _masked(self, vec: int) -> bool:
        ctrl = struct.unpack_from("<I", self.entries, vec * ENTRY_SIZE + 12)[0]
        return bool(self.control & MSIX_FUNCTION_MASK or ctrl & VECTOR_MASKED)

    def _message(self, vec: int) -> tuple[int, int]:
        lo, hi, data = struct.unpack_from("<III", self.entries, vec * ENTRY_SIZE)
        return (hi << 32) | lo, data

    def set_control(self, value: int) -> None:
        with self.lock:
            self.control = value & (MSIX_ENABLE | MSIX_FUNCTION_MASK)
            self._deliver_pending()

    def signal(self, vec: int) -> bool:
        """Interrupt through ``vec``; False if MSI-X is off or the vector does not exist."""
        with self.lock:
            if not self.enabled or not 0 <= vec < self.nvec:
                return False
            if self._masked(vec):
                self.pending[vec] = True
            else:
                self.fire_vector(vec)
            return True

    def _deliver_pending(self) -> None:
        for vec in range(self.nvec):
            if self.pending[vec] and self.enabled and not self._masked(vec):
                self.pending[vec] = False
                self.fire_vector(vec)

    def save_state(self) -> MsixState:
        with self.lock:
            return MsixState(bytes(self.entries), list(self.pending))

    def load_state(self, st: MsixState, where: str) -> None:
        """Write the saved table through the guest's own path (a dword at a time, so each
        vector is routed as when the guest wrote it), then the pending bits."""
        check_length(f"{where}.entries", st.entries, len(self.entries))
        check_length(f"{where}.pending", st.pending, self.nvec)
        with self.lock:
            for off in range(0, len(st.entries), 4):
                self.mmio_write(TABLE_OFFSET + off, 4, int.from_bytes(st.entries[off : off + 4], "little"))
            self.pending = list(st.pending)
            self._deliver_pending()

    # --- the BAR ----------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        with self.lock:
            if TABLE_OFFSET <= offset and offset + size <= TABLE_OFFSET + len(self.entries):
                o = offset - TABLE_OFFSET
                return int.from_bytes(self.entries[o : o + size], "little")
            if PBA_OFFSET <= offset and offset + size <= PBA_OFFSET + 8 * ((self.nvec + 63) // 64):
                bits = sum(1 << v for v, p in enumerate(self.pending) if p)
                o = offset - PBA_OFFSET
                return (bits >> (8 * o)) & ((1 << (8 * size)) - 1)
            return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if not (TABLE_OFFSET <= offset and offset + size <= TABLE_OFFSET + len(self.entries)):
                return  # the PBA is read-only; outside the table nothing decodes
            o = offset - TABLE_OFFSET
            self.entries[o : o + size] = value.to_bytes(size, "little")
            first, last = o // ENTRY_SIZE, (o + size - 1) // ENTRY_SIZE
            for vec in range(first, last + 1):
                address, data = self._message(vec)
                self.route(vec, address, data)
            self._deliver_pending()
