"""kvmm's DSDT: the namespace an ACPI OS finds the machine's devices in, as AML made by
kvmm/acpi/aml.py. In ASL it reads::

    DefinitionBlock ("", "DSDT", 2, "KVMM  ", "KVMMDSDT", 1) {
        Scope (\\_SB) {
            Device (C000) { Name (_HID, "ACPI0007")  Name (_UID, 0) }    // one per vCPU
            Device (PCI0) {
                Name (_HID, EisaId ("PNP0A03"))  Name (_UID, 0)
                Name (_CRS, ResourceTemplate () {
                    WordBusNumber (ResourceProducer, ..., 0x00, 0xFF, ...)
                    IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)            // config mechanism #1
                    WordIO (ResourceProducer, ..., 0x0000, 0x0CF7, ...)
                    WordIO (ResourceProducer, ..., 0x0D00, 0xFFFF, ...)
                    DWordMemory (ResourceProducer, ..., 0xE0000000, 0xFEBFFFFF, ...)
                })
                Name (_PRT, Package () {                                 // as the MP table
                    Package () { 0x0001FFFF, 0, \\_SB.GSIA, 0 }, ...
                })
            }
            Device (GSIA) {                                              // one per GSI used
                Name (_HID, EisaId ("PNP0C0F"))  Name (_UID, 0)
                Name (_PRS, ResourceTemplate () { Interrupt (ResourceConsumer, Level, ActiveHigh, Shared) { 16 } })
                Name (_CRS, <the same>)
                Method (_SRS, 1) { }
            }
            Device (COM1) {
                Name (_HID, EisaId ("PNP0501"))  Name (_UID, 1)
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08)  IRQNoFlags () { 4 } })
            }
        }
        Name (\\_S5, Package () { 5, 5, 0, 0 })
    }

PCI INTx goes through interrupt link devices (PNP0C0F, ACPI 6.5 6.2.13 "_PRT"), one per
IOAPIC input, rather than straight to GSIs: a link's resource says level-triggered and
active high, as the MP table's PCI entries do (a GSI entry of a ``_PRT`` is level and
active low by definition), and Linux logs the link it enables ("ACPI: \\_SB_.GSIA:
Enabled at IRQ 16"), which is how a test sees the route taken. Each link has one
possible interrupt, the one kvmm wired; ``_SRS`` accepts it and changes nothing.

The PCI root bridge's ``_CRS`` gives the bus numbers, the I/O ports but the configuration
ports, and the 32-bit window kvmm places memory BARs in (kvmm/layout.py): Linux takes
these as the bridge's windows and keeps BARs inside them where kvmm put them.
"""

from __future__ import annotations

from .. import layout
from ..devices import acpi_pm as pm
from . import aml
from .tables import sdt

DSDT_REVISION = 2  # 64-bit integers (5.2.11.1: revision 2 and later)
PRT_ALL_FUNCTIONS = 0xFFFF  # _PRT Address: device in the high word, 0xFFFF = any function


def link_name(gsi: int) -> str:
    """The link device of IOAPIC input ``gsi``: GSIA for the first PCI input, GSIB, ..."""
    return "GSI" + chr(ord("A") + gsi - layout.PCI_IRQ_BASE)


def _processors(cpus: int) -> list[bytes]:
    """A processor device per vCPU (ACPI0007; 8.4, "Declaring Processors"): its _UID is
    the MADT's ACPI Processor UID for the same local APIC."""
    return [aml.device(f"C{cpu:03X}", aml.name("_HID", aml.string("ACPI0007")), aml.name("_UID", cpu))
            for cpu in range(cpus)]


def _pci_root(pci_irqs: list[tuple[int, int, int]]) -> bytes:
    windows = aml.resource_template(
        aml.word_bus_number(0x00, 0xFF),
        aml.io(layout.PCI_CONFIG_ADDRESS.base, layout.PCI_CONFIG_ADDRESS.base, 1,
               layout.PCI_CONFIG_ADDRESS.length + layout.PCI_CONFIG_DATA.length),
        aml.word_io(0x0000, layout.PCI_CONFIG_ADDRESS.base - 1),
        aml.word_io(layout.PCI_CONFIG_DATA.base + layout.PCI_CONFIG_DATA.length, 0xFFFF),
        aml.dword_memory(layout.MEM_BAR_BASE, layout.MEM_BAR_LIMIT - 1),
    )
    routes = [aml.package((slot << 16) | PRT_ALL_FUNCTIONS, pin, aml.name_string(f"\\_SB.{link_name(gsi)}"), 0)
              for slot, pin, gsi in pci_irqs]
    return aml.device("PCI0", aml.name("_HID", aml.eisa_id("PNP0A03")), aml.name("_UID", 0),
                      aml.name("_CRS", windows), aml.name("_PRT", aml.package(*routes)))


def _link(gsi: int) -> bytes:
    irq = aml.resource_template(aml.interrupt(gsi, level=True, active_low=False, shared=True))
    return aml.device(link_name(gsi), aml.name("_HID", aml.eisa_id("PNP0C0F")),
                      aml.name("_UID", gsi - layout.PCI_IRQ_BASE), aml.name("_PRS", irq), aml.name("_CRS", irq),
                      aml.method("_SRS", 1))


def _com1() -> bytes:
    crs = aml.resource_template(aml.io(layout.COM1.base, layout.COM1.base, 0, layout.COM1.length),
                                aml.irq_no_flags(layout.COM1_IRQ))
    return aml.device("COM1", aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", 1), aml.name("_CRS", crs))


def dsdt(cpus: int, pci_irqs: list[tuple[int, int, int]]) -> bytes:
    """The DSDT for ``cpus`` vCPUs and the PCI interrupt routes ``pci_irqs``: (device,
    pin 0-3 for INTA-INTD, IOAPIC input), the list the MP table is made from."""
    gsis = sorted({gsi for _, _, gsi in pci_irqs})
    body = aml.scope("\\_SB", *_processors(cpus), _pci_root(pci_irqs), *(_link(g) for g in gsis), _com1())
    # \_S5 (7.4.2.5): PM1a_CNT.SLP_TYP, PM1b_CNT.SLP_TYP (no PM1b block: the same), reserved.
    body += aml.name("\\_S5", aml.package(pm.SLP_TYP_S5, pm.SLP_TYP_S5, 0, 0))
    return sdt(b"DSDT", DSDT_REVISION, body)

