"""Boot page tables, GDT and MP table as the guest will parse them."""

from __future__ import annotations

import struct

import pytest

from kvmm import x86
from kvmm.loader import bootparams as bp
from kvmm.memory import GuestMemory


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.allocate(32 << 20, check_available=False)
    x86.write_boot_tables(m)
    return m


def walk(mem: GuestMemory, va: int) -> int:
    """Translate ``va`` through the boot page tables like the MMU (4-level, 2 MiB pages)."""
    pml4e = mem.read_u64(bp.PML4_ADDR + 8 * ((va >> 39) & 511))
    assert pml4e & 1, "PML4 entry not present"
    pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511))
    assert pdpte & 1, "PDPT entry not present"
    pde = mem.read_u64((pdpte & ~0xFFF & (2**52 - 1)) + 8 * ((va >> 21) & 511))
    assert pde & 0x81 == 0x81, "PD entry not a present 2 MiB page"
    return (pde & ~0x1FFFFF & (2**52 - 1)) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0x7000, 0x1000000, 0x3FFF_FFFF, 0x4000_0000, 0xFFFF_FFFF])
def test_identity_map_covers_first_4gib(mem: GuestMemory, va: int) -> None:
    assert walk(mem, va) == va


def test_gdt_has_boot_cs_and_ds_at_protocol_selectors(mem: GuestMemory) -> None:
    gdt = struct.unpack("<5Q", mem.read(bp.GDT_ADDR, 40))
    cs = x86.segment_from_gdt(gdt[x86.BOOT_CS >> 3], x86.BOOT_CS)
    ds = x86.segment_from_gdt(gdt[x86.BOOT_DS >> 3], x86.BOOT_DS)
    # boot.rst: 4G flat segments, __BOOT_CS execute/read (64-bit), __BOOT_DS read/write.
    assert (cs["base"], cs["limit"], cs["l"], cs["type"], cs["present"], cs["s"]) == (0, 0xFFFFFFFF, 1, 0xB, 1, 1)
    assert (ds["base"], ds["limit"], ds["db"], ds["type"], ds["present"]) == (0, 0xFFFFFFFF, 1, 0x3, 1)
    assert gdt[0] == 0


def test_gdt_entry_round_trips_through_segment_decoding() -> None:
    e = x86.gdt_entry(0xC093, 0x12345678, 0xABCDE)
    seg = x86.segment_from_gdt(e, 0x18)
    assert seg["base"] == 0x12345678 and seg["limit"] == (0xABCDE << 12) | 0xFFF and seg["g"] == 1


def parse_mptable(blob: bytes) -> tuple[bytes, bytes, list[bytes]]:
    mpf, table = blob[:16], blob[16:]
    length, count = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    entries, off = [], 44
    for _ in range(count):
        size = 20 if table[off] == 0 else 8
        entries.append(table[off : off + size])
        off += size
    assert off == length
    return mpf, table[:length], entries


@pytest.mark.parametrize("ncpus", [1, 2, 16])
def test_mptable_checksums_and_processor_entries(ncpus: int) -> None:
    blob = x86.build_mptable(ncpus, pci_irqs=[(1, 0, 16)])
    assert len(blob) <= 0xA0000 - bp.EBDA_START  # fits in the 1 KiB EBDA
    mpf, table, entries = parse_mptable(blob)
    assert mpf[:4] == b"_MP_" and sum(mpf) & 0xFF == 0
    assert struct.unpack_from("<I", mpf, 4)[0] == bp.EBDA_START + 16
    assert table[:4] == b"PCMP" and sum(table) & 0xFF == 0
    cpus = [e for e in entries if e[0] == 0]
    assert [c[1] for c in cpus] == list(range(ncpus))
    assert cpus[0][3] == 3 and all(c[3] == 1 for c in cpus[1:])  # BSP flag only on CPU 0
    ioapic = [e for e in entries if e[0] == 2]
    assert len(ioapic) == 1 and ioapic[0][1] == ncpus
    isa = [e for e in entries if e[0] == 3 and e[4] == 1]
    assert [(e[5], e[7]) for e in isa] == [(i, i) for i in range(16)]  # ISA irq i -> IOAPIC pin i
    pci = [e for e in entries if e[0] == 3 and e[4] == 0]
    assert [(e[5], e[7]) for e in pci] == [((1 << 2) | 0, 16)]


def test_mptable_fits_below_640k_for_max_cpus() -> None:
    assert len(x86.build_mptable(16, pci_irqs=[(d, 0, 16 + d % 8) for d in range(1, 9)])) <= 0x400
