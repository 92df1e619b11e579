/* xgetbv: #UD while CR4.OSXSAVE is clear; with it set, XCR0 in EDX:EAX (x87 at least,
 * bit 0 always set) with the upper halves of RAX and RDX cleared; #GP(0) for an XCR
 * that does not exist (Intel SDM vol. 2C, XGETBV). */
#include "guest.h"
#include "trap.h"

ENTRY
{
    install_traps();
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(c & (1u << 26))) {
        puts_serial("xgetbv skipped: no XSAVE in CPUID\n");
        debug_exit(18);
    }
    write_cr4(read_cr4() & ~(1ul << 18));
    u64 v = TRY("xgetbv", "c"(0));
    check(v == 6, "CR4.OSXSAVE clear: #UD", v);

    write_cr4(read_cr4() | (1ul << 18));
    u64 rax, rdx;
    __asm__ volatile("xgetbv" : "=a"(rax), "=d"(rdx) : "a"(~0ul), "d"(~0ul), "c"(0));
    check((rax & 1) && rax >> 32 == 0 && rdx >> 32 == 0, "XCR0 in edx:eax", rax);

    v = TRY("xgetbv", "c"(2));
    check(v == 13 && fault_code == 0, "XCR2: #GP(0)", v);
    finish("xgetbv", 18);
}
