"""The KVM ABI structures (x86-64) as C declarations for cffi, transcribed from
``<linux/kvm.h>`` and ``<asm/kvm.h>``.

cffi parses C with pycparser, which costs tens of milliseconds at every start, so
``kvmm/kvm/_abi.py`` holds these declarations pre-parsed (cffi's out-of-line ABI mode: a
generated pure-Python module, no C compiler). After editing :data:`CDEF`, regenerate it:

    scripts/gen-abi

``kvmm.kvm.structs`` falls back to parsing :data:`CDEF` (and logs that) when ``_abi.py`` is
stale, and ``tests/kvm/test_structs.py`` fails until it is regenerated.
"""

from __future__ import annotations

import os
import zlib

CDEF = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

struct kvm_pic_state {
    uint8_t last_irr;
    uint8_t irr;
    uint8_t imr;
    uint8_t isr;
    uint8_t priority_add;
    uint8_t irq_base;
    uint8_t read_reg_select;
    uint8_t poll;
    uint8_t special_mask;
    uint8_t init_state;
    uint8_t auto_eoi;
    uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode;
    uint8_t init4;
    uint8_t elcr;
    uint8_t elcr_mask;
};

struct kvm_ioapic_state {
    uint64_t base_address;
    uint32_t ioregsel;
    uint32_t id;
    uint32_t irr;
    uint32_t pad;
    uint64_t redirtbl[24];
};

struct kvm_irqchip {
    uint32_t chip_id;
    uint32_t pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_lapic_state {
    uint8_t regs[1024];
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    uint32_t pio;  /* a union with pad in <linux/kvm.h> */
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t devid;
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t count_latched;
    uint8_t status_latched;
    uint8_t status;
    uint8_t read_state;
    uint8_t write_state;
    uint8_t write_latch;
    uint8_t rw_mode;
    uint8_t mode;
    uint8_t bcd;
    uint8_t gate;
    int64_t count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    uint64_t padding[16];
};

struct kvm_xsave {
    uint32_t region[1024];
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t insn_size;
            uint8_t insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];
        } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    char s[2048];
};

/* libc's ioctl for an integer argument (fcntl.ioctl takes a C int, and KVM_SET_TSS_ADDR's
   0xfffbd000 is not one). Declared with a fixed third argument as kvmm calls it: on x86-64
   an unsigned long goes in the same register either way. */
int ioctl(int fd, unsigned long request, unsigned long arg);
"""


def cdef_digest() -> str:
    """A fingerprint of :data:`CDEF` (staleness of the generated module, not security:
    CRC-32 costs nothing at start, where hashlib would load OpenSSL)."""
    return f"{zlib.crc32(CDEF.encode()):08x}"


def generate_ioctl_numbers(declared: dict[tuple[str, int, int, int], int],
                           path: str = os.path.join(os.path.dirname(__file__), "_ioctl_numbers.py")) -> None:
    """Write ioctl-opt's number for each declaration of kvmm.kvm.ioctls (``scripts/gen-abi``)."""
    import ioctl_opt

    lines = ["# auto-generated by scripts/gen-abi: ioctl-opt's number for each declaration of kvmm.kvm.ioctls",
             "NUMBERS = {"]
    for kind, type_, nr, size in sorted(declared):
        fn = getattr(ioctl_opt, kind)
        number = fn(type_, nr) if kind == "IO" else fn(type_, nr, bytearray(size))
        lines.append(f"    ({kind!r}, {type_:#04x}, {nr:#04x}, {size}): {number:#010x},")
    lines.append("}")
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def generate(path: str = os.path.join(os.path.dirname(__file__), "_abi.py")) -> None:
    """Write the pre-parsed module (``scripts/gen-abi``). (No pathlib here: this module is
    imported at every start, and pathlib costs milliseconds to import.)"""
    import cffi

    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("kvmm.kvm._abi", None)
    builder.emit_python_code(path)
    with open(path, "a", encoding="ascii") as f:
        f.write(f"\n# kvmm.kvm.cdef.cdef_digest() of the declarations this module was generated from\nCDEF_DIGEST = {cdef_digest()!r}\n")
