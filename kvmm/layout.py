"""The machine's map, in one place (as Firecracker's ``arch/x86_64/layout.rs``): where
kvmm puts things in guest-physical memory and which I/O ports its devices answer.

Plain constants, no kvmm imports: the ``kvmm`` command reads some before it loads the
rest of kvmm (kvmm/cli.py). The modules that use a value import it from here; the
constants they re-export under their old names are these same objects.

Guest-physical memory (x86-64)::

    0x0000_0500  boot GDT                               (x86.write_boot_tables)
    0x0000_7000  zero page, struct boot_params          (loader)
    0x0000_8ff0  boot stack top
    0x0000_9000  identity-map page tables: PML4, PDPT, 4 PDs (6 pages)
    0x0001_0000  flat real-mode image, entered at 1000:0000 (--kernel-format flat)
    0x0002_0000  kernel command line (64 KiB)
    0x0009_fc00  EBDA: MP floating pointer and table; reserved in e820 up to 1 MiB
    0x000e_0000  ACPI tables: RSDP first, then FACS, DSDT, FADT, MADT, RSDT, XSDT
                 (kvmm/acpi/; in the BIOS area the e820 map reserves; not with --no-acpi)
    0x0010_0000  high memory: kernel, initrd at the top of low RAM
                 (a multiboot kernel goes where its headers say, in RAM clear of the EBDA
                 area; its boot information and modules follow it: loader/multiboot.py)
    0xc000_0000  end of low RAM: the 32-bit PCI/MMIO hole starts
    0xe000_0000  32-bit PCI memory BARs (MSI-X tables), up to the IOAPIC
    0xfec0_0000  IOAPIC
    0xfee0_0000  local APICs
    0xff00_0000  QEMU pc-testdev's 64 KiB scratch memory (--pc-testdev only)
    0xfffb_c000  identity-map page for Intel real-mode emulation (KVM_SET_IDENTITY_MAP_ADDR)
    0xfffb_d000  three pages of TSS for the same (KVM_SET_TSS_ADDR)
    0x1_0000_0000  RAM above 3 GiB continues here

I/O ports: see :data:`PORT_MAP`. PCI I/O BARs are placed from :data:`IO_BAR_BASE` up.
"""



class PortRange:
    """``length`` I/O ports from ``base`` (a slotted class: a NamedTuple costs ~0.3 ms more
    to create at import, and this module loads at every start)."""

    __slots__ = ("base", "length")

    def __init__(self, base: int, length: int) -> None:
        self.base, self.length = base, length

    def __repr__(self) -> str:
        return f"PortRange({self.base:#x}, {self.length})"


# --- guest-physical memory ------------------------------------------------------------
GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
BOOT_STACK = 0x8FF0
PML4_ADDR = 0x9000
FLAT_SEGMENT = 0x1000  # a flat image runs at 1000:0000, where kvmtool loads one
FLAT_LOAD_ADDR = FLAT_SEGMENT << 4
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # bytes reserved at CMDLINE_ADDR
EBDA_START = 0x9FC00  # the MP table lives here; reserved in e820
VGA_HOLE = 0xA0000  # legacy VGA and BIOS area up to 1 MiB
# ACPI 6.5 5.2.5.1: OSPM finds the RSDP on a 16-byte boundary in the first KiB of the
# EBDA or in the BIOS read-only area 0xE0000-0xFFFFF; kvmm also hands its address over in
# boot_params.acpi_rsdp_addr. The tables follow it in the same 64 KiB.
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_SIZE = 0x10000
HIMEM_START = 0x100000
LOW_RAM_END = 0xC000_0000  # RAM below the 32-bit PCI/MMIO hole ...
HIGH_RAM_START = 0x1_0000_0000  # ... and the rest above 4 GiB
MEM_BAR_BASE = 0xE000_0000  # 32-bit memory BARs (MSI-X tables) go in the MMIO hole
MEM_BAR_LIMIT = 0xFEC0_0000  # below the IOAPIC
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
# Three pages below the 4 GiB BIOS area for the TSS and identity map that Intel's
# real-mode emulation needs (KVM_SET_TSS_ADDR, api.rst), where QEMU and Firecracker put them.
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000

# --- I/O ports ------------------------------------------------------------------------
POST = PortRange(0x80, 1)  # POST codes: counted, boot markers
I8042 = PortRange(0x60, 5)  # keyboard controller (data 0x60, command 0x64): reset only
CMOS = PortRange(0x70, 2)  # MC146818 RTC index/data
COM1 = PortRange(0x3F8, 8)  # 16550A UART, ttyS0
DEBUG_EXIT = PortRange(0x501, 1)  # test guests end the VM with a status
PCI_CONFIG_ADDRESS = PortRange(0xCF8, 4)  # configuration mechanism #1
PCI_CONFIG_DATA = PortRange(0xCFC, 4)
# Devices of test kernels written for QEMU (kvmm/testkernels.py), present only when asked for.
TESTDEV_DATA = PortRange(0xE0, 4)  # pc-testdev scratch register (--pc-testdev)
TESTDEV_FLUSH = PortRange(0xE4, 4)  # pc-testdev page flush
TESTDEV_BYTE = PortRange(0xE8, 4)  # pc-testdev scratch register, byte view
TESTDEV_IRQ = PortRange(0x2000, 24)  # pc-testdev interrupt lines 0-23
TESTDEV_IOMEM = 0xFF00_0000  # pc-testdev scratch memory (MMIO)
TESTDEV_IOMEM_SIZE = 0x1_0000
FW_CFG = PortRange(0x510, 2)  # QEMU fw_cfg selector and data (multiboot kernels)
# ACPI PM1a event block (status, enable), PM1a control block and the reset register
# (kvmm/devices/acpi_pm.py), where QEMU's PIIX4 and ICH9 put their PM base; not with --no-acpi.
ACPI_PM = PortRange(0x600, 8)
IO_BAR_BASE = 0xC000  # PCI I/O BARs, above the legacy ISA ports (as kvmtool and QEMU)
IO_BAR_LIMIT = 0x10000

PORT_MAP = {
    "post": POST, "i8042": I8042, "cmos": CMOS, "com1": COM1, "debug_exit": DEBUG_EXIT,
    "pci_config_address": PCI_CONFIG_ADDRESS, "pci_config_data": PCI_CONFIG_DATA,
    "testdev_data": TESTDEV_DATA, "testdev_flush": TESTDEV_FLUSH, "testdev_byte": TESTDEV_BYTE,
    "testdev_irq": TESTDEV_IRQ, "fw_cfg": FW_CFG, "acpi_pm": ACPI_PM,
}

# --- interrupts -----------------------------------------------------------------------
COM1_IRQ = 4  # ISA IRQ of COM1
SCI_IRQ = 9  # the ACPI System Control Interrupt (FADT SCI_INT), level-triggered; kvmm never raises it
PCI_IRQ_BASE = 16  # IOAPIC inputs 16-23 carry PCI INTA of slots 1, 2, ...
PCI_IRQ_COUNT = 8
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS  # GSIs above the IOAPIC's inputs are MSI routes


def pci_intx_gsi(slot: int) -> int:
    """The IOAPIC input of INTA# of PCI slot ``slot`` (the MP table declares the same)."""
    return PCI_IRQ_BASE + (slot - 1) % PCI_IRQ_COUNT
