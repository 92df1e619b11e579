"""PCI bus 0 with configuration mechanism #1 (ports 0xCF8-0xCFF) and a host bridge.

PCI Local Bus Specification 3.0: 3.2.2.3.2 (mechanism #1: CONFIG_ADDRESS at 0xCF8 with
the enable bit 31, bus, device, function and dword register; CONFIG_DATA at 0xCFC-0xCFF
with byte, word and dword access), 6.1 (the type 0 header) and 6.2.5.1 (BAR sizing: the
driver writes all-ones and reads back the size mask). Devices only have I/O BARs here;
when the guest moves a BAR, the port ranges on the :class:`PioBus` follow.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, SnapshotError
from ..ratelimit import RateLimitedLog
from ..state import check_length, check_range
from ..layout import IO_BAR_BASE, IO_BAR_LIMIT, MEM_BAR_BASE, MEM_BAR_LIMIT, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA
from .bus import MmioBus, PioBus

LOG = logging.getLogger(__name__)

CONFIG_ADDRESS = PCI_CONFIG_ADDRESS.base
CONFIG_DATA = PCI_CONFIG_DATA.base

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_BAR_IO = 0x1
PCI_BAR_MEM32 = 0x0
PCI_STATUS_CAP_LIST = 0x10
NUM_BARS = 6

# BAR windows: I/O above the legacy ISA ports, 32-bit memory in the MMIO hole below the
# IOAPIC (kvmm/layout.py).


@dataclass
class PciBusState:
    """The CONFIG_ADDRESS latch and each function's 256 bytes of config space, by slot."""

    address: int
    functions: list[bytes]


# Header bytes that name the function; a snapshot for other hardware is refused.
_IDENTITY = [(0x00, 4), (0x08, 4), (0x0E, 1), (0x2C, 4), (0x3D, 1)]


class PciDevice:
    """A type-0 function: 256 bytes of config space, I/O BARs, INTx."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0) -> None:
        self.config = bytearray(256)
        self.bar_sizes = [0] * NUM_BARS
        self.bar_is_io = [True] * NUM_BARS
        self.bar_handlers: list[object | None] = [None] * NUM_BARS
        self.extra_writable: dict[int, int] = {}  # capability bytes the guest may write
        struct.pack_into("<HH", self.config, PCI_VENDOR_ID, vendor, device)
        self.config[PCI_REVISION_ID] = revision
        self.config[PCI_CLASS_PROG : PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.config, PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        # Where the bus decodes each BAR (0: nowhere). Config space holds what the guest
        # wrote, which may be an address the bus refused (ports another device owns): only
        # this is ever unregistered when the BAR moves again.
        self.bar_decoded = [0] * NUM_BARS
        self.on_bar_moved: Callable[[int, int], None] | None = None  # (bar, address written)
        self.slot = 0

    def bar_relocated(self, bar: int, address: int) -> None:
        """The bus now decodes ``bar`` at ``address`` (0: nowhere). For subclasses."""

    # writable bits of the header, by offset (everything else is read-only)
    def _writable_mask(self, offset: int) -> int:
        if offset in (PCI_COMMAND, PCI_COMMAND + 1):
            return 0xFF if offset == PCI_COMMAND else 0x07  # up to INTX_DISABLE (bit 10)
        if offset == PCI_INTERRUPT_LINE:
            return 0xFF
        return self.extra_writable.get(offset, 0)

    def add_capability(self, offset: int, data: bytes, writable: dict[int, int]) -> None:
        """Chain a capability at ``offset`` (in front of the others)."""
        cap = bytearray(data)
        cap[1] = self.config[PCI_CAPABILITY_LIST]
        self.config[offset : offset + len(cap)] = cap
        self.config[PCI_CAPABILITY_LIST] = offset
        self.config[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        for off, mask in writable.items():
            self.extra_writable[offset + off] = mask

    def config_written(self, offset: int, size: int) -> None:
        """Called after a guest write to config space (for capabilities). For subclasses."""

    def add_mem_bar(self, bar: int, size: int, handler: object) -> None:
        assert size >= 16 and size & (size - 1) == 0
        self.bar_sizes[bar] = size
        self.bar_is_io[bar] = False
        self.bar_handlers[bar] = handler
        struct.pack_into("<I", self.config, PCI_BAR0 + 4 * bar, PCI_BAR_MEM32)

    def add_io_bar(self, bar: int, size: int, handler: object) -> None:
        assert size >= 4 and size & (size - 1) == 0
        self.bar_sizes[bar] = size
        self.bar_handlers[bar] = handler
        struct.pack_into("<I", self.config, PCI_BAR0 + 4 * bar, PCI_BAR_IO)

    def bar_address(self, bar: int) -> int:
        mask = ~0x3 if self.bar_is_io[bar] else ~0xF
        return struct.unpack_from("<I", self.config, PCI_BAR0 + 4 * bar)[0] & mask

    def set_interrupt(self, line: int, pin: int = 1) -> None:
        self.config[PCI_INTERRUPT_LINE] = line
        self.config[PCI_INTERRUPT_PIN] = pin

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.config, PCI_COMMAND)[0])

    def load_config(self, saved: bytes, where: str) -> None:
        """Restore config space from a snapshot by replaying the guest's writes (BARs,
        command, interrupt line, writable capability bytes) through :meth:`config_write`,
        so a saved value passes the same masks and BAR placement as a guest write."""
        check_length(where, saved, len(self.config))
        for off, n in _IDENTITY:
            if saved[off : off + n] != self.config[off : off + n]:
                raise SnapshotError(f"{where}: saved for another device (config bytes {off:#x}+{n} differ)")
        for bar in range(NUM_BARS):
            if self.bar_sizes[bar]:
                reg = PCI_BAR0 + 4 * bar
                self.config_write(reg, 4, int.from_bytes(saved[reg : reg + 4], "little"))
        self.config_write(PCI_COMMAND, 2, int.from_bytes(saved[PCI_COMMAND : PCI_COMMAND + 2], "little"))
        self.config_write(PCI_INTERRUPT_LINE, 1, saved[PCI_INTERRUPT_LINE])
        for off in sorted(self.extra_writable):
            self.config_write(off, 1, saved[off])

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if PCI_BAR0 <= offset < PCI_BAR0 + 4 * NUM_BARS:
            self._bar_write(offset, size, value)
            return
        for i in range(size):
            off = offset + i
            mask = self._writable_mask(off)
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.config[off] = (self.config[off] & ~mask) | (byte & mask)
        self.config_written(offset, size)

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        bar = (offset - PCI_BAR0) // 4
        bar_size = self.bar_sizes[bar]
        if bar_size == 0:
            return  # unimplemented BARs are hardwired to zero (6.2.5.1)
        reg = bytearray(self.config[PCI_BAR0 + 4 * bar : PCI_BAR0 + 4 * bar + 4])
        shift = offset - (PCI_BAR0 + 4 * bar)
        reg[shift : shift + size] = value.to_bytes(size, "little")[: 4 - shift]
        if self.bar_is_io[bar]:
            new = (int.from_bytes(reg, "little") & ~(bar_size - 1) & 0xFFFF) | PCI_BAR_IO
        else:
            new = (int.from_bytes(reg, "little") & ~(bar_size - 1) & 0xFFFF_FFF0) | PCI_BAR_MEM32
        struct.pack_into("<I", self.config, PCI_BAR0 + 4 * bar, new)
        # Sizing writes all-ones and reads ~(size-1): the masks above yield that. The bus
        # is asked whenever what was written differs from what it decodes (a refused
        # address written again is tried again: its owner may have moved away).
        if self.bar_address(bar) != self.bar_decoded[bar] and self.on_bar_moved is not None:
            self.on_bar_moved(bar, self.bar_address(bar))


class HostBridge(PciDevice):
    """00:00.0, an i440FX host bridge: Linux's conf1 sanity check looks for a host bridge."""

    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x1237, class_code=0x060000)


class _Window:
    """Naturally aligned BAR placement in an address window, as firmware would do it."""

    def __init__(self, name: str, base: int, limit: int) -> None:
        self.name, self.next, self.limit = name, base, limit

    def allocate(self, size: int) -> int:
        base = (self.next + size - 1) & ~(size - 1)
        if base + size > self.limit:
            raise ValueError(f"PCI {self.name} space exhausted")
        self.next = base + size
        return base


class PciBus:
    """Bus 0: config mechanism #1 plus the I/O-port windows of the devices' BARs."""

    def __init__(self, pio: PioBus, mmio: MmioBus | None = None) -> None:
        self.pio = pio
        self.mmio = mmio or MmioBus()
        self.address = 0
        self.devices: dict[int, PciDevice] = {}
        self.io_window = _Window("I/O", IO_BAR_BASE, IO_BAR_LIMIT)
        self.mem_window = _Window("memory", MEM_BAR_BASE, MEM_BAR_LIMIT)
        self.log = RateLimitedLog(LOG)  # BAR moves are the guest's to make at will
        self.add(HostBridge())
        pio.register(CONFIG_ADDRESS, 4, _ConfigAddress(self))
        pio.register(CONFIG_DATA, 4, _ConfigData(self))

    def next_slot(self) -> int:
        """The slot :meth:`add` will give the next device (its INTx line depends on it)."""
        slot = len(self.devices)
        if slot >= 32:
            raise ConfigError("PCI bus 0 is full (32 slots): too many devices")
        return slot

    def add(self, dev: PciDevice) -> int:
        slot = self.next_slot()
        self.devices[slot] = dev
        dev.slot = slot
        for bar, size in enumerate(dev.bar_sizes):
            if not size:
                continue
            io = dev.bar_is_io[bar]
            base = (self.io_window if io else self.mem_window).allocate(size)
            struct.pack_into("<I", dev.config, PCI_BAR0 + 4 * bar, base | (PCI_BAR_IO if io else PCI_BAR_MEM32))
            (self.pio if io else self.mmio).register(base, size, dev.bar_handlers[bar])  # type: ignore[arg-type]
            dev.bar_decoded[bar] = base
        # Firmware would have enabled decoding; Linux keeps BARs that are enabled.
        struct.pack_into("<H", dev.config, PCI_COMMAND, dev.command | PCI_COMMAND_IO | PCI_COMMAND_MEMORY)
        dev.on_bar_moved = lambda bar, new, dev=dev: self._move_bar(dev, bar, new)
        return slot

    def _move_bar(self, dev: PciDevice, bar: int, new: int) -> None:
        """The guest wrote ``new`` into ``bar``: stop decoding where the bus decoded it
        (only there, and only the BAR's own handler: never what another device owns),
        then decode at ``new`` unless that is 0, the sizing pattern, or taken."""
        size = dev.bar_sizes[bar]
        handler = dev.bar_handlers[bar]
        space = self.pio if dev.bar_is_io[bar] else self.mmio
        if dev.bar_decoded[bar]:
            space.unregister(dev.bar_decoded[bar], size, handler)  # type: ignore[arg-type]
            dev.bar_decoded[bar] = 0
        sizing = (~(size - 1) & 0xFFFC) if dev.bar_is_io[bar] else (~(size - 1) & 0xFFFF_FFF0)
        if new == 0 or new == sizing:
            dev.bar_relocated(bar, 0)
            return  # disabled or being sized: decode nothing until a real address arrives
        try:
            space.register(new, size, handler)  # type: ignore[arg-type]
        except ValueError:
            self.log.warning("guest moved %02x.0 BAR%d onto %s in use at %#x; BAR left undecoded", dev.slot, bar,
                             "ports" if dev.bar_is_io[bar] else "addresses", new)
            dev.bar_relocated(bar, 0)
            return
        dev.bar_decoded[bar] = new
        dev.bar_relocated(bar, new)

    def save_state(self) -> PciBusState:
        return PciBusState(self.address, [bytes(self.devices[slot].config) for slot in sorted(self.devices)])

    def load_state(self, st: PciBusState) -> None:
        check_length("pci.functions", st.functions, len(self.devices))
        self.address = check_range("pci.address", st.address, 0, 0xFFFF_FFFF) & 0x80FF_FFFC
        for slot, saved in enumerate(st.functions):
            self.devices[slot].load_config(saved, f"pci.functions[{slot}]")

    # mechanism #1
    def _selected(self) -> tuple[PciDevice | None, int]:
        a = self.address
        if not a & 0x8000_0000:
            return None, 0
        bus, slot, func, reg = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, a & 0xFC
        if bus != 0 or func != 0:
            return None, reg
        return self.devices.get(slot), reg

    def data_read(self, offset: int, size: int) -> int:
        dev, reg = self._selected()
        if dev is None:
            return (1 << (8 * size)) - 1  # no device: master abort reads all-ones
        return dev.config_read(reg + offset, size)

    def data_write(self, offset: int, size: int, value: int) -> None:
        dev, reg = self._selected()
        if dev is not None:
            dev.config_write(reg + offset, size, value)


class _ConfigAddress:
    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        return (self.bus.address >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.bus.address = value & 0x80FF_FFFC
        # Byte writes to 0xCF8-0xCFB belong to mechanism #2 / other uses: ignored.


class _ConfigData:
    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def pio_read(self, offset: int, size: int) -> int:
        if offset + size > 4:
            return (1 << (8 * size)) - 1
        return self.bus.data_read(offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset + size <= 4:
            self.bus.data_write(offset, size, value)
