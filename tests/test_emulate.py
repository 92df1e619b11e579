"""kvmm.emulate without /dev/kvm: synthetic register states, page tables built in a
GuestMemory, KVM's structures from cffi. Each handler against the architectural result
its SDM page gives (registers, flags, memory, the exception and its error code)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvmm import emulate as E
from kvmm.emulate import (
    CR0_AM, CR0_EM, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_TS, CR0_WP, CR4_LA57, CR4_OSFXSR, CR4_OSXSAVE, CR4_PAE,
    CR4_PSE, CR4_SMAP, EFER_LMA, EFER_NXE, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W, RFLAGS_AC, RFLAGS_CF,
    RFLAGS_ZF, Cpu, EmulationError, Emulator, GuestFault, Paging, Symbols, Trap, avoid_cmdline, decode,
    run_handler, translate,
)
from kvmm.host import HARDWARE, PVM, build_cmdline, host_cmdline
from kvmm.kvm import exits as X
from kvmm.kvm import ioctls as K
from kvmm.kvm.structs import ffi
from kvmm.memory import GuestMemory

EMULATION = K.KVM_INTERNAL_ERROR_EMULATION
LONG_CR0 = CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG
LONG_CR4 = CR4_PAE | CR4_OSFXSR
KERNEL_VA = 0xFFFF_FFFF_8100_0000
DATA_VA = 0xFFFF_8880_0020_0000  # a direct-map-like address, mapped with 4-KiB pages
CODE_GPA = 0x40_0000


class Tables:
    """4- or 5-level page tables written into ``mem`` from GPA 0x10_0000 upwards."""

    def __init__(self, mem: GuestMemory, levels: int = 4) -> None:
        self.mem = mem
        self.levels = levels
        self.next = 0x10_0000
        self.root = self._table()

    def _table(self) -> int:
        addr = self.next
        self.next += 0x1000
        self.mem.fill(addr, 0x1000)
        return addr

    def map(self, va: int, gpa: int, flags: int = PTE_P | PTE_W, page_shift: int = 12, upper: int = PTE_P | PTE_W) -> None:
        table = self.root
        shift = 12 + 9 * (self.levels - 1)
        while shift > page_shift:
            slot = table + ((va >> shift) & 0x1FF) * 8
            e = self.mem.read_u64(slot)
            if not e & PTE_P:
                e = self._table() | upper
                self.mem.write_u64(slot, e)
            table = e & E.PTE_ADDR
            shift -= 9
        self.mem.write_u64(table + ((va >> shift) & 0x1FF) * 8,
                           gpa | flags | (PTE_PS if page_shift > 12 else 0))

    def entry(self, va: int) -> int:
        table, shift = self.root, 12 + 9 * (self.levels - 1)
        while True:
            e = self.mem.read_u64(table + ((va >> shift) & 0x1FF) * 8)
            if shift == 12 or e & PTE_PS:
                return e
            table, shift = e & E.PTE_ADDR, shift - 9


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.allocate(16 << 20, check_available=False)
    yield m
    m.close()


def long_mode(mem: GuestMemory, tables: Tables, **regs: int) -> Cpu:
    r = ffi.new("struct kvm_regs *")
    r.rip, r.rflags = KERNEL_VA, 0x2
    for name, value in regs.items():
        setattr(r, name, value)
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.cr3, s.cr4, s.efer = LONG_CR0, tables.root, LONG_CR4 | (CR4_LA57 if tables.levels == 5 else 0), EFER_LMA | EFER_NXE
    s.cs.l, s.cs.present, s.cs.selector = 1, 1, 0x10
    s.ss.present, s.ss.selector = 1, 0x18
    fpu = xsave_area(mxcsr=0x1F80)
    return Cpu(r, s, mem, get_fpu=lambda: E.FpuState(fpu), get_xcr0=lambda: 0x7)


def xsave_area(mxcsr: int = 0x1F80, fsw: int = 0) -> bytes:
    area = bytearray(ffi.sizeof("struct kvm_xsave"))
    struct.pack_into("<H", area, 2, fsw)
    struct.pack_into("<I", area, 24, mxcsr)
    return bytes(area)


@pytest.fixture
def tables(mem: GuestMemory) -> Tables:
    t = Tables(mem)
    t.map(KERNEL_VA, CODE_GPA, page_shift=21)
    for i in range(4):
        t.map(DATA_VA + i * 0x1000, 0x20_0000 + i * 0x1000)
    return t


def run(cpu: Cpu, code: str, cpus: int = 1) -> Trap | None:
    return run_handler(cpu, decode(bytes.fromhex(code), cpu.bitness, cpu.regs.rip), cpus)


def fault_of(cpu: Cpu, code: str, cpus: int = 1) -> GuestFault:
    rip, regs = cpu.regs.rip, bytes(ffi.buffer(cpu.regs))
    with pytest.raises(GuestFault) as info:
        run(cpu, code, cpus)
    assert cpu.regs.rip == rip and bytes(ffi.buffer(cpu.regs)) == regs  # a fault changes no register
    return info.value


# --- decoding ----------------------------------------------------------------------------
def test_decoder_names_the_instruction_kvm_pvm_stops_distribution_kernels_at() -> None:
    insn = decode(bytes.fromhex("f0480fc74f10"), 64, KERNEL_VA)
    assert (E.mnemonic(insn), insn.len, E.disassemble(insn)) == ("cmpxchg16b", 6, "lock cmpxchg16b [rdi+10h]")
    assert E.mnemonic(decode(b"\x9b", 64, 0)) == "fwait"


def test_bytes_that_end_inside_an_instruction_are_refused() -> None:
    with pytest.raises(EmulationError, match="too few"):
        decode(bytes.fromhex("f0480fc7"), 64, 0)


# --- cmpxchg16b (SDM vol. 2A, CMPXCHG8B/CMPXCHG16B) ---------------------------------------
def test_cmpxchg16b_equal_stores_rcx_rbx_and_sets_zf(mem: GuestMemory, tables: Tables) -> None:
    mem.write(0x20_0010, struct.pack("<QQ", 0x1111, 0x2222))
    cpu = long_mode(mem, tables, rdi=DATA_VA, rax=0x1111, rdx=0x2222, rbx=0xAAAA, rcx=0xBBBB, rflags=0x2 | RFLAGS_CF)
    assert run(cpu, "f0480fc74f10") is None
    assert struct.unpack("<QQ", mem.read(0x20_0010, 16)) == (0xAAAA, 0xBBBB)
    assert cpu.regs.rflags & RFLAGS_ZF and cpu.regs.rflags & RFLAGS_CF  # CF unaffected
    assert (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rip) == (0x1111, 0x2222, KERNEL_VA + 6)
    assert tables.entry(DATA_VA) & (PTE_A | PTE_D) == PTE_A | PTE_D  # the walk sets accessed and dirty


def test_cmpxchg16b_unequal_loads_rdx_rax_and_clears_zf(mem: GuestMemory, tables: Tables) -> None:
    mem.write(0x20_0010, struct.pack("<QQ", 0x1111, 0x2222))
    cpu = long_mode(mem, tables, rdi=DATA_VA, rax=0x1111, rdx=0x9999, rbx=0xAAAA, rcx=0xBBBB, rflags=0x2 | RFLAGS_ZF)
    run(cpu, "f0480fc74f10")
    assert struct.unpack("<QQ", mem.read(0x20_0010, 16)) == (0x1111, 0x2222)
    assert (cpu.regs.rax, cpu.regs.rdx) == (0x1111, 0x2222) and not cpu.regs.rflags & RFLAGS_ZF


def test_cmpxchg16b_with_gs_prefix_uses_the_gs_base(mem: GuestMemory, tables: Tables) -> None:
    # this_cpu_cmpxchg_double: `cmpxchg16b %gs:(%rsi)` (no lock: per-CPU data)
    mem.write(0x20_1020, struct.pack("<QQ", 5, 6))
    cpu = long_mode(mem, tables, rsi=0x20, rax=5, rdx=6, rbx=7, rcx=8)
    cpu.sregs.gs.base = DATA_VA + 0x1000
    run(cpu, "65480fc70e")
    assert struct.unpack("<QQ", mem.read(0x20_1020, 16)) == (7, 8)


def test_cmpxchg16b_misaligned_is_gp0(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rdi=DATA_VA + 8)
    fault = fault_of(cpu, "f0480fc74f10")
    assert (fault.vector, fault.error_code) == (E.GP, 0)


def test_cmpxchg16b_on_a_read_only_page_faults_even_when_unequal(mem: GuestMemory, tables: Tables) -> None:
    # The locked cycle always writes (SDM: "the destination operand is written back if the
    # comparison fails"), so a read-only page is #PF(P|W) either way, with CR2 the address.
    tables.map(DATA_VA, 0x20_0000, flags=PTE_P)
    cpu = long_mode(mem, tables, rdi=DATA_VA, rax=1)
    fault = fault_of(cpu, "f0480fc74f10")
    assert (fault.vector, fault.error_code, fault.cr2) == (E.PF, E.PF_P | E.PF_W, DATA_VA + 0x10)


def test_cmpxchg16b_on_a_not_present_page_is_pf_without_p(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rdi=DATA_VA + 0x10_0000)
    fault = fault_of(cpu, "f0480fc74f10")
    assert (fault.vector, fault.error_code) == (E.PF, E.PF_W)


def test_cmpxchg16b_at_a_non_canonical_address_is_gp0(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rdi=0x0000_8000_0000_0000)
    assert fault_of(cpu, "f0480fc74f10").vector == E.GP


def test_cmpxchg16b_is_not_emulated_with_several_vcpus(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rdi=DATA_VA)
    with pytest.raises(EmulationError, match="only with one vCPU") as info:
        run(cpu, "f0480fc74f10", cpus=2)
    assert "clearcpuid=cx16" in info.value.advice and "--cpus 1" in info.value.advice


def test_an_operand_outside_guest_ram_is_not_emulated(mem: GuestMemory, tables: Tables) -> None:
    tables.map(DATA_VA, 0xFEE0_0000)  # the local APIC's page: MMIO, not RAM
    cpu = long_mode(mem, tables, rdi=DATA_VA)
    with pytest.raises(EmulationError, match="not guest RAM"):
        run(cpu, "f0480fc74f10")


# --- ldmxcsr / stmxcsr (SDM vol. 2A/2B) ------------------------------------------------------
def test_mxcsr_written_back_through_the_xsave_area_with_sse_marked_present() -> None:
    # KVM copies MXCSR from the area only when XSTATE_BV has SSE (or AVX) set.
    fpu = E.FpuState(xsave_area(mxcsr=0x1F80))
    fpu.mxcsr = 0x9FC0
    assert struct.unpack_from("<I", fpu.area, 24)[0] == 0x9FC0 and struct.unpack_from("<Q", fpu.area, 512)[0] == 2
    with pytest.raises(EmulationError):
        E.FpuState(b"\0" * 100)


def test_emulator_writes_mxcsr_back_with_kvm_set_xsave(mem: GuestMemory, tables: Tables) -> None:
    mem.write_u32(0x20_0100, 0x9FC0)
    vcpu = FakeVcpu(long_mode(mem, tables, rsp=DATA_VA + 0x104))
    assert Emulator(mem, enabled=True).recover(vcpu, exit_for("0fae5424fc"))
    assert vcpu.calls == ["set_regs", "set_state xsave"] and vcpu.fpu.mxcsr == 0x9FC0


def test_ldmxcsr_loads_and_stmxcsr_stores_mxcsr(mem: GuestMemory, tables: Tables) -> None:
    mem.write_u32(0x20_0100, 0x9FC0)
    cpu = long_mode(mem, tables, rsp=DATA_VA + 0x104)
    run(cpu, "0fae5424fc")  # ldmxcsr -4(%rsp)
    assert cpu.fpu.mxcsr == 0x9FC0 and cpu.regs.rip == KERNEL_VA + 5
    cpu.fpu.mxcsr = 0x1F80
    cpu.regs.rip = KERNEL_VA
    run(cpu, "0fae5c24fc")  # stmxcsr -4(%rsp)
    assert mem.read_u32(0x20_0100) == 0x1F80


@pytest.mark.parametrize("cr0, cr4, vector", [
    (LONG_CR0, LONG_CR4 & ~CR4_OSFXSR, E.UD),
    (LONG_CR0 | CR0_EM, LONG_CR4, E.UD),
    (LONG_CR0 | CR0_TS, LONG_CR4, E.NM),
])
def test_ldmxcsr_exceptions(mem: GuestMemory, tables: Tables, cr0: int, cr4: int, vector: int) -> None:
    cpu = long_mode(mem, tables, rsp=DATA_VA + 0x104)
    cpu.sregs.cr0, cpu.sregs.cr4 = cr0, cr4
    assert fault_of(cpu, "0fae5424fc").vector == vector


def test_ldmxcsr_with_a_reserved_bit_is_gp0_and_mxcsr_unchanged(mem: GuestMemory, tables: Tables) -> None:
    mem.write_u32(0x20_0100, 0x1_1F80)
    cpu = long_mode(mem, tables, rsp=DATA_VA + 0x104)
    assert (fault_of(cpu, "0fae5424fc").vector, cpu.fpu.mxcsr) == (E.GP, 0x1F80)


def test_stmxcsr_across_a_page_boundary_into_an_unmapped_page_writes_nothing(mem: GuestMemory, tables: Tables) -> None:
    tables.map(DATA_VA + 0x4000, 0x20_4000)
    mem.write(0x20_4FFE, b"\xee\xee")
    cpu = long_mode(mem, tables, rsp=DATA_VA + 0x4FFE + 4)  # -4(%rsp) = the page's last 2 bytes + 2 beyond
    fault = fault_of(cpu, "0fae5c24fc")
    assert (fault.vector, fault.cr2) == (E.PF, DATA_VA + 0x5000) and mem.read(0x20_4FFE, 2) == b"\xee\xee"


def test_user_mode_misaligned_access_with_ac_is_ac0(mem: GuestMemory, tables: Tables) -> None:
    tables.map(0x40_0000, 0x30_0000, flags=PTE_P | PTE_W | PTE_U, upper=PTE_P | PTE_W | PTE_U)
    cpu = long_mode(mem, tables, rsp=0x40_0005, rflags=0x2 | RFLAGS_AC)
    cpu.sregs.ss.dpl = 3
    cpu.sregs.cr0 |= CR0_AM
    assert fault_of(cpu, "0fae5c24fc").vector == E.AC


# --- xgetbv, clac/stac, popcnt, fwait, int3 ------------------------------------------------
def test_xgetbv_reads_xcr0_into_edx_eax_zeroing_the_upper_halves(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rax=0xFFFF_FFFF_FFFF_FFFF, rdx=0xFFFF_FFFF_FFFF_FFFF, rcx=0)
    cpu.sregs.cr4 |= CR4_OSXSAVE
    run(cpu, "0f01d0")
    assert (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rip) == (7, 0, KERNEL_VA + 3)


def test_xgetbv_exceptions(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rcx=0)
    assert fault_of(cpu, "0f01d0").vector == E.UD  # CR4.OSXSAVE clear
    cpu.sregs.cr4 |= CR4_OSXSAVE
    cpu.regs.rcx = 2
    assert (fault_of(cpu, "0f01d0").vector, fault_of(cpu, "0f01d0").error_code) == (E.GP, 0)


def test_xcr0_is_read_from_kvm_xcrs() -> None:
    xcrs = ffi.new("struct kvm_xcrs *")
    xcrs.nr_xcrs = 1
    xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, 0x2E7
    assert E.xcr0_from(bytes(ffi.buffer(xcrs))) == 0x2E7
    assert E.xcr0_from(bytes(ffi.buffer(ffi.new("struct kvm_xcrs *")))) == 1


def test_stac_sets_and_clac_clears_ac_at_cpl0_only(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables)
    run(cpu, "0f01cb")
    assert cpu.regs.rflags & RFLAGS_AC and cpu.regs.rip == KERNEL_VA + 3
    cpu.regs.rip = KERNEL_VA
    run(cpu, "0f01ca")
    assert not cpu.regs.rflags & RFLAGS_AC
    cpu.sregs.ss.dpl = 3
    assert fault_of(cpu, "0f01ca").vector == E.UD


@pytest.mark.parametrize("code, src, result, zf", [
    ("f3480fb8c1", 0xF0F0_0000_0000_0001, 9, 0),        # popcnt %rcx,%rax
    ("f3480fb8c1", 0, 0, RFLAGS_ZF),
    ("f30fb8c1", 0xFFFF_FFFF_0000_0003, 2, 0),          # popcnt %ecx,%eax: 32-bit source, zero-extended result
    ("66f30fb8c1", 0x0000_0000_0001_FFFF, 16, 0),       # popcnt %cx,%ax: the upper bits of rax kept
])
def test_popcnt_counts_bits_and_sets_only_zf(mem: GuestMemory, tables: Tables, code: str, src: int, result: int,
                                             zf: int) -> None:
    cpu = long_mode(mem, tables, rcx=src, rax=0x1234_5678_9ABC_0000, rflags=0x2 | 0x8D5)  # OF SF AF PF CF set
    run(cpu, code)
    expect = result if not code.startswith("66") else (0x1234_5678_9ABC_0000 & ~0xFFFF) | result
    assert cpu.regs.rax == expect and cpu.regs.rflags == 0x2 | zf


def test_popcnt_from_memory(mem: GuestMemory, tables: Tables) -> None:
    mem.write_u64(0x20_0040, 0xFF)
    cpu = long_mode(mem, tables, rdi=DATA_VA + 0x40)
    run(cpu, "f3480fb807")  # popcnt (%rdi),%rax
    assert cpu.regs.rax == 8


# --- LSL and LAR (SDM vol. 2A): a GDT at DATA_VA (GPA 0x20_0000) -----------------------
def descriptor(base: int = 0, limit: int = 0, kind: int = 0x3, s: int = 1, dpl: int = 0, g: int = 0, db: int = 0,
               long: int = 0) -> int:
    high = ((base >> 16) & 0xFF) | (kind << 8) | (s << 12) | (dpl << 13) | (1 << 15) | (limit & 0xF_0000) \
        | (long << 21) | (db << 22) | (g << 23) | (base & 0xFF00_0000)
    return ((base & 0xFFFF) << 16) | (limit & 0xFFFF) | (high << 32)


GDT_ENTRIES = {
    0x10: descriptor(limit=0xFFFFF, kind=0xB, g=1, long=1),  # kernel code
    0x18: descriptor(limit=0xFFFFF, kind=0x3, g=1, db=1),  # kernel data
    0x20: descriptor(limit=0x1005, kind=0x5, dpl=3),  # Linux's CPUNODE entry: CPU 5, node 1, DPL 3
    0x28: descriptor(limit=0x67, kind=0x9, s=0), 0x30: 0,  # a 64-bit TSS, 16 bytes, upper half type 0
    0x38: descriptor(limit=0x67, kind=0x9, s=0), 0x40: 0x0000_0F00_0000_0000,  # upper half with a type
    0x48: descriptor(limit=0x67, kind=0x1, s=0),  # a 16-bit TSS: no such thing in IA-32e mode
    0x50: descriptor(kind=0xC, s=0), 0x58: 0,  # a 64-bit call gate: LAR only
    0x60: descriptor(limit=0xFFF, kind=0xE),  # conforming code, DPL 0
    0x68: descriptor(limit=0xABCDE, kind=0x3, dpl=0),  # data, DPL 0
}


@pytest.fixture
def gdt_cpu(mem: GuestMemory, tables: Tables) -> Cpu:
    for selector, value in GDT_ENTRIES.items():
        mem.write_u64(0x20_0000 + selector, value)
    cpu = long_mode(mem, tables, rax=0xDEAD_BEEF_DEAD_BEEF, rflags=0x2 | RFLAGS_CF)
    cpu.sregs.gdt.base, cpu.sregs.gdt.limit = DATA_VA, 0x6F
    cpu.sregs.ldt.unusable = 1
    return cpu


@pytest.mark.parametrize("selector, code, rax", [
    (0x23, "0f03c1", 0x1005),  # lsl %ecx,%eax: Linux's CPU-number read, zero-extended
    (0x10, "480f03c1", 0xFFFF_FFFF),  # G: 4-KiB units
    (0x28, "0f03c1", 0x67),  # a 64-bit TSS (system descriptor, 16 bytes)
    (0x60 | 3, "0f03c1", 0xFFF),  # conforming code: RPL 3 above DPL 0 is no obstacle
    (0x68, "660f03c1", 0xDEAD_BEEF_DEAD_BCDE),  # 16-bit destination: the upper bits stay
    (0x20, "0f02c1", 0xF500),  # lar: P, DPL 3, S, type 5 (no G/D bits here)
    (0x50, "0f02c1", 0x0000_8C00),  # lar takes a call gate
    (0x18, "660f02c1", 0xDEAD_BEEF_DEAD_9300),  # lar %cx,%ax: rights & 0xFF00
    (0x18, "480f02c1", 0x00C0_9300),  # lar %rcx,%rax: G and D/B, P, S, type 3
])
def test_lsl_and_lar_load_a_valid_selectors_limit_or_rights_and_set_zf(gdt_cpu: Cpu, selector: int, code: str,
                                                                     rax: int) -> None:
    gdt_cpu.regs.rcx = 0xFFFF_0000 | selector  # only the low 16 bits are the selector
    run(gdt_cpu, code)
    assert gdt_cpu.regs.rax == rax
    assert gdt_cpu.regs.rflags == 0x2 | RFLAGS_CF | RFLAGS_ZF  # ZF set, no other flag touched


@pytest.mark.parametrize("selector, code, why", [
    (0x0, "0f03c1", "the null selector"),
    (0x3, "0f03c1", "the null selector with an RPL"),
    (0x70, "0f03c1", "past the GDT limit"),
    (0x68 | 3, "0f03c1", "RPL 3 above a data segment's DPL 0"),
    (0x38, "0f03c1", "a 16-byte system descriptor whose upper half has a type"),
    (0x48, "0f03c1", "a 16-bit TSS in IA-32e mode"),
    (0x50, "0f03c1", "a call gate is no segment for LSL"),
    (0x4, "0f03c1", "an LDT selector without an LDT"),
    (0x68 | 3, "0f02c1", "LAR: RPL above DPL"),
])
def test_lsl_and_lar_clear_zf_and_leave_the_destination_for_a_selector_they_do_not_take(
        gdt_cpu: Cpu, selector: int, code: str, why: str) -> None:
    gdt_cpu.regs.rcx = selector
    gdt_cpu.regs.rflags |= RFLAGS_ZF
    run(gdt_cpu, code)
    assert gdt_cpu.regs.rax == 0xDEAD_BEEF_DEAD_BEEF, why
    assert gdt_cpu.regs.rflags == 0x2 | RFLAGS_CF, why


def test_lsl_at_cpl_3_refuses_a_dpl_0_segment_and_takes_a_dpl_3_one(gdt_cpu: Cpu) -> None:
    gdt_cpu.sregs.ss.dpl = 3
    gdt_cpu.regs.rcx = 0x6B
    run(gdt_cpu, "0f03c1")
    assert not gdt_cpu.regs.rflags & RFLAGS_ZF and gdt_cpu.regs.rax == 0xDEAD_BEEF_DEAD_BEEF
    gdt_cpu.regs.rip, gdt_cpu.regs.rcx = KERNEL_VA, 0x23
    run(gdt_cpu, "0f03c1")
    assert gdt_cpu.regs.rflags & RFLAGS_ZF and gdt_cpu.regs.rax == 0x1005


def test_lsl_reads_its_selector_from_memory_and_the_ldt_when_ti_is_set(gdt_cpu: Cpu, mem: GuestMemory) -> None:
    mem.write(0x20_0100, (0x24).to_bytes(2, "little"))  # TI set: the LDT's entry 4
    mem.write_u64(0x20_0800 + 0x20, descriptor(limit=0x4321))
    gdt_cpu.sregs.ldt.unusable, gdt_cpu.sregs.ldt.present = 0, 1
    gdt_cpu.sregs.ldt.base, gdt_cpu.sregs.ldt.limit = DATA_VA + 0x800, 0x27
    gdt_cpu.regs.rdi = DATA_VA + 0x100
    run(gdt_cpu, "0f0307")  # lsl (%rdi),%eax
    assert gdt_cpu.regs.rax == 0x4321 and gdt_cpu.regs.rflags & RFLAGS_ZF


def test_lsl_is_ud_in_virtual_8086_and_real_mode(gdt_cpu: Cpu) -> None:
    gdt_cpu.regs.rcx = 0x23
    gdt_cpu.regs.rflags |= 1 << 17  # virtual-8086 mode
    assert fault_of(gdt_cpu, "0f03c1").vector == E.UD
    gdt_cpu.regs.rflags &= ~(1 << 17)
    gdt_cpu.sregs.cr0, gdt_cpu.sregs.efer, gdt_cpu.regs.rip = 0, 0, 0x7000
    assert fault_of(gdt_cpu, "0f03c1").vector == E.UD


def test_lsl_faults_as_the_cpu_where_the_gdt_is_not_mapped(gdt_cpu: Cpu) -> None:
    gdt_cpu.sregs.gdt.base = DATA_VA + 0x10_0000  # not mapped
    gdt_cpu.regs.rcx = 0x23
    fault = fault_of(gdt_cpu, "0f03c1")
    assert (fault.vector, fault.error_code, fault.cr2) == (E.PF, 0, DATA_VA + 0x10_0020)


def test_lsl_with_a_gdt_mapped_outside_guest_ram_is_reported_not_raised(gdt_cpu: Cpu, tables: Tables) -> None:
    # A hostile guest's GDTR may name any page: one mapped past guest RAM ends in
    # EmulationError (the vCPU stops with an explanation), never an unchecked access.
    tables.map(DATA_VA + 0x40_0000, 0x7FFF_F000)  # far past the 16 MiB of guest RAM
    gdt_cpu.sregs.gdt.base = DATA_VA + 0x40_0000
    gdt_cpu.regs.rcx = 0x23
    with pytest.raises(EmulationError, match="not guest RAM"):
        run(gdt_cpu, "0f03c1")


def test_fwait_is_nothing_with_no_pending_exception_and_mf_or_nm_otherwise(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables)
    run(cpu, "9b")
    assert cpu.regs.rip == KERNEL_VA + 1
    cpu.regs.rip = KERNEL_VA
    cpu._fpu = E.FpuState(xsave_area(fsw=E.FSW_ES | 1))  # an unmasked invalid-operation exception pending
    assert fault_of(cpu, "9b").vector == E.MF
    cpu.sregs.cr0 |= CR0_TS  # with CR0.MP: #NM comes first
    assert fault_of(cpu, "9b").vector == E.NM


def test_int3_is_a_trap_after_the_instruction(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables)
    assert run(cpu, "cc") == Trap(E.BP) and cpu.regs.rip == KERNEL_VA + 1


def test_kernel_simd_code_is_refused_with_the_ssse3_parameter_as_advice(mem: GuestMemory, tables: Tables) -> None:
    # Measured: Debian's 6.1 kernel stopped at `movd %ecx,%xmm15` (66 44 0f 6e f9) in the
    # RNG's blake2s_compress_ssse3 after ldmxcsr; kvmm keeps Linux away with clearcpuid=ssse3.
    cpu = long_mode(mem, tables)
    with pytest.raises(EmulationError, match="does not emulate movd .kernel SIMD code") as info:
        run(cpu, "66440f6ef9")
    assert "clearcpuid=ssse3" in info.value.advice


def test_an_instruction_with_no_handler_is_refused_with_advice(mem: GuestMemory, tables: Tables) -> None:
    cpu = long_mode(mem, tables, rsp=DATA_VA)
    with pytest.raises(EmulationError, match="does not emulate xrstor64") as info:
        run(cpu, "480fae2c24")  # xrstor64 (%rsp)
    assert "noxsave" in info.value.advice
    with pytest.raises(EmulationError, match="does not emulate rdrand") as info:
        run(cpu, "480fc7f0")
    assert "RDRAND" in info.value.advice and "clearcpuid=" in info.value.advice


# --- translation (SDM vol. 3A, chapter 4) ---------------------------------------------------
def paging(mode: str, root: int, cpl: int = 0, rflags: int = 2, cr0: int = LONG_CR0) -> Paging:
    cr4, efer = {"4": (CR4_PAE, EFER_LMA), "5": (CR4_PAE | CR4_LA57, EFER_LMA), "pae": (CR4_PAE, 0),
                 "32": (CR4_PSE, 0)}[mode]
    return Paging(cr0, root, cr4 | CR4_SMAP, efer | EFER_NXE, cpl, rflags)


def test_translate_large_pages_and_five_levels(mem: GuestMemory) -> None:
    t = Tables(mem)
    t.map(0x4000_0000, 0x4000_0000 & 0, page_shift=30)  # 1 GiB page at GPA 0
    assert translate(mem, paging("4", t.root), 0x4012_3456) == 0x12_3456
    t5 = Tables(mem, levels=5)
    va = 0x00FF_0000_0000_1000
    t5.map(va, 0x30_0000)
    assert translate(mem, paging("5", t5.root), va + 0x10) == 0x30_0010


def test_translate_pae_and_32_bit_paging(mem: GuestMemory) -> None:
    pdpt, pd, pt = 0x10_0000, 0x10_1000, 0x10_2000
    for a in (pdpt, pd, pt):
        mem.fill(a, 0x1000)
    mem.write_u64(pdpt + 3 * 8, pd | PTE_P)
    mem.write_u64(pd + 1 * 8, pt | PTE_P | PTE_W)
    mem.write_u64(pt + 2 * 8, 0x35_0000 | PTE_P | PTE_W)
    assert translate(mem, paging("pae", pdpt), 0xC020_2123) == 0x35_0123
    pgd = 0x10_3000
    mem.fill(pgd, 0x1000)
    mem.write_u32(pgd + 0x300 * 4, 0x0080_0000 | PTE_P | PTE_W | PTE_PS)  # a 4-MiB page
    assert translate(mem, paging("32", pgd), 0xC012_3456) == 0x0092_3456


def test_translate_access_rights(mem: GuestMemory) -> None:
    t = Tables(mem)
    user = PTE_P | PTE_W | PTE_U
    t.map(0x40_0000, 0x30_0000, flags=user, upper=user)
    t.map(0x50_0000, 0x31_0000, flags=PTE_P)  # supervisor, read-only
    # SMAP: a supervisor data access to a user page faults unless RFLAGS.AC.
    with pytest.raises(GuestFault) as info:
        translate(mem, paging("4", t.root), 0x40_0000)
    assert info.value.error_code == E.PF_P
    assert translate(mem, paging("4", t.root, rflags=2 | RFLAGS_AC), 0x40_0000) == 0x30_0000
    # A user access to a supervisor page; a supervisor write to a read-only page with WP.
    with pytest.raises(GuestFault) as info:
        translate(mem, paging("4", t.root, cpl=3), 0x50_0000)
    assert info.value.error_code == E.PF_P | E.PF_U
    with pytest.raises(GuestFault):
        translate(mem, paging("4", t.root), 0x50_0000, write=True)
    assert translate(mem, paging("4", t.root, cr0=LONG_CR0 & ~CR0_WP), 0x50_0000, write=True) == 0x31_0000


def test_a_page_table_outside_guest_ram_is_not_emulated(mem: GuestMemory) -> None:
    with pytest.raises(EmulationError, match="outside guest RAM"):
        translate(mem, paging("4", 0x7FFF_F000), 0x1000)


def test_translate_without_paging_is_the_address() -> None:
    assert translate(None, Paging(CR0_PE, 0, 0, 0, 0, 2), 0x1234) == 0x1234  # type: ignore[arg-type]


# --- the table and the command line ----------------------------------------------------------
def test_kvm_pvm_parameters_hide_cx16_only_with_several_vcpus() -> None:
    assert avoid_cmdline(1) == ("noxsave", "clearcpuid=smap,popcnt,ssse3")
    assert avoid_cmdline(2) == ("noxsave", "clearcpuid=cx16,smap,popcnt,ssse3")
    assert host_cmdline(PVM, 1) == ("noxsave", "clearcpuid=smap,popcnt,ssse3", "lpj=1000000", "tsc=reliable",
                                    "nowatchdog", "rcupdate.rcu_cpu_stall_suppress=1",
                                    "cryptomgr.notests=1")
    assert host_cmdline(HARDWARE, 4) == ()


def test_a_users_clearcpuid_is_merged_with_kvmms() -> None:
    line = build_cmdline("clearcpuid=avx,smap root=/dev/vda", ("console=ttyS0",), host_cmdline(PVM, 2)).split()
    assert [w for w in line if w.startswith("clearcpuid")] == ["clearcpuid=cx16,smap,popcnt,ssse3,avx"]
    assert "root=/dev/vda" in line and "noxsave" in line


def test_the_start_up_line_says_what_is_hidden_and_what_is_emulated() -> None:
    one, two = E.plan_summary(1), E.plan_summary(2)
    assert one.startswith("kernel parameters 'noxsave clearcpuid=smap,popcnt,ssse3' keep Linux from clac, stac, "
                          "popcnt, xsave/xrstor family, SSSE3 code (movd, movq); kvmm emulates int3, fwait, "
                          "cmpxchg16b, ldmxcsr")
    assert "clearcpuid=cx16,smap,popcnt,ssse3' keep Linux from cmpxchg16b, clac" in two
    assert "cmpxchg16b" not in two.split("emulates")[1]


def test_an_explained_emulation_failure_is_the_runs_message() -> None:
    from kvmm.config import Outcome
    from kvmm.vcpu import exit_outcome

    result = exit_outcome(exit_for("0f0b"), 1, rip=0x10, detail="KVM could not emulate `ud2` at RIP 0x10 (...)")
    assert result is not None and result.outcome is Outcome.VCPU_ERROR
    assert result.message == "vCPU 1: KVM could not emulate `ud2` at RIP 0x10 (...)"


def test_every_emulated_mnemonic_has_a_test_guest() -> None:
    guests = Path(__file__).parent / "guests"
    covered = {"int3": "int3", "fwait": "fwait", "cmpxchg16b": "emu_cmpxchg16b", "ldmxcsr": "emu_mxcsr",
               "stmxcsr": "emu_mxcsr", "xgetbv": "emu_xgetbv", "clac": "emu_smap", "stac": "emu_smap",
               "popcnt": "emu_popcnt", "lsl": "emu_lsl", "lar": "emu_lsl"}
    emulated = {m for m, h in E.HANDLERS.items() if h.emulate is not None}
    assert emulated == set(covered)
    for guest in covered.values():
        assert (guests / f"{guest}.c").is_file()


# --- the Emulator against a scripted vCPU (KVM's structures, no /dev/kvm) ---------------------
class FakeVcpu:
    def __init__(self, cpu: Cpu) -> None:
        self.id = 0
        self.regs, self.sregs, self.fpu = cpu.regs, cpu.sregs, cpu.fpu
        self.events = ffi.new("struct kvm_vcpu_events *")
        self.calls: list[str] = []

    def get_regs(self) -> Any:
        return self.regs

    def set_regs(self, regs: Any) -> None:
        self.calls.append("set_regs")

    def get_sregs(self) -> Any:
        return self.sregs

    def set_sregs(self, sregs: Any) -> None:
        self.calls.append("set_sregs")

    def get_state(self, kind: str) -> bytes:
        if kind == "xsave":
            return bytes(self.fpu.area)
        return bytes(ffi.buffer(ffi.new("struct kvm_xcrs *")))

    def set_state(self, kind: str, data: bytes) -> None:
        self.calls.append(f"set_state {kind}")
        if kind == "xsave":
            self.fpu = E.FpuState(data)

    def get_vcpu_events(self) -> Any:
        return self.events

    def set_vcpu_events(self, events: Any) -> None:
        self.calls.append("set_vcpu_events")


def exit_for(code: str) -> X.InternalErrorExit:
    return X.InternalErrorExit(EMULATION, (), bytes.fromhex(code))


def test_emulator_emulates_counts_and_writes_back(mem: GuestMemory, tables: Tables) -> None:
    mem.write(0x20_0010, struct.pack("<QQ", 1, 2))
    vcpu = FakeVcpu(long_mode(mem, tables, rdi=DATA_VA, rax=1, rdx=2))
    emu = Emulator(mem, enabled=True)
    assert emu.recover(vcpu, exit_for("f0480fc74f10")) and emu.recover(vcpu, exit_for("cc"))
    assert vcpu.calls == ["set_regs", "set_regs", "set_vcpu_events"]
    assert (vcpu.events.exception.injected, vcpu.events.exception.nr, vcpu.events.exception.has_error_code) == (1, 3, 0)
    assert emu.counters() == {"emulated_cmpxchg16b": 1, "emulated_int3": 1}


def test_emulator_injects_a_page_fault_with_cr2_and_error_code(mem: GuestMemory, tables: Tables) -> None:
    vcpu = FakeVcpu(long_mode(mem, tables, rdi=DATA_VA + 0x10_0000))
    emu = Emulator(mem, enabled=True)
    assert emu.recover(vcpu, exit_for("f0480fc74f10"))
    assert vcpu.calls == ["set_sregs", "set_vcpu_events"] and vcpu.sregs.cr2 == DATA_VA + 0x10_0010
    ev = vcpu.events.exception
    assert (ev.injected, ev.nr, ev.has_error_code, ev.error_code) == (1, E.PF, 1, E.PF_W)
    assert emu.counters() == {"fault_cmpxchg16b_PF": 1}


def test_emulator_reads_the_instruction_from_guest_memory_when_kvm_gives_no_bytes(mem: GuestMemory,
                                                                                tables: Tables) -> None:
    mem.write(CODE_GPA, bytes.fromhex("0f01cb"))
    vcpu = FakeVcpu(long_mode(mem, tables))
    assert Emulator(mem, enabled=True).recover(vcpu, exit_for(""))
    assert vcpu.regs.rflags & RFLAGS_AC


def test_unhandled_instruction_is_explained_with_symbol_and_advice(mem: GuestMemory, tables: Tables,
                                                                   tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-test"
    kernel.write_bytes(b"not read")
    (tmp_path / "System.map-6.1.0-test").write_text(
        f"{KERNEL_VA - 0x100:016x} T startup_64\n{KERNEL_VA - 0x10:016x} T restore_fpregs_from_fpstate\n"
        f"{KERNEL_VA + 0x40:016x} t later\n")
    vcpu = FakeVcpu(long_mode(mem, tables, rsp=DATA_VA))
    emu = Emulator(mem, enabled=True, kernel=str(kernel))
    ex = exit_for("480fae2c24")
    assert not emu.recover(vcpu, ex)
    msg = emu.explain(vcpu, ex)
    assert msg.startswith(f"KVM could not emulate `xrstor64 [rsp]` at RIP {KERNEL_VA:#x} "
                          "(restore_fpregs_from_fpstate+0x10, from System.map-6.1.0-test) "
                          "(instruction bytes: 48 0f ae 2c 24): kvmm does not emulate xrstor64")
    assert "noxsave" in msg


def test_debians_placeholder_system_map_gives_no_symbol(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz-6.1.0-57-amd64"
    kernel.write_bytes(b"x")
    (tmp_path / "System.map-6.1.0-57-amd64").write_text(
        "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    syms = Symbols.beside(str(kernel), debug_dir=str(tmp_path / "no-dbg-package"))
    assert syms.lookup(KERNEL_VA) is None
    assert syms.describe(KERNEL_VA) == (" (kernel symbol unknown: System.map-6.1.0-57-amd64 is a placeholder "
                                        "(Debian ships the real one in the kernel's -dbg package, in "
                                        f"{tmp_path / 'no-dbg-package'}; or put it beside the kernel))")


def test_the_dbg_packages_system_map_replaces_debians_placeholder(tmp_path: Path) -> None:
    boot, debug = tmp_path / "boot", tmp_path / "usr-lib-debug-boot"
    boot.mkdir()
    debug.mkdir()
    kernel = boot / "vmlinuz-6.1.0-57-amd64"
    kernel.write_bytes(b"x")
    (boot / "System.map-6.1.0-57-amd64").write_text(
        "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    (debug / "System.map-6.1.0-57-amd64").write_text(f"{KERNEL_VA - 0x20:016x} T multi_cpu_stop\n")
    syms = Symbols.beside(str(kernel), debug_dir=str(debug))
    assert syms.describe(KERNEL_VA) == " (multi_cpu_stop+0x20, from System.map-6.1.0-57-amd64)"
    assert syms.source == str(debug / "System.map-6.1.0-57-amd64")


def test_symbols_from_a_vmlinux_elf(tmp_path: Path) -> None:
    from guests.build import build_guest

    elf = build_guest("int3", tmp_path)
    syms = Symbols.beside(str(elf))
    found = syms.lookup(0x20_0000)
    assert found is not None and found[0] == "_start"


def test_cmpxchg16b_with_two_vcpus_is_refused_with_the_reason_in_the_report(mem: GuestMemory, tables: Tables) -> None:
    vcpu = FakeVcpu(long_mode(mem, tables, rdi=DATA_VA))
    emu = Emulator(mem, enabled=True, cpus=2)
    ex = exit_for("f0480fc74f10")
    assert not emu.recover(vcpu, ex) and vcpu.calls == []
    msg = emu.explain(vcpu, ex)
    assert "`lock cmpxchg16b [rdi+10h]`" in msg and "only with one vCPU" in msg and "--cpus 1" in msg


def test_hardware_kvm_emulates_nothing_but_explains(mem: GuestMemory, tables: Tables) -> None:
    vcpu = FakeVcpu(long_mode(mem, tables))
    emu = Emulator(mem, enabled=False)
    assert not emu.recover(vcpu, exit_for("cc")) and vcpu.calls == []
    assert "`int3`" in emu.explain(vcpu, exit_for("cc")) and "only on kvm_pvm" in emu.explain(vcpu, exit_for("cc"))


def test_garbage_bytes_and_unmapped_rip_are_explained_not_raised(mem: GuestMemory, tables: Tables) -> None:
    vcpu = FakeVcpu(long_mode(mem, tables))
    vcpu.regs.rip = 0xFFFF_FFFF_C000_0000  # not mapped
    emu = Emulator(mem, enabled=True)
    assert not emu.recover(vcpu, exit_for(""))
    assert "cannot be read" in emu.explain(vcpu, exit_for("")) and "unavailable" in emu.explain(vcpu, exit_for(""))
    assert not emu.recover(vcpu, exit_for("0f0b"))  # ud2: KVM's business, not a handler's
    assert "`ud2`" in emu.explain(vcpu, exit_for("0f0b"))


def test_32_bit_protected_mode_operand_uses_segment_base_and_limit(mem: GuestMemory) -> None:
    r = ffi.new("struct kvm_regs *")
    s = ffi.new("struct kvm_sregs *")
    s.cr0 = CR0_PE
    s.cs.db = s.cs.present = s.ds.present = 1
    s.ds.base, s.ds.limit, s.ds.type = 0x1000, 0xFFF, 3
    r.rax, r.rdx, r.rip = 0, 0, 0x100
    cpu = Cpu(r, s, mem, get_fpu=lambda: E.FpuState(xsave_area()))
    cpu.sregs.cr4 = CR4_OSFXSR
    mem.write_u32(0x1010, 0x1F81)
    run(cpu, "0f551510000000".replace("0f5515", "0fae15"))  # ldmxcsr 0x10 (ds:disp32)
    assert cpu.fpu.mxcsr == 0x1F81
    cpu.regs.rip = 0x100
    with pytest.raises(GuestFault):
        run(cpu, "0fae15fe0f0000")  # ldmxcsr 0xffe: past the limit


# --- a hostile guest: any bytes, any registers --------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HANDLED_PREFIXES = ["f0480fc7", "480fc7", "65480fc7", "0fae", "0f01", "f3480fb8", "f30fb8", "9b", "cc", ""]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(HANDLED_PREFIXES), tail=st.binary(max_size=12),
       gprs=st.lists(st.integers(0, 2**64 - 1), min_size=16, max_size=16),
       rflags=st.integers(0, 2**22 - 1), cpl=st.sampled_from([0, 3]), cr4_extra=st.sampled_from([0, CR4_OSXSAVE]))
def test_any_instruction_and_register_state_is_emulated_faulted_or_explained(
        mem: GuestMemory, tables: Tables, prefix: str, tail: bytes, gprs: list[int], rflags: int, cpl: int,
        cr4_extra: int) -> None:
    # Whatever a guest puts at RIP and in its registers, the emulator either deals with
    # it (emulated, or a fault injected) or declines, and the explanation is a string:
    # never an exception out of the vCPU loop.
    cpu = long_mode(mem, tables, rflags=rflags | 2)
    for name, value in zip(E.GPRS, gprs):
        setattr(cpu.regs, name, value)
    cpu.sregs.ss.dpl = cpl
    cpu.sregs.cr4 |= cr4_extra
    vcpu = FakeVcpu(cpu)
    emu = Emulator(mem, enabled=True)
    ex = X.InternalErrorExit(EMULATION, (), bytes.fromhex(prefix) + tail)
    if not emu.recover(vcpu, ex):
        assert isinstance(emu.explain(vcpu, ex), str)
