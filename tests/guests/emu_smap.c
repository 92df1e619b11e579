/* stac/clac (SMAP's user-access windows): RFLAGS.AC set, then cleared, no other system flag
 * changed (Intel SDM vol. 2A, CLAC; vol. 2B, STAC). */
#include "guest.h"
#include "trap.h"

ENTRY
{
    install_traps();
    u64 keep = ~0x8d5ul; /* the arithmetic flags change with the code between the reads */
    u64 before = read_flags() & ~(1ul << 18) & keep;
    __asm__ volatile("clac");
    __asm__ volatile("stac");
    u64 after_stac = read_flags() & keep;
    __asm__ volatile("clac");
    u64 after_clac = read_flags() & keep;
    check(after_stac == (before | (1ul << 18)), "stac sets AC only", after_stac);
    check(after_clac == before, "clac clears AC only", after_clac);
    finish("clac/stac", 19);
}
