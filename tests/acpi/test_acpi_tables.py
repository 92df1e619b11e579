"""The ACPI tables kvmm writes (kvmm/acpi/): their structure as ACPI 6.5 chapter 5 lays it
out, that they describe the same machine as the MP table, and that ACPICA's own tools
read them: ``iasl -d`` disassembles each without an error or warning and compiles the
disassembly back to the same bytes, and ``acpiexec`` evaluates the DSDT's objects with
ACPICA's checks of predefined names (Debian's acpica-tools; skipped without it)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmm import acpi, layout, x86
from kvmm.acpi import aml
from kvmm.acpi.dsdt import dsdt, link_name
from kvmm.acpi.tables import Tables, build, checksum
from kvmm.devices import acpi_pm as pm
from kvmm.errors import AcpiError
from kvmm.loader import bootparams as bp
from kvmm.memory import GuestMemory

PCI_IRQS = [(1, 0, 16), (2, 0, 17), (3, 0, 18)]
TABLE_NAMES = ("FACS", "DSDT", "FACP", "APIC", "RSDT", "XSDT")


def make(cpus: int = 2, pci_irqs: list[tuple[int, int, int]] = PCI_IRQS) -> Tables:
    return build(layout.ACPI_TABLES_ADDR, cpus, dsdt(cpus, pci_irqs))


# --- structure ------------------------------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_every_checksummed_table_sums_to_zero(cpus: int) -> None:
    t = make(cpus)
    for name in ("DSDT", "FACP", "APIC", "RSDT", "XSDT"):  # 5.2.6: the whole table sums to 0
        assert sum(t.table(name)) & 0xFF == 0, name
    rsdp = t.table("RSDP")  # 5.2.5.3: the first 20 bytes, and all 36
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0


def test_rsdp_points_at_both_root_tables_and_is_where_an_os_looks() -> None:
    t = make()
    sig, _, oem, rev, rsdt_addr, length, xsdt_addr = struct.unpack_from("<8sB6sBIIQ", t.table("RSDP"))
    assert (sig, rev, length) == (b"RSD PTR ", 2, 36)
    # 5.2.5.1: on a 16-byte boundary in 0xE0000-0xFFFFF
    assert t.rsdp % 16 == 0 and 0xE0000 <= t.rsdp < 0x100000
    assert rsdt_addr == t.base + t.offsets["RSDT"] and xsdt_addr == t.base + t.offsets["XSDT"]


def _entries(table: bytes, size: int) -> list[int]:
    return [int.from_bytes(table[i : i + size], "little") for i in range(36, len(table), size)]


def test_root_tables_list_fadt_and_madt() -> None:
    t = make()
    want = [t.base + t.offsets["FACP"], t.base + t.offsets["APIC"]]
    assert _entries(t.table("RSDT"), 4) == want
    assert _entries(t.table("XSDT"), 8) == want


def test_fadt_points_at_kvmm_pm_ports_facs_and_dsdt() -> None:
    t = make()
    fadt = t.table("FACP")
    assert len(fadt) == 276 and fadt[8] == 6
    facs, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert facs == t.base + t.offsets["FACS"] and facs % 64 == 0  # 5.2.10: 64-byte aligned
    assert dsdt_addr == struct.unpack_from("<Q", fadt, 140)[0] == t.base + t.offsets["DSDT"]
    assert struct.unpack_from("<Q", fadt, 132)[0] == 0  # X_FIRMWARE_CTRL: zero when FIRMWARE_CTRL is set
    sci, smi_cmd = struct.unpack_from("<HI", fadt, 46)
    assert (sci, smi_cmd) == (layout.SCI_IRQ, 0)
    evt, _, cnt, _ = struct.unpack_from("<IIII", fadt, 56)
    assert (evt, cnt) == (layout.ACPI_PM.base + pm.PM1_STS, layout.ACPI_PM.base + pm.PM1_CNT)
    assert fadt[88:92] == bytes([4, 2, 0, 0])  # PM1_EVT_LEN, PM1_CNT_LEN, no PM2, no PM timer
    space, width, offset, _access, address = struct.unpack_from("<BBBBQ", fadt, 116)
    # Linux's acpi_reboot() insists on an 8-bit register at bit offset 0
    assert (space, width, offset, address) == (1, 8, 0, layout.ACPI_PM.base + pm.RESET)
    assert fadt[128] == pm.RESET_VALUE
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 10)  # RESET_REG_SUP
    assert not flags & (1 << 20)  # not hardware-reduced: the PM1 blocks are used
    for field, length in ((148, pm.PM1_EVT_LEN), (172, pm.PM1_CNT_LEN)):  # X_ blocks agree
        assert struct.unpack_from("<BBBBQ", fadt, field)[1] == 8 * length


def _madt_entries(madt: bytes) -> list[bytes]:
    out, at = [], 44
    while at < len(madt):
        out.append(madt[at : at + madt[at + 1]])
        at += madt[at + 1]
    assert at == len(madt)
    return out


def _mptable_entries(blob: bytes) -> list[bytes]:
    count = struct.unpack_from("<H", blob, 16 + 34)[0]
    out, at = [], 16 + 44
    for _ in range(count):
        size = 20 if blob[at] == 0 else 8
        out.append(blob[at : at + size])
        at += size
    return out


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_madt_describes_the_mp_tables_cpus_and_ioapic(cpus: int) -> None:
    madt = make(cpus).table("APIC")
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.LAPIC_ADDR and flags & 1  # PCAT_COMPAT
    entries = _madt_entries(madt)
    mp = _mptable_entries(x86.build_mptable(cpus, pci_irqs=PCI_IRQS))
    mp_cpus = [(e[1], bool(e[3] & 1)) for e in mp if e[0] == 0]  # (APIC id, enabled)
    madt_cpus = [(e[3], bool(struct.unpack_from("<I", e, 4)[0] & 1)) for e in entries if e[0] == 0]
    assert madt_cpus == mp_cpus
    (mp_ioapic,) = [e for e in mp if e[0] == 2]
    (ioapic,) = [e for e in entries if e[0] == 1]
    assert ioapic[2] == mp_ioapic[1]  # IOAPIC id
    assert struct.unpack_from("<II", ioapic, 4) == (struct.unpack_from("<I", mp_ioapic, 4)[0], 0)  # address, GSI base
    # The MP table maps ISA IRQ n to IOAPIC input n (ACPI's default), so the only override
    # is the SCI's: IRQ 9, level-triggered, active high.
    overrides = [struct.unpack_from("<BBIH", e, 2) for e in entries if e[0] == 2]
    assert overrides == [(0, 9, 9, 0x0D)]
    mp_isa = {e[5]: e[7] for e in mp if e[0] == 3 and e[4] == 1}  # ISA bus irq -> IOAPIC input
    assert all(mp_isa[irq] == irq for irq in range(16))
    # NMI on LINT1 of every processor, as the MP table's local interrupt entry
    assert [e for e in entries if e[0] == 4] == [bytes([4, 6, 0xFF, 0, 0, 1])]
    assert any(e[0] == 4 and e[1] == x86.MP_NMI and e[6] == 0xFF and e[7] == 1 for e in mp)


def test_dsdt_prt_routes_each_slot_as_the_mp_table() -> None:
    table = make().table("DSDT")
    mp = _mptable_entries(x86.build_mptable(2, pci_irqs=PCI_IRQS))
    pci_routes = [(e[5] >> 2, e[5] & 3, e[7]) for e in mp if e[0] == 3 and e[4] == 0]  # bus 0 is PCI
    assert pci_routes == PCI_IRQS
    for slot, pin, gsi in pci_routes:
        route = aml.package((slot << 16) | 0xFFFF, pin, aml.name_string(f"\\_SB.{link_name(gsi)}"), 0)
        assert route in table
        link_crs = aml.name("_CRS", aml.resource_template(aml.interrupt(gsi)))  # level, active high, shared
        assert link_crs in table[table.index(link_name(gsi).encode()):]
    assert aml.name("\\_S5", aml.package(pm.SLP_TYP_S5, pm.SLP_TYP_S5, 0, 0)) in table


def test_tables_fit_their_area_for_the_largest_machine() -> None:
    t = make(16, [(slot, 0, layout.pci_intx_gsi(slot)) for slot in range(1, 32)])
    assert len(t.blob) < layout.ACPI_TABLES_SIZE
    assert layout.ACPI_TABLES_ADDR + layout.ACPI_TABLES_SIZE <= 0x100000  # in the e820-reserved BIOS area
    e820 = bp.e820_map(GuestMemory.allocate(64 << 20, check_available=False))
    assert any(e.type == bp.E820_RESERVED and e.addr <= layout.ACPI_TABLES_ADDR
               and layout.ACPI_TABLES_ADDR + layout.ACPI_TABLES_SIZE <= e.addr + e.size for e in e820)


def test_misaligned_base_is_refused() -> None:
    with pytest.raises(AcpiError):
        build(layout.ACPI_TABLES_ADDR + 8, 1, dsdt(1, []))


def test_install_writes_tables_and_tells_linux_where_the_rsdp_is() -> None:
    mem = GuestMemory.allocate(64 << 20, check_available=False)
    t = acpi.install(mem, 2, PCI_IRQS, bp.BOOT_PARAMS_ADDR)
    assert mem.read(layout.ACPI_TABLES_ADDR, len(t.blob)) == t.blob
    assert mem.read_u64(bp.BOOT_PARAMS_ADDR + 0x70) == t.rsdp == layout.ACPI_TABLES_ADDR
    assert checksum(b"") == 0


# --- ACPICA's tools ---------------------------------------------------------------------------
needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl is not installed (Debian: apt-get install acpica-tools)")
needs_acpiexec = pytest.mark.skipif(shutil.which("acpiexec") is None,
                                    reason="acpiexec is not installed (Debian: apt-get install acpica-tools)")
TROUBLE = re.compile(r"warning|error|invalid|unknown|mismatch|exception", re.IGNORECASE)
# iasl's banner and summary lines that name the words above without reporting anything
BENIGN = re.compile(r"^(Compilation successful\. 0 Errors, 0 Warnings.*|.*Copyright.*)$")


def _troubles(output: str) -> list[str]:
    return [line for line in output.splitlines() if TROUBLE.search(line) and not BENIGN.match(line.strip())]


def _iasl(tmp_path: Path, *args: str) -> str:
    res = subprocess.run(["iasl", *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


@needs_iasl
@pytest.mark.parametrize("cpus", [1, 3])
@pytest.mark.parametrize("name", TABLE_NAMES)
def test_iasl_disassembles_each_table_cleanly_and_compiles_it_back(tmp_path: Path, name: str, cpus: int) -> None:
    table = make(cpus).table(name)
    (tmp_path / "t.dat").write_bytes(table)
    out = _iasl(tmp_path, "-d", "t.dat")
    assert not _troubles(out), out
    dsl = (tmp_path / "t.dsl").read_text()
    assert not _troubles(dsl.split("*/", 1)[1]), dsl  # no "**** Unknown"/"Warning" comments in the body
    # Compiled back (-oa: no name-path optimisation, which would shorten \_SB.GSIA), the
    # disassembly is the same table: iasl reads and writes every field as kvmm does.
    # Only the compiler id, its revision and so the checksum are iasl's own.
    out = _iasl(tmp_path, "-oa", "-p", "back", "t.dsl")
    assert not _troubles(out), out
    back = (tmp_path / "back.aml").read_bytes()
    if name == "FACS":  # no header: compared whole
        assert back == table
    else:
        assert len(back) == len(table)
        assert back[:9] + back[10:28] + back[36:] == table[:9] + table[10:28] + table[36:]


@needs_iasl
def test_iasl_compiles_asl_to_the_bytes_the_encoder_makes(tmp_path: Path) -> None:
    """The encoder's constructs against ACPICA's own compiler, written in ASL. (With -oa
    iasl keeps a literal 0 or 1 as BytePrefix data: ``Zero`` and ``One`` are its ZeroOp
    and OneOp, what the encoder's smallest encoding uses.)"""
    asl = r"""DefinitionBlock ("", "SSDT", 2, "KVMM  ", "ENCODER ", 1) {
        Scope (\_SB) {
            Device (DEV0) {
                Name (_HID, EisaId ("PNP0A03"))
                Name (_UID, 0x1234)
                Name (BIG, 0x123456789)
                Name (STR, "kvmm")
                Name (_CRS, ResourceTemplate () {
                    WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)
                    WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0xD00, 0xFFFF, 0, 0xF300)
                    DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                                 0, 0xE0000000, 0xFEBFFFFF, 0, 0x1EC00000)
                    QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,
                                 0, 0x100000000, 0x1FFFFFFFF, 0, 0x100000000)
                    IO (Decode16, 0x3F8, 0x3F8, 0, 8)
                    IRQNoFlags () {4}
                    Interrupt (ResourceConsumer, Level, ActiveHigh, Shared) {16}
                })
                Method (_SRS, 1, NotSerialized) { }
                Method (_STA, 0, Serialized) { Return (0x0F) }
            }
        }
        Name (\_S5, Package () { 5, 5, Zero, Zero })
        Name (PKG, Package () { Package () { 0x0001FFFF, Zero, \_SB.DEV0, Zero } })
    }
    """
    ours = aml.scope("\\_SB", aml.device(
        "DEV0", aml.name("_HID", aml.eisa_id("PNP0A03")), aml.name("_UID", 0x1234), aml.name("BIG", 0x123456789),
        aml.name("STR", aml.string("kvmm")),
        aml.name("_CRS", aml.resource_template(
            aml.word_bus_number(0, 0xFF), aml.word_io(0xD00, 0xFFFF), aml.dword_memory(0xE000_0000, 0xFEBF_FFFF),
            aml.qword_memory(1 << 32, (2 << 32) - 1, prefetchable=True), aml.io(0x3F8, 0x3F8, 0, 8),
            aml.irq_no_flags(4), aml.interrupt(16))),
        aml.method("_SRS", 1), aml.method("_STA", 0, aml.return_(0x0F), serialized=True)))
    ours += aml.name("\\_S5", aml.package(5, 5, 0, 0))
    ours += aml.name("PKG", aml.package(aml.package(0x1FFFF, 0, aml.name_string("\\_SB.DEV0"), 0)))
    (tmp_path / "e.asl").write_text(asl)
    out = _iasl(tmp_path, "-oa", "-p", "e", "e.asl")
    assert not _troubles(out), out
    assert (tmp_path / "e.aml").read_bytes()[36:] == ours


@needs_acpiexec
def test_acpiexec_loads_the_dsdt_and_evaluates_its_objects(tmp_path: Path) -> None:
    """ACPICA's interpreter, as a kernel runs it: the namespace loads and each object
    Linux evaluates returns what its predefined name must (ACPICA checks _HID, _UID, _CRS,
    _PRS, _PRT, _S5 and method argument counts, and warns otherwise)."""
    t = make(2)
    (tmp_path / "dsdt.dat").write_bytes(t.table("DSDT"))
    objects = ["\\_S5", "\\_SB.PCI0._HID", "\\_SB.PCI0._CRS", "\\_SB.PCI0._PRT", "\\_SB.COM1._CRS", "\\_SB.C001._UID"]
    for gsi in (16, 17, 18):
        objects += [f"\\_SB.{link_name(gsi)}._PRS", f"\\_SB.{link_name(gsi)}._CRS"]
    # _SRS takes the resource template Linux builds (acpi_pci_link_set): a buffer
    srs = aml.resource_template(aml.interrupt(16))[4:].hex(" ")
    commands = "; ".join(f"evaluate {o}" for o in objects) + f"; evaluate \\_SB.{link_name(16)}._SRS ({srs})"
    res = subprocess.run(["acpiexec", "-b", commands, "dsdt.dat"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Table [DSDT: KVMMDSDT]" in out and "successfully acquired and loaded" in out
    assert out.count("returned object") == len(objects), out
    assert not _troubles(out), out
    assert "[Integer] = 0000000000000005" in out  # \_S5's SLP_TYP


def test_pm_ports_and_bridge_windows_fit_the_port_and_memory_map() -> None:
    # The PM block overlaps no other device's ports and lies below the PCI I/O BARs; the
    # root bridge's _CRS windows hold every BAR kvmm places (Linux uses them as windows).
    ranges = sorted((r.base, r.base + r.length, name) for name, r in layout.PORT_MAP.items())
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:]):
        assert end <= start, f"{name} overlaps {other}"
    assert layout.ACPI_PM.base + layout.ACPI_PM.length <= layout.IO_BAR_BASE
    table = make().table("DSDT")
    assert aml.word_io(layout.PCI_CONFIG_DATA.base + layout.PCI_CONFIG_DATA.length, 0xFFFF) in table
    assert layout.IO_BAR_LIMIT - 1 <= 0xFFFF
    assert aml.dword_memory(layout.MEM_BAR_BASE, layout.MEM_BAR_LIMIT - 1) in table
