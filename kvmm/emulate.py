"""Instructions KVM could not emulate, handled by kvmm (kvm_pvm), or reported.

On ``kvm_pvm`` (a software-nested KVM, see docs/hosts.md) KVM's instruction emulator runs
most guest code and stops the vCPU with ``KVM_EXIT_INTERNAL_ERROR`` (suberror
``KVM_INTERNAL_ERROR_EMULATION``) at an instruction it does not know. The vCPU loop
(:mod:`kvmm.vcpu`) hands that exit to :class:`Emulator`, which

1. decodes the instruction at RIP with a real x86 decoder (iced-x86; the bytes KVM put in
   ``kvm_run.emulation_failure``, or fetched from guest memory through the guest's page
   tables when KVM gave none);
2. looks its mnemonic up in :data:`HANDLERS`, the one table of what kvmm does about an
   instruction: emulate it against the vCPU's registers and guest memory, and/or keep
   Linux away from it before boot with a kernel parameter (where emulating it from the
   host would be unsafe, or where an exit per use would cost more than the feature);
3. executes the handler (a pure function of a :class:`Cpu`: registers, segment and
   control registers, and :class:`~kvmm.memory.GuestMemory` reached only through
   :func:`translate`, a page-table walk with the architectural permission checks), then
   writes the registers back and moves RIP past the instruction; an architectural fault
   the instruction raises (#GP, #PF, #UD, #NM, #MF) is injected into the guest instead,
   with RIP left on the instruction, as the CPU would;
4. otherwise explains the failure (:meth:`Emulator.explain`): the disassembly, RIP, the
   kernel symbol when a System.map or vmlinux lies beside the kernel, and what the user
   can do.

On hardware KVM nothing is emulated (an emulation failure there is a real error, and
KVM's own emulator covers everything these guests run); the explanation is the same.

Memory operands: linear address from the segment base (FS/GS only in 64-bit mode,
Intel SDM vol. 1, 3.3.7.1), canonical check (#GP(0), #SS(0) for the stack segment);
translation as in Intel SDM vol. 3A, chapter 4 (4.5: 4- and 5-level paging; 4.4: PAE;
4.3: 32-bit paging; 4.6: access rights incl. CR0.WP, SMAP and SMEP; 4.7: page-fault
error code; 4.8: accessed and dirty flags). Protection keys are not checked (Linux does
not use them for kernel memory, the only memory these handlers have been seen to touch).

Atomicity: a locked read-modify-write done from the host (``lock cmpxchg16b``) is atomic
against the guest only while no other vCPU runs. With one vCPU it is (that vCPU is in
this exit; devices only write buffers the driver handed them). With several vCPUs kvmm
does not emulate it: the table's kernel parameter (``clearcpuid=cx16``) keeps Linux away
from it (SLUB and the per-CPU ops choose ``cmpxchg16b`` only if CPUID says CX16), and a
guest that runs it anyway stops with an explanation. Pausing every other vCPU around each
emulation would make it atomic, at a round of signals per use of an instruction SLUB
executes on every slab allocation; hiding the feature costs nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
from collections import Counter
from typing import Any, Callable, NamedTuple

from .errors import GuestMemoryError, KvmmError
from .memory import GuestMemory

LOG = logging.getLogger(__name__)


class EmulationError(KvmmError):
    """kvmm cannot emulate the instruction KVM gave up on (``reason``), and ``advice``
    says what the user can do."""

    def __init__(self, reason: str, advice: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice


class GuestFault(KvmmError):
    """Not a kvmm error: the architectural exception the emulated instruction raises
    (vector, error code, CR2 for a page fault). The dispatcher injects it."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(f"{VECTOR_NAMES.get(vector, vector)}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


# Exception vectors (Intel SDM vol. 3A, table 6-1).
DB, BP, UD, NM, SS_FAULT, GP, PF, MF, AC = 1, 3, 6, 7, 12, 13, 14, 16, 17
VECTOR_NAMES = {DB: "#DB", BP: "#BP", UD: "#UD", NM: "#NM", SS_FAULT: "#SS", GP: "#GP", PF: "#PF", MF: "#MF",
                AC: "#AC"}

# Control register and flag bits (Intel SDM vol. 3A, 2.5; vol. 1, 3.4.3).
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR4_PSE, CR4_PAE, CR4_OSFXSR, CR4_LA57, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP = (
    1 << 4, 1 << 5, 1 << 9, 1 << 12, 1 << 18, 1 << 20, 1 << 21)
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11
RFLAGS_CF, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF, RFLAGS_TF, RFLAGS_OF, RFLAGS_RF, RFLAGS_AC = (
    1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 11, 1 << 16, 1 << 18)

# Page-table entry bits and the page-fault error code (SDM vol. 3A, 4.5, 4.7).
PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
PAGE = 4096

# MXCSR bits a processor with DAZ accepts (SDM vol. 1, 10.5.1.2: MXCSR_MASK; 0xFFFF on
# every x86-64 CPU with DAZ). Writing any other bit with LDMXCSR is #GP(0).
MXCSR_MASK = 0xFFFF
FSW_ES = 1 << 7  # x87 status word: an unmasked exception is pending (SDM vol. 1, 8.1.3)

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


# --- the decoder (iced-x86, imported at the first emulation failure) --------------------
def _iced() -> Any:
    import iced_x86  # ~6 ms to import: only when KVM first gives up on an instruction

    return iced_x86


@functools.lru_cache(maxsize=1)
def _registers() -> dict[int, tuple[str, int, int]]:
    """iced Register value -> (kvm_regs field, size in bytes, bit shift: 8 for AH..BH)."""
    reg = _iced().Register
    table: dict[int, tuple[str, int, int]] = {}
    legacy = ("AX", "CX", "DX", "BX", "SP", "BP", "SI", "DI")
    for i, name in enumerate(GPRS):
        if i < 8:
            names = ("R" + legacy[i], "E" + legacy[i], legacy[i],
                     legacy[i][0] + "L" if i < 4 else legacy[i] + "L")
        else:
            names = (name.upper(), name.upper() + "D", name.upper() + "W", name.upper() + "L")
        for attr, size in zip(names, (8, 4, 2, 1)):
            table[getattr(reg, attr)] = (name, size, 0)
    for i, attr in enumerate(("AH", "CH", "DH", "BH")):
        table[getattr(reg, attr)] = (GPRS[i], 1, 8)
    table[reg.RIP] = ("rip", 8, 0)
    table[reg.EIP] = ("rip", 4, 0)
    return table


@functools.lru_cache(maxsize=512)
def decode(code: bytes, bitness: int, rip: int) -> Any:
    """The first instruction of ``code`` (an iced ``Instruction``), decoded as the CPU would
    at ``rip`` in a ``bitness``-bit code segment. Raises EmulationError for bytes that are
    no valid instruction or end before it does. Cached: a kernel fails on the same few
    instructions over and over."""
    iced = _iced()
    decoder = iced.Decoder(bitness, code, ip=rip)
    insn = decoder.decode()
    if decoder.last_error == iced.DecoderError.NO_MORE_BYTES:
        raise EmulationError(f"the {len(code)} bytes at RIP {rip:#x} end inside an instruction (too few)")
    if insn.is_invalid:
        raise EmulationError(f"the bytes at RIP {rip:#x} are no valid {bitness}-bit x86 instruction")
    return insn


def disassemble(insn: Any) -> str:
    iced = _iced()
    return str(iced.Formatter(iced.FormatterSyntax.INTEL).format(insn))


def mnemonic(insn: Any) -> str:
    return _mnemonic_names()[insn.mnemonic]


@functools.lru_cache(maxsize=1)
def _mnemonic_names() -> dict[int, str]:
    m = _iced().Mnemonic
    names = {getattr(m, n): n.lower() for n in dir(m) if not n.startswith("_") and isinstance(getattr(m, n), int)}
    names[m.WAIT] = "fwait"  # one instruction, 9B: WAIT/FWAIT (SDM vol. 2B); Linux and GAS say fwait
    return names


@functools.lru_cache(maxsize=1)
def _cpuid_feature_names() -> dict[int, str]:
    f = _iced().CpuidFeature
    return {getattr(f, n): n for n in dir(f) if not n.startswith("_") and isinstance(getattr(f, n), int)}


# --- paging ------------------------------------------------------------------------------
class Paging(NamedTuple):
    """What a linear-to-physical translation depends on (from KVM_GET_SREGS and RFLAGS)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    rflags: int


def translate(mem: GuestMemory, paging: Paging, la: int, write: bool = False, fetch: bool = False,
              set_flags: bool = True) -> int:
    """The guest-physical address of linear address ``la`` for a data access (``write``)
    or an instruction fetch, walking the guest's page tables in ``mem``. Raises
    GuestFault(#PF) as the CPU would (SDM vol. 3A, 4.6-4.7) and EmulationError for a
    table outside guest RAM. Sets the accessed (and, for a write, dirty) flags the walk
    needs set (4.8), as the CPU does, unless ``set_flags`` is False (a look that is not
    an access, e.g. fetching bytes for a report)."""
    cr0, cr3, cr4, efer, cpl, rflags = paging
    if not cr0 & CR0_PG:
        return la & 0xFFFF_FFFF
    user = cpl == 3
    err = (PF_W if write else 0) | (PF_U if user else 0) | (PF_I if fetch and efer & EFER_NXE else 0)

    def fault(code: int) -> GuestFault:
        return GuestFault(PF, err | code, la)

    def entry(addr: int, size: int) -> int:
        try:
            return int.from_bytes(mem.read(addr, size), "little")
        except GuestMemoryError:
            raise EmulationError(f"the guest's page table at GPA {addr:#x} lies outside guest RAM") from None

    visited: list[tuple[int, int, int]] = []  # (address, size, value) of each entry walked
    writable = usable = True
    nx = False
    if efer & EFER_LMA or cr4 & CR4_PAE:
        if efer & EFER_LMA:
            levels = 5 if cr4 & CR4_LA57 else 4
            table, shift = cr3 & PTE_ADDR, 12 + 9 * (levels - 1)
        else:  # PAE: four PDPTEs at CR3[31:5], which carry no access rights (4.4.1)
            pdpte = entry((cr3 & 0xFFFF_FFE0) + ((la >> 30) & 3) * 8, 8)
            if not pdpte & PTE_P:
                raise fault(0)
            table, shift = pdpte & PTE_ADDR, 21
        while True:
            addr = table + ((la >> shift) & 0x1FF) * 8
            e = entry(addr, 8)
            if not e & PTE_P:
                raise fault(0)
            visited.append((addr, 8, e))
            writable &= bool(e & PTE_W)
            usable &= bool(e & PTE_U)
            nx |= bool(e & PTE_NX) and bool(efer & EFER_NXE)
            if shift == 12 or e & PTE_PS:
                if e & PTE_PS and shift > 30:  # PS in a PML4E/PML5E is reserved
                    raise fault(PF_P | PF_RSVD)
                size = 1 << shift
                gpa = (e & PTE_ADDR & ~(size - 1)) | (la & (size - 1))
                break
            table, shift = e & PTE_ADDR, shift - 9
    else:  # 32-bit paging: 4-byte entries, 4-MiB pages with CR4.PSE (4.3)
        la &= 0xFFFF_FFFF
        addr = (cr3 & 0xFFFF_F000) + ((la >> 22) & 0x3FF) * 4
        e = entry(addr, 4)
        if not e & PTE_P:
            raise fault(0)
        visited.append((addr, 4, e))
        writable, usable = bool(e & PTE_W), bool(e & PTE_U)
        if e & PTE_PS and cr4 & CR4_PSE:
            gpa = (e & 0xFFC0_0000) | (la & 0x3F_FFFF)
        else:
            addr = (e & 0xFFFF_F000) + ((la >> 12) & 0x3FF) * 4
            e = entry(addr, 4)
            if not e & PTE_P:
                raise fault(0)
            visited.append((addr, 4, e))
            writable &= bool(e & PTE_W)
            usable &= bool(e & PTE_U)
            gpa = (e & 0xFFFF_F000) | (la & 0xFFF)
    # Access rights (4.6): user accesses need U everywhere and W for writes; supervisor
    # writes need W when CR0.WP; SMAP forbids supervisor data accesses to user pages
    # unless RFLAGS.AC; SMEP forbids supervisor fetches from them; NX forbids fetches.
    if user:
        if not usable or (write and not writable):
            raise fault(PF_P)
    else:
        if write and not writable and cr0 & CR0_WP:
            raise fault(PF_P)
        if usable and not fetch and cr4 & CR4_SMAP and not rflags & RFLAGS_AC:
            raise fault(PF_P)
        if usable and fetch and cr4 & CR4_SMEP:
            raise fault(PF_P)
    if fetch and nx:
        raise fault(PF_P)
    if set_flags:
        for i, (addr, size, e) in enumerate(visited):
            want = PTE_A | (PTE_D if write and i == len(visited) - 1 else 0)
            if e & want != want:  # kernel mappings have A and D set: usually nothing to write
                mem.write(addr, (e | want).to_bytes(size, "little"))
    return gpa


# --- the vCPU as the handlers see it -------------------------------------------------------
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


class Cpu:
    """One vCPU's state for a handler: ``regs`` (``struct kvm_regs`` or anything with its
    fields), ``sregs`` (``struct kvm_sregs``-like), guest memory, and the FPU and XCR0 on
    demand (each a KVM ioctl). Handlers change ``regs`` and ``fpu`` in place; the
    dispatcher writes back what changed. Pure: tests build one from plain objects."""

    def __init__(self, regs: Any, sregs: Any, mem: GuestMemory, get_fpu: Callable[[], Any] | None = None,
                 get_xcr0: Callable[[], int] | None = None) -> None:
        self.regs = regs
        self.sregs = sregs
        self.mem = mem
        self._get_fpu = get_fpu
        self._get_xcr0 = get_xcr0
        self._fpu: Any = None
        self.regs_changed = False

    # mode ---------------------------------------------------------------------------
    @property
    def bitness(self) -> int:
        s = self.sregs
        if not s.cr0 & CR0_PE:
            return 16
        if s.efer & EFER_LMA and s.cs.l:
            return 64
        return 32 if s.cs.db else 16

    @property
    def cpl(self) -> int:
        # KVM takes the CPL from SS.DPL (SDM vol. 3A, 5.5: equal to CS.RPL in protected mode).
        return int(self.sregs.ss.dpl) if self.sregs.cr0 & CR0_PE else 0

    @property
    def paging(self) -> Paging:
        s = self.sregs
        return Paging(s.cr0, s.cr3, s.cr4, s.efer, self.cpl, self.regs.rflags)

    # registers ----------------------------------------------------------------------
    def get_reg(self, reg: int) -> int:
        name, size, shift = _registers()[reg]
        return (getattr(self.regs, name) >> shift) & ((1 << (8 * size)) - 1)

    def set_reg(self, reg: int, value: int) -> None:
        """A register write as the CPU does it: a 32-bit write zero-extends into the
        64-bit register, 8- and 16-bit writes keep the other bits (SDM vol. 1, 3.4.1.1)."""
        name, size, shift = _registers()[reg]
        old = getattr(self.regs, name)
        if size == 8:
            new = value & 0xFFFF_FFFF_FFFF_FFFF
        elif size == 4:
            new = value & 0xFFFF_FFFF
        else:
            mask = ((1 << (8 * size)) - 1) << shift
            new = (old & ~mask) | ((value << shift) & mask)
        setattr(self.regs, name, new)
        self.regs_changed = True

    def set_flags(self, mask: int, values: int) -> None:
        """RFLAGS bits in ``mask`` become those of ``values``."""
        self.regs.rflags = (self.regs.rflags & ~mask) | (values & mask)
        self.regs_changed = True

    @property
    def fpu(self) -> Any:
        if self._fpu is None:
            if self._get_fpu is None:
                raise EmulationError("the FPU state is not available")
            self._fpu = self._get_fpu()
        return self._fpu

    @property
    def fpu_loaded(self) -> bool:
        return self._fpu is not None

    def xcr0(self) -> int:
        if self._get_xcr0 is None:
            raise EmulationError("XCR0 is not available")
        return self._get_xcr0()

    # memory operands ------------------------------------------------------------------
    def operand_address(self, insn: Any, size: int) -> int:
        """The linear address of ``insn``'s memory operand (``size`` bytes), after the
        segment checks: canonical form in 64-bit mode, base and limit otherwise."""
        iced = _iced()
        regs = _registers()
        bits = self.bitness
        addr_bits = bits
        ea = insn.memory_displacement
        if insn.is_ip_rel_memory_operand:
            ea = insn.ip_rel_memory_address
        else:
            for reg, scale in ((insn.memory_base, 1), (insn.memory_index, insn.memory_index_scale)):
                if reg != iced.Register.NONE:
                    if reg not in regs:
                        raise EmulationError(f"a memory operand addressed through register {reg} (not a GPR)")
                    addr_bits = regs[reg][1] * 8
                    ea += self.get_reg(reg) * scale
        ea &= (1 << addr_bits) - 1
        seg_name = SEGMENTS[insn.memory_segment - iced.Register.ES]
        stack = seg_name == "ss"
        if bits == 64:
            base = getattr(self.sregs, seg_name).base if seg_name in ("fs", "gs") else 0
            la = (base + ea) & 0xFFFF_FFFF_FFFF_FFFF
            if not canonical(la, self.sregs.cr4) or not canonical(la + size - 1, self.sregs.cr4):
                raise GuestFault(SS_FAULT if stack else GP, 0)
            return la
        seg = getattr(self.sregs, seg_name)
        if self.sregs.cr0 & CR0_PE:
            if seg.unusable or not seg.present:
                raise GuestFault(SS_FAULT if stack else GP, 0)
            if seg.type & 0b1100 == 0b0100:  # an expand-down data segment
                raise EmulationError("an operand in an expand-down segment")
            if ea + size - 1 > seg.limit:
                raise GuestFault(SS_FAULT if stack else GP, 0)
        return (seg.base + ea) & 0xFFFF_FFFF

    def check_alignment(self, la: int, align: int) -> None:
        """#AC(0) for a misaligned access at CPL 3 with CR0.AM and RFLAGS.AC (SDM vol. 3A, 6.15)."""
        if la % align and self.cpl == 3 and self.sregs.cr0 & CR0_AM and self.regs.rflags & RFLAGS_AC:
            raise GuestFault(AC, 0)

    def _pieces(self, la: int, n: int, write: bool, paging: Paging | None = None) -> list[tuple[int, int]]:
        """(GPA, length) per page of ``[la, la+n)``, every page translated before any byte
        moves (a fault on the second page leaves the first untouched, as on the CPU)."""
        out = []
        paging = paging or self.paging
        mask = 0xFFFF_FFFF_FFFF_FFFF if self.bitness == 64 else 0xFFFF_FFFF
        while n:
            chunk = min(n, PAGE - la % PAGE)
            out.append((translate(self.mem, paging, la, write=write), chunk))
            la, n = (la + chunk) & mask, n - chunk
        return out

    def read(self, la: int, n: int, for_write: bool = False, paging: Paging | None = None) -> bytes:
        """``n`` bytes at linear address ``la``; ``for_write`` checks write access too
        (a read-modify-write faults on a read-only page before it reads); ``paging``
        replaces the vCPU's own (an implicit access, :meth:`read_system`)."""
        try:
            return b"".join(self.mem.read(gpa, k) for gpa, k in self._pieces(la, n, for_write, paging))
        except GuestMemoryError as exc:
            raise EmulationError(f"the operand at {la:#x} is not guest RAM ({exc})") from None

    def read_system(self, la: int, n: int) -> bytes:
        """``n`` bytes of a descriptor table at linear address ``la``: an implicit
        supervisor access (SDM vol. 3A, 4.6: CPL 0's rights whatever the CPL, and SMAP
        applies whatever RFLAGS.AC says)."""
        implicit = self.paging._replace(cpl=0, rflags=self.regs.rflags & ~RFLAGS_AC)
        mask = 0xFFFF_FFFF_FFFF_FFFF if self.bitness == 64 else 0xFFFF_FFFF
        return self.read(la & mask, n, paging=implicit)

    def write(self, la: int, data: bytes) -> None:
        try:
            pieces = self._pieces(la, len(data), True)
            for gpa, k in pieces:  # all of it RAM before the first byte is written
                if not self.mem.contains(gpa, k):
                    raise GuestMemoryError(gpa, k)
            off = 0
            for gpa, k in pieces:
                self.mem.write(gpa, data[off : off + k])
                off += k
        except GuestMemoryError as exc:
            raise EmulationError(f"the operand at {la:#x} is not guest RAM ({exc})") from None

    def fetch(self, n: int = 15) -> bytes:
        """Up to ``n`` instruction bytes at CS:RIP (fewer where the next page is not
        mapped: the decoder then says whether they suffice)."""
        rip = self.regs.rip if self.bitness == 64 else (self.sregs.cs.base + self.regs.rip) & 0xFFFF_FFFF
        out = b""
        paging = self.paging
        while len(out) < n:
            la = rip + len(out)
            chunk = min(n - len(out), PAGE - la % PAGE)
            try:
                gpa = translate(self.mem, paging, la, fetch=True, set_flags=False)
                out += self.mem.read(gpa, chunk)
            except (GuestFault, GuestMemoryError, EmulationError):
                if not out:
                    raise EmulationError(f"the instruction at RIP {self.regs.rip:#x} cannot be read "
                                         "(not mapped, or not guest RAM)") from None
                break
        return out


def canonical(la: int, cr4: int) -> bool:
    """Bits 63..47 (63..56 with LA57) all equal (SDM vol. 1, 3.3.7.1)."""
    top = 56 if cr4 & CR4_LA57 else 47
    high = la >> top
    return high == 0 or high == (1 << (64 - top)) - 1


# --- handlers (Intel SDM vol. 2, each instruction's "Operation" and exceptions) ----------
class Trap(NamedTuple):
    """A trap the instruction raises after it completes (RIP past it): int3's #BP."""

    vector: int


def _no_lock(insn: Any) -> None:
    if insn.has_lock_prefix:
        raise GuestFault(UD)


def emulate_cmpxchg16b(cpu: Cpu, insn: Any) -> None:
    """CMPXCHG16B m128: compare RDX:RAX with m128; equal: ZF=1, m128 = RCX:RBX; else ZF=0,
    RDX:RAX = m128, and m128 is written back unchanged (the locked cycle always writes).
    #GP(0) if m128 is not 16-byte aligned. Other flags unaffected."""
    la = cpu.operand_address(insn, 16)
    if la % 16:
        raise GuestFault(GP, 0)
    old = cpu.read(la, 16, for_write=True)
    lo, hi = struct.unpack("<QQ", old)
    r = cpu.regs
    if lo == r.rax and hi == r.rdx:
        cpu.write(la, struct.pack("<QQ", r.rbx, r.rcx))
        cpu.set_flags(RFLAGS_ZF, RFLAGS_ZF)
    else:
        cpu.write(la, old)
        r.rax, r.rdx = lo, hi
        cpu.set_flags(RFLAGS_ZF, 0)


def _sse_usable(cpu: Cpu, insn: Any) -> None:
    """LDMXCSR/STMXCSR: #UD with CR0.EM, without CR4.OSFXSR, or with LOCK; #NM with CR0.TS."""
    _no_lock(insn)
    if cpu.sregs.cr0 & CR0_EM or not cpu.sregs.cr4 & CR4_OSFXSR:
        raise GuestFault(UD)
    if cpu.sregs.cr0 & CR0_TS:
        raise GuestFault(NM)


def emulate_ldmxcsr(cpu: Cpu, insn: Any) -> None:
    """LDMXCSR m32: MXCSR = m32; #GP(0) if a reserved bit is set."""
    _sse_usable(cpu, insn)
    la = cpu.operand_address(insn, 4)
    cpu.check_alignment(la, 4)
    value = int.from_bytes(cpu.read(la, 4), "little")
    if value & ~MXCSR_MASK:
        raise GuestFault(GP, 0)
    cpu.fpu.mxcsr = value


def emulate_stmxcsr(cpu: Cpu, insn: Any) -> None:
    """STMXCSR m32: m32 = MXCSR."""
    _sse_usable(cpu, insn)
    la = cpu.operand_address(insn, 4)
    cpu.check_alignment(la, 4)
    cpu.write(la, (cpu.fpu.mxcsr & 0xFFFF_FFFF).to_bytes(4, "little"))


def emulate_xgetbv(cpu: Cpu, insn: Any) -> None:
    """XGETBV: EDX:EAX = XCR[ECX]; #UD without CR4.OSXSAVE; #GP(0) for an XCR other than 0
    or 1. XCR1 (XINUSE) is answered with XCR0: every enabled component counted in use,
    which is what a kernel deciding what to save may always assume."""
    _no_lock(insn)
    if not cpu.sregs.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    index = cpu.regs.rcx & 0xFFFF_FFFF
    if index not in (0, 1):
        raise GuestFault(GP, 0)
    value = cpu.xcr0()
    cpu.regs.rax = value & 0xFFFF_FFFF
    cpu.regs.rdx = (value >> 32) & 0xFFFF_FFFF
    cpu.regs_changed = True


def _smap_insn(cpu: Cpu, insn: Any, ac: int) -> None:
    """CLAC/STAC: RFLAGS.AC = 0/1; #UD at CPL > 0 or with LOCK."""
    _no_lock(insn)
    if cpu.cpl:
        raise GuestFault(UD)
    cpu.set_flags(RFLAGS_AC, ac)


def emulate_clac(cpu: Cpu, insn: Any) -> None:
    _smap_insn(cpu, insn, 0)


def emulate_stac(cpu: Cpu, insn: Any) -> None:
    _smap_insn(cpu, insn, RFLAGS_AC)


def emulate_popcnt(cpu: Cpu, insn: Any) -> None:
    """POPCNT r, r/m (16/32/64): the number of set bits; ZF = (source == 0); OF, SF, AF,
    CF and PF cleared."""
    _no_lock(insn)
    iced = _iced()
    dest = insn.op0_register
    size = _registers()[dest][1]
    if insn.op1_kind == iced.OpKind.MEMORY:
        la = cpu.operand_address(insn, size)
        cpu.check_alignment(la, size)
        src = int.from_bytes(cpu.read(la, size), "little")
    else:
        src = cpu.get_reg(insn.op1_register)
    cpu.set_reg(dest, bin(src).count("1"))
    arith = RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_CF | RFLAGS_PF
    cpu.set_flags(arith, RFLAGS_ZF if src == 0 else 0)


# Descriptor types (SDM vol. 3A, 3.5, table 3-2) LAR and LSL accept among system
# descriptors, outside IA-32e mode and in it (vol. 2A, LAR and LSL): TSSs and the LDT for
# both, call gates (and, outside IA-32e mode, task gates) for LAR only.
LSL_SYSTEM_TYPES = {False: {0x1, 0x2, 0x3, 0x9, 0xB}, True: {0x2, 0x9, 0xB}}
LAR_SYSTEM_TYPES = {False: {0x1, 0x2, 0x3, 0x4, 0x5, 0x9, 0xB, 0xC}, True: {0x2, 0x9, 0xB, 0xC}}
RFLAGS_VM = 1 << 17


def _selector_descriptor(cpu: Cpu, insn: Any, system_types: dict[bool, set[int]]) -> int | None:
    """LAR/LSL's common part: the descriptor (8 bytes, little-endian) the source selector
    names, or None where the instruction clears ZF (null selector, past the table's limit,
    a type it does not take, CPL or RPL above a non-conforming segment's DPL, a 16-byte
    system descriptor whose upper half is not type 0). #UD outside protected mode and with
    LOCK; the memory source and the descriptor read fault as the CPU's accesses do."""
    _no_lock(insn)
    if not cpu.sregs.cr0 & CR0_PE or cpu.regs.rflags & RFLAGS_VM:
        raise GuestFault(UD)
    iced = _iced()
    if insn.op1_kind == iced.OpKind.MEMORY:
        la = cpu.operand_address(insn, 2)
        cpu.check_alignment(la, 2)
        selector = int.from_bytes(cpu.read(la, 2), "little")
    else:
        selector = cpu.get_reg(insn.op1_register) & 0xFFFF
    offset, local, rpl = selector & 0xFFF8, selector & 4, selector & 3
    if local:
        table = cpu.sregs.ldt
        if table.unusable or not table.present:
            return None
        base, limit = table.base, table.limit
    elif offset == 0:  # the null selector
        return None
    else:
        base, limit = cpu.sregs.gdt.base, cpu.sregs.gdt.limit
    if offset + 7 > limit:
        return None
    descriptor = int.from_bytes(cpu.read_system(base + offset, 8), "little")
    high = descriptor >> 32
    kind, dpl, system = (high >> 8) & 0xF, (high >> 13) & 3, not high & (1 << 12)
    long_mode = bool(cpu.sregs.efer & EFER_LMA)
    if system:
        if kind not in system_types[long_mode]:
            return None
        if long_mode:  # a 16-byte descriptor: its upper half must be type 0 (vol. 3A, 3.5)
            if offset + 15 > limit or (int.from_bytes(cpu.read_system(base + offset + 12, 4), "little") >> 8) & 0x1F:
                return None
    conforming = not system and kind & 0b1100 == 0b1100
    if not conforming and (cpu.cpl > dpl or rpl > dpl):
        return None
    return descriptor


def _load_if_valid(cpu: Cpu, insn: Any, value: int | None) -> None:
    """DEST and ZF as LAR/LSL leave them: ZF set and DEST loaded, or ZF clear and DEST
    unchanged; no other flag changes."""
    if value is None:
        cpu.set_flags(RFLAGS_ZF, 0)
        return
    cpu.set_reg(insn.op0_register, value)
    cpu.set_flags(RFLAGS_ZF, RFLAGS_ZF)


def emulate_lsl(cpu: Cpu, insn: Any) -> None:
    """LSL r, r/m16: the limit of the segment the selector names, in bytes (scaled by 4 KiB
    with G), where the selector is valid for it (SDM vol. 2A, LSL). Linux's paranoid
    entry (NMI, #MC, #DB) reads the CPU number from a GDT entry's limit this way on CPUs
    without RDPID."""
    descriptor = _selector_descriptor(cpu, insn, LSL_SYSTEM_TYPES)
    limit = None
    if descriptor is not None:
        limit = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000)
        if descriptor & (1 << 55):  # G: a limit in 4-KiB units
            limit = (limit << 12) | 0xFFF
    _load_if_valid(cpu, insn, limit)


def emulate_lar(cpu: Cpu, insn: Any) -> None:
    """LAR r, r/m16: the access rights of the descriptor (its second doubleword masked
    with 0x00F0FF00; bits 19:16, which Intel leaves undefined, read as zero), 0xFF00 of it
    for a 16-bit destination (SDM vol. 2A, LAR)."""
    descriptor = _selector_descriptor(cpu, insn, LAR_SYSTEM_TYPES)
    size = _registers()[insn.op0_register][1]
    rights = None if descriptor is None else (descriptor >> 32) & (0xFF00 if size == 2 else 0x00F0_FF00)
    _load_if_valid(cpu, insn, rights)


def emulate_fwait(cpu: Cpu, insn: Any) -> None:
    """FWAIT: #NM with CR0.MP and CR0.TS; #MF (CR0.NE) if an unmasked x87 exception is
    pending (FSW.ES); otherwise nothing. (With CR0.NE clear a pending exception is
    signalled on FERR#, an external pin kvmm does not model.)"""
    cr0 = cpu.sregs.cr0
    if cr0 & CR0_MP and cr0 & CR0_TS:
        raise GuestFault(NM)
    if cpu.fpu.fsw & FSW_ES:
        if not cr0 & CR0_NE:
            raise EmulationError("fwait with an unmasked x87 exception pending and CR0.NE clear (FERR#)")
        raise GuestFault(MF)


def emulate_int3(cpu: Cpu, insn: Any) -> Trap:
    """INT3: #BP, a trap: the handler sees RIP after the instruction."""
    return Trap(BP)


# --- the table ----------------------------------------------------------------------------
class Handler(NamedTuple):
    """What kvmm does about one mnemonic on kvm_pvm. ``emulate`` (None: never); ``avoid``:
    kernel parameters that keep Linux away from the instruction, added before boot when
    ``avoid_with`` says (``always``, or ``smp``: with several vCPUs); ``smp_safe``: the
    emulation is correct while other vCPUs run; ``why``: one line for docs and reports."""

    emulate: Callable[[Cpu, Any], Trap | None] | None
    why: str
    avoid: tuple[str, ...] = ()
    avoid_with: str = "always"
    smp_safe: bool = True


XSAVE_WHY = ("XSAVE state save/restore: kvmm does not emulate the XSAVE area; "
             "'noxsave' makes Linux use FXSAVE, which KVM emulates")

SIMD_WHY = ("kernel SIMD code (the RNG's BLAKE2s, SSSE3): kvmm does not emulate SSE; 'clearcpuid=ssse3' "
            "makes Linux use its generic C code")

HANDLERS: dict[str, Handler] = {
    "int3": Handler(emulate_int3, "the kernel's int3 self-test and text patching: #BP injected"),
    "fwait": Handler(emulate_fwait, "fwait in fpu__drop() at task exit: #NM/#MF checked, else nothing"),
    "cmpxchg16b": Handler(emulate_cmpxchg16b,
                          "SLUB's cmpxchg_double (lock cmpxchg16b): atomic from the host only with one vCPU",
                          avoid=("clearcpuid=cx16",), avoid_with="smp", smp_safe=False),
    "ldmxcsr": Handler(emulate_ldmxcsr, "kernel_fpu_begin() loads the default MXCSR"),
    "stmxcsr": Handler(emulate_stmxcsr, "MXCSR saved by FPU code"),
    "xgetbv": Handler(emulate_xgetbv, "XCR0 read by XSAVE-aware code"),
    # SMAP and POPCNT are hidden as well: Linux uses clac/stac around every user copy and
    # popcnt for every hweight(), and an exit per use costs more than the features give.
    "clac": Handler(emulate_clac, "SMAP: user-access windows", avoid=("clearcpuid=smap",)),
    "stac": Handler(emulate_stac, "SMAP: user-access windows", avoid=("clearcpuid=smap",)),
    "popcnt": Handler(emulate_popcnt, "hweight()", avoid=("clearcpuid=popcnt",)),
    "lsl": Handler(emulate_lsl, "the CPU number from a GDT limit in the NMI/#MC/#DB paranoid entry (no RDPID)"),
    "lar": Handler(emulate_lar, "segment access rights (LSL's twin, same checks)"),
    # Kernel SIMD code after kernel_fpu_begin(): in Debian 12's 6.1 kernel the only
    # built-in user (by its config; every other SIMD driver is a module) is the RNG's
    # BLAKE2s (blake2s_compress_ssse3, chosen when CPUID says SSSE3); KVM stopped at
    # `movd %ecx,%xmm15` there (measured), and emulating a SIMD hash an exit per instruction is no answer:
    # 'clearcpuid=ssse3' makes Linux use the generic C code.
    **{m: Handler(None, SIMD_WHY, avoid=("clearcpuid=ssse3",)) for m in ("movd", "movq")},
    **{m: Handler(None, XSAVE_WHY, avoid=("noxsave",))
       for m in ("xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec", "xsavec64", "xsaves", "xsaves64",
                 "xrstor", "xrstor64", "xrstors", "xrstors64")},
}


def avoid_cmdline(cpus: int, table: dict[str, Handler] = HANDLERS) -> tuple[str, ...]:
    """The kernel parameters the table adds before boot for ``cpus`` vCPUs, in order,
    ``clearcpuid=`` lists merged into one word."""
    words: list[str] = []
    cleared: list[str] = []
    for h in table.values():
        if h.avoid_with == "always" or (h.avoid_with == "smp" and cpus > 1):
            for w in h.avoid:
                if w.startswith("clearcpuid="):
                    cleared += [f for f in w.split("=", 1)[1].split(",") if f not in cleared]
                elif w not in words:
                    words.append(w)
    return (*words, *(("clearcpuid=" + ",".join(cleared),) if cleared else ()))


def emulated_mnemonics(cpus: int, table: dict[str, Handler] = HANDLERS) -> list[str]:
    """The mnemonics kvmm emulates with ``cpus`` vCPUs."""
    return [m for m, h in table.items() if h.emulate is not None and (h.smp_safe or cpus == 1)]


def plan_summary(cpus: int) -> str:
    """What kvm_pvm's table does for ``cpus`` vCPUs, for the start-up log line."""
    avoided = [m for m, h in HANDLERS.items() if h.avoid and (h.avoid_with == "always" or cpus > 1)]
    xsave = [m for m in avoided if m.startswith(("xsave", "xrstor"))]
    simd = [m for m in avoided if HANDLERS[m].why is SIMD_WHY]
    avoided = ([m for m in avoided if m not in xsave and m not in simd] + (["xsave/xrstor family"] if xsave else [])
               + (["SSSE3 code (movd, movq)"] if simd else []))
    return (f"kernel parameters '{' '.join(avoid_cmdline(cpus))}' keep Linux from {', '.join(avoided)}; "
            f"kvmm emulates {', '.join(emulated_mnemonics(cpus))} when the guest runs them")


def run_handler(cpu: Cpu, insn: Any, cpus: int = 1) -> Trap | None:
    """Execute ``insn`` on ``cpu`` through the table: registers and memory changed, RIP
    moved past it (and RFLAGS.RF cleared). Raises GuestFault (RIP unchanged, registers
    as before) or EmulationError (kvmm does not emulate it here)."""
    name = mnemonic(insn)
    handler = HANDLERS.get(name)
    if handler is None or handler.emulate is None:
        why = f" ({handler.why})" if handler is not None else ""
        raise EmulationError(f"kvmm does not emulate {name}{why}", _advice(name, insn, cpus))
    if cpus > 1 and not handler.smp_safe:
        raise EmulationError(f"kvmm emulates {name} only with one vCPU: from the host it is not atomic "
                             "against the other vCPUs", _advice(name, insn, cpus))
    if cpu.regs.rflags & RFLAGS_TF:
        raise EmulationError(f"{name} while single-stepping (RFLAGS.TF): the #DB after it is not modelled")
    saved = {name_: getattr(cpu.regs, name_) for name_ in (*GPRS, "rip", "rflags")}
    try:
        trap = handler.emulate(cpu, insn)
    except GuestFault:
        for name_, value in saved.items():  # a fault leaves the registers as they were
            setattr(cpu.regs, name_, value)
        raise
    bits = cpu.bitness
    cpu.regs.rip = insn.next_ip & ((1 << bits) - 1 if bits < 64 else 0xFFFF_FFFF_FFFF_FFFF)
    cpu.regs.rflags &= ~RFLAGS_RF
    cpu.regs_changed = True
    return trap


def _advice(name: str, insn: Any, cpus: int) -> str:
    handler = HANDLERS.get(name)
    if handler is not None and handler.avoid:
        words = " ".join(handler.avoid)
        if handler.avoid_with == "smp" and cpus > 1:
            return (f"kvmm adds '{words}' with several vCPUs to keep Linux away from it; this guest ran it anyway "
                    f"(or --cmdline replaced it): boot with --cpus 1, or on hardware KVM")
        return (f"kvmm adds '{words}' on this host to keep Linux away from it, and this kernel ran it anyway "
                f"(it does not honour that parameter there): boot on hardware KVM, or a kernel built without "
                f"that code path")
    features = [_cpuid_feature_names().get(f, str(f)) for f in insn.cpuid_features()]
    hint = ""
    plain = [f for f in features if f not in ("INTEL8086", "INTEL186", "INTEL286", "INTEL386", "INTEL486",
                                              "X64", "FPU", "CPUID")]
    if plain:
        hint = (f" It needs the CPU feature {', '.join(plain)}: if the kernel uses it only when CPUID says so, "
                f"'clearcpuid=<flag name as in /proc/cpuinfo>' in --cmdline keeps it away.")
    return ("This host's KVM (kvm_pvm, software nested) cannot emulate it." + hint +
            " A host with hardware KVM (VT-x/AMD-V) runs it natively; a kernel built without the code path "
            "avoids it. Please report the instruction and symbol to kvmm.")


# --- the vCPU side -------------------------------------------------------------------------
class FpuState:
    """The x87/SSE control state in a vCPU's XSAVE area (KVM_GET_XSAVE): FSW and MXCSR of
    the legacy region (SDM vol. 1, 13.4.1 and table 10-2). Measured on kvm_pvm,
    KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU does not reach the guest, while the
    XSAVE area does both (tests/guests/emu_mxcsr.c)."""

    FSW = struct.Struct("<H")
    MXCSR = struct.Struct("<I")
    XSTATE_BV = struct.Struct("<Q")
    SSE = 1 << 1  # XSTATE_BV bit: SSE state (XMM and MXCSR) is in the area, not in its initial state

    def __init__(self, area: bytes) -> None:
        if len(area) < 520:
            raise EmulationError("the vCPU's XSAVE area is too short")
        self.area = bytearray(area)
        self.changed = False

    @property
    def fsw(self) -> int:
        return int(self.FSW.unpack_from(self.area, 2)[0])

    @property
    def mxcsr(self) -> int:
        return int(self.MXCSR.unpack_from(self.area, 24)[0])

    @mxcsr.setter
    def mxcsr(self, value: int) -> None:
        # KVM takes MXCSR from the area only when the header says SSE state is present
        # (Linux's copy_uabi_to_xstate, "mxcsr quirk"); the XMM registers beside it are
        # the area's own, as KVM_GET_XSAVE gave them.
        self.MXCSR.pack_into(self.area, 24, value)
        self.changed = True
        bv = self.XSTATE_BV.unpack_from(self.area, 512)[0]
        self.XSTATE_BV.pack_into(self.area, 512, bv | self.SSE)


XCRS = struct.Struct("<II")
XCR = struct.Struct("<IIQ")


def xcr0_from(xcrs: bytes) -> int:
    """XCR0 from a ``struct kvm_xcrs`` (KVM_GET_XCRS); 1 (x87 only, its reset value) if absent."""
    n, _flags = XCRS.unpack_from(xcrs, 0)
    for i in range(min(n, 16)):
        xcr, _reserved, value = XCR.unpack_from(xcrs, XCRS.size + i * XCR.size)
        if xcr == 0:
            return int(value)
    return 1


class Emulator:
    """The vCPU loop's answer to ``KVM_EXIT_INTERNAL_ERROR``: :meth:`recover` emulates
    what :data:`HANDLERS` covers (on a host that needs it, ``enabled``), :meth:`explain`
    says why an instruction stopped the vCPU. Counts per mnemonic (:meth:`counters`)."""

    def __init__(self, mem: GuestMemory | None, enabled: bool, cpus: int = 1, kernel: str | None = None) -> None:
        self.mem = mem
        self.enabled = enabled
        self.cpus = cpus
        self.kernel = kernel
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._symbols: Symbols | None = None
        self._last_error: dict[int, EmulationError] = {}

    def recover(self, vcpu: Any, ex: Any) -> bool:
        """True if the instruction was dealt with (emulated, or its fault injected) and the
        vCPU may go on."""
        from .kvm import ioctls as K

        if not self.enabled or self.mem is None or ex.suberror != K.KVM_INTERNAL_ERROR_EMULATION:
            return False
        try:
            cpu = self._cpu(vcpu)
            insn = self._decode(cpu, ex.insn)
            trap = run_handler(cpu, insn, self.cpus)
        except GuestFault as fault:
            self._inject(vcpu, fault.vector, fault.error_code, fault.cr2)
            name = mnemonic(insn)
            with self._lock:
                self.faults[f"{name}_{VECTOR_NAMES.get(fault.vector, str(fault.vector)).lstrip('#')}"] += 1
            LOG.debug("vCPU %d: %s at RIP %#x raised %s", vcpu.id, name, cpu.regs.rip, fault)
            return True
        except EmulationError as exc:
            with self._lock:
                self._last_error[vcpu.id] = exc
            return False
        if cpu.regs_changed:
            vcpu.set_regs(cpu.regs)
        if cpu.fpu_loaded and cpu.fpu.changed:
            vcpu.set_state("xsave", bytes(cpu.fpu.area))
        if trap is not None:
            self._inject(vcpu, trap.vector, None, None)
        name = mnemonic(insn)
        with self._lock:
            self.counts[name] += 1
            first = self.counts[name] == 1
        if first:
            LOG.info("vCPU %d: emulated %s at RIP %#x%s (the first; the rest are counted)", vcpu.id,
                     disassemble(insn), insn.ip, self.where(insn.ip))
        return True

    def explain(self, vcpu: Any, ex: Any) -> str:
        """Why KVM's internal error stopped ``vcpu``, for the run's result: the
        instruction's disassembly and bytes, RIP, kernel symbol, and what to do."""
        from .kvm import ioctls as K

        with self._lock:
            last = self._last_error.pop(vcpu.id, None)
        try:
            rip = vcpu.get_regs().rip
        except KvmmError:
            return f"KVM internal error {ex.suberror} (registers unavailable)"
        if ex.suberror != K.KVM_INTERNAL_ERROR_EMULATION:
            return f"KVM internal error {ex.suberror} at RIP {rip:#x} (data {[hex(d) for d in ex.data]})"
        code = bytes(ex.insn)
        text = "an instruction"
        try:
            cpu = self._cpu(vcpu) if self.mem is not None else None
            if cpu is not None:
                insn = self._decode(cpu, code)
                code = code[: insn.len] if code else cpu.fetch()[: insn.len]
            elif code:
                insn = decode(code, 64, rip)
            else:
                raise EmulationError("KVM gave no instruction bytes")
            text = f"`{disassemble(insn)}`"
            if last is not None:
                why, advice = last.reason, last.advice
            elif not self.enabled:
                why, advice = "kvmm emulates instructions only on kvm_pvm; on hardware KVM this is a KVM limit", ""
            else:
                name = mnemonic(insn)
                why, advice = f"kvmm does not emulate {name}", _advice(name, insn, self.cpus)
        except EmulationError as exc:
            why, advice = (last.reason, last.advice) if last is not None else (exc.reason, exc.advice)
        insn_hex = code.hex(" ") if code else "unavailable"
        msg = f"KVM could not emulate {text} at RIP {rip:#x}{self.where(rip)} (instruction bytes: {insn_hex}): {why}"
        return msg + (f". {advice}" if advice else "")

    def counters(self) -> dict[str, int]:
        with self._lock:
            out = {f"emulated_{m}": n for m, n in sorted(self.counts.items())}
            out.update({f"fault_{m}": n for m, n in sorted(self.faults.items())})
        return out

    # ------------------------------------------------------------------------------------
    def _cpu(self, vcpu: Any) -> Cpu:
        assert self.mem is not None
        return Cpu(vcpu.get_regs(), vcpu.get_sregs(), self.mem, get_fpu=lambda: FpuState(vcpu.get_state("xsave")),
                   get_xcr0=lambda: xcr0_from(vcpu.get_state("xcrs")))

    @staticmethod
    def _decode(cpu: Cpu, code: bytes) -> Any:
        bits = cpu.bitness
        rip = cpu.regs.rip
        if code:
            try:
                return decode(bytes(code), bits, rip)
            except EmulationError:
                pass  # too few bytes from KVM: read them from guest memory
        return decode(cpu.fetch(), bits, rip)

    @staticmethod
    def _inject(vcpu: Any, vector: int, error_code: int | None, cr2: int | None) -> None:
        if cr2 is not None:
            sregs = vcpu.get_sregs()
            sregs.cr2 = cr2
            vcpu.set_sregs(sregs)
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.flags = 0
        vcpu.set_vcpu_events(events)

    def where(self, rip: int) -> str:
        """`` (symbol+offset, from FILE)`` for a kernel address, or why there is no symbol;
        empty without a kernel file (the symbols are read once, on first use)."""
        if self.kernel is None:
            return ""
        if self._symbols is None:
            self._symbols = Symbols.beside(self.kernel)
        return self._symbols.describe(rip)


# --- kernel symbols ------------------------------------------------------------------------
# Where Debian's linux-image-VERSION-dbg package puts System.map-VERSION and vmlinux-VERSION.
DEBUG_BOOT_DIR = "/usr/lib/debug/boot"


class Symbols:
    """Kernel text symbols from a System.map (``ADDRESS TYPE NAME`` lines) or a vmlinux's
    ELF symbol table, for reports; ``source`` names the file, or says why there is none."""

    def __init__(self, symbols: list[tuple[int, str]], source: str) -> None:
        self.symbols = sorted(symbols)
        self.source = source

    @classmethod
    def beside(cls, kernel: str, debug_dir: str = DEBUG_BOOT_DIR) -> Symbols:
        """Symbols from the first usable file among those a kernel usually has beside it:
        ``System.map-VERSION`` for ``vmlinuz-VERSION`` (beside it, then in ``debug_dir``,
        where Debian's ``linux-image-VERSION-dbg`` package installs the real one),
        ``System.map``, ``vmlinux`` (a kernel build tree's for its
        ``arch/x86/boot/bzImage`` too), or the kernel itself if it is an ELF vmlinux with a
        symbol table."""
        d, base = os.path.split(os.path.abspath(kernel))
        candidates = []
        for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
            if base.startswith(prefix):
                version = base[len(prefix):]
                candidates += [os.path.join(where, name + version) for where in (d, debug_dir)
                               for name in ("System.map-", "vmlinux-")]
        candidates += [os.path.join(d, "System.map"), os.path.join(d, "vmlinux")]
        if d.endswith(os.path.join("arch", "x86", "boot")):
            tree = os.path.dirname(os.path.dirname(os.path.dirname(d)))
            candidates += [os.path.join(tree, "System.map"), os.path.join(tree, "vmlinux")]
        if _is_elf(kernel):
            candidates.append(os.path.abspath(kernel))
        notes = []
        for path in candidates:
            if not os.path.isfile(path):
                continue
            if _is_placeholder(path):
                notes.append(f"{os.path.basename(path)} is a placeholder (Debian ships the real one in the "
                             f"kernel's -dbg package, in {debug_dir}; or put it beside the kernel)")
                continue
            try:
                syms = read_symbols(path)
            except (OSError, ValueError, struct.error) as exc:
                notes.append(f"{os.path.basename(path)}: {exc}")
                continue
            if syms:
                return cls(syms, path)
            notes.append(f"{os.path.basename(path)} has no symbols")
        return cls([], "; ".join(notes) or "no System.map or vmlinux beside the kernel")

    def lookup(self, addr: int) -> tuple[str, int] | None:
        import bisect

        i = bisect.bisect_right(self.symbols, (addr, "\U0010ffff")) - 1
        if i < 0:
            return None
        start, name = self.symbols[i]
        if addr - start > 1 << 20:  # past the last symbol by far: no honest answer
            return None
        return name, addr - start

    def describe(self, addr: int) -> str:
        found = self.lookup(addr)
        if found is None:
            return f" (kernel symbol unknown: {self.source})" if not self.symbols else ""
        return f" ({found[0]}+{found[1]:#x}, from {os.path.basename(self.source)})"


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _is_placeholder(path: str) -> bool:
    """Debian's System.map: one line saying the real one is in the -dbg package."""
    try:
        with open(path, "rb") as f:
            return b"The real System.map is in" in f.read(512)
    except OSError:
        return False


TEXT_TYPES = set("tTwW")
ELF_SHT_SYMTAB = 2
ELF_STT_FUNC = 2
SYMBOL_FILE_LIMIT = 256 << 20


def read_symbols(path: str) -> list[tuple[int, str]]:
    """Text symbols of a System.map or an ELF64 file (its .symtab), bounded in size."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"\x7fELF":
            return _elf_symbols(f)
        f.seek(0)
        data = f.read(SYMBOL_FILE_LIMIT)
    out = []
    for line in data.decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in TEXT_TYPES:
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            if addr != 0xFFFF_FFFF_FFFF_FFFF:  # Debian's placeholder System.map has one such line
                out.append((addr, parts[2]))
    return out


def _elf_symbols(f: Any) -> list[tuple[int, str]]:
    """FUNC symbols of an ELF64 little-endian file's SHT_SYMTAB (System V ABI, ch. 4)."""
    f.seek(0)
    ehdr = f.read(64)
    if len(ehdr) < 64 or ehdr[4] != 2 or ehdr[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", ehdr, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", ehdr, 0x3A)
    if shentsize != 64 or not 0 < shnum <= 4096:
        raise ValueError("unexpected ELF section headers")
    f.seek(shoff)
    shdrs = [struct.unpack("<IIQQQQIIQQ", f.read(64)) for _ in range(shnum)]
    for sh in shdrs:
        if sh[1] != ELF_SHT_SYMTAB:
            continue
        _name, _type, _flags, _addr, offset, size, link, _info, _align, entsize = sh
        if entsize != 24 or size > SYMBOL_FILE_LIMIT or not 0 <= link < shnum:
            raise ValueError("unexpected ELF symbol table")
        str_off, str_size = shdrs[link][4], shdrs[link][5]
        if str_size > SYMBOL_FILE_LIMIT:
            raise ValueError("ELF string table too large")
        f.seek(offset)
        table = f.read(size)
        f.seek(str_off)
        strings = f.read(str_size)
        out = []
        for off in range(0, len(table) - 23, 24):
            st_name, st_info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", table, off)
            if st_info & 0xF == ELF_STT_FUNC and st_value and st_name < len(strings):
                end = strings.find(b"\0", st_name)
                out.append((st_value, strings[st_name : end if end >= 0 else None].decode("ascii", "replace")))
        return out
    return []

