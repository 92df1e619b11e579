/* popcnt (Linux's hweight): the count in 64-, 32- (zero-extended) and 16-bit (upper bits
 * kept) forms and from memory; ZF for a zero source, OF SF AF CF PF cleared (Intel SDM
 * vol. 2B, POPCNT). */
#include "guest.h"
#include "trap.h"

#define ARITH 0x8d5ul /* OF SF ZF AF PF CF */

static u64 popcnt_flags(u64 src, u64 *out, u64 *flags)
{
    u64 dst = 0x123456789abc0000;
    __asm__ volatile("pushq %[all]; popfq; popcnt %[s], %[d]; pushfq; popq %[f]"
                     : [d] "+r"(dst), [f] "=r"(*flags) : [s] "r"(src), [all] "r"(0x2ul | ARITH) : "cc");
    *out = dst;
    return dst;
}

ENTRY
{
    install_traps();
    u64 out, flags;
    popcnt_flags(0xf0f0000000000001, &out, &flags);
    check(out == 9 && (flags & ARITH) == 0, "64-bit", flags);
    popcnt_flags(0, &out, &flags);
    check(out == 0 && (flags & ARITH) == 0x40, "zero: ZF only", flags);

    u64 r = 0xffffffffffffffff;
    __asm__ volatile("popcnt %k1, %k0" : "+r"(r) : "r"(0xffffffff00000003ul) : "cc");
    check(r == 2, "32-bit zero-extends", r);
    r = 0x123456789abcffff;
    __asm__ volatile("popcnt %w1, %w0" : "+r"(r) : "r"(0x1fffful) : "cc");
    check(r == 0x123456789abc0010, "16-bit keeps the upper bits", r);

    static u64 word = 0xff00ff;
    __asm__ volatile("popcnt %1, %0" : "=r"(r) : "m"(word) : "cc");
    check(r == 16, "memory source", r);
    finish("popcnt", 20);
}
