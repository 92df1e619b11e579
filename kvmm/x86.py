"""x86-64 vCPU and platform set-up for a 64-bit Linux entry.

What the 64-bit boot protocol requires (Documentation/x86/boot.rst, "64-bit Boot
Protocol"): long mode with paging, an identity map covering the kernel, boot_params and
command line; a GDT with flat __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18,
read/write); CS = __BOOT_CS, DS/ES/SS = __BOOT_DS; interrupts off; ``rsi`` = boot_params.
The rest (MSRs, FPU, LAPIC LINT0/LINT1, CPUID topology, MP table) is what Firecracker,
cloud-hypervisor and kvmtool set so Linux finds a sane machine without a BIOS.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, NamedTuple, Sequence

from .layout import BOOT_STACK, COM1, EBDA_START, FLAT_SEGMENT, GDT_ADDR, IDENTITY_MAP_ADDR, IOAPIC_ADDR, LAPIC_ADDR, PML4_ADDR, TSS_ADDR
from .errors import KvmUnavailableError
from .kvm import ioctls as K
from .kvm.structs import ffi
from .kvm.system import Kvm, Vcpu, Vm
from .memory import GuestMemory

LOG = logging.getLogger(__name__)

# --- the VM ------------------------------------------------------------------------------
REQUIRED_CAPS = ((K.KVM_CAP_IRQCHIP, "in-kernel irqchip"), (K.KVM_CAP_PIT2, "in-kernel PIT"),
                 (K.KVM_CAP_USER_MEMORY, "user memory"), (K.KVM_CAP_IMMEDIATE_EXIT, "immediate_exit"))


def create_vm(kvm: Kvm, mem: GuestMemory, coalesce_uart: bool = False) -> Vm:
    """A VM with ``mem`` as its RAM, the in-kernel irqchip and PIT; no vCPUs, no devices.
    ``coalesce_uart``: also let writes to the 8250's transmit register queue in KVM's
    coalesced ring (kvmm/coalesced.py; the UART stops that while its THR-empty interrupt
    is on) where KVM can.

    RAM before the irqchip (as Firecracker orders it): once an irqchip exists, every
    memslot change waits for an SRCU grace period, 7 ms here (measured). The kvmm command
    calls this before importing the device code (kvmm/cli.py): each of these changes
    leaves KVM ~15 ms of work after the ioctl returns (an SRCU grace period's tail), and
    a VM destroyed before that waits for it at exit (measured with the flat reset guest:
    23 ms to destroy the VM at once, 15 ms 30 ms later; the PIT's own teardown is the
    15 ms). Hence also the coalesced zone here rather than with the UART."""
    for cap, name in REQUIRED_CAPS:
        if not kvm.check_extension(cap):
            raise KvmUnavailableError(f"this host's KVM lacks the {name} capability kvmm needs")
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(TSS_ADDR)
        if kvm.check_extension(K.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        for slot, region in enumerate(mem.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region))
        vm.create_irqchip()
        vm.create_pit2()
        if coalesce_uart and kvm.check_extension(K.KVM_CAP_COALESCED_MMIO) and kvm.check_extension(K.KVM_CAP_COALESCED_PIO):
            vm.coalesce_pio(COM1.base, 1)
    except BaseException:
        vm.close()
        raise
    return vm


class PreparedVm(NamedTuple):
    """Guest RAM and the VM around it, made ahead of a :class:`kvmm.vm.Machine`."""

    mem: GuestMemory
    kvm: Kvm
    vm: Vm

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()
        self.mem.close()


def prepare_vm(mem_size: int, hugepages: bool = False, coalesce_uart: bool = False) -> PreparedVm:
    """Allocate guest RAM (the user's input is checked first) and create the VM for it
    (:func:`create_vm`; ``coalesce_uart`` as the machine's ``exitless``)."""
    return vm_around(GuestMemory.allocate(mem_size, hugepages), coalesce_uart)


def vm_around(mem: GuestMemory, coalesce_uart: bool = False) -> PreparedVm:
    """A VM made for ``mem`` (:func:`create_vm`), owning it from here: ``mem`` is closed
    if the VM cannot be made."""
    try:
        kvm = Kvm()
        try:
            return PreparedVm(mem, kvm, create_vm(kvm, mem, coalesce_uart))
        except BaseException:
            kvm.close()
            raise
    except BaseException:
        mem.close()
        raise

# --- GDT ---------------------------------------------------------------------------------
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_CODE64 = 0xA09B  # G, L, P, S, type 0xB (execute/read, accessed)
GDT_DATA = 0xC093  # G, D/B, P, S, type 0x3 (read/write, accessed)
GDT_TSS = 0x808B  # G, P, type 0xB (busy 64-bit TSS)

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

IDENTITY_MAP_GIB = 4  # 2 MiB pages covering the first 4 GiB


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (
        ((base & 0xFF00_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
        | ((limit & 0xF_0000) << 32)
        | ((flags & 0xF0FF) << 40)
    )


def boot_gdt() -> list[int]:
    return [0, 0, gdt_entry(GDT_CODE64, 0, 0xFFFFF), gdt_entry(GDT_DATA, 0, 0xFFFFF), gdt_entry(GDT_TSS, 0, 0xFFFFF)]


def segment_from_gdt(entry: int, selector: int) -> dict[str, int]:
    """A ``struct kvm_segment`` initialiser equivalent to loading ``entry``."""
    access = (entry >> 40) & 0xFF
    flags = (entry >> 52) & 0xF
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF_0000)
    g = (flags >> 3) & 1
    present = (access >> 7) & 1
    return {
        "base": ((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        "limit": (limit << 12) | 0xFFF if g else limit,
        "selector": selector,
        "type": access & 0xF,
        "present": present,
        "dpl": (access >> 5) & 3,
        "db": (flags >> 2) & 1,
        "s": (access >> 4) & 1,
        "l": (flags >> 1) & 1,
        "g": g,
        "avl": flags & 1,
        "unusable": 0 if present else 1,
    }


def write_boot_tables(mem: GuestMemory) -> None:
    """The boot GDT and the identity-mapping page tables (PML4 -> PDPT -> 4 PDs)."""
    gdt = boot_gdt()
    mem.write(GDT_ADDR, struct.pack(f"<{len(gdt)}Q", *gdt))
    pml4, pdpt = PML4_ADDR, PML4_ADDR + 0x1000
    pd0 = pdpt + 0x1000
    mem.fill(pml4, 0x1000 * (2 + IDENTITY_MAP_GIB))
    mem.write_u64(pml4, pdpt | 0x3)  # present, writable
    for i in range(IDENTITY_MAP_GIB):
        mem.write_u64(pdpt + 8 * i, (pd0 + 0x1000 * i) | 0x3)
        entries = [((i * 512 + j) << 21) | 0x83 for j in range(512)]  # present, writable, 2 MiB page
        mem.write(pd0 + 0x1000 * i, struct.pack("<512Q", *entries))


def setup_real_mode(vcpu: Vcpu, segment: int) -> None:
    """Real mode at ``segment``:0000 with every segment register there (kvmtool's flat
    binary entry); the rest of the vCPU keeps its reset state."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector = segment
        seg.base = segment << 4
        seg.limit = 0xFFFF
    vcpu.set_sregs(sregs)
    regs = ffi.new("struct kvm_regs *")
    regs.rip = 0
    regs.rsp = 0xFFF0
    regs.rflags = 0x2
    vcpu.set_regs(regs)


MULTIBOOT_EAX = 0x2BADB002  # Multiboot 0.6.96, 3.2: "the OS image was loaded by a Multiboot-compliant boot loader"


def setup_protected_mode(vcpu: Vcpu, entry: int, info: int, gdt_addr: int, gdt: tuple[int, ...],
                         code_selector: int = 0x08, data_selector: int = 0x10) -> None:
    """The machine state of Multiboot 0.6.96, 3.2: EAX = 0x2BADB002, EBX = the
    ``multiboot_info`` address; CS a 32-bit read/execute segment and DS/ES/FS/GS/SS
    32-bit read/write segments, all with offset 0 and limit 0xFFFFFFFF; CR0 with PE set
    and PG clear; EFLAGS with VM and IF clear. GDTR points at ``gdt`` (written at
    ``gdt_addr`` by the loader), so the selectors are valid until the OS loads its own;
    IDTR is empty (3.2: the OS must set up its own IDT before enabling interrupts); ESP
    is undefined by the specification and left 0."""
    sregs = vcpu.get_sregs()
    _load_flat_segments(sregs, gdt, code_selector, data_selector)
    sregs.gdt.base = gdt_addr
    sregs.gdt.limit = len(gdt) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_ET  # paging off (3.2), caches on
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)

    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry
    regs.rax = MULTIBOOT_EAX
    regs.rbx = info
    regs.rflags = 0x2  # reserved bit 1; IF and VM clear
    vcpu.set_regs(regs)


def _load_flat_segments(sregs: Any, gdt: Sequence[int], code_selector: int, data_selector: int) -> None:
    """CS from the code descriptor, DS/ES/FS/GS/SS from the data descriptor of ``gdt``."""
    code = segment_from_gdt(gdt[code_selector >> 3], code_selector)
    data = segment_from_gdt(gdt[data_selector >> 3], data_selector)
    for name, value in code.items():
        setattr(sregs.cs, name, value)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        for name, value in data.items():
            setattr(seg, name, value)


def setup_long_mode(vcpu: Vcpu, entry: int, boot_params: int) -> None:
    """Registers for the 64-bit entry of the boot protocol."""
    sregs = vcpu.get_sregs()
    gdt = boot_gdt()
    _load_flat_segments(sregs, gdt, BOOT_CS, BOOT_DS)
    tss = segment_from_gdt(gdt[BOOT_TSS >> 3], BOOT_TSS)
    for name, value in tss.items():
        setattr(sregs.tr, name, value)
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(gdt) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry
    regs.rsi = boot_params
    regs.rsp = BOOT_STACK
    regs.rbp = BOOT_STACK
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = 0x37F  # FNINIT state
    fpu.mxcsr = 0x1F80  # all SSE exceptions masked
    vcpu.set_fpu(fpu)


MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6


def boot_msrs() -> dict[int, int]:
    """MSRs at their reset values, fast strings on, MTRRs enabled with write-back default."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
    }


APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(value: int, mode: int) -> int:
    return (value & ~0x700) | (mode << 8)


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as the MP spec's virtual wire."""
    lapic = vcpu.get_lapic()
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        raw = bytes(lapic.regs[reg : reg + 4])
        value = _set_delivery_mode(int.from_bytes(raw, "little"), mode)
        lapic.regs[reg : reg + 4] = value.to_bytes(4, "little")
    vcpu.set_lapic(lapic)


CPUID_HYPERVISOR = 1 << 31


KVM_CPUID_FEATURES = 0x40000001


def setup_cpuid(kvm: Kvm, vcpu: Vcpu, ncpus: int, supported: Any = None, hidden_kvm_features: int = 0) -> None:
    """Host-supported CPUID with this vCPU's APIC id and topology filled in, less the KVM
    paravirt features in ``hidden_kvm_features``."""
    cpuid = supported if supported is not None else kvm.supported_cpuid()
    mine = ffi.new("struct kvm_cpuid2 *", {"nent": cpuid.nent, "entries": cpuid.nent})
    for i in range(cpuid.nent):
        e = mine.entries[i]
        ffi.memmove(ffi.addressof(e), ffi.addressof(cpuid.entries[i]), ffi.sizeof("struct kvm_cpuid_entry2"))
        if e.function == 1:
            # EBX[31:24] initial APIC id, [23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpu.id << 24) | ((ncpus & 0xFF) << 16)
            e.ecx |= CPUID_HYPERVISOR
            if ncpus > 1:
                e.edx |= 1 << 28  # HTT: the EBX[23:16] count is valid
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu.id  # x2APIC id
        elif e.function == KVM_CPUID_FEATURES:
            e.eax &= ~hidden_kvm_features
    vcpu.set_cpuid2(mine)


# --- MP table (Intel MultiProcessor Specification 1.4, chapter 4) -------------------------
MP_APIC_BASE = LAPIC_ADDR
MP_IOAPIC_BASE = IOAPIC_ADDR
MP_APIC_VERSION = 0x14
MP_IOAPIC_VERSION = 0x11
MP_CPU_ENABLED = 1
MP_CPU_BSP = 2
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
ISA_IRQS = 16
# PCI INTx: level-triggered, active high (KVM's IOAPIC ignores polarity; QEMU declares
# its PCI links ActiveHigh too). MP spec 4.3.4: polarity bits 1:0 = 01, trigger 3:2 = 11.
MP_PCI_IRQ_FLAGS = 0x0D


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(ncpus: int, base: int = EBDA_START, pci_irqs: list[tuple[int, int, int]] | None = None) -> bytes:
    """The MP floating pointer followed by the configuration table, to be placed at ``base``.

    ``pci_irqs`` lists ``(device, pin 0..3 for INTA..INTD, ioapic input)`` for PCI bus 0.
    """
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = MP_CPU_ENABLED | (MP_CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBIIQ", 0, cpu, MP_APIC_VERSION, flags, 0x600, 0x201, 0))
    entries.append(struct.pack("<BB6s", 1, 0, b"PCI   "))
    entries.append(struct.pack("<BB6s", 1, 1, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, MP_IOAPIC_VERSION, 1, MP_IOAPIC_BASE))
    for irq in range(ISA_IRQS):
        entries.append(struct.pack("<BBHBBBB", 3, MP_INT, 0, 1, irq, ioapic_id, irq))
    for dev, pin, gsi in pci_irqs or []:
        # PCI source irq: bits 1:0 the pin (INTA=0), bits 6:2 the device.
        entries.append(struct.pack("<BBHBBBB", 3, MP_INT, MP_PCI_IRQ_FLAGS, 0, (dev << 2) | pin, ioapic_id, gsi))
    entries.append(struct.pack("<BBHBBBB", 4, MP_EXTINT, 0, 1, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", 4, MP_NMI, 0, 1, 0, 0xFF, 1))
    body = b"".join(entries)
    table_addr = base + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0, b"KVMM    ", b"KVMM-VM     ", 0, 0, len(entries), MP_APIC_BASE, 0, 0, 0))
    header[7] = _checksum(bytes(header) + body)
    mpf = bytearray(struct.pack("<4sIBBBBBBBB", b"_MP_", table_addr, 1, 4, 0, 0, 0, 0, 0, 0))
    mpf[10] = _checksum(bytes(mpf))
    return bytes(mpf) + bytes(header) + body


def setup_boot_vcpu(vcpu: Vcpu, kind: str, entry: int, boot_params: int, msrs: dict[int, int]) -> None:
    """A vCPU as a boot finds it: MSRs (``msrs``, those KVM takes), FNINIT FPU state, the
    LAPIC's virtual wire; vCPU 0 in real mode at the flat image (``kind`` "flat"), in
    32-bit protected mode at a multiboot kernel's ``entry`` ("multiboot", ``boot_params``
    its multiboot_info), or in long mode at the kernel's 64-bit ``entry``. The others wait for the guest's INIT/SIPI
    (KVM keeps them in the wait-for-SIPI state)."""
    refused = vcpu.set_msrs_each(msrs)
    if refused:
        LOG.debug("KVM refused MSR(s) %s; left at their reset values", ", ".join(f"{i:#x}" for i in refused))
    setup_fpu(vcpu)
    setup_lapic(vcpu)
    if vcpu.id == 0 and kind == "flat":
        setup_real_mode(vcpu, FLAT_SEGMENT)
    elif vcpu.id == 0 and kind == "multiboot":  # boot_params: the multiboot_info, the GDT before it
        from .loader import multiboot as mb

        setup_protected_mode(vcpu, entry, boot_params, boot_params - mb.INFO_OFFSET, mb.GDT_FLAT,
                             mb.CODE_SELECTOR, mb.DATA_SELECTOR)
    elif vcpu.id == 0:
        setup_long_mode(vcpu, entry, boot_params)
