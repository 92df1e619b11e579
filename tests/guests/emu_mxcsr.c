/* ldmxcsr/stmxcsr (Linux's kernel_fpu_begin loads the default MXCSR): the value round
 * trips; a reserved bit is #GP(0) and leaves MXCSR alone; CR0.TS makes both #NM
 * (Intel SDM vol. 2A/2B, LDMXCSR, STMXCSR). */
#include "guest.h"
#include "trap.h"

ENTRY
{
    install_traps();
    write_cr4(read_cr4() | (1 << 9)); /* CR4.OSFXSR: SSE state usable */
    u32 in = 0x9fc0, out = 0, bad = 0x11f80;

    __asm__ volatile("ldmxcsr %0" : : "m"(in));
    __asm__ volatile("stmxcsr %0" : "=m"(out));
    check(out == 0x9fc0, "round trip", out);

    u64 v = TRY("ldmxcsr (%0)", "r"(&bad));
    check(v == 13 && fault_code == 0, "reserved bit: #GP(0)", v);
    __asm__ volatile("stmxcsr %0" : "=m"(out));
    check(out == 0x9fc0, "reserved bit: MXCSR unchanged", out);

    write_cr0(read_cr0() | (1 << 3)); /* CR0.TS */
    v = TRY("stmxcsr (%0)", "r"(&out));
    check(v == 7, "CR0.TS: #NM", v);
    __asm__ volatile("clts");

    in = 0x1f80;
    __asm__ volatile("ldmxcsr %0" : : "m"(in));
    __asm__ volatile("stmxcsr %0" : "=m"(out));
    check(out == 0x1f80, "default restored", out);
    finish("mxcsr", 17);
}
