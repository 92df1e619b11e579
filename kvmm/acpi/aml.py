"""A small encoder for AML, the byte code of a DSDT: just what kvmm's DSDT uses.

Every function returns the encoded bytes of one AML term, so a namespace is written as
nested calls (``device("PCI0", name("_HID", eisa_id("PNP0A03")), ...)``) and the
bytes are checked against the grammar of ACPI 6.5 chapter 20 ("ACPI Machine Language
(AML) Specification"; section numbers below are that chapter's) and, for resource
templates, the descriptor layouts of section 6.4 ("Resource Data Types for ACPI").
The shape follows cloud-hypervisor's and Firecracker's ``acpi_tables`` crates (one
small builder per term, lengths computed from the encoded children), as plain functions
over ``bytes``.

Values come from kvmm, not from a guest; one out of range is a kvmm bug and raises
:class:`~kvmm.errors.AcpiError` rather than encode something the guest would misread.
"""

from __future__ import annotations

import re
import struct

from ..errors import AcpiError

# --- opcodes and prefixes (20.2.3 Data Objects Encoding, 20.2.5 Term Objects Encoding) ---
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4

PACKAGE_ELEMENTS_MAX = 255  # NumElements is a ByteData (20.2.5.4); more needs VarPackageOp


# --- 20.2.4 Package Length Encoding ------------------------------------------------------
def pkg_length(body: int) -> bytes:
    """The PkgLength of a term whose bytes after the PkgLength number ``body``.

    The encoded length counts the PkgLength's own bytes too (20.2.4), so the encoding
    is the smallest of 1-4 bytes whose total still fits: one byte holds 0-63 in bits
    5-0; otherwise bits 7-6 of the lead byte give the count (1-3) of bytes that follow,
    bits 3-0 the least significant nibble (bits 5-4 zero) and each further byte the next
    8 bits."""
    if body < 0:
        raise AcpiError(f"AML package body of {body} bytes")
    if body + 1 <= 0x3F:
        return bytes([body + 1])
    for extra in (1, 2, 3):
        total = body + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AcpiError(f"AML package body of {body} bytes exceeds PkgLength's 2**28")


def _with_length(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


# --- 20.2.3 Data Objects -----------------------------------------------------------------
def integer(value: int) -> bytes:
    """An integer in its smallest encoding: ZeroOp, OneOp, then Byte/Word/DWord/QWord
    constants (20.2.3). OnesOp is never used: whether it means 2**32-1 or 2**64-1
    depends on the table's revision (19.6.99, "Ones")."""
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise AcpiError(f"AML integer {value} is outside 0..2**64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String constant: StringPrefix, ASCII characters 0x01-0x7F, NUL (20.2.3)."""
    data = text.encode("ascii", "strict") if text.isascii() else None
    if data is None or b"\0" in data:
        raise AcpiError(f"AML string {text!r} is not NUL-free ASCII")
    return bytes([STRING_PREFIX]) + data + b"\0"


def eisa_id(text: str) -> bytes:
    """The compressed EISA id of a PNP id such as ``PNP0A03`` as an integer, what ASL's
    ``EisaId()`` makes (19.6.35): three letters of 5 bits each ('A' = 1) in the first
    two bytes, big-endian, then the four hex digits as two bytes."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AcpiError(f"EISA id {text!r} is not three capital letters and four hex digits")
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    vendor = (a << 10) | (b << 5) | c
    product = int(text[3:], 16)
    raw = vendor.to_bytes(2, "big") + product.to_bytes(2, "big")
    return integer(int.from_bytes(raw, "little"))


def package(*elements: bytes | int) -> bytes:
    """A Package of at most 255 elements (20.2.5.4 DefPackage: PackageOp PkgLength
    NumElements PackageElementList); an ``int`` element is encoded with
    :func:`integer`, a ``bytes`` element is taken as encoded (a data object, or a name
    reference made with :func:`name_string`)."""
    if len(elements) > PACKAGE_ELEMENTS_MAX:
        raise AcpiError(f"an AML Package holds at most {PACKAGE_ELEMENTS_MAX} elements, not {len(elements)}")
    body = bytes([len(elements)]) + b"".join(integer(e) if isinstance(e, int) else e for e in elements)
    return _with_length(bytes([PACKAGE_OP]), body)


def buffer(data: bytes) -> bytes:
    """A Buffer initialised with ``data`` (20.2.5.4 DefBuffer: BufferOp PkgLength
    BufferSize ByteList; BufferSize is a TermArg, here an integer constant)."""
    return _with_length(bytes([BUFFER_OP]), integer(len(data)) + data)


# --- 20.2.2 Name Objects -----------------------------------------------------------------
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def _name_seg(seg: str) -> bytes:
    """A NameSeg: a LeadNameChar and up to three NameChars, padded with '_' to four."""
    if not _NAME_SEG.fullmatch(seg):
        raise AcpiError(f"AML name segment {seg!r} is not 1-4 characters of A-Z, 0-9 and '_' (not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root ('\\') or parent prefixes ('^'), then the
    dot-separated segments as one NameSeg, a DualNamePath or a MultiNamePath (20.2.2);
    ``"\\"`` alone is the root (its NullName)."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX_CHAR]), path[1:]
    if not path:
        if not prefix:
            raise AcpiError("empty AML name")
        return prefix + b"\0"  # NullName
    segs = [_name_seg(s) for s in path.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AcpiError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- 20.2.5 Term Objects -----------------------------------------------------------------
def name(path: str, value: bytes | int) -> bytes:
    """DefName: NameOp NameString DataRefObject (20.2.5.1)."""
    return bytes([NAME_OP]) + name_string(path) + (integer(value) if isinstance(value, int) else value)


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: ScopeOp PkgLength NameString TermList (20.2.5.1)."""
    return _with_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: DeviceOp (ExtOpPrefix 0x82) PkgLength NameString TermList (20.2.5.2)."""
    return _with_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, args: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList (20.2.5.2);
    MethodFlags bits 2-0 ArgCount (0-7), bit 3 SerializeFlag, bits 7-4 SyncLevel."""
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise AcpiError(f"AML method {path!r}: {args} arguments, sync level {sync_level}")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return _with_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes | int) -> bytes:
    """DefReturn: ReturnOp ArgObject (20.2.5.3)."""
    return bytes([RETURN_OP]) + (integer(value) if isinstance(value, int) else value)


# --- 6.4 Resource Data Types ------------------------------------------------------------
# Small items: a tag byte of type (bits 6-3) and length (bits 2-0) (6.4.2); large items:
# 0x80 | type, then a 16-bit length of what follows (6.4.3).
SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_DWORD_ADDRESS = 0x07
LARGE_WORD_ADDRESS = 0x08
LARGE_EXTENDED_IRQ = 0x09
LARGE_QWORD_ADDRESS = 0x0A

# Address space descriptors (6.4.3.5): resource type, general flags, type-specific flags.
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS = 0, 1, 2
GEN_CONSUMER = 0x01  # bit 0: 1 consumes only, 0 produces (a bridge's windows)
GEN_SUB_DECODE = 0x02  # bit 1 _DEC: subtractive decode
GEN_MIN_FIXED = 0x04  # bit 2 _MIF
GEN_MAX_FIXED = 0x08  # bit 3 _MAF
IO_RANGE_ENTIRE = 0x03  # I/O flags bits 1-0 _RNG: ISA and non-ISA ranges
MEM_READ_WRITE = 0x01  # memory flags bit 0 _RW
MEM_CACHEABLE = 0x02  # bits 2-1 _MEM: 0 non-cacheable, 1 cacheable, 2 write-combining, 3 prefetchable
MEM_PREFETCHABLE = 0x06


def _small(kind: int, body: bytes) -> bytes:
    if len(body) > 7:
        raise AcpiError(f"small resource item of {len(body)} bytes")
    return bytes([(kind << 3) | len(body)]) + body


def _large(kind: int, body: bytes) -> bytes:
    return bytes([0x80 | kind]) + struct.pack("<H", len(body)) + body


def end_tag() -> bytes:
    """End Tag (6.4.2.9): its checksum byte 0 means "treat the template as valid"."""
    return _small(SMALL_END_TAG, b"\0")


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """ASL ``IO(Decode16, min, max, alignment, length)``: the I/O Port Descriptor (6.4.2.5)."""
    _check_range("IO", minimum, maximum, 0xFFFF)
    if not 0 <= alignment <= 0xFF or not 0 <= length <= 0xFF:
        raise AcpiError(f"IO descriptor alignment {alignment} or length {length} exceeds a byte")
    return _small(SMALL_IO, struct.pack("<BHHBB", 1 if decode16 else 0, minimum, maximum, alignment, length))


def irq_no_flags(*irqs: int) -> bytes:
    """ASL ``IRQNoFlags(){...}``: the two-byte IRQ Descriptor (6.4.2.1), whose lines are
    edge-triggered, active high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise AcpiError(f"IRQ descriptor line {irq} is outside 0-15")
        mask |= 1 << irq
    return _small(SMALL_IRQ, struct.pack("<H", mask))


def interrupt(*gsis: int, consumer: bool = True, level: bool = True, active_low: bool = False,
              shared: bool = True) -> bytes:
    """ASL ``Interrupt(ResourceConsumer, Level, ActiveHigh, Shared){...}``: the Extended
    Interrupt Descriptor (6.4.3.6); flags bit 0 consumer, bit 1 edge (_HE), bit 2
    active low (_LL), bit 3 shared (_SHR)."""
    if not 1 <= len(gsis) <= 255 or not all(0 <= g <= 0xFFFF_FFFF for g in gsis):
        raise AcpiError(f"extended interrupt descriptor with interrupts {gsis!r}")
    flags = (1 if consumer else 0) | (0 if level else 2) | (4 if active_low else 0) | (8 if shared else 0)
    return _large(LARGE_EXTENDED_IRQ, bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", g) for g in gsis))


def _check_range(what: str, minimum: int, maximum: int, limit: int) -> None:
    if not 0 <= minimum <= maximum <= limit:
        raise AcpiError(f"{what} range {minimum:#x}-{maximum:#x} is empty or outside 0-{limit:#x}")


def _address(kind: int, fmt: str, limit: int, rtype: int, type_flags: int, minimum: int, maximum: int,
             producer: bool) -> bytes:
    """An address space descriptor with fixed minimum and maximum, positive decode, no
    translation, granularity 0 (6.4.3.5: "_MIF and _MAF both 1 ... length = max - min + 1")."""
    _check_range("address space", minimum, maximum, limit)
    gen = GEN_MIN_FIXED | GEN_MAX_FIXED | (0 if producer else GEN_CONSUMER)
    values = struct.pack(f"<5{fmt}", 0, minimum, maximum, 0, maximum - minimum + 1)
    return _large(kind, bytes([rtype, gen, type_flags]) + values)


def word_bus_number(minimum: int, maximum: int, producer: bool = True) -> bytes:
    """ASL ``WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)``:
    Word Address Space Descriptor (6.4.3.5.3) of resource type 2."""
    return _address(LARGE_WORD_ADDRESS, "H", 0xFFFF, RESOURCE_BUS, 0, minimum, maximum, producer)


def word_io(minimum: int, maximum: int, producer: bool = True) -> bytes:
    """ASL ``WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``
    (6.4.3.5.3, resource type 1)."""
    return _address(LARGE_WORD_ADDRESS, "H", 0xFFFF, RESOURCE_IO, IO_RANGE_ENTIRE, minimum, maximum, producer)


def _mem_flags(cacheable: bool, prefetchable: bool, read_write: bool) -> int:
    cache = MEM_PREFETCHABLE if prefetchable else MEM_CACHEABLE if cacheable else 0
    return cache | (MEM_READ_WRITE if read_write else 0)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False, prefetchable: bool = False,
                 read_write: bool = True, producer: bool = True) -> bytes:
    """ASL ``DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, 0, min, max, 0, len)``: DWord Address Space Descriptor (6.4.3.5.2) of
    resource type 0."""
    return _address(LARGE_DWORD_ADDRESS, "I", 0xFFFF_FFFF, RESOURCE_MEMORY,
                    _mem_flags(cacheable, prefetchable, read_write), minimum, maximum, producer)


def qword_memory(minimum: int, maximum: int, cacheable: bool = False, prefetchable: bool = False,
                 read_write: bool = True, producer: bool = True) -> bytes:
    """ASL ``QWordMemory(...)``: QWord Address Space Descriptor (6.4.3.5.1)."""
    return _address(LARGE_QWORD_ADDRESS, "Q", 0xFFFF_FFFF_FFFF_FFFF, RESOURCE_MEMORY,
                    _mem_flags(cacheable, prefetchable, read_write), minimum, maximum, producer)


def resource_template(*descriptors: bytes) -> bytes:
    """ASL ``ResourceTemplate(){...}``: a Buffer of the descriptors and an End Tag (6.4)."""
    return buffer(b"".join(descriptors) + end_tag())
