"""ACPI for the guest: the tables (RSDP, RSDT, XSDT, FADT, FACS, MADT, DSDT) written into
guest RAM at boot, beside the MP table, so that an ACPI kernel (every distribution
kernel; those built without ``CONFIG_X86_MPPARSE`` know no other way) finds the vCPUs,
the IOAPIC, the PCI interrupt routing, the UART, and how to power off and reset.

- :mod:`kvmm.acpi.aml`: the AML encoder (no ASL compiler at run time);
- :mod:`kvmm.acpi.dsdt`: the DSDT's namespace;
- :mod:`kvmm.acpi.tables`: the other tables and their layout;
- :mod:`kvmm.devices.acpi_pm`: the PM1 registers and reset register the FADT points at.

The builder calls :func:`install` once the PCI devices are in place (the DSDT's ``_PRT``
lists their slots); a snapshot carries the tables in guest RAM. ``--no-acpi`` leaves all
of it out (kvmm/builder.py).
"""

from __future__ import annotations

import logging

from .. import layout
from ..memory import GuestMemory
from .dsdt import dsdt
from .tables import Tables, build

LOG = logging.getLogger(__name__)

BP_ACPI_RSDP_ADDR = 0x070  # struct boot_params.acpi_rsdp_addr (Documentation/x86/zero-page.rst)


def install(mem: GuestMemory, cpus: int, pci_irqs: list[tuple[int, int, int]],
            boot_params: int | None = None) -> Tables:
    """Write the tables for ``cpus`` vCPUs and the PCI interrupt routes ``pci_irqs``
    (as :func:`kvmm.x86.build_mptable` takes them) at :data:`kvmm.layout.ACPI_TABLES_ADDR`;
    with ``boot_params`` (a Linux boot), also tell the kernel where the RSDP is
    (boot_params.acpi_rsdp_addr, which Linux reads before it scans the BIOS area)."""
    tables = build(layout.ACPI_TABLES_ADDR, cpus, dsdt(cpus, pci_irqs))
    mem.write(tables.base, tables.blob)
    if boot_params is not None:
        mem.write_u64(boot_params + BP_ACPI_RSDP_ADDR, tables.rsdp)
    LOG.debug("ACPI tables at %#x (%d bytes): %s", tables.base, len(tables.blob),
              ", ".join(f"{name} {tables.base + at:#x}" for name, at in tables.offsets.items()))
    return tables
