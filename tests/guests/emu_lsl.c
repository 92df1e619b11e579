/* lsl and lar (Linux's paranoid entry reads the CPU number as a GDT entry's limit with
 * lsl on CPUs without RDPID): a GDT of kvmm's boot entries plus test descriptors; the
 * limit (4-KiB units with G) or the access rights of each valid selector with ZF set, ZF
 * clear and the destination unchanged for the null selector, a selector past the limit,
 * RPL above DPL and a type the instruction does not take; 16-bit destinations keep the
 * upper bits; a memory source (Intel SDM vol. 2A, LAR and LSL). */
#include "guest.h"
#include "trap.h"

#define ZF 0x40ul
#define DESC(limit, type, s, dpl, flags) \
    (((u64)(limit) & 0xffff) | ((u64)(((type) << 8) | ((s) << 12) | ((dpl) << 13) | 0x8000 | \
                                      ((limit) & 0xf0000) | ((flags) << 20)) << 32))

enum { CODE = 0x10, DATA = 0x18, CPUNODE = 0x30, TSS64 = 0x38, GATE = 0x48, CONFORMING = 0x58, DATA0 = 0x60 };
static u64 gdt[13] __attribute__((aligned(16)));

struct result { u64 value, flags; };

#define CHECKED(insn, sel, start)                                                                   \
    ({                                                                                              \
        struct result r_ = { (start), 0 };                                                          \
        __asm__ volatile("pushq $0x2; popfq; " insn " %[s], %[d]; pushfq; popq %[f]"                \
                         : [d] "+r"(r_.value), [f] "=r"(r_.flags) : [s] "r"((u64)(sel)) : "cc");    \
        r_;                                                                                         \
    })

ENTRY
{
    install_traps();
    struct __attribute__((packed)) { u16 limit; u64 base; } gdtr;
    __asm__ volatile("sgdt %0" : "=m"(gdtr));
    for (int i = 0; i < 6; i++) /* kvmm's boot entries: null, null, code 0x10, data 0x18, TSS 0x20 (16 bytes) */
        gdt[i] = ((volatile u64 *)gdtr.base)[i];
    gdt[CPUNODE / 8] = DESC(0x1005, 0x5, 1, 3, 0);  /* CPU 5, node 1, as Linux writes it */
    gdt[TSS64 / 8] = DESC(0x67, 0x9, 0, 0, 0);      /* a 64-bit TSS; its upper half is 0 */
    gdt[GATE / 8] = DESC(0, 0xc, 0, 0, 0);          /* a 64-bit call gate: lar only */
    gdt[CONFORMING / 8] = DESC(0xfff, 0xe, 1, 0, 0);
    gdt[DATA0 / 8] = DESC(0xabcde, 0x3, 1, 0, 0xc); /* G, D/B */
    gdtr.base = (u64)gdt;
    gdtr.limit = sizeof(gdt) - 1;
    __asm__ volatile("lgdt %0" : : "m"(gdtr));

    const u64 junk = 0xdeadbeefdeadbeef;
    struct result r;
    r = CHECKED("lsl", 0xffff0000 | CPUNODE | 3, junk);
    check(r.value == 0x1005 && (r.flags & ZF), "lsl CPUNODE (32-bit, zero-extended)", r.value);
    r = CHECKED("lsl", CODE, junk);
    check(r.value == 0xffffffff && (r.flags & ZF), "lsl G=1", r.value);
    r = CHECKED("lsl", TSS64, junk);
    check(r.value == 0x67 && (r.flags & ZF), "lsl 64-bit TSS", r.value);
    r = CHECKED("lsl", CONFORMING | 3, junk);
    check(r.value == 0xfff && (r.flags & ZF), "lsl conforming code, RPL 3", r.value);
    r = CHECKED("lsl", 0, junk);
    check(r.value == junk && !(r.flags & ZF), "lsl null selector", r.flags);
    r = CHECKED("lsl", sizeof(gdt), junk);
    check(r.value == junk && !(r.flags & ZF), "lsl past the limit", r.flags);
    r = CHECKED("lsl", DATA0 | 3, junk);
    check(r.value == junk && !(r.flags & ZF), "lsl RPL above DPL", r.flags);
    r = CHECKED("lsl", GATE, junk);
    check(r.value == junk && !(r.flags & ZF), "lsl call gate", r.flags);
    r = CHECKED("lar", GATE, junk);
    check(r.value == 0x8c00 && (r.flags & ZF), "lar call gate", r.value);
    r = CHECKED("lar", DATA0, junk);  /* bits 19:16 are undefined (Intel): not compared */
    check((r.value & ~0xf0000ul) == 0xc09300 && (r.flags & ZF), "lar data", r.value);

    u64 v = junk;
    u64 sel = DATA0;
    __asm__ volatile("lsl %w1, %w0" : "+r"(v) : "r"(sel) : "cc");
    check(v == 0xdeadbeefdeadefff, "lsl 16-bit keeps the upper bits (G: 0xabcdefff)", v);
    v = junk;
    __asm__ volatile("lar %w1, %w0" : "+r"(v) : "r"(sel) : "cc");
    check(v == 0xdeadbeefdead9300, "lar 16-bit: rights & 0xff00", v);
    static u16 selector_in_memory = CPUNODE;
    v = junk;
    __asm__ volatile("lsl %1, %k0" : "+r"(v) : "m"(selector_in_memory) : "cc");
    check(v == 0x1005, "lsl from memory", v);
    finish("lsl/lar", 21);
}
