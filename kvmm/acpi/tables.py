"""The ACPI tables kvmm writes, as bytes (ACPI 6.5 chapter 5, "ACPI Software Programming
Model"; section numbers below are that chapter's).

Each builder returns one table with its header and checksum; :func:`build` lays them all
out from a base address and links them: RSDP -> RSDT and XSDT -> FADT and MADT; FADT ->
FACS and DSDT. What they describe is kvmm's machine (kvmm/layout.py): a local APIC per
vCPU, the IOAPIC, the ISA interrupts as the MP table maps them (kvmm/x86.py), the PM1
blocks and reset register of kvmm/devices/acpi_pm.py, and the DSDT of kvmm/acpi/dsdt.py.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .. import layout
from ..devices import acpi_pm as pm
from ..errors import AcpiError

OEM_ID = b"KVMM  "
OEM_REVISION = 1
CREATOR_ID = b"KVMM"
CREATOR_REVISION = 1
HEADER_SIZE = 36


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 modulo 256 (5.2.6, "Checksum")."""
    return (-sum(data)) & 0xFF


def _finish(table: bytearray, at: int = 9) -> bytes:
    table[at] = checksum(bytes(table))
    return bytes(table)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header of 5.2.6 (signature, length,
    revision, checksum, OEM ID, OEM table ID, OEM revision, creator ID and revision),
    then ``body``, checksummed."""
    if len(signature) != 4:
        raise AcpiError(f"table signature {signature!r} is not 4 bytes")
    table = bytearray(struct.pack("<4sIBB6s8sI4sI", signature, HEADER_SIZE + len(body), revision, 0, OEM_ID,
                                  b"KVMM" + signature, OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body)
    return _finish(table)


# --- 5.2.5.3 Root System Description Pointer ---------------------------------------------
RSDP_SIZE = 36
RSDP_REVISION = 2  # ACPI 2.0 and later: the XSDT address and the extended checksum


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The RSDP: "RSD PTR ", a checksum over its first 20 bytes (the ACPI 1.0 part), OEM
    ID, revision, RSDT address, length, XSDT address, a checksum over all 36 bytes."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, rsdt_addr, RSDP_SIZE,
                                 xsdt_addr, 0))
    data[8] = checksum(bytes(data[:20]))
    data[32] = checksum(bytes(data))
    return bytes(data)


# --- 5.2.7 RSDT and 5.2.8 XSDT ------------------------------------------------------------
def rsdt(entries: list[int]) -> bytes:
    """The RSDT: 32-bit addresses of the other tables (for OSPMs that read only it,
    such as kvm-unit-tests' ACPI code)."""
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in entries))


def xsdt(entries: list[int]) -> bytes:
    """The XSDT: 64-bit addresses of the other tables (what Linux reads, RSDP revision 2)."""
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


# --- 5.2.3.2 Generic Address Structure ---------------------------------------------------
SPACE_SYSTEM_IO = 1
ACCESS_UNDEFINED, ACCESS_BYTE, ACCESS_WORD = 0, 1, 2


def gas(space: int, bit_width: int, address: int, access_size: int = ACCESS_UNDEFINED) -> bytes:
    """A GAS: address space, register bit width, bit offset 0, access size, address."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


NO_GAS = bytes(12)


# --- 5.2.9 Fixed ACPI Description Table ---------------------------------------------------
FADT_REVISION = 6  # the 276-byte FADT of ACPI 6.0 and later
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
# Flags (5.2.9, Table "Fixed ACPI Description Table Fixed Feature Flags").
FADT_WBINVD = 1 << 0  # WBINVD works (required of ACPI 1.0 and later platforms)
FADT_PROC_C1 = 1 << 2  # C1 (hlt) works on every processor
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_FIX_RTC = 1 << 6  # set: the RTC's wake status is not in the fixed registers
FADT_RESET_REG_SUP = 1 << 10  # RESET_REG and RESET_VALUE are valid
# IA-PC boot architecture flags (5.2.9.3): the ISA devices (UART, CMOS) are there, no VGA.
# The 8042 flag stays clear: kvmm's i8042 only resets (an OS would find no keyboard).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_VGA_NOT_PRESENT = 1 << 2
P_LVL2_LAT_NONE = 101  # > 100: no C2 (5.2.9)
P_LVL3_LAT_NONE = 1001  # > 1000: no C3
CMOS_CENTURY = 0x32  # the CMOS register kvmm's RTC keeps the century in (kvmm/devices/cmos.py)


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    """The FADT: SCI on IRQ 9, no SMI command port (ACPI mode from the start), the PM1a
    event and control blocks and the reset register of kvmm/devices/acpi_pm.py, no PM
    timer, no GPE blocks, no C2/C3. Each block is given twice, as the 32-bit port field
    and as the 64-bit X_ GAS, with the same address and length (ACPICA checks that they
    agree); the DSDT's address likewise, the FACS's in FIRMWARE_CTRL alone."""
    base = layout.ACPI_PM.base
    evt, cnt, reset = base + pm.PM1_STS, base + pm.PM1_CNT, base + pm.RESET
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(36, "<II", facs_addr, dsdt_addr)  # FIRMWARE_CTRL, DSDT
    put(46, "<HI", layout.SCI_IRQ, 0)  # SCI_INT, SMI_CMD (0: no SMM, so ACPI_ENABLE/DISABLE are 0 too)
    put(56, "<IIII", evt, 0, cnt, 0)  # PM1a_EVT_BLK, PM1b_EVT_BLK, PM1a_CNT_BLK, PM1b_CNT_BLK
    put(88, "<BB", pm.PM1_EVT_LEN, pm.PM1_CNT_LEN)  # PM1_EVT_LEN, PM1_CNT_LEN (PM2, timer, GPEs: 0)
    put(96, "<HH", P_LVL2_LAT_NONE, P_LVL3_LAT_NONE)
    put(108, "<BH", CMOS_CENTURY, IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT)  # CENTURY, IAPC_BOOT_ARCH
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP)
    put(116, "<12sB", gas(SPACE_SYSTEM_IO, 8, reset, ACCESS_BYTE), pm.RESET_VALUE)  # RESET_REG, RESET_VALUE
    # X_FIRMWARE_CTRL stays 0: "If the FIRMWARE_CTRL field contains a non zero value then
    # this field must be zero" (5.2.9). X_DSDT may repeat DSDT.
    put(131, "<BQQ", FADT_MINOR_REVISION, 0, dsdt_addr)  # minor version, X_FIRMWARE_CTRL, X_DSDT
    put(148, "<12s", gas(SPACE_SYSTEM_IO, 8 * pm.PM1_EVT_LEN, evt))  # X_PM1a_EVT_BLK
    put(172, "<12s", gas(SPACE_SYSTEM_IO, 8 * pm.PM1_CNT_LEN, cnt))  # X_PM1a_CNT_BLK
    put(268, "<8s", b"KVMMKVMM")  # Hypervisor Vendor Identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# --- 5.2.10 Firmware ACPI Control Structure ----------------------------------------------
FACS_SIZE = 64
FACS_ALIGN = 64  # "The FACS must be aligned on a 64-byte boundary"
FACS_VERSION = 2


def facs() -> bytes:
    """The FACS (no header checksum): hardware signature 0, no waking vector (kvmm
    offers no sleep state to wake from), the global lock free, no S4BIOS."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, 0)


# --- 5.2.12 Multiple APIC Description Table -----------------------------------------------
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # the two 8259 PICs are there too (KVM's in-kernel irqchip has them)
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_ISO, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
# MPS INTI flags (5.2.12.5): polarity bits 1:0 (01 active high, 11 active low), trigger
# mode bits 3:2 (01 edge, 11 level).
INTI_ACTIVE_HIGH_LEVEL = 0x0D
ALL_PROCESSORS = 0xFF
NMI_LINT = 1


def madt(cpus: int) -> bytes:
    """The MADT, what the MP table says in ACPI's words (kvmm/x86.py build_mptable): a
    local APIC per vCPU (processor UID = APIC ID = index; the DSDT's processor devices
    use the same UIDs), the IOAPIC (ID ``cpus``, as in the MP table; GSI base 0), and NMI
    on LINT1 of every processor. The MP table maps ISA IRQ n to IOAPIC input n, which is
    ACPI's default (5.2.12.5: "It is assumed that the ISA interrupts will be
    identity-mapped into the first I/O APIC sources"), so the one override is the SCI's: IRQ 9 becomes
    level-triggered, active high, as QEMU declares it (an SCI is active low by default;
    KVM's IOAPIC does not look at polarity)."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(cpus):  # 5.2.12.2 Processor Local APIC Structure
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, cpus, 0, layout.IOAPIC_ADDR, 0)  # 5.2.12.3
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, layout.SCI_IRQ, layout.SCI_IRQ, INTI_ACTIVE_HIGH_LEVEL)  # 5.2.12.5
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, NMI_LINT)  # 5.2.12.7
    return sdt(b"APIC", MADT_REVISION, bytes(body))


# --- the set ----------------------------------------------------------------------------
class Tables(NamedTuple):
    """The tables laid out from ``base``: ``blob`` is written there; ``rsdp`` is its
    address (``base`` itself); ``offsets`` names each table's offset in ``blob``."""

    base: int
    blob: bytes
    offsets: dict[str, int]

    @property
    def rsdp(self) -> int:
        return self.base + self.offsets["RSDP"]

    def table(self, name: str) -> bytes:
        """One table's bytes (its length from its header; the RSDP's and FACS's are fixed)."""
        at = self.offsets[name]
        size = RSDP_SIZE if name == "RSDP" else struct.unpack_from("<I", self.blob, at + 4)[0]
        return self.blob[at : at + size]


def _align(n: int, to: int) -> int:
    return (n + to - 1) & ~(to - 1)


def build(base: int, cpus: int, dsdt_table: bytes, limit: int = layout.ACPI_TABLES_SIZE) -> Tables:
    """Every table, laid out from ``base`` (16-byte aligned, as the RSDP must be; the
    FACS on its 64-byte boundary) and linked; the DSDT is given whole."""
    if base % 16:
        raise AcpiError(f"ACPI tables at {base:#x}: the RSDP must be 16-byte aligned")
    offsets: dict[str, int] = {}
    parts: list[bytes] = []
    cursor = 0

    def place(name: str, data: bytes, align: int = 16) -> int:
        nonlocal cursor
        at = _align(cursor, align)
        if at > cursor:
            parts.append(bytes(at - cursor))
        offsets[name] = at
        parts.append(data)
        cursor = at + len(data)
        return base + at

    # The RSDP's and the tables' addresses must be known before their referrers are made:
    # sizes are fixed but for the DSDT (given) and MADT (cpus), so lay out in reference order.
    rsdp_at = place("RSDP", bytes(RSDP_SIZE))
    facs_addr = place("FACS", facs(), FACS_ALIGN)
    dsdt_addr = place("DSDT", dsdt_table)
    fadt_addr = place("FACP", fadt(facs_addr, dsdt_addr))
    madt_addr = place("APIC", madt(cpus))
    rsdt_addr = place("RSDT", rsdt([fadt_addr, madt_addr]))
    xsdt_addr = place("XSDT", xsdt([fadt_addr, madt_addr]))
    parts[0] = rsdp(rsdt_addr, xsdt_addr)
    assert rsdp_at == base
    blob = b"".join(parts)
    if len(blob) > limit or base + len(blob) > 0xFFFF_FFFF:
        raise AcpiError(f"ACPI tables of {len(blob)} bytes do not fit in {limit} bytes at {base:#x}")
    return Tables(base, blob, offsets)
