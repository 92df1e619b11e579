"""The AML encoder (kvmm/acpi/aml.py) against byte sequences the ACPI specification
defines. Section numbers are ACPI 6.5's: chapter 20 for AML's grammar (20.2.2 names,
20.2.3 data objects, 20.2.4 package lengths, 20.2.5 term objects) and 6.4 for resource
descriptors, whose tables give each descriptor's first byte (e.g. 6.4.2.9: "Value = 0x79
(01111001B) - Type = 0, Small item name = 0xF, Length = 1"). Where a sequence is built
from several rules, the comment spells out each byte. tests/acpi/test_acpi_tables.py
also compiles the same constructs with ACPICA's iasl and compares."""

from __future__ import annotations

import pytest

from kvmm.acpi import aml
from kvmm.errors import AcpiError


# --- 20.2.4 Package Length Encoding ------------------------------------------------------
@pytest.mark.parametrize("body,encoded", [
    (0, "01"),  # one byte, bits 5-0: the length counts the PkgLength byte itself
    (62, "3f"),  # 63, the most one byte holds ("bits 5-0 ... 0-63")
    (63, "4104"),  # 65 = 0x41: lead byte 01_00_0001 (one byte follows, low nibble 1), then 0x04
    (4093, "4fff"),  # 4095, the most two bytes hold (4 + 8 bits)
    (4094, "810001"),  # 4097 = 0x1001 needs three: lead 10_00_0001, then 0x0100 little-endian
    ((1 << 20) - 4, "8fffff"),  # 2**20 - 1, the most three bytes hold
    (1 << 20, "c4000001"),  # 2**20 + 4: lead 11_00_0100, then 0x010000 little-endian
    ((1 << 28) - 5, "cfffffff"),  # 2**28 - 1, the largest PkgLength ("at most 2**28")
])
def test_pkg_length_encoding(body: int, encoded: str) -> None:
    assert aml.pkg_length(body).hex() == encoded


@pytest.mark.parametrize("body", [(1 << 28) - 4, -1])
def test_pkg_length_beyond_28_bits_is_refused(body: int) -> None:
    with pytest.raises(AcpiError):
        aml.pkg_length(body)


def test_pkg_length_bits_5_4_are_zero_in_a_multibyte_lead() -> None:
    # 20.2.4: "If multiple bytes encode the length, bits 4 and 5 of the PkgLeadByte are
    # reserved and must be zero."
    for body in range(63, 5000):
        assert aml.pkg_length(body)[0] & 0x30 == 0


# --- 20.2.3 Data Objects: integers in the smallest encoding --------------------------------
@pytest.mark.parametrize("value,encoded", [
    (0, "00"),  # ZeroOp
    (1, "01"),  # OneOp
    (2, "0a02"),  # BytePrefix ByteData
    (0xFF, "0aff"),
    (0x100, "0b0001"),  # WordPrefix WordData (little-endian)
    (0xFFFF, "0bffff"),
    (0x1_0000, "0c00000100"),  # DWordPrefix DWordData
    (0xFFFF_FFFF, "0cffffffff"),
    (0x1_0000_0000, "0e0000000001000000"),  # QWordPrefix QWordData
    (0xFFFF_FFFF_FFFF_FFFF, "0effffffffffffffff"),  # not OnesOp, whose value depends on the revision
])
def test_integer_smallest_encoding(value: int, encoded: str) -> None:
    assert aml.integer(value).hex() == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(AcpiError):
        aml.integer(value)


def test_string_is_prefix_ascii_nul() -> None:
    # String := StringPrefix AsciiCharList NullChar; StringPrefix 0x0D
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    with pytest.raises(AcpiError):
        aml.string("bad\0")
    with pytest.raises(AcpiError):
        aml.string("caf\u00e9")


# --- 20.2.2 Name Objects ----------------------------------------------------------------
@pytest.mark.parametrize("path,encoded", [
    ("_HID", b"_HID"),  # NameSeg
    ("S5", b"S5__"),  # padded with '_' to four characters
    ("\\_SB", b"\\_SB_"),  # RootChar (0x5C) NameSeg
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),  # RootChar DualNamePrefix (0x2E) NameSeg NameSeg
    ("\\_SB.PCI0.GSIA", b"\\\x2f\x03_SB_PCI0GSIA"),  # MultiNamePrefix (0x2F) SegCount NameSeg(3)
    ("^^FOO", b"^^FOO_"),  # ParentPrefixChar (0x5E) twice
    ("\\", b"\\\x00"),  # the root itself: RootChar NullName
])
def test_name_string(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "abcd", "_SB..X", "A-B"])
def test_invalid_names_are_refused(path: str) -> None:
    with pytest.raises(AcpiError):
        aml.name_string(path)


# --- 20.2.5 Term Objects ----------------------------------------------------------------
def test_name_op() -> None:
    # DefName := NameOp (0x08) NameString DataRefObject
    assert aml.name("_UID", 0).hex() == "08" + b"_UID".hex() + "00"
    assert aml.name("_UID", 1).hex() == "08" + b"_UID".hex() + "01"


def test_package_of_integers() -> None:
    # DefPackage := PackageOp (0x12) PkgLength NumElements PackageElementList:
    # 4 elements, 0x0A 0x05, 0x0A 0x05, ZeroOp, ZeroOp = 7 bytes after PkgLength -> 0x08
    assert aml.package(5, 5, 0, 0).hex() == "12" "08" "04" "0a05" "0a05" "00" "00"


def test_package_with_name_reference() -> None:
    # a _PRT entry: {0x0001FFFF, 0, \_SB.GSIA, 0}; the link is a NameString element
    encoded = aml.package(0x1FFFF, 0, aml.name_string("\\_SB.GSIA"), 0)
    assert encoded.hex() == "12" "13" "04" "0cffff0100" "00" + b"\\\x2e_SB_GSIA".hex() + "00"


def test_package_element_limit() -> None:
    assert aml.package(*([0] * 255))[0] == aml.PACKAGE_OP
    with pytest.raises(AcpiError):
        aml.package(*([0] * 256))


def test_buffer() -> None:
    # DefBuffer := BufferOp (0x11) PkgLength BufferSize ByteList; BufferSize 0x0A 0x02
    assert aml.buffer(b"\x01\x02").hex() == "11" "05" "0a02" "0102"


def test_scope() -> None:
    # DefScope := ScopeOp (0x10) PkgLength NameString TermList
    assert aml.scope("\\_SB").hex() == "10" "06" + b"\\_SB_".hex()


def test_device() -> None:
    # DefDevice := DeviceOp (ExtOpPrefix 0x5B, 0x82) PkgLength NameString TermList
    assert aml.device("COM1", aml.name("_UID", 1)).hex() == "5b82" "0b" + b"COM1".hex() + "08" + b"_UID".hex() + "01"


def test_method_flags() -> None:
    # DefMethod := MethodOp (0x14) PkgLength NameString MethodFlags TermList;
    # MethodFlags: bits 2-0 ArgCount, bit 3 SerializeFlag, bits 7-4 SyncLevel
    assert aml.method("_SRS", 1).hex() == "14" "06" + b"_SRS".hex() + "01"
    assert aml.method("_XYZ", 2, serialized=True, sync_level=3)[6] == 0x3A
    with pytest.raises(AcpiError):
        aml.method("_XYZ", 8)


def test_return() -> None:
    # DefReturn := ReturnOp (0xA4) ArgObject
    assert aml.return_(1).hex() == "a401"
    assert aml.return_(aml.name_string("PRSA")).hex() == "a4" + b"PRSA".hex()


@pytest.mark.parametrize("pnp_id,value", [
    # 19.6.35 EISAID: letters in 5 bits each ('A' = 1), big-endian in the first two bytes,
    # then the product number: "PNP" -> 0x41D0, so PNP0A03 is the bytes 41 D0 0A 03.
    ("PNP0A03", 0x030AD041),
    ("PNP0C0F", 0x0F0CD041),
    ("PNP0501", 0x0105D041),
])
def test_eisa_id(pnp_id: str, value: int) -> None:
    assert aml.eisa_id(pnp_id) == aml.integer(value)


@pytest.mark.parametrize("bad", ["pnp0a03", "PNP0A0", "PNP0A0G", "PN10A03"])
def test_eisa_id_refuses_malformed_ids(bad: str) -> None:
    with pytest.raises(AcpiError):
        aml.eisa_id(bad)


# --- 6.4 Resource descriptors ---------------------------------------------------------------
def test_end_tag() -> None:
    # 6.4.2.9: byte 0 = 0x79, byte 1 the checksum (0: the template counts as valid)
    assert aml.end_tag().hex() == "7900"


def test_io_port_descriptor() -> None:
    # 6.4.2.5: 0x47, information (bit 0: 16-bit decode), minimum, maximum (16-bit LE),
    # alignment, length
    assert aml.io(0x3F8, 0x3F8, 0, 8).hex() == "47" "01" "f803" "f803" "00" "08"


def test_irq_descriptor_without_flags() -> None:
    # 6.4.2.1: 0x22 (length 2: no information byte: edge, active high, exclusive), then the
    # 16-bit mask of IRQs (IRQ 4: bit 4)
    assert aml.irq_no_flags(4).hex() == "22" "1000"
    with pytest.raises(AcpiError):
        aml.irq_no_flags(16)


def test_extended_interrupt_descriptor() -> None:
    # 6.4.3.6: 0x89, length 6 (flags, count, one DWORD), flags bit 0 consumer, bit 1
    # edge (0: level), bit 2 active low (0: high), bit 3 shared; then the interrupts
    assert aml.interrupt(16).hex() == "89" "0600" "09" "01" "10000000"
    assert aml.interrupt(5, level=False, active_low=True, shared=False).hex() == "89" "0600" "07" "01" "05000000"


def test_word_bus_number_descriptor() -> None:
    # 6.4.3.5.3: 0x88, length 0x0D, resource type 2 (bus numbers), general flags
    # 0x0C (_MAF, _MIF, positive decode, producer), type flags 0, then granularity, min,
    # max, translation offset, length, 16 bits each
    assert aml.word_bus_number(0, 0xFF).hex() == "88" "0d00" "02" "0c" "00" "0000" "0000" "ff00" "0000" "0001"


def test_word_io_descriptor() -> None:
    # 6.4.3.5.3 with resource type 1 (I/O); type flags 0x03: _RNG = entire range
    assert aml.word_io(0, 0xCF7).hex() == "88" "0d00" "01" "0c" "03" "0000" "0000" "f70c" "0000" "f80c"


def test_dword_memory_descriptor() -> None:
    # 6.4.3.5.2: 0x87, length 0x17, resource type 0 (memory), type flags 0x01
    # (read-write, non-cacheable), five 32-bit values
    assert aml.dword_memory(0xE000_0000, 0xFEBF_FFFF).hex() == (
        "87" "1700" "00" "0c" "01" "00000000" "000000e0" "ffffbffe" "00000000" "0000c01e")


def test_qword_memory_descriptor() -> None:
    # 6.4.3.5.1: 0x8A, length 0x2B, five 64-bit values; type flags 0x07: prefetchable, read-write
    assert aml.qword_memory(1 << 32, (2 << 32) - 1, prefetchable=True).hex() == (
        "8a" "2b00" "00" "0c" "07" + "00" * 8 + "0000000001000000" + "ffffffff01000000" + "00" * 8 + "0000000001000000")


def test_address_range_must_not_be_empty() -> None:
    with pytest.raises(AcpiError):
        aml.word_io(0x100, 0xFF)
    with pytest.raises(AcpiError):
        aml.dword_memory(0, 1 << 32)


def test_resource_template_is_a_buffer_with_an_end_tag() -> None:
    # COM1's _CRS: Buffer (0x11), PkgLength 0x10, BufferSize 0x0A 0x0D (13 bytes: the IO
    # descriptor 8, the IRQ descriptor 3, the End Tag 2)
    crs = aml.resource_template(aml.io(0x3F8, 0x3F8, 0, 8), aml.irq_no_flags(4))
    assert crs.hex() == "11" "10" "0a0d" "4701f803f8030008" "221000" "7900"
